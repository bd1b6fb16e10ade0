"""RecurrentGemma (Griffin): parity with transformers, the constant-size state, loaders and surfaces.

The oracle is transformers' RecurrentGemmaForCausalLM with random weights (norms and biases random
too, so a mapping mistake shows), saved by transformers and read back through gemmakit.load. Its
sequence is longer than the attention window and its RG-LRU width differs from the model width,
so a swapped dimension cannot pass unnoticed; sqrt(80) is not a bfloat16 number, so the embedding
scale's rounding is checked too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import gemmakit
from gemmakit.engine.generate import generate_steps
from gemmakit.models.cache import KVCache
from gemmakit.models.config import ModelConfig, griffin_pattern
from gemmakit.models.griffin import linear_scan
from tiny import VOCAB_SIZE, random_model, tiny_config, write_gguf

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention

transformers = pytest.importorskip("transformers")

WINDOW = 8


def _hf_config(**overrides):
    from transformers import RecurrentGemmaConfig

    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=80, intermediate_size=192, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=1, lru_width=48, attention_window_size=WINDOW,
              conv1d_width=4, logits_soft_cap=30.0)
    return RecurrentGemmaConfig(**{**kw, **overrides})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny SentencePiece tokenizer of tests/tiny.py, taken from a GGUF written with it."""
    path = write_gguf(tmp_path_factory.mktemp("tok") / "t.gguf", random_model(tiny_config("gemma")))
    return gemmakit.load(path)[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    from transformers import RecurrentGemmaForCausalLM

    torch.manual_seed(0)
    hf = RecurrentGemmaForCausalLM(_hf_config()).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("recurrentgemma")
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model, tok = gemmakit.load(path)
    return hf, model, path


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_config_read_from_transformers(pair):
    _, model, _ = pair
    c = model.config
    assert c.layer_kinds == ("recurrent", "recurrent", "local") * 2
    assert (c.head_dim, c.rotary_dim, c.recurrent_width, c.intermediate_size) == (20, 10, 48, 96)
    assert c.final_logit_softcap == 30.0 and c.sliding_window == WINDOW


def test_logits_match_transformers_beyond_the_window(pair):
    hf, model, _ = pair
    ids = _ids(2, 5 * WINDOW, 1)
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
    assert (model(ids) - expected).abs().max().item() <= 1e-4


def test_decode_matches_transformers_cached_decode(pair):
    """transformers' own cached decoding (its RG-LRU sampling path) agrees with ours step by step."""
    from transformers import DynamicCache

    hf, model, _ = pair
    ids = _ids(1, 30, 2)
    with torch.no_grad():  # transformers keeps the recurrent state inside its modules, the KV in the cache
        hf.model._setup_cache(hf.config, 1, "cpu", torch.float32)
        kv = DynamicCache(config=hf.config)
        theirs = [hf(ids[:, :12], past_key_values=kv, use_cache=True).logits[:, -1]]
        for t in range(12, 30):
            theirs.append(hf(ids[:, t:t + 1], past_key_values=kv, use_cache=True,
                             position_ids=torch.tensor([[t]])).logits[:, -1])
    cache = model.new_cache(1, 64)
    ours = [model(ids[:, :12], cache=cache)[:, -1]] + [model(ids[:, t:t + 1], cache=cache)[:, -1]
                                                        for t in range(12, 30)]
    assert (torch.stack(ours) - torch.stack(theirs)).abs().max().item() <= 1e-4


def test_stepwise_decode_equals_full_forward(pair):
    _, model, _ = pair
    ids = _ids(2, 3 * WINDOW, 3)
    full = model(ids)
    cache = model.new_cache(2, 64)
    steps = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(3 * WINDOW)], dim=1)
    assert (steps - full).abs().max().item() <= 1e-5


def test_two_prefill_chunks_equal_one(pair):
    _, model, _ = pair
    ids = _ids(2, 45, 4)
    one, two = model.new_cache(2, 64), model.new_cache(2, 64)
    whole = model(ids[:, :40], cache=one)
    split = torch.cat([model(ids[:, :17], cache=two), model(ids[:, 17:40], cache=two)], dim=1)
    assert (split - whole).abs().max().item() <= 1e-5
    after_one = torch.cat([model(ids[:, t:t + 1], cache=one) for t in range(40, 45)], dim=1)
    after_two = torch.cat([model(ids[:, t:t + 1], cache=two) for t in range(40, 45)], dim=1)
    assert (after_one - after_two).abs().max().item() <= 1e-5


