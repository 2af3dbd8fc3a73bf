"""Rows on disk as the trainer reads them (train.jsonl, valid.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path


def write_rows(data_dir: Path, rows: list[dict], n_valid: int = 4) -> Path:
    """rows[:n_valid] as valid.jsonl and the rest as train.jsonl, the layout backends read."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[n_valid:]), ("valid", rows[:n_valid])):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return data_dir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
