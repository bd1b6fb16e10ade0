"""gemma_pytorch ``.ckpt`` files: parity with transformers, config inference from shapes, bad files.

The .ckpt files are written here in gemma_pytorch's layout (fused qkv_proj, embedder.weight,
``{"model_state_dict": ...}``) from a random transformers model, so the same weights reach
gemmakit by two roads: the HF directory and the .ckpt.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gemmakit
from gemmakit.checkpoints import open_checkpoint
from gemmakit.errors import CheckpointError
from gemmakit.models.config import PRESETS
from tiny import random_hf_model as hf_model, write_ckpt

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def trio(request, tmp_path_factory):
    """(transformers model, gemmakit model from its HF dir, gemmakit model from a .ckpt of it)."""
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path / "hf")
    via_hf, _ = gemmakit.load(path / "hf")
    extra = {}
    if request.param == "gemma3":  # the multimodal layout: other embedding name, a vision tower to skip
        extra = {"embed_name": "text_token_embedder.weight", "siglip_vision_model.patch.weight": torch.ones(3, 3),
                 "global_freqs_cis": torch.ones(4, 2)}
    else:
        extra = {"freqs_cis": torch.ones(4, 2)}
    ckpt = write_ckpt(path / "model.ckpt", hf.state_dict(), **extra)
    via_ckpt, _ = gemmakit.load(ckpt, config=via_hf.config)
    return hf, via_hf, via_ckpt


def test_ckpt_logits_match_transformers_and_hf_path(trio):
    hf, via_hf, via_ckpt = trio
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    got = via_ckpt(ids)
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(got, via_hf(ids))  # same weights, same maths: bit-identical


def test_ckpt_cached_generation_equals_full_forward(trio):
    from gemmakit.engine.generate import generate_steps

    _, _, model = trio
    prompt = [2, 50, 60, 70, 80, 90, 100, 110, 120, 130]
    produced = [s.tokens[0] for s in generate_steps(model, [prompt], 12)]
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert produced == seq[len(prompt):]


def test_int8_quant_ckpt_is_dequantised_per_row(tmp_path):
    """gemma_pytorch's '-quant' checkpoints: int8 weight x per-row weight_scaler."""
    hf = hf_model("gemma")
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    from tiny import gemma_pytorch_state

    pt = gemma_pytorch_state(state)
    for name in [n for n in pt if n.endswith("proj.weight") or n == "embedder.weight"]:
        w = pt[name]
        scaler = w.abs().amax(dim=1) / 127
        pt[name] = torch.round(w / scaler[:, None]).to(torch.int8)
        pt[name.removesuffix("weight") + "weight_scaler"] = scaler
    torch.save({"model_state_dict": pt}, tmp_path / "q.ckpt")
    model, _ = gemmakit.load(tmp_path / "q.ckpt", config=_config_of(tmp_path, hf))
    qkv = pt["model.layers.3.self_attn.qkv_proj.weight"].float() * pt["model.layers.3.self_attn.qkv_proj.weight_scaler"][:, None]
    assert torch.equal(model.layers[3].attn.q_proj.weight, qkv[:96])
    assert torch.equal(model.layers[3].attn.k_proj.weight, qkv[96:120])
    assert torch.equal(model.layers[3].attn.v_proj.weight, qkv[120:])
    emb = pt["embedder.weight"].float() * pt["embedder.weight_scaler"][:, None]
    assert torch.equal(model.embed.weight, emb)


def _config_of(tmp_path, hf):
    hf.save_pretrained(tmp_path / "hf")
    return open_checkpoint(tmp_path / "hf").config


def _shape_only_state(config) -> dict[str, torch.Tensor]:
    """transformers names with stride-0 placeholders of a preset's shapes (a few KB on disk)."""
    d, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size

    def t(*shape):
        return torch.zeros(1, dtype=torch.bfloat16).expand(*shape)

    state = {"model.embed_tokens.weight": t(config.vocab_size, d), "model.norm.weight": t(d)}
    norms = ["input_layernorm", "post_attention_layernorm"]
    if config.family != "gemma":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        for n in norms:
            state[p + n + ".weight"] = t(d)
        state[p + "self_attn.q_proj.weight"] = t(config.num_heads * hd, d)
        state[p + "self_attn.k_proj.weight"] = t(config.num_kv_heads * hd, d)
        state[p + "self_attn.v_proj.weight"] = t(config.num_kv_heads * hd, d)
        state[p + "self_attn.o_proj.weight"] = t(d, config.num_heads * hd)
        if config.family == "gemma3":
            state[p + "self_attn.q_norm.weight"] = t(hd)
            state[p + "self_attn.k_norm.weight"] = t(hd)
        for n, shape in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter))):
            state[p + f"mlp.{n}.weight"] = t(*shape)
    return state


@pytest.mark.parametrize("name", ["gemma-2b", "gemma-7b", "gemma2-2b", "gemma2-9b", "gemma2-27b", "gemma3-270m",
                                  "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b"])
