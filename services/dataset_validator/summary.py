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
    return DatasetReport(
        valid=report.valid,
        reason=report.reason,
        format=report.format,
        methods=report.methods,
        rows=report.rows,
        train_rows=report.train_rows,
        valid_rows=report.valid_rows,
        test_rows=report.test_rows,
        dropped=report.dropped,
        dropped_reasons=report.dropped_reasons,
        errors=row_errors(report.errors, max_errors),
        error_count=report.error_count,
        error_counts=report.error_counts_by_kind,
        warnings=report.warnings[:max_errors],
        warning_count=report.warning_count,
        warning_counts=report.warning_counts_by_kind,
        preview=report.sample_preview,
        token_stats=report.token_stats,
        token_counter=report.token_counter,
        sha256=report.sha256,
    )


def unreadable(reason: str) -> DatasetReport:
    """The report on a dataset that could not be read at all."""
    return DatasetReport(valid=False, reason=reason, error_count=1,
                         errors=[ContractRowError(file="", message=reason, kind="unreadable")],
                         error_counts={"unreadable": 1})
