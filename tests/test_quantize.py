"""`gemmakit quantize`: any source -> a Q8_0 / Q4_1 GGUF that loads (kept quantised) and runs.

Tolerances. Q8_0 rounds each weight to one of 255 levels spanning its group of 32's absmax: an
error of at most absmax/254, about 0.4% of a Gaussian group's absmax or ~1% of its RMS; through
three random layers the logits move by 0.8-2.4% of their own size (measured, relative L2; bound 5%).
Q4_1 has 16 levels over the group's range, ~15x coarser: 12-34% measured on these deliberately
noisy random models, bound 60%, the point being only that the file is the model and not noise
(another random model of the same config is 129-142% away).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import gguf
import pytest
import torch

import gemmakit
from gemmakit.checkpoints.gguf_writer import quantize_checkpoint
from gemmakit.errors import InvalidRequestError, ModelNotFoundError
from gemmakit.quant.grouped import GroupedEmbedding
from golden_check import assert_greedy_matches_golden
from tiny import random_model, tiny_config, write_gguf

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def float_source(request, tmp_path_factory):
    """A float32 GGUF of a random tiny model of one family (the tokenizer comes with it)."""
    config = tiny_config(request.param, num_layers=3)
    if request.param == "gemma3":  # not the family's default pattern: the file must record it
        config = replace(config, layer_kinds=("local", "global", "global"))
    model = random_model(config, seed=4)
    return write_gguf(tmp_path_factory.mktemp(request.param) / "float.gguf", model, sliding_window_pattern="auto"), model


@pytest.mark.parametrize("scheme,qtype,bound", [("int8", "Q8_0", 0.05), ("int4", "Q4_1", 0.6)])
def test_quantised_file_is_the_model(float_source, tmp_path, scheme, qtype, bound):
    source, model = float_source
    out = tmp_path / f"q-{scheme}.gguf"
    report = quantize_checkpoint(source, out, scheme)
    assert report.qtype == qtype and report.bytes == out.stat().st_size
    reader = gguf.GGUFReader(str(out))  # the reference reader accepts it; types are as promised
    for t in reader.tensors:
        expected = qtype if len(t.shape) == 2 and t.shape[1] > 1 else "F32"
        assert t.tensor_type.name == expected, t.name
    loaded, tok = gemmakit.load(out)
    assert tok is not None and isinstance(loaded.embed, GroupedEmbedding)  # runs from the blocks
    assert loaded.config.layer_kinds == model.config.layer_kinds  # a non-default pattern is recorded
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        rel = _rel(loaded(ids), model(ids))
    assert rel < bound, rel


def test_load_int4_holds_what_quantize_writes(float_source, tmp_path):
    """``load(src, quant="int4")`` and loading ``gemmakit quantize src --scheme int4``'s file give the
    same logits: the same Q4_1 rounding of the same weights, reached by two paths. (int8 in memory
    keeps float32 scales, finer than a Q8_0 file's float16 ones, so there the two differ.)"""
    source, _ = float_source
    out = tmp_path / "q-int4.gguf"
    quantize_checkpoint(source, out, "int4")
    in_memory, _ = gemmakit.load(source, quant="int4")
    from_file, _ = gemmakit.load(out)
    ids = torch.randint(0, in_memory.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = in_memory(ids), from_file(ids)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def test_bad_requests(float_source, tmp_path):
    source, _ = float_source
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"keep me")
    with pytest.raises(InvalidRequestError, match="exists"):
        quantize_checkpoint(source, existing, "int8")
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(InvalidRequestError, match="scheme"):
        quantize_checkpoint(source, tmp_path / "x.gguf", "int3")
    with pytest.raises(ModelNotFoundError):
        quantize_checkpoint(tmp_path / "missing.gguf", tmp_path / "y.gguf", "int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there.gguf"]  # no partial files left behind


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", "quantize", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_cli_end_to_end(float_source, tmp_path):
    source, _ = float_source
    out = tmp_path / "m.gguf"
    ok = _cli(str(source), str(out), "--scheme", "int8")
    assert ok.returncode == 0, ok.stderr
    assert "Q8_0" in ok.stdout and out.is_file()
    again = _cli(str(source), str(out))
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0
    assert "--force" in again.stderr
    assert _cli(str(source), str(out), "--force").returncode == 0
    preset = _cli("gemma3-1b", str(tmp_path / "n.gguf"))
    assert preset.returncode == 2 and "preset" in preset.stderr and "Traceback" not in preset.stderr


def test_real_model_int8(real_model_path, golden, tmp_path):
    """The default model requantised to Q8_0 keeps the reference's greedy tokens up to near-ties
    (its Q4_K/Q5_0/Q6_K values are re-rounded to 8 bits: an error far below the golden margins
    except at near-ties, where the golden tests also stop comparing)."""
    out = tmp_path / "270m-q8.gguf"
    quantize_checkpoint(real_model_path, out, "int8")
    model, _ = gemmakit.load(out, activations="float32")  # the requantisation's own error
    assert_greedy_matches_golden(model, golden, near_tie=0.02)
