"""The glibc allocator switches: large buffers from the heap, trimming (glibc only)."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from freesegdiff import memory

glibc = pytest.mark.skipif(memory._libc() is None, reason="glibc's allocator only")


def page_faults_of(make: object) -> int:
    """Minor page faults while ``make()`` builds and frees a tensor."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    make()  # type: ignore[operator]
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def fill_64_mb() -> None:
    torch.ones(16 * 1024 * 1024, dtype=torch.float32).sum()  # 64 MB, touched, then freed


@glibc
def test_large_buffers_from_the_heap_are_not_faulted_in_again():
    page = 4096
    pages = 64 * 1024 * 1024 // page
    fresh = page_faults_of(fill_64_mb)  # a fresh mmap: every page faults
    assert fresh > pages // 2
    # Heap memory is reused only while freed memory is retained (large_buffers_from_heap sets
    # it; said here too so that this test does not depend on the order of anything else).
    memory.fix_trim_threshold()
    with memory.large_buffers_from_heap():
        fill_64_mb()  # grows the heap once
        again = page_faults_of(fill_64_mb)  # reuses it
    assert again < pages // 10


@glibc
def test_large_buffers_from_heap_nests_and_restores():
    with memory.large_buffers_from_heap():
        with memory.large_buffers_from_heap():
            assert memory._depth == 2
        assert memory._depth == 1
    assert memory._depth == 0  # large blocks may be mapped afresh again from here on


def test_trim_is_safe_everywhere():
    assert memory.return_freed_memory() in (True, False)
    if not sys.platform.startswith("linux"):
        assert memory._libc() is None