def test_config_inferred_from_shapes(name, tmp_path):
    preset = PRESETS[name]
    path = write_ckpt(tmp_path / "model.ckpt", _shape_only_state(preset))
    assert open_checkpoint(path).config == preset


def test_gemma_pytorch_vocab_of_gemma3_4b(tmp_path):
    """gemma_pytorch's Gemma 3 4B+ embeds 262144 tokens (HF: 262208); the file's shape wins."""
    preset = PRESETS["gemma3-4b"].replace(vocab_size=262_144)
    path = write_ckpt(tmp_path / "model.ckpt", _shape_only_state(preset), embed_name="text_token_embedder.weight")
    assert open_checkpoint(path).config == preset


def test_info_on_a_ckpt_names_the_inferred_preset(tmp_path):
    path = write_ckpt(tmp_path / "gemma.ckpt", _shape_only_state(PRESETS["gemma2-27b"]))
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "info", "--model", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "gemma2-27b" in proc.stdout and "46 " in proc.stdout


def test_explicit_config_overrides_inference(tmp_path):
    path = write_ckpt(tmp_path / "m.ckpt", _shape_only_state(PRESETS["codegemma-7b"]))
    assert open_checkpoint(path, "codegemma-7b-it").config.name == "codegemma-7b-it"
    with pytest.raises(CheckpointError, match=r"embedder.weight has shape \(256000, 3072\), expected \(256000, 2048\)"):
        open_checkpoint(path, "gemma-2b")  # wrong preset: the first mismatching tensor is named


# --- bad input ---------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", *args], capture_output=True, text=True)


def _one_line_error(proc, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemmakit: error:") and fragment in lines[0], proc.stderr


@pytest.mark.parametrize("obj", [[1, 2, 3], torch.ones(3), {"step": 5}, {"model_state_dict": {}}],
                         ids=["list", "tensor", "no-tensors", "empty"])
def test_ckpt_that_is_not_a_state_dict(obj, tmp_path):
    path = tmp_path / "bad.ckpt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="state dict"):
        gemmakit.load(path)
    _one_line_error(run_cli("generate", "--model", str(path), "hi"), "bad.ckpt")


def test_ckpt_of_another_model(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"model_state_dict": {"transformer.wte.weight": torch.ones(4, 4)}}, path)
    with pytest.raises(CheckpointError, match="embedder.weight"):
        gemmakit.load(path)


def test_ckpt_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"model_state_dict": {"embedder.weight": torch.ones(2, 2)}, "cfg": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="unpickle"):
        gemmakit.load(path)


class _Opaque:
    pass


def test_garbage_ckpt(tmp_path):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        gemmakit.load(path)
    _one_line_error(run_cli("info", "--model", str(path)), "junk.ckpt")


def test_ckpt_missing_and_misshapen_tensors(tmp_path):
    state = _shape_only_state(PRESETS["gemma-2b"])
    del state["model.layers.5.mlp.up_proj.weight"]
    path = write_ckpt(tmp_path / "m.ckpt", state)
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.5\.mlp\.up_proj\.weight"):
        gemmakit.load(path)
    state = _shape_only_state(PRESETS["gemma-2b"])
    state["model.layers.2.mlp.down_proj.weight"] = torch.zeros(1).expand(2048, 100)
    path = write_ckpt(tmp_path / "m.ckpt", state)
    with pytest.raises(CheckpointError, match=r"down_proj.weight has shape \(2048, 100\), expected \(2048, 16384\)"):
        gemmakit.load(path)
    _one_line_error(run_cli("info", "--model", str(path)), "down_proj")


def test_unknown_shapes_ask_for_a_preset(tmp_path):
    path = write_ckpt(tmp_path / "tiny.ckpt", hf_model("gemma2").state_dict())
    with pytest.raises(CheckpointError, match="--config"):
        gemmakit.load(path)


def test_config_is_refused_for_sources_that_carry_one(tmp_path):
    from tiny import random_model, tiny_config, write_gguf

    from gemmakit.errors import InvalidRequestError

    path = write_gguf(tmp_path / "m.gguf", random_model(tiny_config(num_layers=1)))
    with pytest.raises(InvalidRequestError, match="only"):
        gemmakit.load(path, config="gemma-2b")


def test_tokenizer_model_next_to_the_ckpt_is_used(tmp_path):
    from tiny import random_model, tiny_config, write_gguf

    gguf_tokenizer = open_checkpoint(write_gguf(tmp_path / "t.gguf", random_model(tiny_config(num_layers=1)))).tokenizer
    gguf_tokenizer.save_pretrained(tmp_path / "kaggle")  # writes tokenizer.model (+ configs)
    ckpt = write_ckpt(tmp_path / "kaggle" / "gemma-2b.ckpt", _shape_only_state(PRESETS["gemma-2b"]))
    tokenizer = open_checkpoint(ckpt).tokenizer
    assert tokenizer is not None and tokenizer.encode("the heat") == gguf_tokenizer.encode("the heat")
