"""When a consumer counts as stalled (shared/health.py), on consumer states as JetStream reports them."""

from __future__ import annotations

from types import SimpleNamespace

from tunebus.shared.health import ConsumerWatch


def info(*, pending=0, ack_pending=0, max_ack_pending=1000, delivered=10, ack_floor=10):
    return SimpleNamespace(
        num_pending=pending, num_ack_pending=ack_pending,
        config=SimpleNamespace(max_ack_pending=max_ack_pending),
        delivered=SimpleNamespace(stream_seq=delivered), ack_floor=SimpleNamespace(stream_seq=ack_floor))


def test_ack_pending_at_its_maximum_is_a_stall_at_once():
    problem = ConsumerWatch(60).assess("v", info(ack_pending=1000), busy=True, now=0)
    assert problem == "consumer v: 1000 messages awaiting an ack, its maximum: nothing more is delivered to it"


def test_a_backlog_that_does_not_move_while_the_instance_is_idle_is_a_stall_after_the_bound():
    watch = ConsumerWatch(60)
    assert watch.assess("v", info(pending=5), busy=False, now=0) is None
    assert watch.assess("v", info(pending=5), busy=False, now=59) is None
    assert "5 messages waiting and none delivered for 61s" in watch.assess("v", info(pending=5), busy=False, now=61)


def test_a_busy_instance_with_a_backlog_is_not_stalled():
    watch = ConsumerWatch(60)
    for now in (0, 100, 1000):
        assert watch.assess("t", info(pending=3), busy=True, now=now) is None


def test_progress_or_an_empty_backlog_restarts_the_clock():
    watch = ConsumerWatch(60)
    watch.assess("v", info(pending=5), busy=False, now=0)
    assert watch.assess("v", info(pending=5, delivered=11), busy=False, now=50) is None
    assert watch.assess("v", info(pending=5, delivered=11), busy=False, now=100) is None
    assert watch.assess("v", info(pending=5, delivered=11), busy=False, now=111) is not None
    assert watch.assess("v", info(pending=0, delivered=11), busy=False, now=500) is None
