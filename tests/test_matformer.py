"""MatFormer slicing of Gemma 3n (``--matformer``, checkpoints/matformer.py) against transformers run
on the same sliced weights.

The reference is built here, independently of gemmakit: the weight tensors of a small random
Gemma 3n saved by transformers are cut by hand (the first rows of gate/up, the first columns of
down, the skipped layers' slices of the per-layer embedding table and of its projection, the
layers renumbered), and transformers' own model of the sliced config is filled with them. The
plans skip a layer that reads shared keys and values, one before the layers that produce them and
one with a sparse MLP, so that K/V sharing, the sparsity pattern and the layer types are all
carried through.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import gemmakit
from gemmakit.checkpoints.matformer import PLANS, slice_config
from gemmakit.engine.generate import generate_steps
from gemmakit.errors import MatformerPlanError, UnsupportedModelError
from gemmakit.models.config import PRESETS

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma3nForCausalLM"):
    pytest.skip("this transformers has no Gemma 3n", allow_module_level=True)

VOCAB, PLE_VOCAB, PLE_DIM = 200, 150, 256
TYPES = (["sliding_attention"] * 4 + ["full_attention"]) * 2
# The "E4B": 10 layers, the last 4 reading shared K/V (sliding 6-8 read layer 5's, full 9 reads 4's),
# sparse MLPs on the first 3 layers, two layers narrower than the rest
WIDTHS = [512, 384, 512, 512, 512, 512, 384, 512, 512, 512]
SPARSITY = [0.95, 0.95, 0.9] + [0.0] * 7
BASE = dict(vocab_size=VOCAB, vocab_size_per_layer_input=PLE_VOCAB, hidden_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=5, max_position_embeddings=256,
            hidden_size_per_layer_input=PLE_DIM, laurel_rank=8)

PLANS_UNDER_TEST = {
    # skips a sparse layer (1), one before the K/V producers (3) and a layer reading shared K/V (7);
    # widths on block boundaries (256, 512: stored 16-bit blocks are cut) and off them (96, 200)
    "skip": {"ffn_hidden_dims": [256, 96, 512, 256, 200, 256, 512], "layers_to_skip": [1, 3, 7]},
    "widths": {"ffn_hidden_dims": 256},  # every layer, none skipped
}


def _by_hand(plan: dict, layers: int = 10, widths=WIDTHS, types=TYPES, sparsity=SPARSITY, shared: int = 4):
    """The sliced model's kept layers and transformers config keys, worked out directly."""
    skip = plan.get("layers_to_skip", [])
    kept = [i for i in range(layers) if i not in skip]
    new_widths = plan["ffn_hidden_dims"]
    new_widths = [new_widths] * len(kept) if isinstance(new_widths, int) else new_widths
    return kept, dict(num_hidden_layers=len(kept), layer_types=[types[i] for i in kept], intermediate_size=new_widths,
                      activation_sparsity_pattern=[sparsity[i] for i in kept],
                      num_kv_shared_layers=sum(i >= layers - shared for i in kept))


def _slice_weights(weights: dict, kept: list[int], widths: list[int], layers: int, dim: int) -> dict:
    out = {}
    for name, t in weights.items():
        if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name):
            if int(m[1]) not in kept:
                continue
            j, rest = kept.index(int(m[1])), m[2]
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                t = t[:widths[j]]
            elif rest == "mlp.down_proj.weight":
                t = t[:, :widths[j]]
            name = f"model.layers.{j}.{rest}"
        elif name == "model.embed_tokens_per_layer.weight":
            t = t.reshape(t.shape[0], layers, dim)[:, kept].reshape(t.shape[0], -1)
        elif name == "model.per_layer_model_projection.weight":
            t = t.reshape(layers, dim, -1)[kept].reshape(len(kept) * dim, -1)
        out[name] = t.contiguous()
    return out


def _sliced_reference(weights: dict, base: dict, plan: dict, **whole) -> torch.nn.Module:
    kept, keys = _by_hand(plan, **whole)
    hf = transformers.Gemma3nForCausalLM(transformers.Gemma3nTextConfig(**{**base, **keys})).eval()
    layers = whole.get("layers", 10)
    sliced = _slice_weights(weights, kept, keys["intermediate_size"], layers, base["hidden_size_per_layer_input"])
    missing, unexpected = hf.load_state_dict(sliced, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    return hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.Gemma3nTextConfig(**BASE, num_hidden_layers=10, layer_types=TYPES, num_kv_shared_layers=4,
                                            intermediate_size=WIDTHS, activation_sparsity_pattern=SPARSITY)
    hf = transformers.Gemma3nForCausalLM(config).eval()
    with torch.no_grad():  # far from the initial values, so that a mapping mistake shows (as tests/test_gemma3n.py)
        for _, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0.0, 0.15)
    path = tmp_path_factory.mktemp("e4b")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(PLANS_UNDER_TEST))
