"""heap.py: which code mappings may be dropped, and that dropping them changes RSS, not results."""

import os
import subprocess
import sys
import textwrap

import pytest

from gemmakit.heap import _unmodified_code_mappings

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test

LISTING = """\
7f0000000000-7f0000100000 r-xp 00000000 08:01 11 /lib/libkept.so
Rss:                 512 kB
Anonymous:             0 kB
7f0000100000-7f0000200000 r-xp 00000000 08:01 12 /lib/libpatched.so
Rss:                 512 kB
Anonymous:             4 kB
7f0000200000-7f0000300000 r-xp 00000000 08:01 13 /lib/libcold.so
Rss:                   0 kB
Anonymous:             0 kB
7f0000300000-7f0000400000 r--p 00000000 08:01 14 /lib/libkept.so
Rss:                 256 kB
Anonymous:             0 kB
7f0000400000-7f0000500000 r-xp 00000000 00:00 0
Rss:                  64 kB
Anonymous:            64 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
Rss:                   8 kB
Anonymous:             0 kB
7f0000500000-7f0000600000 r-xp 00000000 08:01 15 /lib/libalso kept.so
Rss:                   4 kB
Anonymous:             0 kB
"""


def test_only_resident_unwritten_file_code_is_chosen():
    # written pages (a patched copy), anonymous or kernel-provided code and data mappings must stay
    assert _unmodified_code_mappings(LISTING.splitlines()) == [
        (0x7F0000000000, 0x7F0000100000), (0x7F0000500000, 0x7F0000600000)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_forgetting_code_lowers_rss_and_keeps_results():
    script = textwrap.dedent("""
        import torch
        from gemmakit.heap import forget_unused_code

        def file_rss_kb():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssFile"))

        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(64, 96, generator=g), torch.randn(96, 32, generator=g)
        before = (a @ b, torch.nn.functional.gelu(a).sum(), torch.sort(a.flatten()).values)
        rss = file_rss_kb()
        unmapped = forget_unused_code()
        dropped = rss - file_rss_kb()
        after = (a @ b, torch.nn.functional.gelu(a).sum(), torch.sort(a.flatten()).values)
        assert all(torch.equal(x, y) for x, y in zip(before, after))
        assert unmapped > dropped * 1024 > 20 * 2**20, (unmapped, dropped)  # libtorch's start-up code
        print("ok", dropped)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


_RETAINED = textwrap.dedent("""
    import sys, torch
    from gemmakit.heap import keep_freed_heap
    if sys.argv[1] == "keep":
        assert keep_freed_heap()

    def anon_kb():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon"))

    before = anon_kb()
    parts = [torch.ones(15 << 18) for _ in range(3)]  # a prefill's pattern in small: 3 x 15 MB, written
    del parts
    print((anon_kb() - before) // 1024)  # MB still resident after the free
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_heap_holds_freed_scratch_for_reuse():
    """glibc by itself hands big freed blocks straight back to the OS (the next prefill then faults
    them in again, ~1 us a page); kept, they stay resident for the next allocation to reuse."""
    def retained_mb(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _RETAINED, mode], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "GEMMAKIT_MALLOC_DEFAULTS": "0"})
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    default, kept = retained_mb("default"), retained_mb("keep")
    if default >= 40:
        pytest.skip(f"this libc keeps the blocks by itself ({default} MB)")
    assert kept >= 40, (kept, default)  # of the 45 MB freed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_map_file_pages_maps_a_file_in_and_forget_file_pages_drops_it(tmp_path):
    import mmap

    import numpy as np

    from gemmakit.heap import forget_file_pages, map_file_pages

    def file_rss_kb() -> int:
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssFile"))

    path = tmp_path / "pages.bin"
    path.write_bytes(bytes(range(256)) * (64 << 10))  # 16 MB
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        array = np.frombuffer(m, dtype=np.uint8)
        before = file_rss_kb()
        map_file_pages(array.ctypes.data, array.nbytes)
        mapped = file_rss_kb() - before
        forget_file_pages(array.ctypes.data, array.nbytes)
        dropped = before + mapped - file_rss_kb()
        assert array[12345] == 12345 % 256  # the bytes are the file's either way
        del array
    assert mapped >= 15 * 1024 and dropped >= 15 * 1024, (mapped, dropped)
