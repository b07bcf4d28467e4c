"""glibc allocator switches for CPU runs (a no-op with any other C library).

The low-level half of :mod:`freesegdiff.infra.tuning`, which decides when each is used; nothing in
the package calls these on its own. Two things cost a CPU run time or memory that the models
themselves do not:

- Loading models leaves freed blocks behind (a weight converted to another dtype or layout frees
  its old copy, and such holes inside the heap stay resident); :func:`return_freed_memory` hands
  them back to the operating system.
- glibc serves every allocation above 32 MB with a fresh ``mmap`` and unmaps it when freed, so a
  tensor of that size costs a page fault per 4 KB page each time it is made; the SD VAE encoder
  at 512x512 makes dozens of 32 and 64 MB activations per image. Inside
  :func:`large_buffers_from_heap` they come from the heap instead, where the next image finds
  them already mapped. (glibc 2.36's aligned allocation, which torch uses, may grow the heap a
  few times before freed blocks fit the next request: the first images can still fault.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_DEFAULT_MMAP_MAX = 65536
# Keep freed memory at the top of the heap instead of returning it at once (glibc's default is
# 128 KB, raised as large blocks are freed): the VAE's activations come back next image.
_TRIM_THRESHOLD = 2**31 - 1

_lock = threading.Lock()
_depth = 0


@cache
def _libc() -> Any | None:
    """glibc, or None where the C library is another (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def return_freed_memory() -> bool:
    """Return the heap's free blocks to the operating system; True if anything was returned."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def fix_trim_threshold() -> None:
    """Keep freed memory at the top of the heap for reuse instead of returning it at once.

    Also fixes glibc's threshold for serving a block by ``mmap`` at 128 KB (it otherwise grows
    with the largest block freed), so model weights loaded afterwards get their own mappings
    rather than interleaving with short-lived blocks in the heap. Process-wide, for good.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


def single_arena() -> None:
    """Make every thread allocate from the main heap (glibc's ``M_ARENA_MAX`` = 1), for
    threads started from now on: call it before other threads allocate, since glibc gives a new
    thread the arena of a thread that has ended before it looks at the limit.

    glibc gives other threads heaps of their own, of at most 64 MB each: the VAE's activations,
    hundreds of MB, then come from fresh ``mmap`` pages (or, inside
    :func:`large_buffers_from_heap`, fail over to them), page-faulted on every image. Measured: the
    diffusion features of one image took 12 s in the main thread and 22 s in another, and 12 s
    in both with a single arena. Process-wide, for good; a no-op off glibc.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 1)


@contextmanager
def large_buffers_from_heap() -> Iterator[None]:
    """Serve large allocations made inside this block from the heap rather than fresh mmaps.

    Process-wide while it lasts (other threads' allocations too) and re-entrant. It fixes the
    trim threshold (:func:`fix_trim_threshold`) for good, as heap memory trimmed at each free
    would be faulted in again. The memory stays with the process afterwards, for the next time:
    what the block needed at its peak remains resident, which is what its peak cost anyway.
    """
    global _depth
    libc = _libc()
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            fix_trim_threshold()
            libc.mallopt(_M_MMAP_MAX, 0)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
