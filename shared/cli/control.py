"""tunebus cancel."""

from __future__ import annotations

from typing import Annotated

import typer
from nats.errors import NoRespondersError, TimeoutError
from rich.console import Console
from tunebus.contracts import subjects
from tunebus.contracts.training import CancelReply, CancelTraining
from tunebus.shared.cli import client
from tunebus.shared.settings import Settings

from .watching import watch_job

console = Console()
err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root `tunebus` app."""
    app.command()(cancel)


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to cancel.")],
    reason: Annotated[str, typer.Option(help="Recorded in the job's TrainingCancelled event.")] = "cancelled by request",
    wait: Annotated[bool, typer.Option(help="Follow the job until it has stopped.")] = False,
) -> None:
    """Cancel a job's training: it stops within seconds and keeps its last checkpoint."""
    settings = Settings()
    try:
        reply = client.run(_cancel(settings, CancelTraining(job_id=job_id, reason=reason), wait))
    except (NoRespondersError, TimeoutError):
        err.print("[red]error:[/] no trainer answered: is a trainer running against this NATS?")
        raise typer.Exit(1) from None
    if reply.status != "cancelling":
        err.print(f"[yellow]{reply.status}:[/] {reply.message}")
        raise typer.Exit(1)


async def _cancel(settings: Settings, command: CancelTraining, wait: bool) -> CancelReply:
    async with client.connect(settings) as nc:
        reply = await client.ask(nc, subjects.TRAINER_CANCEL, command, CancelReply)
        if reply.status == "cancelling":
            console.print(reply.message)
            if wait:
                await watch_job(nc, command.job_id, console)
        return reply
