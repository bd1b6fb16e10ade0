"""Bad input gives one clear line and exit status 2 from the CLI, and a typed error from the API."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gemmakit
from gemmakit.errors import (CheckpointError, InvalidRequestError, ModelNotFoundError, UnsupportedModelError)
from tiny import random_model, tiny_config, write_gguf

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("g") / "tiny.gguf", random_model(tiny_config(max_position_embeddings=32)))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", *args], capture_output=True, text=True)


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemmakit: error:"), proc.stderr
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_file(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "nope.gguf"), "hi"), "not found")
    with pytest.raises(ModelNotFoundError):
        gemmakit.load(tmp_path / "nope.gguf")


def test_truncated_gguf(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    assert_one_line_error(run_cli("generate", "--model", str(cut), "hi"), "cut.gguf")
    with pytest.raises(CheckpointError):
        gemmakit.load(cut)


def test_garbage_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    with pytest.raises(CheckpointError):
        gemmakit.load(junk)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\x00" * 100)
    assert_one_line_error(run_cli("generate", "--model", str(not_gguf), "hi"), "weights.bin")


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(run_cli("info", "--model", str(path)), "llama")
    with pytest.raises(UnsupportedModelError):
        gemmakit.load(path)


def test_unknown_quantisation_type(tiny_gguf, tmp_path, monkeypatch):
    """A tensor type gemmakit cannot read is named in the error (IQ2_XXS here)."""
    import gguf
    import numpy as np

    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    qtype = gguf.GGMLQuantizationType.IQ2_XXS
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    w.add_tensor("token_embd.weight", np.zeros((4, size), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises((UnsupportedModelError, CheckpointError)) as err:
        gemmakit.load(path)
    assert "IQ2_XXS" in str(err.value) or "type" in str(err.value)


def test_empty_prompt(tiny_gguf):
    assert_one_line_error(run_cli("generate", "--model", str(tiny_gguf), ""), "empty")
    model, tokenizer = gemmakit.load(tiny_gguf)
    with pytest.raises(InvalidRequestError):
        gemmakit.generate(model, tokenizer, "")


def test_prompt_longer_than_context(tiny_gguf):
    long_prompt = "the " * 40  # more than the 32-token context of this model
    assert_one_line_error(run_cli("generate", "--model", str(tiny_gguf), long_prompt), "context")
    model, tokenizer = gemmakit.load(tiny_gguf)
    with pytest.raises(InvalidRequestError):
        gemmakit.generate(model, tokenizer, long_prompt)


def test_bad_sampling_values(tiny_gguf):
    assert_one_line_error(run_cli("generate", "--model", str(tiny_gguf), "--top-p", "0", "hi"), "top_p")
    assert_one_line_error(run_cli("generate", "--model", str(tiny_gguf), "--temperature", "-1", "hi"), "temperature")


def test_unknown_preset_in_info():
    assert_one_line_error(run_cli("info", "--model", "gemma9-1t"), "not found")


def test_unknown_or_unavailable_device(tiny_gguf):
    assert_one_line_error(run_cli("generate", "--model", str(tiny_gguf), "--device", "bogus", "hi"), "unknown device")
    assert_one_line_error(run_cli("serve", "--model", str(tiny_gguf), "--device", "bogus"), "unknown device")
    if not torch.cuda.is_available():  # a CPU build of torch: say what to install
        assert_one_line_error(run_cli("generate", "--model", str(tiny_gguf), "--device", "cuda", "hi"),
                              "CUDA build")
    with pytest.raises(InvalidRequestError):
        gemmakit.load(tiny_gguf, device="cuda:999")


def test_serve_loads_the_quantisation_and_device_asked_for(tiny_gguf, monkeypatch):
    """`gemmakit serve --quant/--device` reach the loader (--quant was once dropped on the way)."""
    import uvicorn

    import gemmakit.serve as serve

    import gemmakit.api as api

    loaded, load_model = [], api.load_model
    monkeypatch.setattr(api, "load_model", lambda *args, **kwargs: loaded.append(load_model(*args, **kwargs)) or loaded[-1])
    monkeypatch.setattr(serve, "build_app", lambda model, *args, **kwargs: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    serve.run_server(str(tiny_gguf), quant="int8", device="cpu")
    assert loaded[-1].report.weights == "int8" and loaded[-1].model.device.type == "cpu"
    serve.run_server(str(tiny_gguf), prefill_dtype="float32")  # --prefill-dtype too
    assert loaded[-1].report.prefill_dtype == "float32"
    with pytest.raises(InvalidRequestError, match="unknown prefill dtype"):
        serve.run_server(str(tiny_gguf), prefill_dtype="float16")
