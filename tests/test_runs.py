"""runs.staged_dir and runs.atomic_file: a folder or file appears whole or not at all."""

import pytest

from lowtune.runs import atomic_file, staged_dir


def test_staged_dir_publishes_on_success_and_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with staged_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "new"
    with pytest.raises(RuntimeError), staged_dir(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (final / "a.txt").read_text() == "new"  # the older folder is untouched
    with staged_dir(final) as tmp:
        (tmp / "b.txt").write_text("replacement")
    assert [p.name for p in final.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left


def test_staged_dir_for_a_cache_keeps_the_first_folder_published(tmp_path):
    final = tmp_path / "cache-key"
    with staged_dir(final, replace=False) as first:
        (first / "x").write_text("first")
    with staged_dir(final, replace=False) as second:  # another process finished first
        (second / "x").write_text("second")
    assert (final / "x").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["cache-key"]


def test_atomic_file_replaces_only_when_the_block_succeeds(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with atomic_file(path) as handle:
        handle.write("one\n")
    with pytest.raises(ValueError), atomic_file(path) as handle:
        handle.write("two\n")
        raise ValueError
    assert path.read_text() == "one\n"
    with atomic_file(tmp_path / "loss.png", "wb") as handle:
        handle.write(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]
