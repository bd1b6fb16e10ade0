"""``gemmakit convert`` on the real Gemma 3 270M GGUF (its own file: about 40 s of dequantising and writing)."""

from __future__ import annotations

import pytest
import torch

from gemmakit.convert import convert

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test

transformers = pytest.importorskip("transformers")


def test_real_270m_gguf_converts_and_transformers_agrees(real_model_path, real_model, tmp_path):
    """The real Gemma 3 270M (Q4_K_M, dequantised to float32): transformers on the converted
    directory computes the same logits as gemmakit on the GGUF."""
    model, tokenizer = real_model
    convert(real_model_path, tmp_path / "out")
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. The capital of Italy is", add_bos=True)])
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(ids).logits
    expected = model(ids)
    diff = (got - expected).abs().max().item()
    print(f"max |logit difference| transformers vs gemmakit: {diff:.2e}")
    assert diff <= 1e-3, diff
    assert got[0, -1].argmax() == expected[0, -1].argmax()
    from transformers import AutoTokenizer

    text = "<start_of_turn>user\nWrite a haiku about the sea, 海.<end_of_turn>\n<start_of_turn>model\n"
    assert AutoTokenizer.from_pretrained(tmp_path / "out")(text)["input_ids"] == tokenizer.encode(text, add_bos=True)
