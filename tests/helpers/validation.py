"""Validating a dataset in a test: rows or bytes in, the validator's report and rows out."""

from __future__ import annotations

import io
import json
from pathlib import Path

from tunebus.services.dataset_validator.validation import ValidationReport, validate

FIXTURES = Path(__file__).parent.parent / "fixtures" / "datasets"


def check(data: bytes | list[dict], name: str = "data.jsonl",
          **kwargs) -> tuple[ValidationReport, list[dict]]:
    """The report and every canonical row written (train and valid together, in order)."""
    if isinstance(data, list):
        data = "".join(json.dumps(r) + "\n" for r in data).encode()
    out = io.BytesIO()
    report = validate([(name, io.BytesIO(data))], train_sink=out, valid_sink=out,
                      valid_fraction=0.0, **kwargs)
    return report, [json.loads(line) for line in out.getvalue().splitlines()]


def fixture(name: str, **kwargs) -> tuple[ValidationReport, list[dict]]:
    return check((FIXTURES / name).read_bytes(), name, **kwargs)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}