def pair(request, checkpoint, tmp_path_factory):
    plan = PLANS_UNDER_TEST[request.param]
    plan_file = tmp_path_factory.mktemp("plan") / f"{request.param}.json"
    plan_file.write_text(json.dumps(plan))
    reference = _sliced_reference(load_file(checkpoint / "model.safetensors"), BASE, plan)
    model, _ = gemmakit.load(checkpoint, matformer=plan_file)
    return reference, model, plan, plan_file


def test_the_sub_models_config(pair):
    reference, model, plan, _ = pair
    c, r = model.config, reference.config
    assert (c.num_layers, c.num_kv_shared_layers) == (r.num_hidden_layers, r.num_kv_shared_layers)
    assert [p.intermediate_size for p in c.layer_plan] == r.intermediate_size
    assert [p.activation_sparsity for p in c.layer_plan] == r.activation_sparsity_pattern
    assert [{"local": "sliding_attention", "global": "full_attention"}[k] for k in c.layer_kinds] == r.layer_types
    if plan.get("layers_to_skip"):  # kept layers 0 2 4 5 6 8 9: 6, 8 read 5's K/V (now 3), 9 reads 4's (now 2)
        assert [p.kv_source for p in c.layer_plan] == [0, 1, 2, 3, 3, 3, 2]


def test_logits_match_transformers_on_the_sliced_weights(pair):
    reference, model, _, _ = pair
    for seed, shape in ((1, (2, 24)), (4, (1, 80))):  # 80 rows: the CPU's many-row matmul paths too
        ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = reference(ids).logits
        assert (model(ids) - expected).abs().max().item() <= 1e-4


def test_cached_greedy_equals_transformers(pair):
    reference, model, _, _ = pair
    prompt = [2, 50, 60, 70, 80, 90, 100, 110, 160, 130, 190]  # longer than the window of 5; ids past the PLE table
    produced = [s.tokens[0] for s in generate_steps(model, [prompt], 16)]
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert produced == out[0, len(prompt):].tolist()


def test_the_cache_holds_only_the_kept_producers(pair):
    _, model, _, _ = pair
    cache = model.new_cache(1, 16)
    owners = [i for i, p in enumerate(model.config.layer_plan) if not p.reads_shared_kv]
    assert [i for i, c in enumerate(cache.layers) if c is not None] == owners


def test_convert_writes_the_sub_model_transformers_loads(pair, checkpoint, tmp_path):
    from gemmakit.convert import convert

    reference, _, _, plan_file = pair
    out = convert(checkpoint, tmp_path / "sliced", matformer=plan_file)
    back = transformers.Gemma3nForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, reference(ids).logits)


def test_info_counts_the_sub_models_parameters(pair, checkpoint):
    from gemmakit.info import describe, format_report

    reference, model, plan, plan_file = pair
    report = describe(str(checkpoint), matformer=plan_file)
    assert report["parameters"] == sum(p.numel() for p in reference.parameters()) == model.config.num_parameters()
    assert report["matformer"]["skipped"] == plan.get("layers_to_skip", [])
    assert report["matformer"]["unsliced_parameters"] == describe(str(checkpoint))["parameters"]
    assert "MatFormer    plan " in format_report(report)