def test_left_padding_does_not_disturb_the_recurrence(pair):
    """Rows of a left-padded batch give the logits each row gives alone (junk pad tokens included)."""
    _, model, _ = pair
    lengths = [5, 23, 14]
    rows = [_ids(1, n, 10 + n)[0] for n in lengths]
    T = max(lengths)
    ids = _ids(len(rows), T, 99)  # padding filled with random tokens: they must not leak in
    positions = torch.full((len(rows), T), -1)
    for r, row in enumerate(rows):
        ids[r, T - len(row):] = row
        positions[r, T - len(row):] = torch.arange(len(row))
    cache = model.new_cache(len(rows), 64)
    batched = model(ids, cache=cache, positions=positions)
    nxt = _ids(len(rows), 1, 7)
    stepped = model(nxt, cache=cache, positions=positions[:, -1:] + 1)
    for r, row in enumerate(rows):
        alone_cache = model.new_cache(1, 64)
        alone = model(row[None], cache=alone_cache)
        assert (batched[r, T - len(row):] - alone[0]).abs().max().item() <= 1e-5
        alone_next = model(nxt[r:r + 1], cache=alone_cache)
        assert (stepped[r] - alone_next[0]).abs().max().item() <= 1e-5


def test_batched_generate_equals_one_by_one(pair):
    _, model, _ = pair
    prompts = [[2, 11, 12, 13], [2] + list(range(20, 40)), [2, 99]]
    batched = [s.tokens for s in generate_steps(model, prompts, 10)]
    for row, prompt in enumerate(prompts):
        alone = [s.tokens[0] for s in generate_steps(model, [prompt], 10)]
        assert [step[row] for step in batched] == alone


def test_greedy_generate_equals_stepwise_full_forward(pair):
    _, model, _ = pair
    prompt = [2, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140]
    produced = [s.tokens[0] for s in generate_steps(model, [prompt], 10)]
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert produced == seq[len(prompt):]


