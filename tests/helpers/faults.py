"""Ways to break things on loopback: a TCP proxy that cuts a server off without losing its data,
and a wait that polls a condition."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable


class TcpProxy:
    """127.0.0.1:<port> forwarding to `target`, in a thread of its own. `cut()` closes every
    connection and refuses new ones (as a host gone from the network does); `restore()` listens
    on the same port again. The server behind it keeps running, and keeps its data."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="tcp-proxy")
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TcpProxy:
        self.thread.start()
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._listen())

    def _call(self, coro) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _listen(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self._forward, "127.0.0.1", self.port,
                                                     reuse_address=True)

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.connections):
            writer.transport.abort()
        self.connections.clear()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort() if dst.transport else None

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.connections -= {writer, up_writer}


def cut_for(proxy: TcpProxy, seconds: float) -> threading.Thread:
    """Cut the proxy now and restore it after `seconds`, in the background."""
    proxy.cut()
    timer = threading.Timer(seconds, proxy.restore)
    timer.start()
    return timer


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s: {what}")


def poison(valid_body: bytes) -> dict[str, bytes]:
    """A message of every kind that is not an event, made from a valid one, by kind."""
    doc = json.loads(valid_body)
    without_id = {k: v for k, v in doc.items() if k != "id"}
    without_type = {k: v for k, v in doc.items() if k != "type"}
    return {
        "deep nesting": b'{"a":' * 3000 + b"1" + b"}" * 3000,
        "not utf-8": b'{"specversion": "1.0", "id": "\xff\xfe"}',
        "not json": b"this is not JSON at all",
        "not an object": b"[1, 2, 3]",
        "missing id": json.dumps(without_id).encode(),
        "900 KB": json.dumps(without_type | {"padding": "x" * 900_000}).encode(),
    }
