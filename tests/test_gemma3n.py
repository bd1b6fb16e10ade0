"""Gemma 3n text decoders against transformers, on small random-weight models saved by transformers.

The configs between them exercise every mechanism of the family: AltUp's streams (router,
prediction, correction, the scaled active stream gating the per-layer embeddings, the streams'
projections in and out), LAuReL, per-layer embeddings (PLE) from a table smaller than the
vocabulary (the ids beyond it read row 0), gaussian top-k sparsity on the first layers, K/V
sharing with a sliding window shorter than the prompt, per-layer MLP widths and the final soft-cap.
"""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.engine.generate import generate_steps

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma3nForCausalLM"):
    pytest.skip("this transformers has no Gemma 3n", allow_module_level=True)

VOCAB = 200
PLE_VOCAB = 150  # ids 150..199 stand for the soft-token ids beyond the PLE table
TYPES = (["sliding_attention"] * 4 + ["full_attention"]) * 2

CONFIGS = {
    # E2B/E4B-like: 4 streams, the last 5 layers read shared K/V (sliding from layer 3, full from 4),
    # sparse MLPs on the first 3 layers, a different MLP width on some layers
    "shared_kv_sparse": dict(num_hidden_layers=10, layer_types=TYPES, num_kv_shared_layers=5,
                             intermediate_size=[96, 80, 96, 64, 96, 112, 96, 96, 80, 96],
                             activation_sparsity_pattern=[0.95, 0.95, 0.9] + [0.0] * 7),
    # 3 streams, no sharing, dense, the correction's output scale off, another final soft-cap
    # (transformers 5.23's strict config class takes no null one)
    "three_streams": dict(num_hidden_layers=5, layer_types=TYPES[:5], num_kv_shared_layers=0, intermediate_size=96,
                          activation_sparsity_pattern=[0.0] * 5, altup_num_inputs=3, altup_correct_scale=False,
                          final_logit_softcapping=12.0),
}


def _hf_model(name: str):
    config = transformers.Gemma3nTextConfig(
        vocab_size=VOCAB, vocab_size_per_layer_input=PLE_VOCAB, hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=5, max_position_embeddings=256,
        hidden_size_per_layer_input=8, laurel_rank=8, **CONFIGS[name])
    return transformers.Gemma3nForCausalLM(config)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = _hf_model(request.param).eval()
    # Weights far from their initial values (zeros, ones), so that a mapping mistake shows. Matrices
    # at std 0.15 rather than Gemma 4's test's 0.2: there, the ten layers of AltUp streams were so
    # ill-conditioned that float32 rounding alone moved the logits by 1.7e-4 from float64's
    # (transformers' own cached and full forwards differed by 8.6e-5), more than the tolerance.
    with torch.no_grad():
        for _, p in hf.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, _ = gemmakit.load(path)
    return hf, model, path


def test_the_config_reads_every_mechanism(pair):
    _, model, _ = pair
    c = model.config
    assert c.family == "gemma3n" and c.altup_inputs in (3, 4) and c.laurel_rank == 8
    assert (c.per_layer_input_dim, c.per_layer_vocab_size, c.vocab_size) == (8, PLE_VOCAB, VOCAB)
    assert (c.norm_offset, c.attention_scale, c.v_norm, c.qk_norm) == (0.0, 1.0, True, True)
    if c.num_kv_shared_layers:
        assert [p.kv_source for p in c.layer_plan] == [0, 1, 2, 3, 4, 3, 3, 3, 3, 4]
        assert [p.intermediate_size for p in c.layer_plan] == CONFIGS["shared_kv_sparse"]["intermediate_size"]
        assert [p.activation_sparsity for p in c.layer_plan][:4] == [0.95, 0.95, 0.9, 0.0]


def test_logits_match_transformers(pair):
    hf, model, _ = pair
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    assert (ids >= PLE_VOCAB).any()
    with torch.no_grad():
        expected = hf(ids).logits
    got = model(ids)
    assert (got - expected).abs().max().item() <= 1e-4


def test_long_prompt_logits_match_transformers(pair):
    """Enough rows for the CPU's many-row matmul and attention paths (kernels/gemm.py)."""
    hf, model, _ = pair
    ids = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(ids).logits
    assert (model(ids) - expected).abs().max().item() <= 1e-4


