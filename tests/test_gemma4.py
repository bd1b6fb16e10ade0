"""Gemma 4 text decoders against transformers, on small random-weight models saved by transformers.

The configs between them exercise every mechanism of the family: per-layer embeddings (PLE), K/V
sharing with a sliding window shorter than the prompt, the double-wide MLP of the sharing layers,
global layers with their own head size, K=V and their own KV-head count, proportional RoPE, the
mixture of experts beside the dense MLP, layer scalars and the final soft-cap.
"""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.engine.generate import generate_steps

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma4ForCausalLM"):
    pytest.skip("this transformers has no Gemma 4", allow_module_level=True)

VOCAB = 200
TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention", "full_attention"]

CONFIGS = {
    # E2B/E4B-like: PLE, the last 3 layers read shared K/V (double-wide MLP there), K=V global layers
    "ple_shared_kv": dict(num_kv_shared_layers=3, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
                          vocab_size_per_layer_input=VOCAB, attention_k_eq_v=True, num_global_key_value_heads=1),
    # 26B-A4B-like: experts beside the dense MLP in every layer, no PLE
    "experts": dict(enable_moe_block=True, num_experts=6, top_k_experts=2, moe_intermediate_size=20,
                    hidden_size_per_layer_input=0, attention_k_eq_v=True, num_global_key_value_heads=1),
    # 31B-like: plain global layers with a v projection, no sharing, no PLE
    "dense": dict(hidden_size_per_layer_input=0),
    # the 12B: transformers' gemma4_unified, K=V global layers
    "unified": dict(attention_k_eq_v=True, num_global_key_value_heads=1),
}


def _hf_model(name: str):
    unified = name == "unified"
    config = (transformers.Gemma4UnifiedTextConfig if unified else transformers.Gemma4TextConfig)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=len(TYPES), num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=5, layer_types=TYPES,
        max_position_embeddings=256, final_logit_softcapping=30.0, **CONFIGS[name])
    return (transformers.Gemma4UnifiedForCausalLM if unified else transformers.Gemma4ForCausalLM)(config)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = _hf_model(request.param).eval()
    with torch.no_grad():  # weights far from their initial values, so that a mapping mistake shows
        for name, p in hf.named_parameters():
            if p.dim() == 1 or name.endswith("layer_scalar"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
        for name, b in hf.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, _ = gemmakit.load(path)
    return hf, model, path


def test_logits_match_transformers(pair):
    hf, model, _ = pair
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    got = model(ids)
    assert (got - expected).abs().max().item() <= 1e-4


def test_cached_chunks_equal_full_forward(pair):
    _, model, _ = pair
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = model.new_cache(2, 32)
    pieces = [model(ids[:, :9], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(9, 24)]
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-4  # float32 rounding of other kernels


def test_cached_greedy_equals_transformers(pair):
    hf, model, _ = pair
    prompt = [2, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140]  # longer than the window of 5
    produced = [s.tokens[0] for s in generate_steps(model, [prompt], 16)]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert produced == out[0, len(prompt):].tolist()


def test_batch_of_different_lengths_equals_one_by_one(pair):
    _, model, _ = pair
    prompts = [[2, 5, 9, 33, 41, 17, 80, 81, 3], [2, 7, 11]]
    together = [s.tokens for s in generate_steps(model, prompts, 8)]
    alone = [[s.tokens[0] for s in generate_steps(model, [p], 8)] for p in prompts]
    assert [list(t) for t in zip(*together)] == alone


def test_cache_holds_only_the_layers_that_produce_keys_and_values(pair):
    _, model, _ = pair
    cache = model.new_cache(1, 16)
    owners = [i for i, plan in enumerate(model.config.layer_plan) if not plan.reads_shared_kv]
    assert [i for i, c in enumerate(cache.layers) if c is not None] == owners
    assert cache.nbytes() == model.config.kv_cache_bytes(16, bytes_per_value=4) or model.config.sliding_window > 16


def test_convert_writes_a_directory_transformers_reads_as_the_same_model(pair, tmp_path):
    from gemmakit.convert import convert

    hf, _, path = pair
    out = convert(path, tmp_path / "out")
    back = transformers.Gemma4ForCausalLM.from_pretrained(out).eval()  # (the unified 12B's layout too)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    ours, theirs = back.state_dict(), hf.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():  # the same weights; transformers' expert kernels need not sum in one order on every CPU
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


def test_parameter_count_is_the_models_and_transformers(pair):
    hf, model, _ = pair
    ours = sum(p.numel() for p in model.parameters())
    assert model.config.num_parameters() == ours == sum(p.numel() for p in hf.parameters()) + model.config.num_layers


@pytest.mark.parametrize("name", ["gemma4-e2b", "gemma4-e4b", "gemma4-12b", "gemma4-26b-a4b", "gemma4-31b"])
def test_preset_reads_back_through_transformers_config(name):
    from gemmakit.checkpoints.gemma4 import config_from_hf, to_hf_config
    from gemmakit.models.config import PRESETS

    preset = PRESETS[name]
    raw = transformers.Gemma4TextConfig(**to_hf_config(preset)).to_dict()
    assert config_from_hf(raw).replace(name=name) == preset
    assert PRESETS[name + "-it"] == preset.replace(name=name + "-it")
