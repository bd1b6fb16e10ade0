"""Broken checkpoints in each format: the error names the problem in the file's own terms.

Unknown architecture, missing tensors, tensors of the wrong shape (which tensor, expected and found
shape); never a silent partial load, and from the CLI one line and exit status 2. The .ckpt cases
live in test_gemma_pytorch.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import gemmakit
from gemmakit.errors import CheckpointError, UnsupportedModelError
from tiny import random_hf_model, random_model, tiny_config, write_gguf

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test

transformers = pytest.importorskip("transformers")


def cli_error(path, fragment: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "info", "--model", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemmakit: error:") and fragment in lines[0], proc.stderr


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "gemma2"
    random_hf_model("gemma2").save_pretrained(path)
    return path


def _copy(hf_dir, tmp_path, edit_config=None, edit_tensors=None):
    out = tmp_path / "edited"
    out.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(hf_dir / "model.safetensors")
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_hf_unknown_model_type(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path, edit_config=lambda c: c.update(model_type="llama"))
    with pytest.raises(UnsupportedModelError, match="model_type 'llama' is not supported"):
        gemmakit.load(path)
    cli_error(path, "'llama'")


def test_hf_missing_config_key(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path, edit_config=lambda c: c.pop("hidden_size"))
    with pytest.raises(CheckpointError, match="'hidden_size' is missing"):
        gemmakit.load(path)


def test_hf_missing_tensor(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path, edit_tensors=lambda t: t.pop("model.layers.3.pre_feedforward_layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.3\.pre_feedforward_layernorm\.weight"):
        gemmakit.load(path)
    cli_error(path, "model.layers.3.pre_feedforward_layernorm.weight")


def test_hf_wrong_shape(hf_dir, tmp_path):
    def shrink(t):
        t["model.layers.5.self_attn.k_proj.weight"] = torch.zeros(24, 64)

    path = _copy(hf_dir, tmp_path, edit_tensors=shrink)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.5\.self_attn\.k_proj\.weight has shape "
                                              r"\(24, 64\), expected \(48, 64\)"):
        gemmakit.load(path)


def test_gguf_missing_tensor(tmp_path):
    model = random_model(tiny_config("gemma2"))
    model.layers[2].post_mlp_norm = nn.Identity()  # the writer then has no blk.2.post_ffw_norm
    path = write_gguf(tmp_path / "m.gguf", model)
    with pytest.raises(CheckpointError, match=r"missing tensors blk\.2\.post_ffw_norm\.weight"):
        gemmakit.load(path)
    cli_error(path, "blk.2.post_ffw_norm.weight")


def test_gguf_wrong_shape(tmp_path):
    model = random_model(tiny_config("gemma"))
    model.layers[6].attn.o_proj.weight = nn.Parameter(torch.zeros(64, 32))
    path = write_gguf(tmp_path / "m.gguf", model)
    with pytest.raises(CheckpointError, match=r"tensor blk\.6\.attn_output\.weight has shape \(64, 32\), "
                                              r"expected \(64, 96\)"):
        gemmakit.load(path)


def test_gguf_missing_metadata(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="gemma2.embedding_length is missing"):
        gemmakit.load(path)
