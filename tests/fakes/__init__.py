"""Reusable fakes for tests: checkpoint fabricators (`checkpoints`), a local hub server (`hub`), tiny SentencePiece
models (`spm`), and pytest fixtures over them (`fixtures`; import the ones a test module needs)."""
