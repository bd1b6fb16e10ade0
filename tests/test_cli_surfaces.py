"""The remaining user surfaces: chat, info, API loading of directories without tokenizer files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import gemmakit
from gemmakit.chat import render_chat
from tiny import random_model, tiny_config, write_gguf

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("g") / "tiny.gguf", random_model(tiny_config()))


def test_chat_over_stdin_two_turns(tiny_gguf):
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "chat", "--model", str(tiny_gguf), "-n", "5"],
                          input="hello\n/reset\nagain\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(history cleared)" in proc.stderr
    assert len(proc.stdout.splitlines()) == 2  # one reply line per user turn


def test_render_chat_folds_system_into_first_user_turn():
    text = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert text == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_info_from_preset_needs_no_weights():
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "info", "--model", "gemma3-27b", "--json",
                           "--context", "131072"], capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout)
    assert report["layers"] == 62 and report["layer_kinds"] == {"local": 52, "global": 10}
    # 10 global layers x 131072 + 52 local x 1024 positions, K and V, 16 heads x 128 dims, bf16
    assert report["kv_cache_bytes"]["bfloat16"] == 2 * (10 * 131072 + 52 * 1024) * 16 * 128 * 2
    assert 27e9 < report["parameters"] < 28e9


def test_info_on_file_counts_real_parameters(tiny_gguf):
    from gemmakit.cli import main

    model, _ = gemmakit.load(tiny_gguf)
    report = __import__("gemmakit.info", fromlist=["describe"]).describe(str(tiny_gguf))
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert main(["info", "--model", str(tiny_gguf)]) == 0


def test_hf_directory_without_tokenizer_and_sharded(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                           sliding_window=4, hidden_activation="gelu_pytorch_tanh")
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, tokenizer = gemmakit.load(tmp_path)
    assert tokenizer is None
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4
