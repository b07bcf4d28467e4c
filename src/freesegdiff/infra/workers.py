"""A worker process that runs the functions it is sent: ``python -m freesegdiff.infra.workers``.

The other half of :class:`freesegdiff.infra.tuning.WorkerProcesses`. It reads pickled
``(function, arguments)`` requests from its standard input and writes a pickled
``("ok", value)`` or ``("error", text)`` reply for each, until its input closes (also when the
parent dies). It imports nothing but the standard library until a request names a function
(whose module pickle imports), never the parent's ``__main__`` (so, unlike ``multiprocessing``'s
spawn, an unguarded user script is not run again), and ignores Ctrl-C, which is the parent's to
handle. Anything a function prints goes to standard error, never into the replies.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from typing import Any, BinaryIO


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer requests from ``requests`` on ``replies`` until ``requests`` ends."""
    while True:
        try:
            function, arguments = pickle.load(requests)
        except EOFError:
            return
        try:
            reply: tuple[str, Any] = ("ok", function(*arguments))
        except Exception as error:  # the parent runs the call again itself, to raise it there
            reply = ("error", f"{type(error).__name__}: {error}")
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()


def main() -> None:
    """Serve on standard input and a private copy of standard output."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints go to standard error
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
