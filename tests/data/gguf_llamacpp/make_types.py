"""Rebuild ``types/``: one small GGUF per quantisation type that llama.cpp's own quantiser writes and
gemmakit reads, and llama.cpp's logits on each (the reference tests/test_gguf_types.py compares with).

A tiny random Gemma 3 (transformers; one layer, width 256, 4 query heads of 64 and one KV head,
MLP width 256, make.py's 384-piece tokenizer) is converted to an F32 GGUF by llama.cpp's
converter, then quantised by llama.cpp (llama-cpp-python's ``llama_model_quantize``) into every type, with
``pure`` set so that every matrix, the embedding included, is of the type under test (the ftype
alone would mix in Q4_K-Q6_K for the embedding and some layers). Every matrix's rows are a
multiple of 256, so no tensor falls back to a 32-weight type. The grid types (IQ1-IQ3) cannot be
written without an importance matrix: one is computed here with transformers, as llama.cpp's
imatrix tool does it (per linear layer, the mean over tokens of each input column's squared
activation), and handed to the quantiser for every type. MXFP4 is llama.cpp's ftype for
mixtures (MXFP4_MOE: experts MXFP4, every other matrix Q8_0), so its file is a tiny Gemma 4 with
experts (make.py's gemma4-experts, two layers, experts 32 wide as MXFP4's blocks need). Every
file is reproduced byte for byte by a rerun.

    PYTHONPATH=llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py \\
        python tests/data/gguf_llamacpp/make_types.py llama_cpp_python-0.3.36/vendor/llama.cpp [gemma3] [mxfp4]

Needs what make.py needs (transformers >= 5.5, sentencepiece, llama-cpp-python 0.3.36).
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import make  # noqa: E402

OUT = make.HERE / "types"
# type under test -> the llama.cpp ftype whose default tensor type it is (IQ2_S is IQ2_M's:
# llama.cpp's IQ2_S ftype defaults to IQ2_XS tensors)
FTYPES = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "IQ3_XXS": "IQ3_XXS",
          "IQ3_S": "IQ3_S", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_M", "IQ1_S": "IQ1_S",
          "IQ1_M": "IQ1_M", "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0"}
GEMMA3 = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64, max_position_embeddings=256,
              sliding_window=8, layer_types=["sliding_attention"],
              hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2)
EXPERTS = {**make.VARIANTS["gemma4-experts"], "moe_intermediate_size": 32, "num_hidden_layers": 2,
           "layer_types": ["sliding_attention", "full_attention"]}
IDS = make.IDS  # 16 positions, twice the sliding window
# transformers' linear layers -> llama.cpp's tensor names (the tied LM head reads the embedding)
LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
# llama.cpp rounds activations to 8 bits; routing among experts by near-equal scores would turn
# that rounding into a different expert (a jump in the logits), so the router's scores are spread
ROUTER_GAIN = 8.0


def randomise(model: torch.nn.Module, seed: int, norm_offset: float) -> None:
    """About unit gain per matrix, so that quantisation noise is not amplified layer after layer;
    norms and scales near one (Gemma 3 multiplies by ``1 + w``: ``norm_offset`` 1, Gemma 4 by ``w``);
    the embedding larger, so that the logits spread."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g)
                if t.dim() == 1 or name.endswith(("layer_scalar", "router.scale", "per_expert_scale")):
                    t.copy_(1.0 - norm_offset + 0.2 * r)
                elif "embed_tokens" in name:
                    t.copy_(4.0 * r / t.shape[-1] ** 0.5)
                elif "router.proj" in name:
                    t.copy_(ROUTER_GAIN * r / t.shape[-1] ** 0.5)
                else:
                    t.copy_(r / t.shape[-1] ** 0.5)


