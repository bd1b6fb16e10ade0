"""Gemma 4 GGUF files written by llama.cpp's own converter (tests/data/gguf_llamacpp/make.py) against
llama.cpp's logits on them, recorded there and, where llama-cpp-python is installed, computed live.

llama.cpp computes GELU through a float16 table, which moves its logits by a few 1e-3 on these
models; a misread tensor or metadata key moves them by far more than the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gemmakit

DATA = Path(__file__).parent / "data" / "gguf_llamacpp"
NAMES = ["gemma4-ple-shared-kv", "gemma4-experts"]
RECORDED = json.loads((DATA / "llama_cpp_logits.json").read_text())
LLAMA_CPP_NOISE = 2e-2


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    model, tokenizer = gemmakit.load(DATA / f"{request.param}.gguf")
    return request.param, model, tokenizer


def test_the_files_say_what_the_models_are(loaded):
    name, model, _ = loaded
    c = model.config
    assert c.family == "gemma4" and c.norm_offset == 0.0 and c.rope_global_proportion == 0.25
    if name == "gemma4-ple-shared-kv":
        assert (c.per_layer_input_dim, c.num_kv_shared_layers, c.double_wide_mlp) == (16, 2, True)
        assert [p.kv_source for p in c.layer_plan] == [0, 1, 2, 3, 2, 3]
    else:
        assert (c.num_experts, c.experts_per_token, c.k_eq_v, c.global_kv_heads) == (4, 2, True, 1)


def test_logits_match_recorded_llama_cpp(loaded):
    name, model, _ = loaded
    got = model(torch.tensor([RECORDED["ids"]]))[0]
    expected = torch.tensor(RECORDED[name])
    assert (got - expected).abs().max().item() < LLAMA_CPP_NOISE
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_logits_and_tokens_match_llama_cpp_live(loaded):
    llama_cpp = pytest.importorskip("llama_cpp")
    name, model, tokenizer = loaded
    llm = llama_cpp.Llama(model_path=str(DATA / f"{name}.gguf"), logits_all=True, n_ctx=64, n_batch=64,
                          verbose=False, n_threads=2, type_k=0, type_v=0)
    for text in ["Hello world! The quick brown fox.", "  two  spaces\n\nand newlines\n", "ünïcödé 0123 <|turn>x"]:
        assert tokenizer.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True)
    ids = tokenizer.encode("The lazy dog converts GGUF files, quickly.", add_bos=True)
    llm.eval(ids)
    expected = torch.tensor(llm.scores[:len(ids)])
    assert (model(torch.tensor([ids]))[0] - expected).abs().max().item() < LLAMA_CPP_NOISE


def test_cached_greedy_equals_stepwise_full_forward(loaded):
    from gemmakit.engine.generate import generate_steps

    _, model, _ = loaded
    prompt = RECORDED["ids"][:12]  # longer than the window of 8
    produced = [s.tokens[0] for s in generate_steps(model, [prompt], 10)]
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert produced == seq[len(prompt):]


def test_converted_to_hf_transformers_computes_the_same(loaded, tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma4ForCausalLM"):
        pytest.skip("this transformers has no Gemma 4")
    from gemmakit.convert import convert

    name, model, _ = loaded
    hf = transformers.Gemma4ForCausalLM.from_pretrained(convert(DATA / f"{name}.gguf", tmp_path / "hf")).eval()
    ids = torch.tensor([RECORDED["ids"]])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


@pytest.mark.slow  # a CLI subprocess
@pytest.mark.parametrize("think", [[], ["--think"], ["--think", "hide"]], ids=["plain", "think", "hide"])
def test_chat_runs_on_a_gemma4_vocabulary(think):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "gemmakit.cli", "chat", "--model", str(DATA / f"{NAMES[0]}.gguf"),
                           "-n", "4", "--seed", "0", *think], input="Hello there\n/exit\n", capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
