"""GGUF files of architectures gemma, gemma2 and gemma3 against transformers on the same random weights.

The GGUF is written from the transformers model with llama.cpp's names and conventions (norms
stored as 1 + w), by a writer that shares no table with gemmakit's loader, so a mapping mistake
in either shows as a logit difference.
"""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.errors import CheckpointError
from gemmakit.models.config import alternating
from tiny import VOCAB_SIZE, tiny_config, write_hf_as_gguf

transformers = pytest.importorskip("transformers")

KINDS = {"local": "sliding_attention", "global": "full_attention"}


def make_hf(config):
    """A transformers model with ``config``'s numbers and random weights (norms included)."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig,
                              GemmaForCausalLM)

    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                  head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings)
    torch.manual_seed(7)
    if config.family == "gemma":
        hf = GemmaForCausalLM(GemmaConfig(**common, hidden_act="gelu_pytorch_tanh", rope_theta=config.rope_theta))
    elif config.family == "gemma2":
        hf = Gemma2ForCausalLM(Gemma2Config(
            **common, hidden_activation="gelu_pytorch_tanh", sliding_window=config.sliding_window,
            query_pre_attn_scalar=config.head_dim, attn_logit_softcapping=config.attn_logit_softcap,
            final_logit_softcapping=config.final_logit_softcap, rope_theta=config.rope_theta,
            layer_types=[KINDS[k] for k in config.layer_kinds]))
    else:
        hf = Gemma3ForCausalLM(Gemma3TextConfig(
            **common, hidden_activation="gelu_pytorch_tanh", sliding_window=config.sliding_window,
            query_pre_attn_scalar=config.head_dim, layer_types=[KINDS[k] for k in config.layer_kinds],
            rope_theta=config.rope_theta, rope_local_base_freq=10_000.0,
            rope_scaling={"rope_type": "linear", "factor": config.rope_scaling_factor}))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return hf.eval()


CASES = {
    "gemma-mqa": (tiny_config("gemma", num_kv_heads=1, rope_theta=10_000.0), None),
    "gemma-mha": (tiny_config("gemma", num_kv_heads=4), None),
    "gemma2": (tiny_config("gemma2", attn_logit_softcap=5.0, final_logit_softcap=3.0), None),
    "gemma3-int-pattern": (tiny_config("gemma3", layer_kinds=alternating(7, 3), rope_scaling_factor=8.0), 3),
    "gemma3-bool-pattern": (tiny_config("gemma3", layer_kinds=("local", "global", "local", "local", "global",
                                                               "local", "local")),
                            [True, False, True, True, False, True, True]),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    config, pattern = CASES[request.param]
    config = config.replace(query_pre_attn_scalar=float(config.head_dim))
    assert config.vocab_size == VOCAB_SIZE  # the GGUF carries tiny.py's vocabulary
    hf = make_hf(config)
    path = write_hf_as_gguf(tmp_path_factory.mktemp("g") / "m.gguf", hf, config, sliding_window_pattern=pattern)
    model, _ = gemmakit.load(path)
    return hf, model, config


def test_gguf_logits_match_transformers(pair):
    hf, model, config = pair
    assert model.config.layer_kinds == config.layer_kinds
    ids = torch.randint(0, VOCAB_SIZE, (2, 30), generator=torch.Generator().manual_seed(1))  # 30 > window 8
    with torch.no_grad():
        expected = hf(ids).logits
    assert (model(ids) - expected).abs().max().item() <= 1e-4


def test_gguf_greedy_with_cache_equals_full_forward(pair):
    from gemmakit.engine.generate import generate_steps

    _, model, _ = pair
    prompt = [2, 270, 271, 272, 280, 281, 290, 291, 292, 293, 294]
    produced = [s.tokens[0] for s in generate_steps(model, [prompt], 14)]
    seq = list(prompt)
    for _ in range(14):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert produced == seq[len(prompt):]


def test_bad_sliding_window_pattern(tmp_path):
    config = tiny_config("gemma3").replace(query_pre_attn_scalar=24.0)
    path = write_hf_as_gguf(tmp_path / "m.gguf", make_hf(config), config, sliding_window_pattern=[True, False])
    with pytest.raises(CheckpointError, match="sliding_window_pattern must be an integer or 7 booleans"):
        gemmakit.load(path)
