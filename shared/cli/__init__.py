"""The `tunebus` command line: run the local stack, submit and follow jobs, fetch adapters."""

import sys

from .main import app, err

__all__ = ["app", "main"]


def main() -> None:
    """`tunebus`: the app, with a refused identity said plainly instead of a traceback."""
    from tunebus.shared.client import PermissionDenied

    try:
        app(standalone_mode=True)
    except PermissionDenied as e:
        err.print(f"[red]refused:[/] {e}")
        sys.exit(3)