def test_16_bit_weights_stay_as_stored_and_compute_the_same(checkpoint, tmp_path):
    """A bfloat16 checkpoint keeps its matrices as stored on the block kernel (checkpoints/base.py):
    the cut ones too, where the cut falls on a block boundary (the others load as floats)."""
    from gemmakit.kernels import build

    if build.kernel() is None:
        pytest.skip("the CPU kernel is not built here")
    hf = transformers.Gemma3nForCausalLM.from_pretrained(checkpoint).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    plan = PLANS_UNDER_TEST["skip"]
    kept, _ = gemmakit.load(tmp_path, matformer=plan)
    expanded, _ = gemmakit.load(tmp_path, matformer=plan, quant="none")
    # layers 0, 1, 2 keep 256 of 512 units (a cut on a block boundary), 96 of 384 (not), 512 of 512
    assert [type(b.mlp.down_proj).__name__ for b in kept.layers[:3]] == ["GroupedLinear", "Linear", "GroupedLinear"]
    assert type(kept.per_layer_embed).__name__ == "GroupedEmbedding"  # 256 columns a layer, cut per layer
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(6))
    ref = expanded(ids)
    assert (kept(ids) - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


# A GGUF written by llama.cpp's converter (tests/test_gemma3n_gguf.py): 22 layers, MLP width 128, the
# last 2 reading the K/V of layer 18; its per-layer table is Q8_0 blocks, 256 per layer
GGUF = __import__("pathlib").Path(__file__).parent / "data" / "gguf_llamacpp" / "gemma3n-altup-laurel-ple.gguf"
GGUF_PLAN = {"ffn_hidden_dims": [64, 128, 96, 64] * 4 + [128, 64, 32], "layers_to_skip": [3, 9, 21]}


@pytest.fixture(scope="module")
def gguf_reference(tmp_path_factory):
    from gemmakit.convert import convert

    whole = convert(GGUF, tmp_path_factory.mktemp("gguf") / "hf")  # checked against transformers there
    raw = json.loads((whole / "config.json").read_text())
    base = {k: raw[k] for k in ("vocab_size", "vocab_size_per_layer_input", "hidden_size", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "sliding_window", "max_position_embeddings",
                                "hidden_size_per_layer_input", "laurel_rank", "final_logit_softcapping")}
    return _sliced_reference(load_file(whole / "model.safetensors"), base, GGUF_PLAN, layers=22,
                             widths=raw["intermediate_size"], types=raw["layer_types"],
                             sparsity=raw["activation_sparsity_pattern"], shared=raw["num_kv_shared_layers"])


@pytest.mark.parametrize("quant", ["none", "gguf"])
def test_a_gguf_slices_to_the_same_model(gguf_reference, quant):
    """Dequantised, and as stored (the Q8_0 blocks on the block kernel, the per-layer table's blocks
    cut per layer): the same model up to float32 rounding, which this small random model amplifies
    to ~2e-4 on the block kernel (as in tests/test_gemma3n_gguf.py)."""
    model, _ = gemmakit.load(GGUF, quant=quant, matformer=GGUF_PLAN, prefill_dtype="float32")
    assert model.config.num_layers == 19 and model.config.num_kv_shared_layers == 1
    if quant == "gguf":
        assert type(model.per_layer_embed).__name__ == "GroupedEmbedding"  # its Q8_0 blocks, cut per layer
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = gguf_reference(ids).logits
    assert (model(ids) - expected).abs().max().item() <= (1e-4 if quant == "none" else 1e-3)


# Google's named plans, on the E4B preset (no weights)

def test_the_e2b_plan_cuts_e4b_into_e2b():
    sliced, kept = slice_config(PRESETS["gemma3n-e4b"], "e2b")
    assert kept == [*range(20), *range(25, 35)]
    assert sliced.replace(name="gemma3n-e2b") == PRESETS["gemma3n-e2b"]


# transformers 4.53, which the MatFormer Lab notebook ran, kept key/value weights on the layers that
# read shared ones (unused); the published sizes count them, gemmakit and transformers 5 do not
_UNUSED_KV = 2 * 2048 * 512 + 256  # k_proj, v_proj (2 KV heads x 256 -> 2048) and k_norm


def _effective(config) -> int:
    """Parameters without the embeddings and the per-layer table, as the notebook counts them
    (``num_parameters(exclude_embeddings=True)``)."""
    return (config.num_parameters() + config.num_kv_shared_layers * _UNUSED_KV
            - config.vocab_size * config.hidden_size - config.per_layer_embedding_parameters())


def test_the_e2b_slice_has_the_notebooks_parameter_counts():
    """The MatFormer Lab notebook's last cell prints, for its E2B slice: 4,456,156,768 text
    parameters, 1,905,495,648 without the embeddings and the per-layer table."""
    sliced, _ = slice_config(PRESETS["gemma3n-e4b"], "e2b")
    assert sliced.num_parameters() + 10 * _UNUSED_KV == 4_456_156_768
    assert _effective(sliced) == 1_905_495_648


@pytest.mark.parametrize("name, published", [("e2b", 1.91), ("e1.96b-layer-level", 1.96), ("e2.54b-layer-level", 2.52)])
def test_named_plans_have_their_published_effective_sizes(name, published):
    """configs.csv's "# Effective Params (B)". For E2.54B it says 2.54, where its own widths (six
    layers at 16384, the rest at 8192, none skipped) give 2.52: 29 layers at half width take
    29 x 3 x 2048 x 8192 = 1.46B off E4B's 3.98B, which the row's name does not add up to."""
    sliced, _ = slice_config(PRESETS["gemma3n-e4b"], name)
    assert round(_effective(sliced) / 1e9, 2) == published
    assert round(_effective(PRESETS["gemma3n-e4b"]) / 1e9, 2) == 3.98  # the "Main model" row


@pytest.mark.parametrize("name", sorted(PLANS))
def test_named_plans_read_back_through_transformers(name):
    """The sliced config as transformers' config, and its parameter count on the meta device."""
    from gemmakit.checkpoints.gemma3n import config_from_hf, to_hf_config

    sliced, _ = slice_config(PRESETS["gemma3n-e4b"], name)
    raw = to_hf_config(sliced)
    assert config_from_hf(transformers.Gemma3nTextConfig(**raw).to_dict()).replace(name=sliced.name) == sliced
    with torch.device("meta"):
        hf = transformers.Gemma3nForCausalLM(transformers.Gemma3nTextConfig(**raw))
    assert sliced.num_parameters() == sum(p.numel() for p in hf.parameters())


# What a plan must not do

@pytest.mark.parametrize("preset, says", [("gemma3-270m", "this is a gemma3 model"), ("gemma4-e4b", "Gemma 4")])
def test_only_gemma_3n_is_sliced(preset, says):
    with pytest.raises(UnsupportedModelError, match=says):
        slice_config(PRESETS[preset], "e2b")


@pytest.mark.parametrize("plan, says", [
    ({"ffn_hidden_dims": 1024}, r"layer 0 .* width 1024, but the checkpoint's is 512"),
    ({"ffn_hidden_dims": [256] * 9}, r"9 MLP widths and skips 0 layers: it is for a 9-layer model, .* has 10$"),
    ({"ffn_hidden_dims": 256, "layers_to_skip": [5]}, r"skips layer\(s\) \[5\], whose keys and values layers \[6, 7, 8\]"),
    ({"ffn_hidden_dims": 256, "layers_to_skip": [4]}, r"skips layer\(s\) \[4\], whose keys and values layers \[9\]"),
    ({"ffn_hidden_dims": 256, "layers_to_skip": [10]}, r"layers_to_skip \[10\] are not layers of 0..9"),
    ({"ffn_hidden_dims": 256, "layers_to_skip": [2, 2]}, r"repeats layers"),
    ({"ffn_hidden_dims": 0}, r"gets MLP width 0"),
    ({"ffn_hidden_dims": "256"}, r"must be an integer or a list of integers"),
    ({"widths": [256]}, r"has 'ffn_hidden_dims'.*unknown keys \['widths'\]"),
    ("e2b", r"for a 35-layer model, and this checkpoint has 10 \(is it already a sub-model\?\)"),
    ("e3b", r"neither a named plan \(e2b, .*\) nor a JSON file"),
])
def test_plans_that_do_not_fit_are_refused(checkpoint, plan, says):
    with pytest.raises(MatformerPlanError, match=says):
        gemmakit.load(checkpoint, matformer=plan)


def test_a_plan_file_that_is_not_json_is_refused(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("[256,")
    with pytest.raises(MatformerPlanError, match="not a readable JSON MatFormer plan"):
        gemmakit.load(None, matformer=bad)  # refused before any model is opened


def test_the_cli_reports_a_bad_plan_on_one_line(checkpoint, capsys):
    from gemmakit.cli import main

    assert main(["generate", "--model", str(checkpoint), "--matformer", "e2b", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gemmakit: error: plan 'e2b'") and "\n" not in err
    assert main(["info", "--model", "gemma3n-e4b", "--matformer", "e2b"]) == 0
    assert "plan e2b: 30 of 35 layers (skipping 20, 21, 22, 23, 24), MLP widths 8192" in capsys.readouterr().out


def test_the_cli_converts_with_a_plan_file(checkpoint, tmp_path):
    from gemmakit.cli import main

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLANS_UNDER_TEST["skip"]))
    assert main(["convert", str(checkpoint), str(tmp_path / "out"), "--matformer", str(plan)]) == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["intermediate_size"] == PLANS_UNDER_TEST["skip"]["ffn_hidden_dims"]
    assert (written["num_hidden_layers"], written["num_kv_shared_layers"]) == (7, 3)


def test_serve_loads_the_sub_model(checkpoint, monkeypatch):
    """`gemmakit serve --matformer` reaches the loader."""
    uvicorn = pytest.importorskip("uvicorn")
    import gemmakit.api as api
    import gemmakit.serve as serve

    loaded, load_model = [], api.load_model
    monkeypatch.setattr(api, "load_model", lambda *a, **k: loaded.append(load_model(*a, **k)) or loaded[-1])
    monkeypatch.setattr(serve, "build_app", lambda model, *args, **kwargs: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    serve.run_server(str(checkpoint), matformer=PLANS_UNDER_TEST["skip"])
    assert loaded[-1].model.config.num_layers == 7
