"""Small random-weight Gemma models and the files that hold them, built for tests.

Nothing here is mocked: the models are real GemmaModels with random weights, written into real
GGUF files (with gguf's own writer) or Hugging Face directories (with transformers), and read back
through gemmakit's loaders.
"""

from __future__ import annotations

from dataclasses import replace

import string
from pathlib import Path

import numpy as np
import torch

from gemmakit.models.config import ModelConfig, alternating
from gemmakit.models.decoder import GemmaModel

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


FIM_TOKENS = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|file_separator|>"]

# The control tokens of a vocabulary's tool syntax: Gemma 4's turns, thoughts, calls and string
# quote; FunctionGemma's calls and quote
TOOL_TOKENS = {
    "gemma4": ["<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>",
               "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'],
    "functiongemma": ["<start_function_declaration>", "<end_function_declaration>", "<start_function_call>",
                      "<end_function_call>", "<start_function_response>", "<end_function_response>", "<escape>"],
}


def tiny_vocab(fim: bool = False, tool_tokens: str | None = None) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: specials, 256 byte-fallback pieces, then letters and merges.

    ``fim=True`` appends CodeGemma's fill-in-the-middle pieces (USER_DEFINED, as in CodeGemma's
    tokenizer) after everything else, so the ids of the plain vocabulary do not move."""
    tokens = list(SPECIALS)
    types = [3, 3, 3, 2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    normal = ["\u2581"] + list(string.ascii_lowercase) + ["\u2581" + c for c in "tahswi"] + ["th", "he", "in", "er"]
    tokens += normal
    types += [1] * len(normal)
    scores = [0.0] * len(SPECIALS) + [0.0] * 256 + [-float(i) for i in range(len(normal))]
    if fim:
        tokens += FIM_TOKENS
        types += [4] * len(FIM_TOKENS)
        scores += [0.0] * len(FIM_TOKENS)
    if tool_tokens:  # CONTROL, after everything else
        tokens += TOOL_TOKENS[tool_tokens]
        types += [3] * len(TOOL_TOKENS[tool_tokens])
        scores += [0.0] * len(TOOL_TOKENS[tool_tokens])
    return tokens, scores, types


VOCAB_SIZE = len(tiny_vocab()[0])
FIM_VOCAB_SIZE = len(tiny_vocab(fim=True)[0])


def tiny_config(family: str = "gemma3", **overrides) -> ModelConfig:
    """A few-layer config of the given family that exercises every switch of it."""
    layers = overrides.pop("num_layers", 7)
    base = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_layers=layers, num_heads=4,
                num_kv_heads=2, head_dim=24, max_position_embeddings=128, query_pre_attn_scalar=24.0)
    if family == "gemma":
        cfg = ModelConfig(family="gemma", layer_kinds=("global",) * layers, **base)
    elif family == "gemma2":
        cfg = ModelConfig(family="gemma2", layer_kinds=alternating(layers, 2), sliding_window=8, post_norms=True,
                          attn_logit_softcap=50.0, final_logit_softcap=30.0, **base)
    else:
        cfg = ModelConfig(family="gemma3", layer_kinds=alternating(layers, 6), sliding_window=8,
                          rope_theta=1_000_000.0, qk_norm=True, post_norms=True, **base)
    return cfg.replace(**overrides)


def random_model(config: ModelConfig, seed: int = 0) -> GemmaModel:
    """A model whose every weight, norms included, is random (so a wrong mapping shows)."""
    torch.manual_seed(seed)
    model = GemmaModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.05)
    return model.eval()


def _gguf_name(ours: str) -> str:
    table = {"attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
             "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
             "post_attn_norm": "post_attention_norm", "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "post_mlp_norm": "post_ffw_norm"}
    if ours == "embed.weight":
        return "token_embd.weight"
    if ours == "final_norm.weight":
        return "output_norm.weight"
    _, index, rest = ours.split(".", 2)
    return f"blk.{index}.{table[rest.removesuffix('.weight')]}.weight"


def write_gguf(path: Path, model: GemmaModel, arch: str | None = None, quant: str | None = None,
               with_tokenizer: bool = True, **metadata) -> Path:
    """Write ``model`` as a llama.cpp-style GGUF (norms stored as 1 + w, as the converter does)."""
    arrays = {_gguf_name(name): p.detach().float().numpy() for name, p in model.state_dict().items()}
    return _write_gguf_file(path, model.config, arch or model.config.family, arrays, quant, with_tokenizer, **metadata)


# transformers' per-layer names -> llama.cpp's (gguf-py's tensor map for gemma, gemma2, gemma3)
_HF_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def write_hf_as_gguf(path: Path, hf_model, config: ModelConfig, **metadata) -> Path:
    """Write a transformers Gemma model as llama.cpp's converter would, straight from transformers'
    names (independently of gemmakit's own name tables). ``config`` supplies the GGUF metadata."""
    arrays = {}
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, _, index, rest = name.split(".", 3)
            rest = rest.removesuffix(".weight")
            if rest == "post_attention_layernorm":  # Gemma 1: the pre-MLP norm; Gemma 2/3: after attention
                part = "ffn_norm" if config.family == "gemma" else "post_attention_norm"
            else:
                part = _HF_TO_GGUF[rest]
            gguf_name = f"blk.{index}.{part}.weight"
        arrays[gguf_name] = t.detach().float().numpy()
    return _write_gguf_file(path, config, config.family, arrays, None, True, **metadata)


def _write_gguf_file(path: Path, c: ModelConfig, arch: str, arrays: dict[str, np.ndarray], quant: str | None,
                     with_tokenizer: bool, sliding_window_pattern=None, fim_tokens: bool = False,
                     chat_template: str | None = None, tool_tokens: str | None = None) -> Path:
    import gguf

    from gemmakit.checkpoints.gguf_writer import add_model_metadata, add_tensor

    if c.query_pre_attn_scalar != c.head_dim:
        raise ValueError("GGUF has no key for query_pre_attn_scalar; llama.cpp assumes head_dim")
    w = gguf.GGUFWriter(str(path), arch)
    add_model_metadata(w, replace(c, family=arch), "tiny-" + arch, sliding_window_pattern)
    if with_tokenizer:
        tokens, scores, types = tiny_vocab(fim_tokens, tool_tokens)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(False)
        if chat_template is not None:
            w.add_chat_template(chat_template)
    for name, data in arrays.items():
        add_tensor(w, name, data, quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gemma_pytorch_state(hf_state: dict[str, torch.Tensor], embed_name: str = "embedder.weight") -> dict:
    """transformers' Gemma tensor names -> the layout of google/gemma_pytorch's ``.ckpt`` files.

    Written from gemma_pytorch's model.py by hand (not from gemmakit's loader) so that a mistake in
    the loader cannot be mirrored here: q, k and v are fused into one ``qkv_proj`` (queries, keys,
    values), the embedding is ``embedder.weight``, QK-norms are ``query_norm``/``key_norm``.
    Tensors that all have stride 0 (shape-only placeholders) stay placeholders when fused.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in hf_state.items():
        if name == "lm_head.weight":
            continue
        if name == "model.embed_tokens.weight":
            out[embed_name] = t
        elif ".self_attn.q_proj." in name:
            k, v = hf_state[name.replace("q_proj", "k_proj")], hf_state[name.replace("q_proj", "v_proj")]
            fused_rows = t.shape[0] + k.shape[0] + v.shape[0]
            if all(x.stride() == (0, 0) for x in (t, k, v)):
                fused = torch.zeros(1, dtype=t.dtype).expand(fused_rows, t.shape[1])
            else:
                fused = torch.cat([t, k, v], dim=0)
            out[name.replace("q_proj", "qkv_proj")] = fused
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        else:
            out[name.replace("self_attn.q_norm", "self_attn.query_norm")
                .replace("self_attn.k_norm", "self_attn.key_norm")] = t
    return out


def write_ckpt(path: Path, hf_state: dict[str, torch.Tensor], **extra) -> Path:
    """Save ``hf_state`` as gemma_pytorch does: ``torch.save({"model_state_dict": ...})``."""
    state = gemma_pytorch_state(hf_state, extra.pop("embed_name", "embedder.weight"))
    state.update(extra)  # e.g. freqs_cis, vision-tower tensors the loader must skip
    torch.save({"model_state_dict": state}, path)
    return path


HF_COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=24, max_position_embeddings=256)


def random_hf_model(kind: str):
    """A transformers Gemma / Gemma 2 / Gemma 3 causal LM with random weights, norms included.

    MQA for Gemma 1, GQA with a sliding window of 8, soft-caps, query_pre_attn_scalar != head_dim
    and linear RoPE scaling for the others: every switch the generation has."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig,
                              GemmaForCausalLM)

    torch.manual_seed(0)
    if kind == "gemma":  # MQA, as Gemma 2B
        model = GemmaForCausalLM(GemmaConfig(**{**HF_COMMON, "num_key_value_heads": 1}, hidden_act="gelu_pytorch_tanh"))
    elif kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**HF_COMMON, hidden_activation="gelu_pytorch_tanh", sliding_window=8,
                                               query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
                                               final_logit_softcapping=3.0))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**HF_COMMON, hidden_activation="gelu_pytorch_tanh", sliding_window=8,
                                                   query_pre_attn_scalar=20,
                                                   rope_scaling={"rope_type": "linear", "factor": 8.0}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model.eval()


