"""The `tunebus` command line: run the local stack, submit and follow jobs, fetch adapters."""

from .main import app

__all__ = ["app"]