def importance_matrix(model: torch.nn.Module, ids: list[int], length: int = 64) -> dict[str, np.ndarray]:
    """Per linear layer (by llama.cpp's tensor name), the mean over ``ids`` (in windows of
    ``length``) of each input column's squared activation."""
    sums: dict[str, torch.Tensor] = {}
    counts: Counter = Counter()
    hooks = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name == "lm_head":
            key = "token_embd.weight"
        else:
            layer, tail = name.removeprefix("model.layers.").split(".", 1)
            key = f"blk.{layer}.{LLAMA_NAMES[tail]}.weight"

        def hook(_module, inputs, _output, key=key):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] += x.shape[0]

        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for start in range(0, len(ids) - length + 1, length):
            model(torch.tensor([ids[start:start + length]]))
    for h in hooks:
        h.remove()
    return {key: (s / counts[key]).float().numpy() for key, s in sums.items()}


def quantize(source: Path, destination: Path, ftype: str, imatrix: dict[str, np.ndarray] | None,
             pure: bool) -> None:
    """llama.cpp's quantiser on ``source`` (``ftype`` as llama.cpp names it), with ``imatrix``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    params.pure = pure
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # the last one's NULL name ends it
        for entry, (name, values) in zip(entries, imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantise {source} to {ftype}")


def llama_cpp_logits(path: Path) -> list:
    return make.llama_cpp_logits(path, IDS).astype(np.float64).round(3).tolist()


def tensor_types(path: Path) -> dict[str, int]:
    import gguf

    return dict(sorted(Counter(gguf.GGMLQuantizationType(t.tensor_type).name
                               for t in gguf.GGUFReader(path).tensors).items()))


def convert(llama_cpp_dir: str, hf: Path, out: Path) -> None:
    subprocess.run([sys.executable, f"{llama_cpp_dir}/convert_hf_to_gguf.py", str(hf), "--outfile", str(out),
                    "--outtype", "f32"], check=True)


def gemma3_files(llama_cpp_dir: str, tmp: Path, record: dict) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GemmaTokenizer

    hf = tmp / "gemma3"
    hf.mkdir()
    vocab = make.tokenizer(hf, gemma3=True)
    model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=vocab, **GEMMA3)).eval()
    randomise(model, 21, norm_offset=1.0)
    model.save_pretrained(hf)
    source = tmp / "gemma3-f32.gguf"
    convert(llama_cpp_dir, hf, source)
    text = GemmaTokenizer.from_pretrained(hf).encode(make.TEXT * 4, add_special_tokens=False)
    imatrix = importance_matrix(model, text)
    record["logits"]["F32"] = llama_cpp_logits(source)
    for qtype, ftype in FTYPES.items():
        out = OUT / f"gemma3-{qtype.lower()}.gguf"
        quantize(source, out, ftype, imatrix, pure=True)
        record["types"][qtype] = tensor_types(out)
        record["logits"][qtype] = llama_cpp_logits(out)


def mxfp4_file(llama_cpp_dir: str, tmp: Path, record: dict) -> None:
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    hf = tmp / "gemma4"
    hf.mkdir()
    vocab = make.tokenizer(hf)
    config = Gemma4TextConfig(**{**make.COMMON, "vocab_size": vocab, "vocab_size_per_layer_input": vocab},
                              **EXPERTS)
    model = Gemma4ForCausalLM(config).eval()
    randomise(model, 22, norm_offset=0.0)
    model.save_pretrained(hf)
    source = tmp / "gemma4-f32.gguf"
    convert(llama_cpp_dir, hf, source)
    out = OUT / "gemma4-experts-mxfp4.gguf"
    quantize(source, out, "MXFP4_MOE", None, pure=False)
    record["types"]["MXFP4"] = tensor_types(out)
    record["logits"]["MXFP4"] = llama_cpp_logits(out)
    record["logits"]["MXFP4_F32"] = llama_cpp_logits(source)


def main(llama_cpp_dir: str, which: list[str]) -> None:
    OUT.mkdir(exist_ok=True)
    path = OUT / "llama_cpp_logits.json"
    record = json.loads(path.read_text()) if path.exists() else {"ids": IDS, "logits": {}, "types": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in which:
            {"gemma3": gemma3_files, "mxfp4": mxfp4_file}[name](llama_cpp_dir, Path(tmp), record)
    path.write_text(json.dumps(record) + "\n")
    for qtype, types in record["types"].items():
        print(qtype, types)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["gemma3", "mxfp4"])
