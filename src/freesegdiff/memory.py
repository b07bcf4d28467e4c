"""Process memory housekeeping for long CPU runs (glibc's allocator; a no-op elsewhere).

Loading models leaves freed blocks behind (a weight converted to another dtype or layout frees
its old copy, and such holes inside the heap stay resident); :func:`trim_freed_memory` hands
them back to the operating system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache
from typing import Any


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
    return libc if hasattr(libc, "malloc_trim") else None


def trim_freed_memory() -> bool:
    """Return the heap's free blocks to the operating system; True if anything was returned."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
