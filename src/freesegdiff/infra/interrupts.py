"""Stopping a command: Ctrl-C (SIGINT) and SIGTERM take the same, orderly way out.

``timeout``, docker, systemd, Kubernetes and Slurm stop a process with SIGTERM, a person with
Ctrl-C. While a command runs inside :func:`signals_as_interrupts` (``freesegdiff.cli.main``
runs every command so), SIGTERM raises :class:`Terminated` in the main thread. It is a
:class:`KeyboardInterrupt`, so every place that handles Ctrl-C (finish or abandon the image in
hand, write the run's summary files, say how to resume, remove temporary files) handles SIGTERM
the same way; :func:`exit_code` then gives 143 (128 + SIGTERM) instead of 130 (128 + SIGINT).
:class:`DeferredInterrupt` holds both signals back while an image's files are written.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

__all__ = [
    "DeferredInterrupt",
    "SignalState",
    "Terminated",
    "exit_code",
    "signals_as_interrupts",
]

INTERRUPTED = 130  # 128 + SIGINT
TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread, handled wherever Ctrl-C is."""


def exit_code(error: BaseException | None = None) -> int:
    """The exit code of a command stopped by ``error``: 143 for SIGTERM, else 130."""
    return TERMINATED if isinstance(error, Terminated) else INTERRUPTED


@dataclass
class SignalState:
    """What :func:`signals_as_interrupts` saw: ``terminated`` once SIGTERM arrived (also where
    a library swallowed the :class:`Terminated` it raised, as Gradio's server loop does)."""

    terminated: bool = False


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[SignalState]:
    """Inside the block, SIGTERM raises :class:`Terminated` in the main thread.

    Outside the main thread (where Python cannot handle signals) it changes nothing. The
    previous handler is restored on leaving.
    """
    state = SignalState()
    if not _in_main_thread():
        yield state
        return

    def terminate(signum: int, frame: Any) -> None:
        state.terminated = True
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except (ValueError, OSError):  # an embedding that owns the signals
        yield state
        return
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class DeferredInterrupt:
    """Inside the block, Ctrl-C and SIGTERM wait until the block ends, then raise.

    So the image being written is completed rather than abandoned: on leaving the block
    normally, a pending SIGINT raises :class:`KeyboardInterrupt` and a pending SIGTERM
    :class:`Terminated`. Only in the main thread (elsewhere signals cannot be handled, and this
    does nothing).
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.pending != signal.SIGTERM:  # SIGTERM is the stronger request: it stays
            self.pending = signum

    def __enter__(self) -> DeferredInterrupt:
        if _in_main_thread():
            for signum in self._SIGNALS:
                try:
                    self._previous[signum] = signal.signal(signum, self._handler)
                except (ValueError, OSError):
                    continue
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if self.pending is not None and kind is None:
            raise Terminated if self.pending == signal.SIGTERM else KeyboardInterrupt
