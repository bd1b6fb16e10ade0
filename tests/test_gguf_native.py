"""GGUF quantised matrices kept quantised (``--quant gguf``): whole models on their blocks.

The reference is the same file loaded as floats through gemmakit's own bit-exact dequantiser
(itself checked bit-for-bit against gguf-py in test_ggml_quant.py); the block kernel alone is
tested in test_ggml_kernel.py.
"""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.quant.grouped import GroupedEmbedding, GroupedLinear
from gemmakit.engine.generate import generate_steps
from gemmakit.kernels.build import kernel
from golden_check import assert_greedy_matches_golden
from tiny import random_model, tiny_config, write_gguf


def test_kernel_builds_here() -> None:
    """CI machines have a compiler: the fast path must not silently fall back there."""
    assert kernel() is not None


@pytest.fixture(scope="module")
def tiny_quantised_gguf(tmp_path_factory):
    config = tiny_config("gemma3", hidden_size=64, intermediate_size=128, num_layers=3)
    model = random_model(config, seed=3)
    path = tmp_path_factory.mktemp("native") / "tiny-q8.gguf"
    return write_gguf(path, model, quant="Q8_0")


def test_tiny_model_native_equals_dequantised(tiny_quantised_gguf) -> None:
    native, _ = gemmakit.load(tiny_quantised_gguf, quant="gguf")
    floats, _ = gemmakit.load(tiny_quantised_gguf, quant="none")
    assert isinstance(native.embed, GroupedEmbedding)
    assert any(isinstance(m, GroupedLinear) for m in native.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in native.modules())
    ids = torch.tensor([[2, 17, 99, 5, 30, 41, 7, 8, 9, 10, 11, 12]])
    with torch.inference_mode():
        a, b = native(ids), floats(ids)
    assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())
    # greedy generation over the cache (one-row decode = kernel path) agrees token for token
    def greedy(model):
        return [o.tokens[0] for o in generate_steps(model, [ids[0].tolist()], 12)]

    assert greedy(native) == greedy(floats)


def test_native_model_holds_no_float_matrices(tiny_quantised_gguf) -> None:
    native, _ = gemmakit.load(tiny_quantised_gguf, quant="gguf")
    floats, _ = gemmakit.load(tiny_quantised_gguf, quant="none")
    big_float = [n for n, p in native.named_parameters() if p.dim() == 2]
    assert big_float == []
    native_bytes = sum(b.nbytes for b in native.buffers()) + sum(p.nbytes for p in native.parameters())
    float_bytes = sum(p.nbytes for p in floats.parameters())
    # Q8_0: 1 byte code + 4/32 bytes scale per weight, against 4 bytes: well under a third
    assert native_bytes < 0.35 * float_bytes


def test_quant_gguf_needs_a_quantised_gguf(tmp_path) -> None:
    config = tiny_config("gemma3", hidden_size=64, intermediate_size=128, num_layers=2)
    path = write_gguf(tmp_path / "float.gguf", random_model(config, seed=1))
    with pytest.raises(gemmakit.errors.InvalidRequestError, match="no quantised or 16-bit matrices to keep"):
        gemmakit.load(path, quant="gguf")


def test_real_model_golden_with_native_weights(golden, real_model_path) -> None:
    """The default model's quantised blocks, never expanded, reproduce the reference's greedy ids."""
    model, _ = gemmakit.load(real_model_path, quant="gguf")
    assert_greedy_matches_golden(model, golden, near_tie=0.02)
