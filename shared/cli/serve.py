"""tunebus serve --openai: the OpenAI-compatible HTTP facade (shared/cli/openai_api.py)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from tunebus.shared.settings import Settings

err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root `tunebus` app."""
    app.command()(serve)


def serve(
    openai: Annotated[bool, typer.Option("--openai", help="The OpenAI-compatible API (/v1/models, "
                                         "/v1/chat/completions).")] = False,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
) -> None:
    """Serve the bus over HTTP. Callers authenticate with their own tunebus identity as the API
    key, `<nats user>:<password>`, and each request reaches the bus as that user."""
    if not openai:
        err.print("[red]error:[/] say which API to serve: --openai")
        raise typer.Exit(2)
    try:
        import uvicorn

        from .openai_api import create_app
    except ImportError as e:
        err.print(f"[red]error:[/] serving needs the 'serve' extra (pip install 'tunebus[serve]'): {e}")
        raise typer.Exit(1) from None
    err.print(f"OpenAI-compatible API on http://{host}:{port}/v1 (API key: <nats user>:<password>)")
    uvicorn.run(create_app(Settings()), host=host, port=port, log_level="info")
