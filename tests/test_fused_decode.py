"""The fused decode step (one C++ call for a step's layers, models/fused_decode.py) equals the eager one.

Bit for bit, not within a tolerance: it runs the same kernels on the same tensors in the same
order, so any difference means it computed something else. Checked on tiny random models of each
family (global-only Gemma 1; Gemma 2 with soft-caps and post-norms; Gemma 3 with QK-norm), with
each weight form the step accepts (dense float32, GGML blocks of a GGUF, int8 requantised to Q8_0 blocks),
batched with left padding, over enough steps that sliding-window rings wrap. The eager reference
is the same model with the fused step switched off.
"""

from __future__ import annotations

import pytest
import torch

import gemmakit
import gemmakit.models.decoder as decoder
import gemmakit.models.fused_decode as fused_decode
from gemmakit.api import LoadOptions, load_model
from gemmakit.errors import InvalidRequestError
from gemmakit.kernels.build import kernel
from gemmakit.kernels.gemm import bf16_supported
from tiny import random_model, tiny_config, write_gguf

pytestmark = pytest.mark.skipif(kernel() is None, reason="the CPU kernel could not be built here")

PROMPTS = [[2, 17, 99, 5, 30, 41, 7, 8, 9, 60, 61], [2, 40, 41]]
STEPS = 20  # past the 8-token sliding window of the tiny configs


def _count_fused_steps(monkeypatch, fused: bool) -> list[bool]:
    """Switch the fused step on or off; the returned list gets, per step, whether it served it."""
    served: list[bool] = []

    def counting(*args):
        out = fused_decode.fused_hidden(*args)
        served.append(out is not None)
        return out

    monkeypatch.setattr(fused_decode, "_ENABLED", fused)
    monkeypatch.setattr(decoder, "fused_hidden", counting)
    return served


def _decode_logits(model, prompts, fused: bool, monkeypatch) -> tuple[torch.Tensor, int]:
    """Logits of greedy decoding steps after a prompt, and how many steps the fused call served."""
    served = _count_fused_steps(monkeypatch, fused)
    B, longest = len(prompts), max(map(len, prompts))
    ids = torch.zeros(B, longest, dtype=torch.long)
    positions = torch.full((B, longest), -1, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p)
        positions[row, longest - len(p):] = torch.arange(len(p))
    out = []
    with torch.inference_mode():
        cache = model.new_cache(B, longest + STEPS)
        logits = model(ids, cache=cache, positions=positions, last_only=True)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for step in range(STEPS):
            pos = positions[:, -1:] + 1 + step
            logits = model(nxt, cache=cache, positions=pos)
            out.append(logits)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(out, dim=1), sum(served)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize("form", ["float32", "gguf-q8_0", "gguf-q5_0", "int8"])
def test_fused_step_equals_eager(family, form, tmp_path, monkeypatch) -> None:
    config = tiny_config(family, num_layers=4, intermediate_size=256, hidden_size=256)
    model = random_model(config, seed=3)
    if form.startswith("gguf"):
        path = write_gguf(tmp_path / "m.gguf", model, quant=form.split("-")[1].upper())
        model, _ = gemmakit.load(path)
    elif form == "int8":
        path = write_gguf(tmp_path / "m.gguf", model)
        model, _ = gemmakit.load(path, quant="int8")
    for prompts in ([PROMPTS[0]], PROMPTS):
        fused, served = _decode_logits(model, prompts, True, monkeypatch)
        eager, none = _decode_logits(model, prompts, False, monkeypatch)
        assert served == STEPS and none == 0  # every step took the fused call in one run, none in the other
        assert torch.equal(fused, eager)


