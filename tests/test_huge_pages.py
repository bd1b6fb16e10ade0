"""huge_pages.py: file-mapped weights move into huge pages at the first decode step, bytes intact,
file pages dropped as they go, and nothing else moves or changes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import gemmakit
from gemmakit.engine.generate import generate_steps
from gemmakit.models.decoder import HUGE_PAGES_AFTER_STEPS
from gemmakit.huge_pages import HUGE_PAGE, huge_pages_wanted, move_to_huge_pages, read_only_file_maps
from tiny import random_model, tiny_config, write_gguf

needs_thp = pytest.mark.skipif(not huge_pages_wanted(), reason="no transparent huge pages here (or not Linux)")

MAPS = """\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 1001 /usr/bin/python3.12
7f1000000000-7f1010000000 r--s 00000000 08:01 2002 /models/gemma.gguf
7f1010000000-7f1010100000 rw-p 00000000 00:00 0
7f1020000000-7f1020100000 rw-s 00000000 08:01 3003 /tmp/scratch.bin
7f1030000000-7f1030200000 r--p 00000000 00:00 0
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
"""


def test_only_read_only_file_mappings_count():
    # anonymous memory, a writable file mapping and kernel-provided pages must never be dropped
    assert read_only_file_maps(MAPS.splitlines()) == [
        (0x55D0C0000000, 0x55D0C0001000), (0x7F1000000000, 0x7F1010000000)]


def _file_tensor(path, nbytes: int, seed: int) -> torch.Tensor:
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    data.tofile(path)
    with warnings.catch_warnings():  # torch: the read-only memmap is not writable (nothing writes it)
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(np.memmap(path, mode="r"), dtype=torch.uint8)


def _rss_file_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile")) / 1024


@needs_thp
def test_file_mapped_bytes_move_and_their_pages_go(tmp_path):
    big = _file_tensor(tmp_path / "big.bin", 48 << 20, seed=0).view(-1, 4096)  # [N, row bytes], as blocks are
    small = _file_tensor(tmp_path / "small.bin", 5000, seed=1)
    alias = big.view(-1, 8192)  # another view of the same bytes: must keep sharing them
    anonymous = torch.arange(100, dtype=torch.uint8)
    expect_big, expect_small = big.clone(), small.clone()
    anon_ptr = anonymous.data_ptr()
    big.sum(), small.sum()  # page the file in
    before = _rss_file_mb()

    moved = move_to_huge_pages([big, small, alias, anonymous])

    assert moved == big.numel() + small.numel()
    assert torch.equal(big, expect_big) and torch.equal(small, expect_small)
    assert alias.data_ptr() == big.data_ptr() and alias.shape == (6144, 8192) and big.shape == (12288, 4096)
    assert anonymous.data_ptr() == anon_ptr  # anonymous memory is left where it is
    with open("/proc/self/maps") as f:
        maps = read_only_file_maps(f)
    assert not any(s <= big.data_ptr() < e for s, e in maps)
    assert big.data_ptr() % HUGE_PAGE == 0  # the arena starts on a huge page
    assert before - _rss_file_mb() > 40  # the 48 MB file's pages left the process as they were copied
    assert move_to_huge_pages([big, small]) == 0  # already moved: nothing to do


def test_switched_off_nothing_moves(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMAKIT_HUGE_PAGES", "0")
    t = _file_tensor(tmp_path / "t.bin", 1 << 16, seed=2)
    ptr = t.data_ptr()
    assert move_to_huge_pages([t]) == 0 and t.data_ptr() == ptr


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    return [step.tokens[0] for step in generate_steps(model, [prompt], steps)]


@needs_thp
def test_decoding_moves_a_gguf_models_blocks_and_tokens_stay(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", random_model(tiny_config("gemma3", num_layers=3), seed=5), quant="Q8_0")
    monkeypatch.setenv("GEMMAKIT_HUGE_PAGES", "0")
    reference, _ = gemmakit.load(path)
    steps = HUGE_PAGES_AFTER_STEPS + 8
    expected = _greedy(reference, [2, 17, 99, 5], steps)
    assert reference.weights_in_huge_pages == 0
    monkeypatch.delenv("GEMMAKIT_HUGE_PAGES")

    model, _ = gemmakit.load(path)
    blocks = [b for b in model.buffers() if b.dtype == torch.uint8]
    assert _greedy(model, [2, 17, 99, 5], HUGE_PAGES_AFTER_STEPS - 1) == expected[:HUGE_PAGES_AFTER_STEPS - 1]
    assert model.weights_in_huge_pages == 0  # a prefill and short generations move nothing
    assert _greedy(model, [2, 17, 99, 5], steps) == expected
    assert model.weights_in_huge_pages == sum(b.numel() for b in blocks) > 0
    with open("/proc/self/maps") as f:
        maps = read_only_file_maps(f)
    assert not any(s <= b.data_ptr() < e for b in blocks for s, e in maps)


@needs_thp
def test_serving_moves_the_blocks_before_any_request(tmp_path):
    from gemmakit.api import settle_for_serving

    path = write_gguf(tmp_path / "m.gguf", random_model(tiny_config("gemma3", num_layers=2), seed=6), quant="Q8_0")
    model, _ = gemmakit.load(path)
    expected = _greedy(model, [2, 40, 41], 6)  # (too short to move anything)
    assert model.weights_in_huge_pages == 0
    moved = settle_for_serving(model)
    assert moved == sum(b.numel() for b in model.buffers() if b.dtype == torch.uint8) > 0
    assert settle_for_serving(model) == moved  # once per model
    assert _greedy(model, [2, 40, 41], 6) == expected


@needs_thp
def test_generate_json_reports_the_bytes_moved(tmp_path, capsys):
    import json

    from gemmakit.cli import main

    path = write_gguf(tmp_path / "m.gguf", random_model(tiny_config("gemma3", num_layers=2), seed=7), quant="Q8_0")
    blocks = sum(b.numel() for b in gemmakit.load(path)[0].buffers() if b.dtype == torch.uint8)
    for tokens, moved in ((HUGE_PAGES_AFTER_STEPS, 0), (HUGE_PAGES_AFTER_STEPS + 4, blocks)):
        assert main(["generate", "--model", str(path), "--json", "--temperature", "0",
                     "--max-tokens", str(tokens), "hello"]) == 0
        stats = json.loads(capsys.readouterr().out)["stats"]
        assert stats["generated_tokens"] == tokens and stats["huge_page_bytes"] == moved
