"""The backend thread: every call into an ML backend runs on one daemon thread, one at a time, in
the order submitted, and its result or exception comes back to the caller that awaits it."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest
from tunebus.shared.threads import BackendThread, backend_thread

pytestmark = pytest.mark.anyio

WAIT_S = 10  # bound on waits for another thread; never reached when the code works

_names = itertools.count()


def fresh() -> BackendThread:
    return BackendThread(f"test-backend-{next(_names)}")


async def test_the_result_comes_back_to_the_awaiting_caller():
    thread = fresh()
    assert await thread.run(divmod, 17, 5) == (3, 2)
    assert await thread.run(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]  # keyword arguments too


async def test_an_exception_comes_back_to_the_awaiting_caller_and_the_thread_goes_on():
    thread = fresh()

    def fail():
        raise ValueError("bad adapter")

    with pytest.raises(ValueError, match="bad adapter"):
        await thread.run(fail)
    assert await thread.run(len, "still serving") == 13


async def test_calls_run_one_at_a_time_in_submission_order():
    thread = fresh()
    gate = threading.Event()
    lock = threading.Lock()
    order: list[int] = []
    active = peak = 0

    def call(index: int) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        if index == 0:  # hold the thread until every other call has been submitted
            assert gate.wait(WAIT_S)
        order.append(index)
        with lock:
            active -= 1

    futures = [thread.submit(call, i) for i in range(20)]
    gate.set()
    await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, futures)), WAIT_S)
    assert order == list(range(20))
    assert peak == 1


async def test_every_call_runs_on_the_same_named_daemon_thread():
    thread = fresh()
    here = threading.current_thread()
    first = await thread.run(threading.current_thread)
    second = await thread.run(threading.current_thread)
    assert first is second and first is not here
    assert first.daemon and first.name == thread.name
    assert first.is_alive()  # idle between calls, not ended


async def test_a_call_cancelled_before_it_starts_never_runs():
    thread = fresh()
    gate = threading.Event()
    started = threading.Event()
    ran: list[str] = []

    def hold() -> None:
        started.set()
        assert gate.wait(WAIT_S)

    holding = asyncio.ensure_future(thread.run(hold))
    assert await asyncio.to_thread(started.wait, WAIT_S)
    queued = asyncio.ensure_future(thread.run(ran.append, "cancelled"))
    await asyncio.sleep(0)  # let the task submit its call
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    gate.set()
    await holding
    await thread.run(ran.append, "after")
    assert ran == ["after"]


def test_one_thread_per_name_for_the_whole_process():
    assert backend_thread("test-shared") is backend_thread("test-shared")
    assert backend_thread("test-shared") is not backend_thread("test-other")
    assert backend_thread("test-shared").name == "test-shared"
