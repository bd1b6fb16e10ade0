"""Generation mechanics on the real model and on tiny GGUF models: windows, batches, caches."""

from __future__ import annotations

import torch

import gemmakit
from gemmakit.engine.generate import generate_steps
from gemmakit.engine.sampling import SamplingParams
import pytest

from gemmakit.models.config import ModelConfig, griffin_pattern
from tiny import VOCAB_SIZE, random_model, tiny_config, write_gguf


def test_long_prompt_crosses_window_cache_equals_full(real_model):
    """A 1,100-token prompt crosses the 512-token window; chunked cached logits equal one full pass."""
    model, tokenizer = real_model
    text = " ".join(f"item {i} is {i * 7 % 13}." for i in range(200))
    ids = tokenizer.encode(text, add_bos=True)[:1100]
    assert len(ids) == 1100
    x = torch.tensor([ids])
    with torch.inference_mode():
        full = model(x)[0, -40:]
        cache = model.new_cache(1, 1200)
        model(x[:, :600], cache=cache, last_only=True)
        model(x[:, 600:1060], cache=cache, last_only=True)
        steps = [model(x[:, t:t + 1], cache=cache)[0, -1] for t in range(1060, 1100)]
    assert (torch.stack(steps) - full).abs().max().item() < 1e-3


def _griffin_config() -> ModelConfig:
    return ModelConfig(family="recurrentgemma", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48,
                       num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16, layer_kinds=griffin_pattern(4),
                       max_position_embeddings=256, query_pre_attn_scalar=16, sliding_window=16, lru_width=32,
                       rope_fraction=0.5, embed_scale_bf16=True, mlp_bias=True, attn_out_bias=True,
                       final_logit_softcap=30.0)


@pytest.mark.parametrize("config", [tiny_config("gemma"), tiny_config("gemma2"), tiny_config(),
                                    tiny_config(num_layers=6), _griffin_config()],
                         ids=["gemma-global", "gemma2-local", "gemma3-local", "gemma3-global", "griffin"])
def test_last_only_prefill_keeps_every_row_in_the_cache(config):
    """With last_only the final layer works out the last row alone: its logits are the full pass's
    last row, and the cache it leaves is the one a full prefill leaves, so decoding goes on the same."""
    model = random_model(config)
    ids = torch.randint(6, VOCAB_SIZE, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = model(ids)
        cut, whole = model.new_cache(2, 48), model.new_cache(2, 48)
        last = model(ids[:, :-1], cache=cut, last_only=True)
        assert last.shape[1] == 1
        assert (last[:, 0] - model(ids[:, :-1], cache=whole)[:, -1]).abs().max().item() < 1e-5
        for a, b in zip(cut.layers, whole.layers):
            for name, x in vars(a).items():
                if isinstance(x, torch.Tensor):
                    assert torch.equal(x, getattr(b, name)), name
        step = model(ids[:, -1:], cache=cut)[:, 0]
    assert (step - full[:, -1]).abs().max().item() < 1e-4


def test_real_model_batch_equals_single(real_model):
    model, tokenizer = real_model
    prompts = [tokenizer.encode(p, add_bos=True) for p in ["Hello", "The capital of France is", "1, 2, 3, 4,"]]
    batched = [s.tokens for s in generate_steps(model, prompts, 8)]
    for row, prompt in enumerate(prompts):
        alone = [s.tokens[0] for s in generate_steps(model, [prompt], 8)]
        assert [step[row] for step in batched] == alone


def test_local_cache_is_bounded_by_window():
    """Local layers allocate only their window, whatever the context."""
    config = tiny_config(max_position_embeddings=4096)
    model = random_model(config)
    cache = model.new_cache(1, 4096)
    per_position = 2 * config.num_kv_heads * config.head_dim * 4
    local = config.layer_kinds.count("local")
    global_ = config.layer_kinds.count("global")
    assert cache.nbytes() == per_position * (local * config.sliding_window + global_ * 4096)
    assert cache.nbytes() == config.kv_cache_bytes(4096, bytes_per_value=4)


def test_stops_on_stop_token():
    """Generation ends at the first stop token, which is included as the last token."""
    model = random_model(tiny_config())
    prompt = [2, 280, 281]
    free = [s.tokens[0] for s in generate_steps(model, [prompt], 20)]
    stop = free[5]
    stopped = [s.tokens[0] for s in generate_steps(model, [prompt], 20, stop_ids=frozenset({stop}))]
    assert stopped == free[: free.index(stop) + 1]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_overlapped_decode_yields_the_same_steps(temperature):
    """Queuing each decode step before reading the previous one's tokens (the default on a GPU)
    changes when steps run, not what they produce: the same tokens, finish flags and stops, for a
    batch whose rows stop at different steps, greedy and sampled; at most one step more is run."""
    model = random_model(tiny_config())
    prompts = [[2, 280, 281], [2, 17, 99, 5, 30]]
    params = SamplingParams(temperature=temperature, seed=3)
    free = [s.tokens for s in generate_steps(model, prompts, 12, params, overlap=False)]
    stops = frozenset({free[3][0], free[6][1]})
    calls = {True: 0, False: 0}

    def runs(overlap: bool):
        def count(*_):
            calls[overlap] += 1
        handle = model.register_forward_hook(count)
        try:
            return [(s.tokens, s.finished) for s in generate_steps(model, prompts, 12, params, stops, overlap=overlap)]
        finally:
            handle.remove()

    assert runs(True) == runs(False)
    assert calls[False] <= calls[True] <= calls[False] + 1


def test_gguf_quantised_model_equals_independently_dequantised(tmp_path):
    """A Q8_0 GGUF loads to exactly the model whose weights gguf-py quantises and dequantises (with
    float32 prefill, the reference numerics; ``auto`` may take bfloat16, see test_fused_decode)."""
    import gguf

    model = random_model(tiny_config())
    loaded, _ = gemmakit.load(write_gguf(tmp_path / "q8.gguf", model, quant="Q8_0"), prefill_dtype="float32")
    expected = random_model(tiny_config())
    with torch.no_grad():
        for name, p in expected.named_parameters():
            if p.ndim == 2:
                q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    ids = torch.randint(0, VOCAB_SIZE, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(ids) - expected(ids)).abs().max() <= 1e-5
        assert (loaded(ids) - model(ids)).abs().max() > 0  # the quantisation really happened


def test_gguf_float_roundtrip_is_exact(tmp_path):
    model = random_model(tiny_config())
    loaded, tokenizer = gemmakit.load(write_gguf(tmp_path / "f32.gguf", model))
    assert tokenizer is not None and loaded.config == model.config.replace(name=loaded.config.name)
    ids = torch.randint(0, VOCAB_SIZE, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(ids) - model(ids)).abs().max() <= 1e-6
