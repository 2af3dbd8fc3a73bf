"""`tunebus watch`: a job's events as a live progress bar."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunebus.shared import client


async def watch_job(nc, job_id: str, console: Console):
    """Print each stage as it happens; return the job's final event (None if the stream ends)."""
    final = None
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"), TimeRemainingColumn(), console=console, transient=False,
    ) as progress:
        task = None
        async for event in client.follow(nc, job_id):
            data = event.data
            kind = event.type.removeprefix("tunebus.").removesuffix(".v1")
            if kind == "training.progress":
                if task is None:
                    task = progress.add_task("training", total=data.total_steps, loss="")
                loss = f"loss {data.train_loss:.3f}" if data.train_loss is not None else ""
                progress.update(task, completed=data.step, loss=loss)
                continue
            progress.console.print(f"[bold]{kind}[/] {_describe(kind, data)}")
            if kind == "training.started":
                task = progress.add_task("training", total=data.total_steps, loss="")
            final = event
    return final


def _describe(kind: str, data) -> str:
    match kind:
        case "training.requested":
            return f"adapter {data.adapter_name} on {data.base_model}"
        case "dataset.validated":
            d = data.dataset
            return f"{d.format}, {d.rows} rows → train {d.train_rows} / valid {d.valid_rows}"
        case "dataset.rejected":
            lines = [data.reason, *(f"  {e.file}:{e.line if e.line is not None else e.index}"
                                    f" {e.field or ''} {e.message}" for e in data.errors[:10])]
            return "\n".join(lines)
        case "training.started":
            return f"{data.backend} on {data.worker}, {data.total_steps} steps"
        case "training.completed":
            m = data.metrics
            return f"loss {m.first_loss:.3f} → {m.final_loss:.3f} in {m.seconds:.1f}s ({m.tokens_per_second:.0f} tok/s)"
        case "training.failed" | "training.cancelled":
            return data.reason
        case "evaluation.completed":
            if data.skipped:
                return "skipped"
            return (f"perplexity {data.before.perplexity:.2f} → {data.after.perplexity:.2f} "
                    f"({data.relative_change.get('perplexity', 0):+.1%})")
        case "evaluation.failed":
            return data.reason
        case "adapter.registered":
            return data.entry.ref
        case "deadletter":
            return f"{data.service} could not accept {data.original_subject}: {data.reason}; " + "; ".join(data.errors[:5])
    return ""
