"""`tunebus deadletters list | show | replay`: the messages no service could take, and their
replay once the cause is fixed (who may replay what: shared/replay.py)."""

from __future__ import annotations

import base64
import json
from typing import Annotated

import typer
from nats.errors import NoRespondersError, TimeoutError
from rich.console import Console
from rich.table import Table

from tunebus.shared.cli import client
from tunebus.shared.settings import Settings

console = Console()
err = Console(stderr=True)
deadletters_app = typer.Typer(help="Dead letters: messages a service could not take.",
                              no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root `tunebus` app."""
    app.add_typer(deadletters_app, name="deadletters")


def matches(stored: client.StoredDeadLetter, service: str | None, reason: str | None,
            job: str | None) -> bool:
    """The filters of `deadletters list` (and the dashboard's): service exactly, the reason as
    a case-insensitive substring of the reason or any error, the job id exactly."""
    letter = stored.letter
    if service and letter.service != service:
        return False
    if job and letter.job_id != job:
        return False
    if reason:
        needle = reason.lower()
        return any(needle in text.lower() for text in (letter.reason, *letter.errors))
    return True


def body_text(letter) -> str:
    """The original body as a person reads it: indented JSON, else text, else base64."""
    body = base64.b64decode(letter.body_base64)
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        pass
    try:
        return body.decode()
    except UnicodeDecodeError:
        return f"(not UTF-8; base64) {letter.body_base64}"


@deadletters_app.command("list")
def list_dead_letters(
    service: Annotated[str | None, typer.Option(help="Only those of this service.")] = None,
    reason: Annotated[str | None, typer.Option(help="Only those whose reason or errors contain this.")] = None,
    job: Annotated[str | None, typer.Option(help="Only those of this job id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Every dead letter, oldest first; ID is its sequence in TUNEBUS_DEADLETTER."""
    found = [d for d in client.run(_dead_letters(Settings())) if matches(d, service, reason, job)]
    if as_json:
        for d in found:
            console.print_json(json.dumps({"id": d.sequence, "time": d.event.time.isoformat(),
                                           **d.letter.model_dump(exclude={"body_base64"})}))
        return
    table = Table("id", "time", "service", "job", "original subject", "reason", "deliveries")
    for d in found:
        table.add_row(str(d.sequence), f"{d.event.time:%Y-%m-%d %H:%M:%S}", d.letter.service,
                      d.letter.job_id, d.letter.original_subject, d.letter.reason[:80],
                      str(d.letter.deliveries))
    console.print(table)
    if not found:
        console.print("no dead letters" + (" match" if service or reason or job else ""))


@deadletters_app.command("show")
def show_dead_letter(
    dead_id: Annotated[int, typer.Argument(metavar="ID", help="The id `deadletters list` shows.")],
    as_json: Annotated[bool, typer.Option("--json", help="The dead letter event as JSON.")] = False,
) -> None:
    """One dead letter: why, where it came from, its headers and the original message."""
    stored = client.run(_dead_letter(Settings(), dead_id))
    if stored is None:
        err.print(f"[red]error:[/] no dead letter with id {dead_id} (see `tunebus deadletters list`)")
        raise typer.Exit(1)
    if as_json:
        console.print_json(stored.event.model_dump_json())
        return
    letter = stored.letter
    console.print(f"[bold]dead letter {dead_id}[/]  {stored.event.time:%Y-%m-%d %H:%M:%S} UTC")
    for label, value in (("service", letter.service), ("job", letter.job_id),
                         ("subject", letter.original_subject), ("reason", letter.reason),
                         ("deliveries", letter.deliveries),
                         ("stream seq", letter.stream_sequence)):
        console.print(f"  {label:<11} {value}", highlight=False)
    for error in letter.errors:
        console.print(f"  error       {error}", highlight=False)
    for key, value in letter.headers.items():
        console.print(f"  header      {key}: {value}", highlight=False)
    note = "" if letter.body_complete else f" (first {len(base64.b64decode(letter.body_base64))} of {letter.body_size} bytes)"
    console.print(f"\n[bold]original message[/]{note}:")
    console.print(body_text(letter), highlight=False, markup=False, soft_wrap=True)


@deadletters_app.command("replay")
def replay_dead_letter(
    dead_id: Annotated[int, typer.Argument(metavar="ID", help="The id `deadletters list` shows.")],
    reason: Annotated[str, typer.Option(help="Why; logged by the service that replays it.")] = "",
) -> None:
    """Publish a dead letter's original message again on its original subject (operators)."""
    try:
        reply = client.run(_replay(Settings(), dead_id, reason))
    except (NoRespondersError, TimeoutError):
        err.print("[red]error:[/] the service that publishes this subject did not answer: is it "
                  "running against this NATS?")
        raise typer.Exit(1) from None
    if reply.error:
        err.print(f"[red]error:[/] {reply.error}")
        raise typer.Exit(1)
    if reply.duplicate:
        console.print(f"dead letter {dead_id} was already replayed to {reply.subject} (stream "
                      f"sequence {reply.stream_sequence}); nothing new was published")
        return
    console.print(f"replayed dead letter {dead_id} to {reply.subject} "
                  f"(stream sequence {reply.stream_sequence})")


async def _dead_letters(settings: Settings) -> list[client.StoredDeadLetter]:
    async with client.connect(settings) as nc:
        return await client.dead_letters(nc)


async def _dead_letter(settings: Settings, sequence: int) -> client.StoredDeadLetter | None:
    async with client.connect(settings) as nc:
        return await client.dead_letter(nc, sequence)


async def _replay(settings: Settings, sequence: int, reason: str):
    async with client.connect(settings) as nc:
        return await client.replay_dead_letter(nc, sequence, reason)
