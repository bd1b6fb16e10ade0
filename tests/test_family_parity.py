"""Every generation of the text family against transformers, on small random-weight models.

Each config exercises its generation's switches: GQA, a sliding window shorter than the sequence,
soft-caps, linear RoPE scaling, QK-norm, an odd head_dim. Models are saved by transformers and read
back through gemmakit.load, so the loader's name and config mapping is under test too.
"""

from __future__ import annotations

import pytest
import torch

import gemmakit

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
              num_key_value_heads=2, head_dim=24, max_position_embeddings=256)


def _hf_model(kind: str):
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig,
                              GemmaForCausalLM)

    if kind == "gemma":
        return GemmaForCausalLM(GemmaConfig(**{**COMMON, "num_key_value_heads": 1}, hidden_act="gelu_pytorch_tanh"))
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**COMMON, hidden_activation="gelu_pytorch_tanh", sliding_window=8,
                                              query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
                                              final_logit_softcapping=3.0))
    return Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, hidden_activation="gelu_pytorch_tanh", sliding_window=8,
                                              query_pre_attn_scalar=20,
                                              rope_scaling={"rope_type": "linear", "factor": 8.0}))


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = _hf_model(request.param).eval()
    with torch.no_grad():  # random norms, or a mapping mistake on a norm would go unseen
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, tokenizer = gemmakit.load(path)
    return hf, model


def test_logits_match_transformers(pair):
    hf, model = pair
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    got = model(ids)
    assert (got - expected).abs().max().item() <= 1e-4


def test_cached_chunks_equal_full_forward(pair):
    _, model = pair
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = model.new_cache(2, 64)
    pieces = [model(ids[:, :13], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(13, 40)]
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-5


def test_greedy_with_cache_equals_stepwise_full_forward(pair):
    from gemmakit.engine.generate import generate_steps

    _, model = pair
    prompt = [2, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140]
    produced = [s.tokens[0] for s in generate_steps(model, [prompt], 20)]
    seq = list(prompt)
    for _ in range(20):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert produced == seq[len(prompt):]


def test_batch_of_different_lengths_equals_one_by_one(pair):
    from gemmakit.engine.generate import generate_steps

    _, model = pair
    prompts = [[2, 11, 12, 13], [2] + list(range(20, 40)), [2, 99]]
    batched = [s.tokens for s in generate_steps(model, prompts, 12)]
    for row, prompt in enumerate(prompts):
        alone = [s.tokens[0] for s in generate_steps(model, [prompt], 12)]
        assert [step[row] for step in batched] == alone
