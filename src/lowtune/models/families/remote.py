"""Families lowtune loads only through their own remote code (an explicit --trust-remote-code), and why.

model_type -> (display name, why no exact native mapping, the transformers version its remote code targets).
"""

from __future__ import annotations

REMOTE_ONLY: dict[str, tuple[str, str, str]] = {
    "chatglm": ("ChatGLM2/3", "GLM blocks with interleaved partial rotary and prefix-style multi-query attention "
                "have no transformers class with identical numerics",
                "transformers 4.30-4.33 (its tokenizer breaks from 4.34)"),
}
