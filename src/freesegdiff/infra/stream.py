"""A streaming executor: items flow through groups of work, each in its own thread, joined by
bounded queues, so that every group works as soon as its input is ready.

It knows nothing of the method: :mod:`freesegdiff.pipeline` gives it the six groups of a
segmentation run (reading, caption, features, clustering and naming, refinement, composition)
and the items (batches of images). What it guarantees:

- **Order.** Each group is one thread taking items first in, first out, so items leave in the
  order they entered.
- **Bounded memory.** Each queue holds at most ``depth`` items; a group whose output queue is
  full waits, and so does the source.
- **Failure isolation.** A group that raises marks that item failed (:attr:`Item.error`); the
  later groups pass it on untouched and the caller decides (the pipeline segments its images
  again one by one, as the serial path does).
- **Shared devices.** Groups given the same lock never run at the same time (the model groups
  on the CPU, whose matrix kernels already use every core).
- **Stopping.** Closing the output iterator (a ``break``, Ctrl-C or SIGTERM in the consumer)
  stops every thread at its next queue operation, after the work in hand, which is waited for;
  none is left waiting, none is left running. A ``KeyboardInterrupt``
  or ``SystemExit`` raised inside a group stops the run too and is raised to the consumer, as
  the serial path would raise it.
- **Measurement.** Each group's busy seconds and active intervals, and each queue's depth as
  seen by every item put into it (:class:`StreamStats`), for ``freesegdiff bench --stream`` and
  the overlap test.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

_POLL_SECONDS = 0.05  # how often a waiting thread looks at the stop flag
# The consumer's sleeps while the output queue is empty: 1 ms, doubled up to 20 ms.
_FIRST_SLEEP, _LONGEST_SLEEP = 0.001, 0.02
_JOIN_SECONDS = 600.0  # the longest a stopped run waits for a group's work in hand
_END = object()


def poll(waiting: queue.Queue[Any], stop: threading.Event | None = None) -> Any:
    """The next entry of ``waiting``, for the main thread: waited for by sleeping, never inside
    the queue's Condition, where Ctrl-C and SIGTERM raise (an exception raised there by a
    signal handler can leave the queue's lock held, and the threads putting into it stuck).

    The sleeps start at 1 ms and double up to 20 ms while the queue stays empty, so a consumer
    that waits through a whole model batch wakes 50 times a second rather than 500 (each wake
    takes Python's lock from the thread that is computing; on the 2-core CPU the throughput
    measured the same either way). Returns a private end marker once ``stop`` is set.
    """
    sleep = _FIRST_SLEEP
    while stop is None or not stop.is_set():
        try:
            return waiting.get_nowait()
        except queue.Empty:
            time.sleep(sleep)
            sleep = min(2 * sleep, _LONGEST_SLEEP)
    return _END


@dataclass
class Item:
    """What flows through the stream: the caller's ``payload``, and the first error a group
    raised on it (later groups skip an item with an error)."""

    payload: Any
    error: BaseException | None = None
    group: str | None = None  # the group that raised


@dataclass(frozen=True)
class Group:
    """One stage group: ``work(payload) -> payload`` in its own thread.

    ``lock``: held while ``work`` runs; groups sharing a lock never overlap.
    """

    name: str
    work: Callable[[Any], Any]
    lock: AbstractContextManager[Any] | None = None


@dataclass
class StreamStats:
    """What a run measured, in seconds of ``time.perf_counter``.

    Attributes:
        busy: group -> seconds spent in its ``work``.
        intervals: group -> ``(start, end)`` of every ``work`` call.
        depths: queue (the group it feeds) -> its depth after each put.
        started / finished: the run's first item in and last item out.
    """

    busy: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    depths: dict[str, list[int]] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0

    def busy_fraction(self) -> dict[str, float]:
        """group -> its busy seconds over the run's wall-clock seconds."""
        wall = max(self.finished - self.started, 1e-9)
        return {name: seconds / wall for name, seconds in self.busy.items()}

    def mean_depths(self) -> dict[str, float]:
        """queue -> its mean depth after a put."""
        return {
            name: (sum(values) / len(values) if values else 0.0)
            for name, values in self.depths.items()
        }


