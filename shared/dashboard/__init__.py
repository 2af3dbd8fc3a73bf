"""The web dashboard (`tunebus ui`, and part of `tunebus stack up` / `tunebus demo`): jobs live,
loss curves, evaluation reports, adapters to promote and download, services, dead letters,
submitting. Tooling, like the CLI: a client of the bus with one identity; no service imports it.

Starlette (ASGI) with server-sent events (sse-starlette) under uvicorn; the page is plain
JavaScript with uPlot, vendored in static/vendor (MIT, npm `uplot` 1.6.32): nothing to build,
nothing fetched from a CDN.
"""

from __future__ import annotations

import socket
import threading
import time

from tunebus.shared.settings import Settings

DEFAULT_PORT = 8765


class Dashboard:
    """The dashboard served from a thread of this process (the stack's, a test's)."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        from .app import create_app

        self.socket = bind(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        # A page's live stream never ends by itself: give open connections a second, not forever.
        config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       daemon=True, name="tunebus-dashboard")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self, timeout: float = 20.0) -> Dashboard:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `port`, or on a free one if that is taken (0: a free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        if not port:
            raise
        sock.bind((host, 0))
    sock.listen(128)
    return sock
