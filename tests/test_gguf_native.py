"""GGUF quantised matrices kept quantised (``--quant gguf``): codes, kernel and whole models.

The reference for every number here is gemmakit's own bit-exact dequantiser (itself checked
bit-for-bit against gguf-py in test_ggml_quant.py): unpacked codes must dequantise to exactly the
same floats, and the grouped matmul must equal dequantise-then-matmul up to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import gemmakit
from gemmakit.quant.ggml import PACKABLE_TYPES, dequantize, unpack_codes
from gemmakit.quant.grouped import GroupedEmbedding, GroupedLinear
from gemmakit.engine.generate import generate_steps
from gemmakit.quant.kernels import dequantize_rows, grouped_matmul, kernel
from test_ggml_quant import random_blocks
from golden_check import assert_greedy_matches_golden
from tiny import random_model, tiny_config, write_gguf

TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]


def test_every_packable_type_is_tested() -> None:
    assert {int(t) for t in TYPES} == set(PACKABLE_TYPES)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_codes_dequantise_bit_exactly(qtype: T) -> None:
    rows, cols = 24, 512
    raw = random_blocks(qtype, rows, cols, seed=int(qtype))
    packed = unpack_codes(raw, qtype, (rows, cols))
    assert packed.codes.dtype == torch.int8 and packed.scale.dtype == torch.float32
    ours = dequantize_rows(packed.codes, packed.scale, packed.offset, packed.group)
    assert torch.equal(ours, dequantize(raw, qtype, (rows, cols)))


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "fallback"])
def test_matmul_equals_dequantise_then_matmul(qtype: T, use_kernel: bool) -> None:
    """Float32 rounding only: products are summed in another order, nothing else differs.

    A float32 dot product of 512 terms in any order is within ~512 * 2^-24 ~ 3e-5 of exact,
    relative to the sum of |terms|; the bound below (2e-5 of the largest output) holds for
    random signs with a wide margin and fails for any real mistake (a wrong scale or code is O(1)).
    """
    rows, cols = 100, 512  # 100 rows: not a multiple of the kernel's 64-row grain
    raw = random_blocks(qtype, rows, cols, seed=7)
    packed = unpack_codes(raw, qtype, (rows, cols))
    w = dequantize(raw, qtype, (rows, cols)).double()
    for m in (1, 2, 3, 4, 5, 9, 17):  # every row-block size of the kernel, and the slab path
        x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m))
        y = grouped_matmul(x, *packed, use_kernel=use_kernel)
        assert y.shape == (m, rows) and y.dtype == torch.float32
        assert _relative_error(y, x.double() @ w.T) < 2e-5


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
    with pytest.raises(gemmakit.errors.InvalidRequestError, match="no GGUF-quantised tensors"):
        gemmakit.load(path, quant="gguf")


def test_real_model_golden_with_native_weights(golden, real_model_path) -> None:
    """The default model's quantised blocks, never expanded, reproduce the reference's greedy ids."""
    model, _ = gemmakit.load(real_model_path, quant="gguf")
    assert_greedy_matches_golden(model, golden, near_tie=0.02)
