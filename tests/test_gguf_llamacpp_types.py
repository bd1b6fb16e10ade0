"""The real 270M quantised by llama.cpp itself into Q2_K, Q3_K, IQ4_NL and IQ4_XS (kept as blocks on
the kernel, ggml_kquants.cpp): gemmakit loads each file, and its logits track llama.cpp's on the same file.

llama.cpp rounds activations to 8 bits in its block products and gemmakit does not, so the two
differ by a few percent; both differ from the float model by far more (measured relative error to
llama.cpp / to the float model: Q2_K 0.041 / 0.42, Q3_K_S 0.045 / 0.40, IQ4_NL 0.030 / 0.17,
IQ4_XS 0.054 / 0.17)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import gemmakit
from tiny import llama_cpp_quantize

pytestmark = pytest.mark.slow

IDS = [2, 818, 5279, 529, 7001, 563, 496, 1550, 236764, 532, 625, 1722, 9405, 1144, 1154, 2364]


@pytest.fixture(scope="module")
def widened(real_model_path, tmp_path_factory) -> Path:
    """The real model widened to F32 (the only source llama.cpp's quantiser takes without
    allow_requantize), shared by every type's file."""
    pytest.importorskip("llama_cpp")
    spec = importlib.util.spec_from_file_location(
        "make_gguf_llamacpp", Path(__file__).parent / "data" / "gguf_llamacpp" / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    path = tmp_path_factory.mktemp("llamacpp_types") / "f32.gguf"
    make.float32_copy(real_model_path, path)
    return path


def _llama_cpp_logits(path: Path) -> torch.Tensor:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, verbose=False,
                          n_threads=2, type_k=0, type_v=0)  # float32 K/V
    llm.eval(IDS)
    return torch.tensor(np.asarray(llm.scores[:len(IDS)], dtype=np.float32))


@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_S", "IQ4_NL", "IQ4_XS"])
def test_llama_cpp_file_loads_and_agrees(widened, ftype):
    path = llama_cpp_quantize(widened, widened.with_name(f"{ftype}.gguf"), ftype)
    model, _ = gemmakit.load(str(path))
    with torch.no_grad():
        ours = model(torch.tensor([IDS]))[0]
        float_model, _ = gemmakit.load(str(widened))
        exact = float_model(torch.tensor([IDS]))[0]
    theirs = _llama_cpp_logits(path)
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < 0.08
    assert rel < 0.5 * ((ours - exact).norm() / exact.norm()).item()
    assert (ours.argmax(-1) == theirs.argmax(-1)).sum().item() >= len(IDS) - 2
