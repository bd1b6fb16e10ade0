"""`gemmakit serve --adapter DIR` serves the adapted model: the same tokens as `generate --adapter`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from gemmakit.checkpoints.peft import save_adapter  # noqa: E402
from gemmakit.models.lora import LoRAConfig, apply_lora, lora_parameters  # noqa: E402
from tiny import random_model, tiny_config, write_gguf  # noqa: E402

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_applies_the_adapter(tmp_path):
    base = random_model(tiny_config())
    model_path = write_gguf(tmp_path / "m.gguf", base)
    adapted = random_model(tiny_config())
    lora = LoRAConfig(rank=4, alpha=8.0)
    apply_lora(adapted, lora)
    with torch.no_grad():  # a visibly non-zero adapter
        for p in lora_parameters(adapted).values():
            p.normal_(0.0, 0.3)
    save_adapter(adapted, tmp_path / "adapter", lora)

    cli = [sys.executable, "-m", "gemmakit.cli"]
    gen = subprocess.run(cli + ["generate", "--model", str(model_path), "--adapter", str(tmp_path / "adapter"),
                                "--json", "-n", "8", "the"], capture_output=True, text=True, check=True)
    expected = json.loads(gen.stdout)["text"]
    plain = json.loads(subprocess.run(cli + ["generate", "--model", str(model_path), "--json", "-n", "8", "the"],
                                      capture_output=True, text=True, check=True).stdout)["text"]
    assert expected != plain  # the adapter changes the output, so the comparison below means something

    port = _free_port()
    server = subprocess.Popen(cli + ["serve", "--model", str(model_path), "--adapter", str(tmp_path / "adapter"),
                                     "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"prompt": "the", "max_tokens": 8, "temperature": 0}, timeout=60).json()
        assert reply["choices"][0]["text"] == expected
    finally:
        server.terminate()
        server.wait(timeout=30)