LLAMACPP_DATA = Path(__file__).parent / "data" / "gguf_llamacpp"


def gemma4_experts_gguf(path: Path, hidden: int = 256, expert_width: int = 256, experts: int = 8,
                        per_token: int = 2, intermediate: int = 256, context: int = 256, quant: str | None = None,
                        seed: int = 0) -> Path:
    """llama.cpp's tiny Gemma 4 mixture (data/gguf_llamacpp/gemma4-experts.gguf, written by its
    converter) widened to ``hidden``, ``experts`` experts of ``expert_width``: its metadata and
    vocabulary with those sizes, random weights, F32 or, with ``quant`` (a type gguf-py can write:
    Q8_0, Q4_0, Q5_0 ...), every matrix in that type but the router, which llama.cpp's quantiser
    leaves in F32 too. Rows of 256 let llama.cpp requantise the file into K-quants; the test
    file's 64-wide, 24-deep experts fall back to F16 there."""
    import gguf

    from gemmakit.checkpoints.base import parameter_shapes
    from gemmakit.checkpoints.gguf import config_from_gguf, gguf_names
    from gemmakit.checkpoints.gguf_reader import open_gguf

    source = LLAMACPP_DATA / "gemma4-experts.gguf"
    config = config_from_gguf(open_gguf(source)).replace(
        hidden_size=hidden, intermediate_size=intermediate, num_experts=experts, experts_per_token=per_token,
        expert_intermediate_size=expert_width, max_position_embeddings=context)
    sizes = {"context_length": context, "embedding_length": hidden, "feed_forward_length": intermediate,
             "expert_count": experts, "expert_used_count": per_token, "expert_feed_forward_length": expert_width}
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(path), "gemma4")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind, value = field.types[0], field.contents()
        short = key.removeprefix("gemma4.")
        if short in sizes:
            value = [sizes[short]] * len(value) if isinstance(value, list) else sizes[short]
        writer.add_key_value(key, value, kind, field.types[1] if kind == gguf.GGUFValueType.ARRAY else None)
    g = torch.Generator().manual_seed(seed)
    names = gguf_names(config)
    for ours, shape in parameter_shapes(config).items():
        r = torch.randn(shape, generator=g)
        if len(shape) == 1 or ours.endswith("layer_scalar"):  # norms and scales multiply: near one
            data = 1.0 + 0.2 * r
        else:  # about unit gain per matrix, so that quantisation noise is not amplified layer after layer
            data = r / shape[-1] ** 0.5
        data, name = data.numpy(), names[ours]
        qtype = getattr(gguf.GGMLQuantizationType, quant) if quant else None
        if qtype is not None and data.ndim >= 2 and data.shape[-1] % 32 == 0 and "ffn_gate_inp" not in name:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    rope = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    writer.add_tensor(rope.name, np.asarray(rope.data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_quantize(source: Path, destination: Path, ftype: str = "Q4_K_M") -> Path:
    """``source`` requantised by llama.cpp itself (llama-cpp-python's ``llama_model_quantize``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantise {source}")
    return destination
