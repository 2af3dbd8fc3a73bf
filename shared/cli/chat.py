"""tunebus chat: talk to a registered adapter in the terminal, streamed over the bus."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tunebus.contracts import AdapterReply, ChatMessage, Generate, GetAdapter, subjects
from tunebus.shared.cli import client
from tunebus.shared.settings import Settings

console = Console()
err = Console(stderr=True)
QUIT = {"/exit", "/quit"}


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root `tunebus` app."""
    app.command()(chat)


def chat(
    ref: Annotated[str, typer.Argument(help="The adapter: name, name:version or name@alias.")],
    system: Annotated[str | None, typer.Option(help="A system message that opens the chat.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096, help="New tokens per answer at most.")] = 256,
    temperature: Annotated[float, typer.Option(min=0, max=2, help="0: greedy.")] = 0.0,
    compare: Annotated[bool, typer.Option(
        help="Answer every turn with the base model too, side by side.")] = False,
) -> None:
    """Chat with an adapter: each line you type is a user turn, the answer streams back as the
    evaluator generates it. An empty line, /exit or Ctrl-D ends the chat."""
    settings = Settings()
    code = client.run(_chat(settings, ref, system, max_tokens, temperature, compare))
    raise typer.Exit(code)


async def _chat(settings: Settings, ref: str, system: str | None, max_tokens: int,
                temperature: float, compare: bool) -> int:
    async with client.connect(settings) as nc:
        found = await client.ask(nc, subjects.REGISTRY_GET, GetAdapter(ref=ref), AdapterReply)
        if found.error or found.entry is None:
            err.print(f"[red]error:[/] {found.error or f'{ref}: not found'}")
            return 1
        entry = found.entry
        console.print(f"[bold]{entry.ref}[/] on {entry.base_model}"
                      f"{' (compared with the base model)' if compare else ''}; "
                      "an empty line or /exit ends the chat")
        opening = [ChatMessage(role="system", content=system)] if system else []
        sides = {entry.ref: dict(adapter=entry.ref), "base model": dict(base_model=entry.base_model)}
        if not compare:
            sides.pop("base model")
        histories = {name: list(opening) for name in sides}
        while (line := _read_line()) is not None:
            answers = await _turn(nc, sides, histories, line, max_tokens, temperature)
            for name, reply in answers.items():
                if reply.error:
                    err.print(f"[red]error ({name}):[/] {reply.error}")
                    return 1
                histories[name].append(ChatMessage(role="assistant", content=reply.text))
    return 0


async def _turn(nc, sides: dict, histories: dict, line: str, max_tokens: int, temperature: float):
    """One user turn: every side answers it, streamed; the replies by side."""
    texts = {name: "" for name in sides}

    def ask(name: str, show):
        histories[name].append(ChatMessage(role="user", content=line))

        async def on_text(piece: str) -> None:
            texts[name] += piece
            show(piece)

        request = Generate(messages=histories[name], max_tokens=max_tokens,
                           temperature=temperature, stream=True, **sides[name])
        return client.generate(nc, request, on_text)

    if len(sides) == 1:  # plain streaming to the terminal
        (name,) = sides
        reply = await ask(name, lambda piece: console.print(piece, end="", markup=False,
                                                            highlight=False))
        console.print()
        return {name: reply}

    def table() -> Table:
        view = Table(expand=True, show_lines=False)
        for name in sides:
            view.add_column(name, ratio=1)
        view.add_row(*texts.values())
        return view

    with Live(table(), console=console, refresh_per_second=12, transient=False) as live:
        replies = await asyncio.gather(*(ask(name, lambda _: live.update(table())) for name in sides))
        live.update(table())
    return dict(zip(sides, replies))


def _read_line() -> str | None:
    """The next user turn, or None at the end (EOF, an empty line, /exit)."""
    if sys.stdin.isatty():
        console.print("[bold cyan]you>[/] ", end="")
    line = sys.stdin.readline()
    if not line or not line.strip() or line.strip() in QUIT:
        return None
    return line.rstrip("\n")