def test_replaced_weights_rebuild_the_stack(monkeypatch) -> None:
    """A projection swapped after the first step (as LoRA or a weight load does) is what runs next."""
    model = random_model(tiny_config("gemma3", num_layers=2), seed=1)
    first, _ = _decode_logits(model, PROMPTS[:1], True, monkeypatch)
    old = model.layers[1].attn.o_proj
    new = type(old)(old.in_features, old.out_features, bias=False)
    with torch.no_grad():
        new.weight.copy_(old.weight * -1.5)
    model.layers[1].attn.o_proj = new
    fused, served = _decode_logits(model, PROMPTS[:1], True, monkeypatch)
    eager, _ = _decode_logits(model, PROMPTS[:1], False, monkeypatch)
    assert served == STEPS and torch.equal(fused, eager)
    assert not torch.equal(fused, first)  # the new weight really changed the outputs
    # a new Parameter on a module that stays (as a weight load by assignment does)
    down = model.layers[0].mlp.down_proj
    down.weight = torch.nn.Parameter(down.weight.detach() * 0.5)
    refused, served = _decode_logits(model, PROMPTS[:1], True, monkeypatch)
    eager, _ = _decode_logits(model, PROMPTS[:1], False, monkeypatch)
    assert served == STEPS and torch.equal(refused, eager) and not torch.equal(refused, fused)


def test_unsupported_layers_keep_the_eager_path(monkeypatch) -> None:
    """A wrapped projection (here a LoRA-like module) is not something the stack can run: eager steps."""

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0.5

    model = random_model(tiny_config("gemma3", num_layers=2), seed=2)
    model.layers[0].mlp.down_proj = Wrapped(model.layers[0].mlp.down_proj)
    _, served = _decode_logits(model, PROMPTS[:1], True, monkeypatch)
    assert served == 0


# --------------------------------------------------------------------------- bfloat16 prefill


@pytest.mark.skipif(not bf16_supported(), reason="needs a CPU with bfloat16 dot products that oneDNN may use")
def test_bf16_prefill_is_close_to_float32_and_decode_is_untouched(tmp_path) -> None:
    """``prefill_dtype="bfloat16"``: many-row products move by about bfloat16's rounding (and do
    move, so the bfloat16 GEMM really ran); one-token steps keep the float32 block kernel exactly."""
    from gemmakit.errors import InvalidRequestError

    config = tiny_config("gemma3", num_layers=3, hidden_size=256, intermediate_size=256)
    path = write_gguf(tmp_path / "m.gguf", random_model(config, seed=4), quant="Q8_0")
    ref, _, ref_report = load_model(path, LoadOptions(prefill_dtype="float32"))
    bf16, _, bf16_report = load_model(path, LoadOptions(prefill_dtype="bfloat16"))
    assert (ref_report.prefill_dtype, bf16_report.prefill_dtype) == ("float32", "bfloat16")
    ids = torch.tensor([list(range(2, 72))])  # 70 rows: past the block kernel's 16 and bf16's 64
    with torch.inference_mode():
        a, b = ref(ids), bf16(ids)
        one = torch.tensor([[7]])
        assert torch.equal(ref(one), bf16(one))
        # a batch of one position a row (serving's decode steps) past the block kernel's 16 rows,
        # and a short prompt, keep float32 too: tokens never depend on the batch
        column, short = torch.arange(2, 22)[:, None], torch.tensor([list(range(2, 40))])
        assert torch.equal(ref(column), bf16(column)) and torch.equal(ref(short), bf16(short))
    scale = a.abs().max().item()
    assert 0 < (a - b).abs().max().item() < 0.05 * scale
    with pytest.raises(InvalidRequestError, match="quantised weights"):
        gemmakit.load(path, quant="none", prefill_dtype="bfloat16")
    with pytest.raises(InvalidRequestError, match="unknown prefill dtype"):
        gemmakit.load(path, prefill_dtype="float16")


def test_bf16_prefill_is_refused_on_a_cpu_without_bf16_dot_products(tmp_path, monkeypatch) -> None:
    """Where oneDNN has no bfloat16 dot products (an AVX2-only CPU, or ``ONEDNN_MAX_CPU_ISA=AVX2``) it
    cannot build the bfloat16 product at all: asking for it is a one-line error, and "auto" keeps float32."""
    import gemmakit.kernels.gemm as gemm
    from gemmakit.errors import InvalidRequestError

    config = tiny_config("gemma3", num_layers=2, hidden_size=256, intermediate_size=256)
    path = write_gguf(tmp_path / "m.gguf", random_model(config, seed=6), quant="Q8_0")
    monkeypatch.setattr(gemm, "bf16_supported", lambda: False)
    with pytest.raises(InvalidRequestError, match="bfloat16 dot products"):
        gemmakit.load(path, prefill_dtype="bfloat16")
    assert load_model(path).report.prefill_dtype == "float32"