@pytest.mark.parametrize("T", [1, 2, 37, 64])
def test_linear_scan_equals_sequential_recurrence(T):
    g = torch.Generator().manual_seed(T)
    a, b, h0 = torch.rand(2, T, 5, generator=g), torch.randn(2, T, 5, generator=g), torch.randn(2, 5, generator=g)
    a[0, T // 3] = 0.0  # a reset
    for start in (h0, None):
        h, expected = start if start is not None else torch.zeros(2, 5), []
        for t in range(T):
            h = a[:, t] * h + b[:, t]
            expected.append(h)
        assert (linear_scan(a, b, start) - torch.stack(expected, 1)).abs().max().item() <= 1e-5


def _all_state_bytes(cache: KVCache) -> int:
    """Every tensor the cache holds: keys, values, recurrent states and slot positions."""
    total = sum(t.nbytes for t in vars(cache).values() if isinstance(t, torch.Tensor))
    for layer in cache.layers:
        total += sum(t.nbytes for t in vars(layer).values() if t is not None)  # int8 scales absent: None
    return total


def test_state_after_10000_tokens_is_the_size_after_3000():
    config = ModelConfig(family="recurrentgemma", vocab_size=50, hidden_size=16, intermediate_size=24,
                         num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8, layer_kinds=griffin_pattern(3),
                         max_position_embeddings=1 << 20, query_pre_attn_scalar=8, sliding_window=4,
                         lru_width=16, rope_fraction=0.5, embed_scale_bf16=True, mlp_bias=True,
                         attn_out_bias=True, final_logit_softcap=30.0)
    model = random_model(config)
    ids = _ids(1, 10_000, 5) % 50
    cache = model.new_cache(1, 16)
    sizes = {}
    with torch.inference_mode():
        for end in (3000, 10_000):
            start = cache.length
            for chunk in range(start, end - 8, 1024):  # chunked prefill, then token-by-token decoding
                model(ids[:, chunk:min(chunk + 1024, end - 8)], cache=cache)
            for t in range(end - 8, end):
                last = model(ids[:, t:t + 1], cache=cache)
            sizes[end] = (_all_state_bytes(cache), cache.nbytes())
            if end == 3000:  # the state after 3,000 tokens is also the right state
                assert (last[0, -1] - model(ids[:, :3000], last_only=True)[0, -1]).abs().max().item() <= 1e-4
    assert cache.length == 10_000
    assert sizes[10_000] == sizes[3000]
    lru, conv, ring = 16 * 4, 3 * 16 * 4, 2 * 4 * 8 * 4  # per layer: float32 state, 3 inputs, 4 keys + 4 values
    assert cache.nbytes() == 2 * (lru + conv) + ring == config.recurrent_state_bytes(bytes_per_value=4) \
        + config.kv_cache_bytes(10_000, bytes_per_value=4)
    assert model.new_cache(1, 10_000).nbytes() == model.new_cache(1, 3000).nbytes()


def _official_state_dict(hf) -> dict[str, torch.Tensor]:
    """transformers' weights rewritten in the layout of recurrentgemma.torch.Griffin (the official one)."""
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    out = {"embedder.input_embedding": sd["model.embed_tokens.weight"],
           "final_norm.scale": sd["model.final_norm.weight"]}
    for i, kind in enumerate(hf.config.layers_block_type):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "temporal_pre_norm.scale"] = sd[src + "temporal_pre_norm.weight"]
        out[dst + "channel_pre_norm.scale"] = sd[src + "channel_pre_norm.weight"]
        mlp = src + "mlp_block."
        # ffw_up computes x @ w[c] + b[c] for c = 0 (gate) and 1 (up): w [2, D, E], b [2, 1, 1, E]
        out[dst + "mlp_block.ffw_up.w"] = torch.stack([sd[mlp + "gate_proj.weight"].t(),
                                                       sd[mlp + "up_proj.weight"].t()])
        out[dst + "mlp_block.ffw_up.b"] = torch.stack([sd[mlp + "gate_proj.bias"],
                                                       sd[mlp + "up_proj.bias"]])[:, None, None]
        out[dst + "mlp_block.ffw_down.weight"] = sd[mlp + "down_proj.weight"]
        out[dst + "mlp_block.ffw_down.bias"] = sd[mlp + "down_proj.bias"]
        tb = src + "temporal_block."
        if kind == "linear_attention":
            rb = dst + "recurrent_block."
            for lin in ("linear_x", "linear_y", "linear_out"):
                out[rb + lin + ".weight"], out[rb + lin + ".bias"] = sd[tb + lin + ".weight"], sd[tb + lin + ".bias"]
            out[rb + "conv_1d.w"] = sd[tb + "conv_1d.weight"][:, 0, :].t()
            out[rb + "conv_1d.b"] = sd[tb + "conv_1d.bias"]
            out[rb + "rg_lru.a_param"] = sd[tb + "rg_lru.recurrent_param"]
            for ours, theirs in (("input_gate", "input_gate"), ("a_gate", "recurrent_gate")):
                out[rb + f"rg_lru.{ours}.w"] = sd[tb + f"rg_lru.{theirs}_weight"]
                out[rb + f"rg_lru.{ours}.b"] = sd[tb + f"rg_lru.{theirs}_bias"]
        else:
            ab = dst + "attention_block."
            for ours, theirs in (("proj_q", "q_proj"), ("proj_k", "k_proj"), ("proj_v", "v_proj"),
                                 ("proj_final", "o_proj")):
                out[ab + ours + ".weight"] = sd[tb + theirs + ".weight"]
            out[ab + "proj_final.bias"] = sd[tb + "o_proj.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def test_official_pytorch_checkpoint_loads(pair, tmp_path, tokenizer):
    hf, model, _ = pair
    torch.save(_official_state_dict(hf), tmp_path / "tiny.pt")
    tokenizer.save_pretrained(tmp_path)
    official, tok = gemmakit.load(tmp_path)  # the directory as downloaded: one .pt + tokenizer.model
    assert tok is not None and official.config.layer_kinds == model.config.layer_kinds
    assert official.config.sliding_window == 2048  # the file has no config: the published models' window
    ids = _ids(2, WINDOW, 6)  # so compare within the tiny model's window
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
    assert (official(ids) - expected).abs().max().item() <= 1e-4


def test_export_to_hf_directory_loads_in_transformers(pair, tmp_path, tokenizer):
    from transformers import RecurrentGemmaForCausalLM

    from gemmakit.checkpoints.hf_writer import save_recurrent_gemma
    from gemmakit.errors import InvalidRequestError

    _, model, _ = pair
    out = save_recurrent_gemma(model, tmp_path / "export", tokenizer)
    reloaded = RecurrentGemmaForCausalLM.from_pretrained(out).eval()
    ids = _ids(2, 30, 8)
    with torch.no_grad():
        assert (reloaded(ids, use_cache=False).logits - model(ids)).abs().max().item() <= 1e-4
    assert gemmakit.load(out)[0].config.replace(name="") == model.config.replace(name="")
    with pytest.raises(InvalidRequestError):
        save_recurrent_gemma(model, out)  # never overwrites


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300, env=env)


