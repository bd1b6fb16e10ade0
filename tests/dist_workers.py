"""Worker functions for test_distributed.py, run in 2 spawned processes over gloo on loopback.

They live in their own module because spawned processes import their target by name. Each worker
writes what it measured to ``out/<rank>.json``; the test process asserts on those files.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
import torch.distributed as dist


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def tensor_parallel_forward(rank: int, world: int, port: int, out: str) -> None:
    from gemmakit.train.distributed import tensor_parallel
    from tiny import random_model, tiny_config

    _init(rank, world, port)
    try:
        result = {}
        for name, cfg in [("gemma3", tiny_config("gemma3", num_layers=3)),
                          ("gemma2", tiny_config("gemma2", num_layers=2)),
                          ("one_kv_head", tiny_config("gemma3", num_layers=2, num_kv_heads=1))]:
            model = random_model(cfg, seed=0)
            ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                full = model(ids)
                tensor_parallel(model, rank, world)
                split = model(ids)
                cache = model.new_cache(2, 32)  # sized for this rank's heads
                stepped = torch.cat([model(ids[:, :12], cache=cache)] +
                                    [model(ids[:, t:t + 1], cache=cache) for t in range(12, 20)], dim=1)
            result[name] = {"forward": (split - full).abs().max().item(),
                            "cached": (stepped - full).abs().max().item(),
                            "q_rows": model.layers[0].attn.q_proj.weight.shape[0]}
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def fsdp_step(rank: int, world: int, port: int, out: str) -> None:
    from gemmakit.train.data import Blocks
    from gemmakit.train.distributed import gather_full_model, shard_for_training
    from gemmakit.train.loop import Trainer, TrainConfig
    from tiny import random_model, tiny_config

    _init(rank, world, port)
    try:
        cfg = tiny_config("gemma3", num_layers=2)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, cfg.vocab_size, (7, 17), generator=g)
        mask = torch.rand(7, 17, generator=g) > 0.2
        blocks = Blocks(ids, mask)  # 7 blocks, 4 per step: the last step leaves one rank without data
        config = TrainConfig(lr=1e-2, batch_size=2, grad_accum=2, epochs=1)

        single = random_model(cfg, seed=0).requires_grad_(True)
        Trainer(single, blocks, config, None, progress=False).run()

        model = shard_for_training(random_model(cfg, seed=0).requires_grad_(True))
        result = Trainer(model, blocks, config, None, progress=False, rank=rank, world=world).run()
        model = gather_full_model(model)
        expected = dict(single.named_parameters())
        diff = max((p.detach() - expected[n].detach()).abs().max().item() for n, p in model.named_parameters())
        moved = max((p.detach() - q.detach()).abs().max().item()
                    for p, q in zip(random_model(cfg, seed=0).parameters(), single.parameters()))
        sharded = type(next(iter(shard_for_training(random_model(cfg, seed=0).requires_grad_(True))
                                 .parameters()))).__name__
        Path(out, f"{rank}.json").write_text(json.dumps({"diff": diff, "moved": moved, "steps": result.steps,
                                                         "param_type": sharded}))
    finally:
        dist.destroy_process_group()