def test_onednn_isa_limit_and_the_avx2_switch_turn_bf16_off(monkeypatch) -> None:
    """``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16, or ``GEMMAKIT_CPU_ISA=avx2``, make the bfloat16
    check say no on any CPU; the switch also hides AVX-512 from the flags and takes a separate build."""
    import gemmakit.kernels.gemm as gemm
    from gemmakit.kernels import build as kernels

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not gemm._onednn_may_use_bf16() and not gemm.bf16_supported()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert gemm._onednn_may_use_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("GEMMAKIT_CPU_ISA", "native")
    native_name = kernels._build_name()
    monkeypatch.setenv("GEMMAKIT_CPU_ISA", "avx2")
    assert not any(f.startswith(("avx512", "amx")) for f in kernels.cpu_flags().split())
    assert not gemm._cpu_has_bf16_dot() and kernels._build_name() != native_name
    monkeypatch.setenv("GEMMAKIT_CPU_ISA", "avx-512")
    with pytest.raises(ValueError, match="GEMMAKIT_CPU_ISA"):
        kernels.cpu_isa()


def test_auto_prefill_takes_bf16_only_for_quantised_codes_on_a_bf16_cpu(tmp_path, monkeypatch) -> None:
    """``prefill_dtype="auto"`` (the default): bfloat16 for quantised blocks where the CPU has bfloat16
    dot products, float32 where it has not, and float32 for a 16-bit checkpoint's exact matrices
    (and for expanded float weights) on any CPU."""
    import gemmakit.kernels.gemm as gemm
    from gemmakit.quant.grouped import GGMLWeight

    config = tiny_config("gemma3", num_layers=2, hidden_size=256, intermediate_size=256)
    model = random_model(config, seed=5)
    q8 = write_gguf(tmp_path / "q8.gguf", model, quant="Q8_0")
    f16 = write_gguf(tmp_path / "f16.gguf", model, quant="F16")

    def kinds(m) -> set:
        return {w.prefill_dtype for w in m.modules() if isinstance(w, GGMLWeight)}

    for supported in (True, False):
        monkeypatch.setattr(gemm, "bf16_supported", lambda: supported)
        quantised, _, report = load_model(q8)
        assert report.prefill_dtype == ("bfloat16" if supported else "float32")
        assert kinds(quantised) == {torch.bfloat16 if supported else torch.float32}
        half, _, report = load_model(f16)
        assert report.weights.startswith("float16") and report.prefill_dtype == "float32"
        assert kinds(half) == {torch.float32}
        assert load_model(q8, LoadOptions(quant="none")).report.prefill_dtype == "float32"
        assert load_model(q8, LoadOptions(prefill_dtype="float32")).report.prefill_dtype == "float32"


