"""`tunebus watch`: a job's events as a live progress bar."""

from __future__ import annotations

from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Column
from tunebus.shared.cli import client


async def watch_job(nc, job_id: str, console: Console, answering: str | None = None):
    """Print each stage as it happens, training as a live bar; return the job's final event
    (None if the stream ends). `answering`: see `client.follow`."""
    final = None
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(bar_width=24),
        MofNCompleteColumn(), TextColumn("[cyan]{task.fields[eta]}"),
        # Last and elastic, so that a narrow terminal cuts the least important figures.
        TextColumn("{task.fields[stats]}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
        console=console, transient=False, expand=True,
    ) as progress:
        task = None
        async for event in client.follow(nc, job_id, answering=answering):
            data = event.data
            kind = event.type.removeprefix("tunebus.").removesuffix(".v1")
            if kind == "training.progress":
                if task is None:
                    task = progress.add_task("training", total=data.total_steps, stats="", eta="")
                progress.update(task, total=data.total_steps, completed=data.step,
                                stats=progress_stats(data), eta=eta_text(data.eta_seconds))
                continue
            progress.console.print(f"[bold]{kind}[/] {_describe(kind, data)}")
            if kind == "training.started":
                if task is not None:  # a resumed run: one bar, continued
                    progress.remove_task(task)
                task = progress.add_task("training", total=data.total_steps,
                                         completed=data.resumed_from_step or 0, stats="", eta="")
            final = event
    return final


def progress_stats(data) -> str:
    """One line of the figures a progress event carries, in the order people look for them."""
    parts = []
    if data.train_loss is not None:
        parts.append(f"loss {data.train_loss:.3f}")
    if data.val_loss is not None:
        parts.append(f"val {data.val_loss:.3f}")
    if data.reward is not None:
        parts.append(f"reward {data.reward:.3f}")
    if data.learning_rate is not None:
        parts.append(f"lr {data.learning_rate:.1e}")
    if data.tokens_per_second is not None:
        parts.append(f"{data.tokens_per_second:,.0f} tok/s")
    if data.peak_memory_gb is not None:
        parts.append(f"{data.peak_memory_gb:.2f} GB")
    if data.epoch is not None:
        parts.append(f"epoch {data.epoch:.2f}")
    return " · ".join(parts)


def eta_text(seconds: float | None) -> str:
    return "" if seconds is None else f"ETA {timedelta(seconds=round(seconds))}"


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
            resumed = (f", resumed from step {data.resumed_from_step}"
                       if data.resumed_from_step else "")
            return f"{data.backend} on {data.worker}, {data.total_steps} steps{resumed}"
        case "training.completed":
            m = data.metrics
            reward = (f", reward {m.first_reward:.3f} → {m.final_reward:.3f}"
                      if m.first_reward is not None and m.final_reward is not None else "")
            return (f"loss {m.first_loss:.3f} → {m.final_loss:.3f}{reward} in {m.seconds:.1f}s "
                    f"({m.tokens_per_second:.0f} tok/s)")
        case "training.cancelled":
            at = f" at step {data.step}" if data.step is not None else " before training"
            kept = (f"; checkpoint of step {data.checkpoint_step} kept at {data.checkpoint_uri}"
                    if data.checkpoint_uri else "")
            return f"{data.reason}{at}{kept}"
        case "training.failed" | "training.refused":
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
