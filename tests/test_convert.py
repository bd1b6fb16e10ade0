"""``gemmakit convert``: every source format -> a HF directory that transformers loads with the same logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import gemmakit
from gemmakit.checkpoints import open_checkpoint
from gemmakit.convert import convert
from gemmakit.errors import CheckpointError, InvalidRequestError
from tiny import random_hf_model, random_model, tiny_config, write_ckpt, write_gguf

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(3))


def hf_logits(directory, ids=IDS):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(ids).logits


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_ckpt_to_hf_round_trips_through_transformers(family, tmp_path):
    original = random_hf_model(family)
    original.save_pretrained(tmp_path / "orig")
    ckpt = write_ckpt(tmp_path / "model.ckpt", original.state_dict())
    convert(ckpt, tmp_path / "out", config=open_checkpoint(tmp_path / "orig").config)
    model, got = hf_logits(tmp_path / "out")
    assert type(model) is type(original)
    with torch.no_grad():
        expected = original(IDS).logits
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_gguf_to_hf_round_trips_through_transformers(family, tmp_path):
    config = tiny_config(family, rope_scaling_factor=4.0) if family == "gemma3" else tiny_config(family)
    gguf = write_gguf(tmp_path / "tiny.gguf", random_model(config, seed=5))
    model, tokenizer = gemmakit.load(gguf)
    ids = torch.randint(0, config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(4))
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "convert", str(gguf), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    hf, got = hf_logits(tmp_path / "out", ids)
    assert hf.config.model_type == {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}[family]
    assert (got - model(ids)).abs().max().item() <= 1e-4
    # the tokenizer files: transformers' tokenizer reads them and splits text as gemmakit does
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "the heat<start_of_turn>was in the west"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text, add_bos=True)


def test_hf_to_hf_sharded_and_cast(tmp_path):
    original = random_hf_model("gemma3")
    original.save_pretrained(tmp_path / "orig")
    convert(tmp_path / "orig", tmp_path / "out", dtype=torch.bfloat16, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["model_type"] == "gemma3_text"
    _, got = hf_logits(tmp_path / "out")
    with torch.no_grad():
        for p in original.parameters():  # the same bf16-rounded weights (buffers such as RoPE stay float32)
            p.copy_(p.to(torch.bfloat16).float())
        expected = original(IDS).logits
    assert (got - expected).abs().max().item() <= 1e-4
    # and gemmakit reads its own output back
    again = open_checkpoint(tmp_path / "out")
    assert again.config == open_checkpoint(tmp_path / "orig").config.replace(name=again.config.name)


def test_destination_that_exists_is_refused(tmp_path):
    gguf = write_gguf(tmp_path / "tiny.gguf", random_model(tiny_config("gemma")))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidRequestError, match="already exists"):
        convert(gguf, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "convert", str(gguf), str(tmp_path / "busy")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("gemmakit: error:") and "already exists" in proc.stderr


def test_failure_half_way_leaves_nothing_behind(tmp_path):
    """A mis-shaped tensor late in a HF directory (its header is not checked up front) stops the
    conversion after earlier tensors were written: neither DST nor the temporary directory remains."""
    from safetensors.torch import load_file, save_file

    random_hf_model("gemma2").save_pretrained(tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    tensors["model.layers.6.mlp.up_proj.weight"] = torch.zeros(5, 64)
    save_file(tensors, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.6\.mlp\.up_proj\.weight has shape \(5, 64\), "
                                              r"expected \(96, 64\)"):
        convert(tmp_path / "src", tmp_path / "out", max_shard_bytes=10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