def test_dequantise_to_bf16_equals_converting_the_float32_weights() -> None:
    """The bfloat16 prefill's weights come from the blocks straight to bfloat16 (no float32 matrix);
    they must be exactly torch's rounding of the float32 dequantisation."""
    from gguf import GGMLQuantizationType as T

    from gemmakit.quant.ggml_ops import _dequantize_parts
    from test_ggml_quant import random_blocks

    K = 512
    parts = [torch.from_numpy(random_blocks(q, n, K, seed=n)).reshape(n, -1)
             for q, n in ((T.Q5_0, 40), (T.Q4_K, 24), (T.Q6_K, 8))]
    types = [int(T.Q5_0), int(T.Q4_K), int(T.Q6_K)]
    f32 = _dequantize_parts(parts, types, K)
    bf16 = _dequantize_parts(parts, types, K, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.view(torch.int16), f32.bfloat16().view(torch.int16))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_fused_step_on_the_serving_row_cache(family, tmp_path, monkeypatch) -> None:
    """The serving engine's cache: rows at different positions, one row idle (padding, written to the
    trash slot) for some steps, rings wrapping. Fused and eager steps give the same logits bit for bit."""
    from gemmakit.models.row_cache import RowKVCache

    config = tiny_config(family, num_layers=3, hidden_size=256, intermediate_size=256)
    path = write_gguf(tmp_path / "m.gguf", random_model(config, seed=6), quant="Q8_0")
    model, _ = gemmakit.load(path)

    def run(fused: bool) -> tuple[torch.Tensor, int]:
        served = _count_fused_steps(monkeypatch, fused)
        cache = RowKVCache(config, 3, 48, torch.float32)
        prompts = [PROMPTS[0], PROMPTS[1], [2, 5, 6, 7, 8]]
        longest = max(map(len, prompts))
        ids = torch.zeros(3, longest, dtype=torch.long)
        pos = torch.full((3, longest), -1, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = torch.tensor(p)
            pos[r, :len(p)] = torch.arange(len(p))
        out = []
        with torch.inference_mode():
            logits = model(ids, cache=cache, positions=pos)
            nxt = torch.stack([logits[r, len(p) - 1].argmax() for r, p in enumerate(prompts)])[:, None]
            at = torch.tensor([[len(p)] for p in prompts])
            for step in range(STEPS):
                step_pos = at.clone()
                if step % 3 == 1:
                    step_pos[2] = -1  # row 2 idles this step
                logits = model(nxt, cache=cache, positions=step_pos)
                out.append(logits)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                at = at + (step_pos >= 0).long()
        return torch.cat(out, dim=1), sum(served)

    fused, served = run(True)
    eager, none = run(False)
    assert served == STEPS and none == 0
    assert torch.equal(fused, eager)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize("head_dim", [24, 64])  # one scale per vector; two groups of 32 (and the batched heads path)
def test_fused_step_with_an_int8_kv_cache_equals_eager(family, head_dim, monkeypatch) -> None:
    """``--kv-cache int8``: the fused step quantises each new key and value as LayerCache.store does
    and attends over the codes; logits and the cache's codes and scales equal the eager step's."""
    config = tiny_config(family, num_layers=4, intermediate_size=256, hidden_size=256, head_dim=head_dim,
                         query_pre_attn_scalar=float(head_dim))
    model = random_model(config, seed=3)
    model.kv_int8 = True
    runs = []
    for fused in (True, False):
        served = _count_fused_steps(monkeypatch, fused)
        with torch.inference_mode():
            cache = model.new_cache(1, len(PROMPTS[0]) + STEPS)
            logits = model(torch.tensor([PROMPTS[0]]), cache=cache, last_only=True)
            out = []
            for step in range(STEPS):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                logits = model(nxt, cache=cache)
                out.append(logits)
        runs.append((torch.cat(out, 1), cache, sum(served)))
    (fused, fused_cache, served), (eager, eager_cache, none) = runs
    assert served == STEPS and none == 0
    assert torch.equal(fused, eager)
    for a, b in zip(fused_cache.layers, eager_cache.layers):
        assert a.quantised and all(torch.equal(x, y) for x, y in zip(a._tensors(), b._tensors()))


def test_int8_activations_reach_both_steps(tmp_path, monkeypatch) -> None:
    """load(activations="int8"): the fused and the eager steps multiply the same rounded activations
    (equal logits), and those move the float32 activations' logits by about 8-bit rounding."""
    config = tiny_config("gemma3", num_layers=4, intermediate_size=256, hidden_size=256)
    path = write_gguf(tmp_path / "m.gguf", random_model(config, seed=3), quant="Q5_0")
    exact, _ = gemmakit.load(path, activations="float32")
    rounded, _ = gemmakit.load(path, activations="int8")
    fused, served = _decode_logits(rounded, PROMPTS, True, monkeypatch)
    eager, _ = _decode_logits(rounded, PROMPTS, False, monkeypatch)
    assert served == STEPS and torch.equal(fused, eager)
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        a, b = exact(ids), rounded(ids)
    rel = ((b - a).norm() / a.norm()).item()
    assert 1e-4 < rel < 5e-2, rel


def test_int8_activations_need_quantised_blocks(tmp_path) -> None:
    config = tiny_config("gemma3", num_layers=2, intermediate_size=256, hidden_size=256)
    path = write_gguf(tmp_path / "m.gguf", random_model(config, seed=3))
    with pytest.raises(InvalidRequestError, match="--activations int8 applies to quantised"):
        gemmakit.load(path, activations="int8")
    with pytest.raises(InvalidRequestError, match="unknown kernel activations 'int4'"):
        gemmakit.load(path, activations="int4")
