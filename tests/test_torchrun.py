"""The user's command under torchrun: ``finetune`` on 2 gloo processes (FSDP2) equals 1 process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from train_helpers import synthetic_task, tiny_gguf, write_jsonl

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test

SRC = str(Path(__file__).parents[1] / "src")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_finetune_equals_single_process(tmp_path):
    model, data = tiny_gguf(tmp_path), write_jsonl(tmp_path / "d.jsonl", synthetic_task(30))
    args = ["-m", "gemmakit.cli", "finetune", "--model", str(model), "--data", str(data), "--seq-len", "24",
            "--batch-size", "2", "--max-steps", "3", "--lr", "1e-2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, check=True, timeout=120,
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(_free_port())]
    done = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two")], env=env, timeout=180,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert max(one[k].abs().max().item() for k in one if "lora_B" in k) > 1e-3  # it trained
