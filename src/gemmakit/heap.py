"""Handing memory back to the OS, where RSS matters more than a few milliseconds: the C heap's free
pages, and the pages of a read-only file mapping whose bytes have been decoded (and, the other
way, mapping a file's pages in at once where they will be read: ``map_file_pages``).

glibc keeps memory that a program frees for its next allocations: the fragments a 262k-piece
vocabulary leaves after loading (~10 MB), or a 512-token prefill's scratch (dequantised weights,
[512, 4096] activations: ~40 MB) would otherwise stay resident for the whole run, and the prefill's
would sit on top of the 170 MB embedding that the LM head then streams through, the moment a run's
peak RSS is reached. ``malloc_trim`` returns them; elsewhere (no glibc) this does nothing.

The other side of the trade: between those moments glibc should *keep* what is freed. Left to
itself it hands the top of its heap back whenever more than a threshold is free there and grows it
again at the next allocation, so a prefill's scratch (a [512, 4096] activation, a dequantised
weight: 8-10 MB each, dozens of times a prompt) is page-faulted in afresh again and again, ~1 us per
4 KB: the gate/up GEMM of Gemma 3 270M ran at 390 GFLOP/s inside a prefill against 460 with its
output memory kept. ``keep_freed_heap`` sets the thresholds so that freed memory stays for reuse
until ``return_freed_heap`` hands it back (set GEMMAKIT_MALLOC_DEFAULTS=1 to leave malloc alone).

The third kind is machine code. ``import torch`` runs the static initialisers spread through
libtorch's 400 MB of code, which leaves ~85 MB of its pages resident although a generation then
uses ~20 MB of them. ``forget_unused_code`` unmaps all of them once a model is loaded; the ones in
use come back from the page cache at their first call (minor faults, ~2 ms in all), the rest stay
out of the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import sys


@functools.cache
def _libc_function(name: str):
    """``name`` from the C library (malloc_trim, mallopt, madvise), or None where it has none."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 32 << 20  # glibc's largest: smaller blocks come from the heap and are reused
_TRIM_THRESHOLD = 1 << 30  # never trim on free; return_freed_heap trims where the peak is decided


@functools.cache
def keep_freed_heap() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS at each ``free``
    (once per process; see the module docstring). Returns whether the settings took."""
    mallopt = _libc_function("mallopt")
    if mallopt is None or os.environ.get("GEMMAKIT_MALLOC_DEFAULTS", "0") == "1":
        return False
    # either setting alone would also freeze glibc's adaptive mmap threshold at its current value
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the OS (a few milliseconds)."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def forget_file_pages(address: int, nbytes: int) -> None:
    """Drop the whole pages inside ``[address, address + nbytes)``, part of a read-only file mapping,
    from this process (MADV_DONTNEED): the kernel reads them again from the file if they are ever
    touched, and the pages at either end, shared with neighbouring data, stay. Linux; elsewhere
    nothing."""
    madvise = _libc_function("madvise")
    if madvise is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    first = -(-address // page) * page
    last = (address + nbytes) // page * page
    if last > first:
        madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


def map_file_pages(address: int, nbytes: int) -> None:
    """Map the pages covering ``[address, address + nbytes)`` of a read-only file mapping into the
    process now (MADV_POPULATE_READ, Linux 5.14+); on older kernels, or elsewhere, only a read-ahead
    hint (MADV_WILLNEED) where there is one."""
    madvise = _libc_function("madvise")
    if madvise is None:
        return
    page = mmap.PAGESIZE
    first = address // page * page
    length = address + nbytes - first
    for advice in (_MADV_POPULATE_READ, getattr(mmap, "MADV_WILLNEED", None)):
        if advice is not None and madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), advice) == 0:
            return


def _unmodified_code_mappings(smaps_lines) -> list[tuple[int, int]]:
    """``(start, end)`` of each executable, file-backed mapping in a ``/proc/<pid>/smaps`` listing
    with resident pages and no privately modified ones (``Anonymous: 0 kB``): the only mappings
    whose pages can be dropped without changing what the addresses hold."""
    found, current, resident = [], None, 0
    for line in smaps_lines:
        fields = line.split()
        if not fields:
            continue
        if not fields[0].endswith(":"):  # a mapping's header: "start-end perms offset dev inode [path]"
            current = None
            if len(fields) > 5 and fields[1] == "r-xp" and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = (start, end)
        elif current is not None and fields[0] == "Rss:":
            resident = int(fields[1])
        elif current is not None and fields[0] == "Anonymous:":
            if resident and int(fields[1]) == 0:
                found.append(current)
            current = None
    return found


def forget_unused_code() -> int:
    """Unmap the resident pages of every loaded library's machine code (MADV_DONTNEED on
    executable file mappings none of whose pages was ever written, so each address reads the same
    bytes from the file when next executed). Returns the bytes unmapped; Linux only, elsewhere 0."""
    madvise = _libc_function("madvise")
    if madvise is None or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    try:
        with open("/proc/self/smaps") as f:
            mappings = _unmodified_code_mappings(f)
    except OSError:
        return 0
    unmapped = 0
    for start, end in mappings:
        if madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED) == 0:
            unmapped += end - start
    return unmapped
