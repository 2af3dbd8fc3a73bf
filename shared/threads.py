"""The thread every call into an ML backend (MLX, torch) runs on: `backend_thread(name)`.

Services run their blocking ML work off the event loop, but not on asyncio's default executor
(`asyncio.to_thread`): see `BackendThread` for why.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from concurrent.futures import Executor, Future


class BackendThread(Executor):
    """One daemon thread that runs every call into an ML backend, one at a time, in the order
    they were submitted, for as long as the process lives.

    Not asyncio's default executor: its threads end when the event loop closes, right as the
    interpreter finalizes, and MLX's thread-local state is destroyed at thread exit by code that
    takes the GIL; a thread that finds the interpreter finalizing is unwound through that C++ and
    the process aborts ("terminate called without an active exception"), about one shutdown in
    six. A daemon thread idle on its queue never exits, so never runs those destructors.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    async def run(self, fn, /, *args, **kwargs):
        """`fn(*args, **kwargs)` on this thread; its result, or what it raised, comes back here.
        Cancelling the awaiting task before the call starts means it never runs."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def _serve(self) -> None:
        while True:
            future, fn, args, kwargs = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to whoever awaits the call
                future.set_exception(e)


@functools.cache
def backend_thread(name: str) -> BackendThread:
    """The process's one backend thread of this name, started on first use."""
    return BackendThread(name)
