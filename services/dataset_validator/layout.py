"""How a dataset spread over several files is laid out: which file feeds which split.

A directory (or S3 prefix) holds train, valid (or validation, val, dev) and test files named
`<split>.jsonl`, `.json`, `.jsonl.gz`, `.json.gz` or `.parquet`, or a split in shards as Hugging
Face writes them (`train-00000-of-00002.parquet`, ...; every shard there, read in order). Without
a validation file, the training file is split by seed ("auto"); with one, each file feeds its
own split.
"""

from __future__ import annotations

import re

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
    training files first."""
    found: dict[str, list[str]] = {}
    shards: dict[str, dict[int, tuple[int, str]]] = {}  # split -> {shard: (of, name)}
    for name in names:
        stem, dot, ext = name.partition(".")
        if not dot or f".{ext}" not in EXTENSIONS:
            continue
        if stem.lower() in SPLIT_NAMES:
            found.setdefault(SPLIT_NAMES[stem.lower()], []).append(name)
        elif (shard := _SHARD.fullmatch(stem.lower())) and shard["split"] in SPLIT_NAMES:
            split = SPLIT_NAMES[shard["split"]]
            shards.setdefault(split, {})[int(shard["index"])] = (int(shard["of"]), name)
    for split, parts in shards.items():
        if split in found:
            raise DatasetUnavailable(f"{where} holds both {found[split][0]} and {split} shards; "
                                     "keep one or the other")
        counts = {of for of, _ in parts.values()}
        if len(counts) > 1 or set(parts) != set(range(next(iter(counts)))):
            raise DatasetUnavailable(f"{where} holds {len(parts)} {split} shards "
                                     f"({', '.join(sorted(n for _, n in parts.values()))}), "
                                     f"not a whole set")
        found[split] = [parts[i][1] for i in sorted(parts)]
    for split, files in found.items():
        if len(files) > 1 and split not in shards:
            raise DatasetUnavailable(f"{where} holds {len(files)} {split} files "
                                     f"({', '.join(sorted(files))}); keep one")
    if "train" not in found:
        listed = ", ".join(sorted(names)[:10]) + (", ..." if len(names) > 10 else "")
        raise DatasetUnavailable(f"{where} holds no train file (train.jsonl, train.json, "
                                 "train.jsonl.gz, train.json.gz, train.parquet or train-*-of-*."
                                 f"parquet shards); it holds: {listed or 'nothing'}")
    train_split: Split = "train" if "valid" in found else "auto"
    files: list[tuple[str, Split]] = [(name, train_split) for name in found["train"]]
    files += [(name, split) for split in ("valid", "test") for name in found.get(split, ())]
    return files


_SHARD = re.compile(r"(?P<split>[a-z]+)-(?P<index>\d{5})-of-(?P<of>\d{5})")