def overlaps(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> int:
    """How many pairs of intervals, one from each list, share some time."""
    return sum(1 for a, b in first for c, d in second if a < d and c < b)


class Stream:
    """Run ``groups`` over items, one thread per group, ``depth`` items per queue."""

    def __init__(self, groups: list[Group], depth: int = 2) -> None:
        if not groups:
            raise ValueError("a stream needs at least one group")
        self.groups = groups
        self.depth = max(1, depth)
        self.stats = StreamStats()

    def run(self, payloads: Iterable[Any]) -> Iterator[Item]:
        """Yield one :class:`Item` per payload, in order, as the last group finishes it.

        ``payloads`` is read in a thread of its own (an :class:`Item` given there passes
        through as it is: a read failure, say). An exception raised while reading it ends the
        run and is raised here.
        """
        stop = threading.Event()
        queues: list[queue.Queue[Any]] = [
            queue.Queue(maxsize=self.depth) for _ in range(len(self.groups) + 1)
        ]
        stats = self.stats = StreamStats(
            busy={group.name: 0.0 for group in self.groups},
            intervals={group.name: [] for group in self.groups},
            depths={group.name: [] for group in self.groups},
            started=time.perf_counter(),
        )
        source_failure: list[BaseException] = []
        fatal: list[BaseException] = []

        def put(index: int, value: Any) -> bool:
            while not stop.is_set():
                try:
                    queues[index].put(value, timeout=_POLL_SECONDS)
                except queue.Full:
                    continue
                if index < len(self.groups) and value is not _END:
                    stats.depths[self.groups[index].name].append(queues[index].qsize())
                return True
            return False

        def get(index: int) -> Any:
            while not stop.is_set():
                try:
                    return queues[index].get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    continue
            return _END

        def source() -> None:
            try:
                for payload in payloads:
                    item = payload if isinstance(payload, Item) else Item(payload)
                    if not put(0, item):
                        return
            except BaseException as error:  # handed to the consumer, never lost in a thread
                source_failure.append(error)
            finally:
                put(0, _END)

        def worker(index: int, group: Group) -> None:
            while True:
                item = get(index)
                if item is _END:
                    put(index + 1, _END)
                    return
                if item.error is None:
                    with group.lock if group.lock is not None else nullcontext():
                        began = time.perf_counter()  # (not counting the wait for the lock)
                        try:
                            item.payload = group.work(item.payload)
                        except Exception as error:  # the item's, not the stream's
                            item.error, item.group = error, group.name
                        except BaseException as error:  # Ctrl-C raised in a stage, SystemExit
                            fatal.append(error)  # ends the run, raised to the consumer
                            stop.set()
                            return
                        ended = time.perf_counter()
                    stats.busy[group.name] += ended - began
                    stats.intervals[group.name].append((began, ended))
                if not put(index + 1, item):
                    return

        threads = [threading.Thread(target=source, name="freesegdiff-stream-source", daemon=True)]
        threads += [
            threading.Thread(
                target=worker, args=(index, group), name=f"freesegdiff-{group.name}", daemon=True
            )
            for index, group in enumerate(self.groups)
        ]
        for thread in threads:
            thread.start()

        try:
            while True:
                item = poll(queues[len(self.groups)], stop)
                if item is _END:
                    break
                yield item
            if fatal:
                raise fatal[0]
            if source_failure:
                raise source_failure[0]
        finally:
            stats.finished = time.perf_counter()
            stop.set()
            # Each thread ends at its next queue operation, after the work in hand: waited
            # for, so that no thread is inside a model's kernels when the interpreter exits
            # (its native threads would abort the process).
            deadline = time.monotonic() + _JOIN_SECONDS
            interrupted: BaseException | None = None
            for thread in threads:
                while thread.is_alive() and time.monotonic() < deadline:
                    try:
                        thread.join(timeout=max(0.0, deadline - time.monotonic()))
                    except BaseException as error:  # a second Ctrl-C: stopping goes on
                        interrupted = interrupted or error
            if interrupted is not None:
                raise interrupted
