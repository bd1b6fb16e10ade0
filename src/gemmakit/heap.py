"""Handing memory back to the OS, where RSS matters more than a few milliseconds: the C heap's free
pages, and the pages of a read-only file mapping whose bytes have been decoded.

glibc keeps memory that a program frees for its next allocations: the fragments a 262k-piece
vocabulary leaves after loading (~10 MB), or a 512-token prefill's scratch (dequantised weights,
[512, 4096] activations: ~40 MB) would otherwise stay resident for the whole run, and the prefill's
would sit on top of the 170 MB embedding that the LM head then streams through, the moment a run's
peak RSS is reached. ``malloc_trim`` returns them; elsewhere (no glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the OS (a few milliseconds)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _madvise():
    try:
        return ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None


def forget_file_pages(address: int, nbytes: int) -> None:
    """Drop the whole pages inside ``[address, address + nbytes)``, part of a read-only file mapping,
    from this process (MADV_DONTNEED): the kernel reads them again from the file if they are ever
    touched, and the pages at either end, shared with neighbouring data, stay. Linux; elsewhere
    nothing."""
    madvise = _madvise()
    if madvise is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    first = -(-address // page) * page
    last = (address + nbytes) // page * page
    if last > first:
        madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)