def test_cli_generate_chat_and_info(pair, monkeypatch, capsys):
    """`gemmakit generate` as a user runs it (a subprocess); chat and info through the same entry point."""
    import io

    from gemmakit.cli import main

    _, model, path = pair
    proc = _cli("generate", "-m", str(path), "-n", "6", "--json", "the sea")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    loaded, tokenizer = gemmakit.load(path)
    steps = generate_steps(loaded, [tokenizer.encode("the sea", add_bos=True)], 6, stop_ids=tokenizer.stop_ids())
    assert got["token_ids"] == [s.tokens[0] for s in steps] and len(got["token_ids"]) > 0
    assert got["text"] == gemmakit.generate(loaded, tokenizer, "the sea", max_tokens=6)

    monkeypatch.setattr("sys.stdin", io.StringIO("hi there\n/exit\n"))
    assert main(["chat", "-m", str(path), "-n", "4"]) == 0
    from gemmakit.chat import render_chat

    reply = gemmakit.generate(loaded, tokenizer, render_chat([{"role": "user", "content": "hi there"}]), max_tokens=4)
    assert capsys.readouterr().out == reply + "\n"
    assert main(["info", "-m", str(path)]) == 0
    info = capsys.readouterr().out
    assert "state        at any context" in info and "KV cache" not in info


def test_bfloat16_generation_runs_and_stays_close(pair):
    _, model, path = pair
    bf16, _ = gemmakit.load(path, dtype="bfloat16")
    ids = _ids(1, 20, 9)
    assert bf16.new_cache(1, 8).layers[0].rg_lru.dtype == torch.float32  # the recurrence stays float32
    assert (bf16(ids).float() - model(ids)).abs().max().item() < 0.5


@pytest.mark.parametrize("name", ["recurrentgemma-2b", "recurrentgemma-9b"])
def test_presets_have_the_published_shapes(name):
    """Each preset, exported as a transformers config, builds a model with exactly our parameter count."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    from gemmakit.checkpoints.recurrent_gemma import to_hf_config
    from gemmakit.models.config import PRESETS
    from gemmakit.models.decoder import GemmaModel

    config = PRESETS[name]
    raw = {k: v for k, v in to_hf_config(config).items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        hf = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**raw))
        ours = GemmaModel(config)
    theirs = sum(p.numel() for n, p in hf.named_parameters() if not n.startswith("lm_head"))
    assert theirs == sum(p.numel() for p in ours.parameters()) == config.num_parameters()
    assert theirs == {"recurrentgemma-2b": 2_682_862_080, "recurrentgemma-9b": 8_579_977_216}[name]


def test_info_reports_constant_state_memory():
    from gemmakit.info import describe

    r2k, r100k = describe("recurrentgemma-2b", 2048), describe("recurrentgemma-2b", 100_000)
    # 18 recurrent layers x 2560 x (4-byte RG-LRU + 3 bf16 Conv1D inputs) + 8 rings x 2048 x (K + V) x 256 x 2 bytes
    assert r2k["state_bytes"]["bfloat16"] == r100k["state_bytes"]["bfloat16"] == 18 * 2560 * 10 + 8 * 2048 * 2 * 256 * 2


def test_gemmakit_convert_writes_recurrent_hf_directory(pair, tmp_path):
    """`gemmakit convert` on a RecurrentGemma source goes through the RecurrentGemma exporter."""
    from transformers import AutoModelForCausalLM

    from gemmakit.cli import main

    hf, _, path = pair
    assert main(["convert", str(path), str(tmp_path / "out")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(1, 20, seed=5)
    with torch.no_grad():
        assert (again(ids).logits - hf(ids).logits).abs().max() <= 1e-5
