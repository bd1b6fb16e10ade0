"""The compiled one-token decode step (``--compile``) gives the eager tokens.

One tiny Gemma 3 model, stored as a Q8_0 GGUF so the compiled graph runs the quantised-weight
kernel as a torch operator, with a 6-token sliding window so the prompt and the continuation wrap
the ring and global layers attend over a static, partly unwritten buffer.
"""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.engine.generate import generate_steps
from tiny import random_model, tiny_config, write_gguf

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test


def test_compiled_decode_equals_eager(tmp_path) -> None:
    config = tiny_config("gemma3", hidden_size=64, intermediate_size=128, num_layers=3, sliding_window=6)
    path = write_gguf(tmp_path / "tiny-q8.gguf", random_model(config, seed=5), quant="Q8_0")
    from torch._dynamo.utils import counters

    eager, _ = gemmakit.load(path)
    counters.clear()
    compiled, _ = gemmakit.load(path, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # compiled at load, for the smallest cache size
    calls = []
    step = compiled._compiled_step
    compiled._compiled_step = lambda *args: calls.append(1) or step(*args)
    prompts = [[2, 17, 99, 5, 30, 41, 7, 8, 9], [2, 40, 41]]

    def greedy(model, prompt):
        return [o.tokens[0] for o in generate_steps(model, [prompt], 24)]

    for prompt in prompts:
        assert greedy(compiled, prompt) == greedy(eager, prompt)
    assert len(calls) == 2 * 23  # every decode step went through the compiled function...
    assert counters["stats"]["unique_graphs"] == graphs  # ...without compiling again (same cache size)
    # the compiled model's cache really is the static kind, and logits agree closely, not just argmax
    cache = compiled.new_cache(1, 40)
    assert cache.static and cache.max_len >= 40
    ids = torch.tensor([prompts[0]])
    with torch.inference_mode():
        ref_cache = eager.new_cache(1, 40)
        eager(ids, cache=ref_cache)
        compiled(ids, cache=cache)
        nxt = torch.tensor([[11]])
        a = compiled(nxt, cache=cache)
        b = eager(nxt, cache=ref_cache)
    assert (a - b).abs().max().item() < 1e-4


def test_compiled_bfloat16_decode_runs_and_matches_eager(tmp_path) -> None:
    """A bfloat16 model compiled on the CPU: the float32-only attention kernel stays out of the
    graph (it once went in and failed at the first step) and the tokens are the eager ones."""
    config = tiny_config("gemma3", hidden_size=64, intermediate_size=128, num_layers=2, sliding_window=6)
    path = write_gguf(tmp_path / "tiny-f32.gguf", random_model(config, seed=6))
    eager, _ = gemmakit.load(path, dtype="bfloat16")
    compiled, _ = gemmakit.load(path, dtype="bfloat16", compile=True)
    prompt = [2, 17, 99, 5, 30, 41, 7]
    assert ([o.tokens[0] for o in generate_steps(compiled, [prompt], 12)]
            == [o.tokens[0] for o in generate_steps(eager, [prompt], 12)])


def test_dense_projections_merge_without_changing_the_model() -> None:
    """What compile_decode does to a float model on CUDA (checked here on the CPU): q/k/v and
    gate/up become one matmul each, and the logits and greedy tokens stay those of the model."""
    import copy

    from gemmakit.models.decoder import fuse_dense_projections
    from gemmakit.models.lora import LoRAConfig, apply_lora

    config = tiny_config("gemma3", hidden_size=64, intermediate_size=128, num_layers=3, sliding_window=6)
    model = random_model(config, seed=8).eval()
    merged = copy.deepcopy(model)
    assert fuse_dense_projections(merged) == 2 * config.num_layers
    assert fuse_dense_projections(merged) == 0  # nothing left to merge
    attn = merged.layers[0].attn
    assert attn.q_proj is None and attn.qkv_proj.weight.shape == (attn.qkv_proj.out_features, config.hidden_size)
    ids = torch.tensor([[2, 17, 99, 5, 30, 41, 7, 8, 9]])
    with torch.inference_mode():
        a, b = merged(ids), model(ids)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    prompt = ids[0].tolist()
    assert ([o.tokens[0] for o in generate_steps(merged, [prompt], 12)]
            == [o.tokens[0] for o in generate_steps(model, [prompt], 12)])
    lora = random_model(config, seed=8)
    assert len(apply_lora(lora, LoRAConfig(rank=4, alpha=8))) == 7 * config.num_layers
    assert fuse_dense_projections(lora) == 0  # LoRA-wrapped projections stay as they are
