"""gemmakit on a CUDA GPU (skipped where there is none, as on the CI machines).

These are the checks for a lent GPU machine (benchmarks/gpu_check.sh runs them there): the eager
model on CUDA computes the CPU's logits, and the compiled decode step is really replayed as CUDA
graphs (no skipped graphs) with the eager greedy tokens and merged q/k/v and gate/up projections.
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.engine.generate import generate_steps
from tiny import random_model, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = dict(hidden_size=64, intermediate_size=128, num_layers=3, sliding_window=6)
PROMPTS = [[2, 17, 99, 5, 30, 41, 7, 8, 9], [2, 40, 41]]


def _greedy(model, prompt: list[int], n: int = 16) -> list[int]:
    return [o.tokens[0] for o in generate_steps(model, [prompt], n)]


def test_eager_cuda_logits_equal_the_cpu_ones() -> None:
    cpu = random_model(tiny_config("gemma3", **CONFIG), seed=5).eval()
    gpu = random_model(tiny_config("gemma3", **CONFIG), seed=5).to("cuda").eval()
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        a, b = gpu(ids.cuda()).cpu(), cpu(ids)
    assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
    assert _greedy(gpu, PROMPTS[0]) == _greedy(cpu, PROMPTS[0])


def test_compiled_decode_replays_cuda_graphs_with_the_eager_tokens() -> None:
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    eager = random_model(tiny_config("gemma3", **CONFIG), seed=5).to("cuda").eval()
    compiled = random_model(tiny_config("gemma3", **CONFIG), seed=5).to("cuda").eval()
    counters.clear()
    compiled.compile_decode()
    assert compiled.layers[0].attn.qkv_proj is not None and compiled.layers[0].mlp.gate_up_proj is not None
    for prompt in PROMPTS:
        assert _greedy(compiled, prompt) == _greedy(eager, prompt)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False) is not None
