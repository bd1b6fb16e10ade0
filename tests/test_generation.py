"""Generation mechanics on the real model and on tiny GGUF models: windows, batches, caches."""

from __future__ import annotations

import torch

import gemmakit
from gemmakit.engine.generate import generate_steps
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


def test_gguf_quantised_model_equals_independently_dequantised(tmp_path):
    """A Q8_0 GGUF loads to exactly the model whose weights gguf-py quantises and dequantises."""
    import gguf

    model = random_model(tiny_config())
    loaded, _ = gemmakit.load(write_gguf(tmp_path / "q8.gguf", model, quant="Q8_0"))
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
