"""How a dataset spread over several files is laid out: which file feeds which split.

A directory (or S3 prefix) holds train, valid (or validation, val, dev) and test files named
`<split>.jsonl`, `.json`, `.jsonl.gz`, `.json.gz` or `.parquet`. Without a validation file, the
training file is split by seed ("auto"); with one, each file feeds its own split.
"""

from __future__ import annotations

from .validation import Split

SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid",
               "dev": "valid", "test": "test"}
EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


class DatasetUnavailable(LookupError):
    """The dataset cannot be read at all; `reason` says why, for a person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def split_files(where: str, names: list[str]) -> list[tuple[str, Split]]:
    """The files of `names` (relative to `where`) that make the dataset, with their splits,
    training file first."""
    found: dict[str, list[str]] = {}
    for name in names:
        stem, dot, ext = name.partition(".")
        if dot and f".{ext}" in EXTENSIONS and stem.lower() in SPLIT_NAMES:
            found.setdefault(SPLIT_NAMES[stem.lower()], []).append(name)
    for split, files in found.items():
        if len(files) > 1:
            raise DatasetUnavailable(f"{where} holds {len(files)} {split} files "
                                     f"({', '.join(sorted(files))}); keep one")
    if "train" not in found:
        listed = ", ".join(sorted(names)[:10]) + (", ..." if len(names) > 10 else "")
        raise DatasetUnavailable(f"{where} holds no train file (train.jsonl, train.json, "
                                 "train.jsonl.gz or train.json.gz); it holds: "
                                 f"{listed or 'nothing'}")
    files: list[tuple[str, Split]] = [(found["train"][0], "train" if "valid" in found else "auto")]
    files += [(found[split][0], split) for split in ("valid", "test") if split in found]
    return files
