"""The validator's reports in the words of the contracts: rejection errors, the summary a
validated dataset carries, and the request/reply (and CLI) report."""

from __future__ import annotations

from tunebus.contracts import RowError as ContractRowError
from tunebus.contracts.dataset import DatasetReport

from .validation import RowError, ValidationReport


def row_errors(errors: list[RowError], limit: int) -> list[ContractRowError]:
    return [ContractRowError(file=e.file or "", line=e.line, index=e.index, field=e.field,
                             message=e.message, kind=e.kind) for e in errors[:limit]]


def dataset_report(report: ValidationReport, max_errors: int = 50) -> DatasetReport:
    return DatasetReport.model_validate(report.contract_fields(max_errors))


def unreadable(reason: str) -> DatasetReport:
    """The report on a dataset that could not be read at all."""
    return DatasetReport(valid=False, reason=reason, error_count=1,
                         errors=[ContractRowError(file="", message=reason, kind="unreadable")],
                         error_counts={"unreadable": 1})
