"""torch.distributed on 2 CPU processes with gloo (loopback only, bounded timeouts).

A tensor-parallel forward equals the single-process forward; an FSDP2 training step equals the
single-process step on the same data.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import dist_workers

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(fn, tmp_path, world: int = 2, timeout_s: float = 240) -> list[dict]:
    ctx = mp.spawn(fn, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        # join() returns as each process ends (and raises if one failed); a hung collective fails the test
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("distributed workers timed out")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(world)]


def test_tensor_parallel_forward_equals_single_process(tmp_path):
    for rank, result in enumerate(_run(dist_workers.tensor_parallel_forward, tmp_path)):
        for name, r in result.items():
            assert r["forward"] < 1e-5, (rank, name, r)
            assert r["cached"] < 1e-5, (rank, name, r)
            assert r["q_rows"] == 2 * 24  # 4 heads of 24 split over 2 ranks


def test_fsdp_step_equals_single_process_step(tmp_path):
    for result in _run(dist_workers.fsdp_step, tmp_path):
        assert result["param_type"] == "DTensor"  # really sharded
        assert result["steps"] == 2
        assert result["moved"] > 1e-3  # training changed the weights...
        assert result["diff"] < 1e-5, result  # ...exactly as one process does
