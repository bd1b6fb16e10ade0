"""Moving weights that are read in place from a file mapping into 2 MB ("huge") pages.

A decoding step streams every weight once: for Gemma 3 270M's GGUF, the 178 MB tied LM head
and ~66 MB of layers, straight from the file's memory map (checkpoints/gguf.py keeps the blocks
there). That map is made of 4 KB pages, and with only 4 KB pages the TLB covers a few MB, so each
step walks the page tables tens of thousands of times; under a hypervisor each walk is itself a
two-level walk. On a 2-core Zen 4 VM a plain read of 178 MB ran at 24 GB/s from 4 KB pages and at
50 GB/s from 2 MB pages, and decoding the 270M ran ~19% faster with its blocks in huge pages
(median 73.5 against 61.6 tokens/s over six generations each, alternating; the head alone gave
~14%, the layers ~3%). Linux gives file mappings of ordinary file systems only 4 KB pages, so the
blocks are copied once into anonymous memory advised MADV_HUGEPAGE.

When: at a model's 32nd decoding step (``decoder.GemmaModel``), or right after loading for
processes that wait for input anyway (``api.settle_for_serving``: serve, chat); not at load for a
one-shot generation. By then a prompt's prefill has handed its scratch memory back and has already
paged the whole file in (its last position's logits read the whole head), so a run's peak RSS is
what it was; moved at load, the head would sit resident under the prefill's scratch (+~45 MB of
peak RSS for a 512-token prompt). The copy goes 2 MB at a time and drops each piece's file pages
as soon as it is copied, so the process never holds both. It took 0.23-0.65 s for 246 MB on that
VM, where freshly faulted huge pages are slow (a second arena in one process: 12-18 ms); waiting
for the 32nd step keeps short generations from paying it.

Only file-mapped bytes move: tensors in anonymous memory (``--quant int8``, a converted
checkpoint) stay where they are, as a copy would briefly double them. The tensors keep their
identity (``Tensor.set_``), so every module, fused decode stack and view sees the new memory.
``GEMMAKIT_HUGE_PAGES=0`` turns this off; so does a kernel whose transparent huge pages are
``never``. Elsewhere than Linux nothing moves.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import warnings
from collections.abc import Iterable

import torch

from gemmakit.heap import _libc_function, forget_file_pages

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)  # (14 is Linux's value, mman-common.h)
_COPY_CHUNK = HUGE_PAGE  # bytes copied before their file pages are dropped
_ALIGN = 64  # each tensor starts on a cache line in the arena


def huge_pages_wanted() -> bool:
    """Whether moving weights into huge pages can help here: Linux, madvise available, transparent
    huge pages not ``never``, and not switched off with ``GEMMAKIT_HUGE_PAGES=0``."""
    if os.environ.get("GEMMAKIT_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if _libc_function("madvise") is None:
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def read_only_file_maps(maps_lines: Iterable[str]) -> list[tuple[int, int]]:
    """``(start, end)`` of every read-only file-backed mapping in a ``/proc/<pid>/maps`` listing:
    the only memory whose pages the copy may drop (the kernel reads them again from the file if
    they are ever touched)."""
    found = []
    for line in maps_lines:
        fields = line.split()
        if len(fields) < 6 or not fields[5].startswith("/") or fields[1][:2] != "r-":
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        found.append((start, end))
    return found


def _in_any(maps: list[tuple[int, int]], address: int, nbytes: int) -> bool:
    return any(start <= address and address + nbytes <= end for start, end in maps)


def _arena(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` in fresh anonymous memory starting on a 2 MB boundary and
    advised MADV_HUGEPAGE. Nothing is touched yet, so its pages come into being as huge pages when
    the copy first writes them (where the kernel has none to give, as ordinary pages: still correct)."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # private, not Python's default shared mapping: shared anonymous memory is shmem, whose huge
    # pages follow a different switch (shmem_enabled, usually never)
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (torch warns that the buffer is not "writable")
        whole = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` alive; never closed
    start = -whole.data_ptr() % HUGE_PAGE
    arena = whole[start : start + size]
    _libc_function("madvise")(ctypes.c_void_p(arena.data_ptr()), ctypes.c_size_t(size), _MADV_HUGEPAGE)
    return arena[:nbytes]


def move_to_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Copy the file-mapped ones among ``tensors`` (contiguous CPU tensors, e.g. GGML blocks) into
    one arena of huge pages and point each of them at its copy; returns the bytes moved (0 where
    nothing could move or it would not help: see the module docstring).

    Tensors that are views of the same bytes move together and keep sharing them.
    """
    if not huge_pages_wanted():
        return 0
    try:
        with open("/proc/self/maps") as f:
            maps = read_only_file_maps(f)
    except OSError:
        return 0
    by_bytes: dict[tuple[int, int], list[torch.Tensor]] = {}
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            continue
        key = (t.data_ptr(), t.numel() * t.element_size())
        if _in_any(maps, *key):
            group = by_bytes.setdefault(key, [])
            if not any(t is seen for seen in group):
                group.append(t)
    if not by_bytes:
        return 0
    slots, total = [], 0
    for address, nbytes in by_bytes:
        slots.append(total)
        total += -(-nbytes // _ALIGN) * _ALIGN
    with torch.inference_mode(False), torch.no_grad():
        arena = _arena(total)
        for (address, nbytes), slot in zip(by_bytes, slots):
            group = by_bytes[(address, nbytes)]
            source = group[0].detach().reshape(-1).view(torch.uint8)
            dropped = address  # file pages before this are gone (a page straddling two chunks goes with the second)
            for at in range(0, nbytes, _COPY_CHUNK):
                n = min(_COPY_CHUNK, nbytes - at)
                arena[slot + at : slot + at + n].copy_(source[at : at + n])
                forget_file_pages(dropped, address + at + n - dropped)
                dropped = (address + at + n) // mmap.PAGESIZE * mmap.PAGESIZE
            copy = arena[slot : slot + nbytes]
            for t in group:
                t.set_(copy.untyped_storage(), copy.storage_offset() // t.element_size(), t.shape, t.stride())
    return sum(nbytes for _, nbytes in by_bytes)
