"""The `tunebus` command line: run the local stack, submit and follow jobs, fetch adapters.

`main` is the entry point. `tunebus validate` runs without loading the rest of the command line
(the contracts, the bus, the object store), so that checking a file starts at once.
"""

from __future__ import annotations

import sys
from typing import Any


def main() -> None:
    """`tunebus`. A refused identity is said plainly instead of with a traceback."""
    if sys.argv[1:2] == ["validate"]:
        from .validate import validate_app

        validate_app()(args=sys.argv[2:], prog_name="tunebus validate")
        return
    from tunebus.shared.cli.client import PermissionDenied

    from .main import app, err

    try:
        app()
    except PermissionDenied as e:
        err.print(f"[red]refused:[/] {e}")
        sys.exit(3)


def __getattr__(name: str) -> Any:
    if name == "app":  # the whole command line, loaded when asked for
        from .main import app

        return app
    raise AttributeError(name)


__all__ = ["app", "main"]
