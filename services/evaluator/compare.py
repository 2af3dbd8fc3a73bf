"""How an adapter compares with its base model: plain arithmetic on the two measurements."""

from __future__ import annotations

from tunebus.contracts import EvaluationCompleted, LossMetrics


def compare(job_id: str, adapter_name: str, before: LossMetrics, after: LossMetrics,
            *, examples: int, tokens: int, report_uri: str | None) -> EvaluationCompleted:
    relative = {
        metric: (getattr(after, metric) - getattr(before, metric)) / getattr(before, metric)
        for metric in ("loss", "perplexity")
        if getattr(before, metric)
    }
    return EvaluationCompleted(
        job_id=job_id,
        adapter_name=adapter_name,
        examples=examples,
        tokens=tokens,
        before=before,
        after=after,
        relative_change=relative,
        improved=after.loss < before.loss,
        report_uri=report_uri,
    )
