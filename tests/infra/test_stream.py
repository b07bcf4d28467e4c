"""The streaming executor (freesegdiff.infra.stream): order, overlap, failures, stopping."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from freesegdiff.infra import stream
from freesegdiff.infra.stream import Group, Item, Stream, overlaps


def _sleeper(seconds: float, tag: str):
    def work(payload):
        time.sleep(seconds)
        return [*payload, tag]

    return work


def test_a_slow_cpu_group_and_a_fast_model_group_overlap():
    """Twelve items: a fast "model" group and a slow "cpu" group after it. Streamed, the model
    group works on later items while the CPU group refines earlier ones: intervals of the two
    groups share time (counted, not timed). Items leave in order, each through both groups."""
    stream = Stream(
        [Group("model", _sleeper(0.01, "model")), Group("cpu", _sleeper(0.04, "cpu"))], depth=2
    )
    out = [item.payload for item in stream.run([[n] for n in range(12)])]
    assert out == [[n, "model", "cpu"] for n in range(12)]
    stats = stream.stats
    both = overlaps(stats.intervals["model"], stats.intervals["cpu"])
    assert both >= 6, both  # serial execution would give 0
    assert len(stats.intervals["model"]) == len(stats.intervals["cpu"]) == 12
    fractions = stats.busy_fraction()
    assert fractions["cpu"] > fractions["model"]  # the slow group is the busy one
    # the bounded queues never held more than their depth
    assert max(max(depths) for depths in stats.depths.values()) <= 2


def test_groups_that_share_a_lock_never_overlap():
    """Two model groups given one lock (the CPU case): no two of their intervals share time."""
    lock = threading.Lock()
    stream = Stream(
        [
            Group("caption", _sleeper(0.01, "a"), lock),
            Group("features", _sleeper(0.01, "b"), lock),
            Group("cpu", _sleeper(0.02, "c")),
        ]
    )
    assert len(list(stream.run([[n] for n in range(8)]))) == 8
    intervals = stream.stats.intervals
    assert overlaps(intervals["caption"], intervals["features"]) == 0
    assert overlaps(intervals["features"], intervals["cpu"]) > 0


def test_a_failing_item_is_marked_and_skips_the_later_groups():
    """A group that raises fails that item only: later groups skip it, the others go on."""
    seen: list[int] = []

    def first(payload):
        if payload == 3:
            raise ValueError("three is bad")
        return payload

    def second(payload):
        seen.append(payload)
        return payload * 10

    items = list(Stream([Group("one", first), Group("two", second)]).run(range(6)))
    assert [item.payload for item in items] == [0, 10, 20, 3, 40, 50]
    assert [item.group for item in items] == [None, None, None, "one", None, None]
    assert isinstance(items[3].error, ValueError) and seen == [0, 1, 2, 4, 5]


def test_items_already_failed_pass_through_in_order():
    """An :class:`Item` given with an error (an unreadable image) is passed on untouched."""
    items = [Item(0), Item("unread", error=OSError("no")), Item(2)]
    out = list(Stream([Group("double", lambda n: n * 2)]).run(items))
    assert [item.payload for item in out] == [0, "unread", 4]


def test_closing_the_output_stops_every_thread():
    """The consumer stops after two items of an endless source: every stream thread ends."""

    def endless():
        n = 0
        while True:
            yield n
            n += 1

    before = {thread.name for thread in threading.enumerate()}
    stream = Stream([Group("a", lambda n: n), Group("b", lambda n: n)], depth=1)
    run = stream.run(endless())
    assert [next(run).payload, next(run).payload] == [0, 1]
    run.close()
    time.sleep(0.5)
    left = {thread.name for thread in threading.enumerate()} - before
    assert not {name for name in left if name.startswith("freesegdiff-")}, left


def test_an_error_while_reading_the_source_is_raised_to_the_consumer():
    def source():
        yield 1
        raise OSError("the folder went away")

    run = Stream([Group("a", lambda n: n)]).run(source())
    with pytest.raises(OSError, match="went away"):
        list(run)


def test_ctrl_c_raised_inside_a_group_ends_the_run_in_the_consumer():
    """A KeyboardInterrupt in a stage (not an item's failure) reaches the consumer, and no
    thread is left waiting: the run never hangs."""

    def work(n):
        if n == 2:
            raise KeyboardInterrupt
        return n

    before = {thread.name for thread in threading.enumerate()}
    run = Stream([Group("a", work), Group("b", lambda n: n)], depth=1).run(range(10))
    with pytest.raises(KeyboardInterrupt):
        list(run)
    time.sleep(0.5)
    left = {thread.name for thread in threading.enumerate()} - before
    assert not {name for name in left if name.startswith("freesegdiff-")}, left


def test_the_consumer_polls_1_ms_then_doubling_up_to_20_ms(monkeypatch):
    """``poll`` sleeps instead of waiting in the queue's Condition, backing off while nothing
    comes (a computing thread then loses Python's lock 50 times a second, not 500); it returns
    the entry once there is one, and the end marker once ``stop`` is set."""
    waiting: queue.Queue[int] = queue.Queue()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 7:
            waiting.put(42)

    monkeypatch.setattr(stream.time, "sleep", sleep)
    assert stream.poll(waiting) == 42
    assert slept == [0.001, 0.002, 0.004, 0.008, 0.016, 0.02, 0.02]
    slept.clear()
    waiting.put(7)
    assert stream.poll(waiting) == 7 and slept == []  # an entry there: no sleep at all
    stop = threading.Event()
    stop.set()
    assert stream.poll(waiting, stop) is stream._END
