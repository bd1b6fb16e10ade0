"""gemmakit on a CUDA GPU (skipped where there is none, as on the CI machines).

These are the checks for a lent GPU machine (benchmarks/gpu_check.sh runs them there): the eager
model on CUDA computes the CPU's logits, and the compiled decode step is really replayed as CUDA
graphs (no skipped graphs) with the eager greedy tokens and merged q/k/v and gate/up projections;
the serving engine, speculative decoding and a compiled bfloat16 model on CUDA agree with their
plain counterparts. (Their logic was checked by running a copy of this file with "cuda" replaced
by "cpu": all pass there but the projection-merging assertion, which is CUDA-only by design.)
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


def test_serving_engine_on_cuda_equals_one_request_alone() -> None:
    """The continuous-batching engine on a CUDA model (its row cache, batched greedy picks): each
    request's tokens equal generate_steps' for it alone."""
    from gemmakit.engine.scheduler import Engine, Request

    model = random_model(tiny_config("gemma3", **CONFIG), seed=5).to("cuda").eval()
    prompts = PROMPTS + [[2, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]]
    engine = Engine(model, max_batch=2, prefill_chunk=4)
    try:
        got = engine.generate([Request(tuple(p), max_tokens=10, stop_ids=frozenset()) for p in prompts])
    finally:
        engine.shutdown()
    assert [g[0] for g in got] == [_greedy(model, p, 10) for p in prompts]


def test_speculative_decoding_on_cuda_equals_plain_greedy() -> None:
    from gemmakit.engine.speculative import speculative_greedy

    target = random_model(tiny_config("gemma3", **CONFIG), seed=5).to("cuda").eval()
    draft = random_model(tiny_config("gemma3", **{**CONFIG, "num_layers": 1}), seed=6).to("cuda").eval()
    got, stats = speculative_greedy(target, draft, PROMPTS[0], 20, k=3)
    assert got == _greedy(target, PROMPTS[0], 20) and stats["rounds"] > 0


def test_bfloat16_compiled_step_on_cuda_follows_eager() -> None:
    """A bfloat16 model, the benchmark's case: compiled (CUDA graphs) and eager logits of the same
    steps stay within bfloat16's rounding of each other."""
    eager = random_model(tiny_config("gemma3", **CONFIG), seed=5).to("cuda", torch.bfloat16).eval()
    compiled = random_model(tiny_config("gemma3", **CONFIG), seed=5).to("cuda", torch.bfloat16).eval()
    compiled.compile_decode()
    with torch.inference_mode():
        logits = []
        for model in (eager, compiled):
            cache = model.new_cache(1, 32)
            ids = torch.tensor([PROMPTS[0]], device="cuda")
            model(ids, cache=cache, last_only=True)
            steps = [model(torch.tensor([[t]], device="cuda"), cache=cache).float() for t in (5, 6, 7, 8)]
            logits.append(torch.cat(steps))
    scale = logits[0].abs().max().item()
    assert (logits[0] - logits[1]).abs().max().item() <= 0.05 * scale
