"""Row lengths in tokens: the base model's own tokenizer when there is one, else an estimate.

Only `tokenizer.json` is read, with the `tokenizers` library (the `local` extra); no ML stack
(mlx, torch, transformers) is ever imported here, and the validator runs without any of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class TokenCounter(Protocol):
    name: str  # what the manifest says counted the tokens

    def lengths(self, texts: list[str]) -> list[int]: ...


class TokenizerCounter:
    """Exact token counts from a Hugging Face fast tokenizer (special tokens not added)."""

    def __init__(self, tokenizer, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name

    def lengths(self, texts: list[str]) -> list[int]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [len(e.ids) for e in encodings]


CHARS_PER_TOKEN = 4
ESTIMATE = "estimate: characters / 4"


def estimate(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def load_tokenizer(model_dir: Path, name: str) -> TokenizerCounter | None:
    """The tokenizer in `model_dir`, or None when the directory has no tokenizer.json or the
    `tokenizers` package is not installed (the caller then estimates)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        return TokenizerCounter(Tokenizer.from_file(str(path)), name)
    except Exception:  # a tokenizer.json this version cannot read: estimate instead
        return None