def test_cached_chunks_equal_full_forward(pair):
    _, model, _ = pair
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = model.new_cache(2, 32)
    pieces = [model(ids[:, :9], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(9, 24)]
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-4  # float32 rounding of other kernels


def test_last_only_equals_the_full_forwards_last_row(pair):
    _, model, _ = pair
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(2, 16)
    assert (model(ids, cache=cache, last_only=True)[:, -1] - model(ids)[:, -1]).abs().max().item() <= 1e-4


def test_cached_greedy_equals_transformers(pair):
    hf, model, _ = pair
    prompt = [2, 50, 60, 70, 80, 90, 100, 110, 160, 130, 190]  # longer than the window of 5; ids past the PLE table
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


def test_serving_rows_equal_one_by_one(pair):
    """The serving engine's cache, whose rows advance independently (models/row_cache.py)."""
    from gemmakit.models.row_cache import RowKVCache

    _, model, _ = pair
    prompts, following = [[2, 5, 9, 33, 41, 17, 80, 81, 3], [2, 7, 11]], [50, 160]
    ids, positions = torch.zeros(2, 9, dtype=torch.long), torch.full((2, 9), -1)
    for r, p in enumerate(prompts):
        ids[r, :len(p)], positions[r, :len(p)] = torch.tensor(p), torch.arange(len(p))
    cache = RowKVCache(model.config, 2, 32, torch.float32)
    prefill = model(ids, cache=cache, positions=positions)
    step = model(torch.tensor([following]).T, cache=cache, positions=torch.tensor([[9], [3]]))
    for r, p in enumerate(prompts):
        alone = model(torch.tensor([p + [following[r]]]))[0]
        assert (prefill[r, len(p) - 1] - alone[len(p) - 1]).abs().max().item() <= 1e-4
        assert (step[r, -1] - alone[-1]).abs().max().item() <= 1e-4


def test_the_language_model_of_a_multimodal_checkpoint_loads(pair, tmp_path):
    """Gemma3nForConditionalGeneration's layout: the decoder under ``model.language_model.``, its
    config as the ``text_config`` of a ``gemma3n`` one, beside towers gemmakit does not read."""
    import json

    from safetensors.torch import load_file, save_file

    _, model, path = pair
    weights = {k.replace("model.", "model.language_model.", 1): v for k, v in load_file(path / "model.safetensors").items()}
    weights["model.embed_vision.embedding.weight"] = torch.zeros(4, 8)  # stands for the towers and embedders
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    text = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3n", "text_config": text,
                                                      "architectures": ["Gemma3nForConditionalGeneration"]}))
    loaded, _ = gemmakit.load(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(7))
    assert torch.equal(loaded(ids), model(ids))


def test_cache_holds_only_the_layers_that_produce_keys_and_values(pair):
    _, model, _ = pair
    cache = model.new_cache(1, 16)
    owners = [i for i, plan in enumerate(model.config.layer_plan) if not plan.reads_shared_kv]
    assert [i for i, c in enumerate(cache.layers) if c is not None] == owners
    assert cache.nbytes() == model.config.kv_cache_bytes(16, bytes_per_value=4)


def test_convert_writes_a_directory_transformers_reads_as_the_same_model(pair, tmp_path):
    from gemmakit.convert import convert

    hf, _, path = pair
    out = convert(path, tmp_path / "out")
    back = transformers.Gemma3nForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)


def test_parameter_count_is_the_models_and_transformers(pair):
    hf, model, _ = pair
    ours = sum(p.numel() for p in model.parameters())
    assert model.config.num_parameters() == ours == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", ["gemma3n-e2b", "gemma3n-e4b"])
def test_preset_reads_back_through_transformers_config(name):
    from gemmakit.checkpoints.gemma3n import config_from_hf, to_hf_config
    from gemmakit.models.config import PRESETS

    preset = PRESETS[name]
    raw = transformers.Gemma3nTextConfig(**to_hf_config(preset)).to_dict()
    assert config_from_hf(raw).replace(name=name) == preset
    assert PRESETS[name + "-it"] == preset.replace(name=name + "-it")


@pytest.mark.parametrize("name", ["gemma3n-e2b", "gemma3n-e4b"])
def test_preset_parameter_count_is_transformers(name):
    """The full-size text decoder, built by transformers on the meta device (no memory)."""
    from gemmakit.checkpoints.gemma3n import to_hf_config
    from gemmakit.models.config import PRESETS

    preset = PRESETS[name]
    with torch.device("meta"):
        hf = transformers.Gemma3nForCausalLM(transformers.Gemma3nTextConfig(**to_hf_config(preset)))
    assert preset.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_transformers_defaults_are_e4b():
    """A config.json that leaves keys out gets Gemma3nTextConfig's defaults, E4B's values."""
    from gemmakit.checkpoints.gemma3n import config_from_hf
    from gemmakit.models.config import PRESETS

    assert config_from_hf({"model_type": "gemma3n_text"}).replace(name="gemma3n-e4b") == PRESETS["gemma3n-e4b"]
    multimodal = {"model_type": "gemma3n", "text_config": transformers.Gemma3nTextConfig().to_dict()}
    from gemmakit.checkpoints.safetensors import config_from_hf as any_config

    assert any_config(multimodal).replace(name="gemma3n-e4b") == PRESETS["gemma3n-e4b"]
