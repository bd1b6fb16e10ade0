"""GGUF files (llama.cpp's format): metadata -> ModelConfig, tensor names -> ours.

Facts this adapter relies on (from llama.cpp's converter and loader):
- Gemma norm weights are stored with the 1 already added (``w + 1``); we subtract it again.
- Tensors are stored with GGUF's dims reversed relative to PyTorch; the reader already flips them.
- The GGUF metadata of Gemma 2/3 usually does not record the local/global layer pattern or the
  query scale; llama.cpp hard-codes them per architecture, and so do we (Gemma 2: every 2nd layer
  global, Gemma 3: every 6th; query_pre_attn_scalar = head_dim except for the 27B sizes, where it
  is hidden / heads). Newer converters may write ``{arch}.attention.sliding_window_pattern``: an
  integer period n (layer i is local unless i % n == n - 1; 0 means all local) or one bool per
  layer (true = sliding window); when present it wins.
- Gemma 3n (``gemma3n``): see :func:`_gemma3n_config` for what llama.cpp hard-codes and the
  converter writes; the model's AltUp projections are stacked into one [3, H, H] tensor each.
- EmbeddingGemma (``gemma-embedding``): Gemma 3's decoder run bidirectionally, plus the pooling
  and projections of its sentence-transformers pipeline; see :func:`embedding_config_from_gguf`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from gemmakit.checkpoints.base import Checkpoint, TensorLoader, check_file_tensors, parameter_shapes
from gemmakit.checkpoints.gguf_reader import GGUFFile, GGUFTensor, open_gguf
from gemmakit.errors import CheckpointError, InvalidRequestError, UnsupportedModelError
from gemmakit.models.config import LayerKind, ModelConfig, alternating
from gemmakit.models.encoder import DenseLayer, EmbeddingConfig
from gemmakit.quant.ggml import SUPPORTED_TYPES, dequantize, ggml_blocks, packable
from gemmakit.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "gemma3n", "gemma4", "gemma-embedding")

# GGUF block-tensor suffix -> our per-layer parameter name
_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "post_attn_norm",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_mlp_norm",
    # Gemma 4 (llama.cpp's gemma4 architecture)
    "layer_output_scale": "layer_scalar",
    "inp_gate": "per_layer.gate",
    "proj": "per_layer.proj",
    "post_norm": "per_layer.norm",
    "ffn_gate_inp": "moe.router.proj",
    "pre_ffw_norm_2": "moe.pre_norm",
    "post_ffw_norm_1": "dense_norm",
    "post_ffw_norm_2": "moe.post_norm",
    # Gemma 3n (llama.cpp's gemma3n architecture)
    "altup_router": "altup.router",
    "altup_router_norm": "altup.router_norm",
    "altup_predict_coef": "altup.predict_coefs",
    "altup_correct_coef": "altup.correct_coefs",
    "laurel_l": "laurel.left",
    "laurel_r": "laurel.right",
    "laurel_post_norm": "laurel.norm",
}
# block tensors whose GGUF name is not ``<ours>.weight``
_LAYER_NAMES_EXACT = {
    "layer_output_scale.weight": "layer_scalar",
    "ffn_gate_inp.scale": "moe.router.scale",
    "ffn_down_exps.scale": "moe.router.per_expert_scale",
    "ffn_gate_up_exps.weight": "moe.experts.gate_up_proj",
    "ffn_down_exps.weight": "moe.experts.down_proj",
    "altup_correct_scale.weight": "altup.output_scale",
}
_MODEL_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "final_norm.weight",
    "per_layer_token_embd.weight": "per_layer_embed.weight",
    "per_layer_model_proj.weight": "per_layer_model_proj.weight",
    "per_layer_proj_norm.weight": "per_layer_proj_norm.weight",
}
# model tensors holding several of ours stacked on a leading dim: GGUF name -> our name of entry {i}
_STACKED_NAMES = {
    "altup_proj.weight": "altup.expand.{}.weight",
    "altup_unembd_proj.weight": "altup.collapse.{}.weight",
}
# llama.cpp's gemma3n loader wants keys and values on every layer, so converted files may carry them
# on the layers that read an earlier layer's (hub checkpoints have such unused weights); none of ours
_UNUSED_SHARED_KV = ("attn_k.weight", "attn_v.weight", "attn_k_norm.weight")


# What llama.cpp assumes where GGUF metadata is silent (and so what a GGUF writer must not contradict):
# every n-th layer global, and queries scaled by hidden/heads for the 27B shapes, else by head_dim.
DEFAULT_LOCAL_PERIOD = {"gemma2": 2, "gemma3": 6, "gemma-embedding": 6}


def assumed_query_scalar(arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> float:
    return hidden / heads if (arch, layers) in {("gemma2", 46), ("gemma3", 62)} else head_dim


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    arch = f.architecture
    if arch == "clip":  # llama.cpp's vision half of a model (checkpoints/mmproj.py)
        raise InvalidRequestError(f"{f.path}: llama.cpp's vision file (mmproj), not a model; load the text "
                                  f"model's GGUF with --mmproj {f.path}")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{f.path}: GGUF architecture {arch!r} is not supported (gemmakit runs {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    m = f.metadata

    def get(key: str, default=None):
        value = m.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{f.path}: metadata key {arch}.{key} is missing")
        return value

    hidden = int(get("embedding_length"))
    layers = int(get("block_count"))
    heads = int(get("attention.head_count"))
    kv_heads = _per_layer(get("attention.head_count_kv", heads), layers, "attention.head_count_kv", f)[0]
    head_dim = int(get("attention.key_length", hidden // heads))
    vocab = len(m["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in m else f.tensors["token_embd.weight"].shape[0]
    base = dict(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=_per_layer(get("feed_forward_length"), layers, "feed_forward_length", f)[0],
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=int(get("context_length")),
        # stored as float32: take its shortest decimal form (1e-06, not 9.99999997e-07)
        rms_norm_eps=float(str(np.float32(get("attention.layer_norm_rms_epsilon", 1e-6)))),
        name=str(m.get("general.name", Path(f.path).stem)),
    )
    if arch == "gemma":
        return ModelConfig(family="gemma", layer_kinds=("global",) * layers, query_pre_attn_scalar=head_dim,
                           rope_theta=float(get("rope.freq_base", 10_000.0)),
                           rope_local_theta=float(get("rope.freq_base", 10_000.0)), **base)
    # The 27B models scale queries by hidden/heads instead of head_dim (llama.cpp does the same).
    scalar = assumed_query_scalar(arch, layers, hidden, heads, head_dim)
    if arch == "gemma2":
        return ModelConfig(
            family="gemma2", layer_kinds=_layer_kinds(f, layers, DEFAULT_LOCAL_PERIOD[arch]), query_pre_attn_scalar=scalar,
            sliding_window=int(get("attention.sliding_window", 4096)),
            rope_theta=float(get("rope.freq_base", 10_000.0)), rope_local_theta=float(get("rope.freq_base", 10_000.0)),
            post_norms=True, attn_logit_softcap=float(get("attn_logit_softcapping", 50.0)),
            final_logit_softcap=float(get("final_logit_softcapping", 30.0)), **base,
        )
    if arch == "gemma4":
        return _gemma4_config(f, get, base)
    if arch == "gemma3n":
        return _gemma3n_config(f, get, base)
    scaling = float(m.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if m.get(f"{arch}.rope.scaling.type", "linear") not in ("linear", "none"):
        raise UnsupportedModelError(f"{f.path}: RoPE scaling type {m[f'{arch}.rope.scaling.type']!r} is not supported")
    # gemma-embedding: the converter writes the local layers' base and the checkpoint's own window
    # (not transformers' halved one); llama.cpp masks it symmetrically, as ModelConfig.bidirectional does
    embedding = arch == "gemma-embedding"
    return ModelConfig(
        family="gemma3", layer_kinds=_layer_kinds(f, layers, DEFAULT_LOCAL_PERIOD[arch]), query_pre_attn_scalar=scalar,
        sliding_window=int(get("attention.sliding_window")), rope_theta=float(get("rope.freq_base", 1_000_000.0)),
        rope_local_theta=float(get("rope.freq_base_swa", 10_000.0)) if embedding else 10_000.0,
        rope_scaling_factor=scaling, qk_norm=True, post_norms=True, bidirectional=embedding, **base,
    )


# llama.cpp's enum llama_pooling_type, as the converter writes {arch}.pooling_type -> our pooling mode
POOLING_TYPES = {1: "mean", 2: "cls", 3: "lasttoken"}
# EmbeddingGemma's task prompts (its config_sentence_transformers.json), which a GGUF does not carry
EMBEDDING_GEMMA_PROMPTS = (
    ("query", "task: search result | query: "), ("document", "title: none | text: "),
    ("BitextMining", "task: search result | query: "), ("Clustering", "task: clustering | query: "),
    ("Classification", "task: classification | query: "), ("InstructionRetrieval", "task: code retrieval | query: "),
    ("MultilabelClassification", "task: classification | query: "),
    ("PairClassification", "task: sentence similarity | query: "), ("Reranking", "task: search result | query: "),
    ("Retrieval", "task: search result | query: "), ("Retrieval-query", "task: search result | query: "),
    ("Retrieval-document", "title: none | text: "), ("STS", "task: sentence similarity | query: "),
    ("Summarization", "task: summarization | query: "),
)
# the GGUF names of the projections after pooling, in the order they apply (sentence-transformers'
# 2_Dense and 3_Dense; the converter keeps their weights only, and llama.cpp applies no bias or activation)
_DENSE_NAMES = ("dense_2.weight", "dense_3.weight")


def dense_names(count: int) -> tuple[str, ...]:
    """The GGUF names of an embedding model's ``count`` projections after pooling (at most two)."""
    return _DENSE_NAMES[:count]


def embedding_config_from_gguf(f: GGUFFile, decoder: ModelConfig) -> EmbeddingConfig:
    """A ``gemma-embedding`` file's pipeline, as llama.cpp runs it: the decoder's last hidden
    states pooled as ``{arch}.pooling_type`` says (mean where absent: EmbeddingGemma's), then
    ``dense_2`` and ``dense_3`` where the converter kept them (``--sentence-transformers-dense-modules``),
    bias-free and without activation, as EmbeddingGemma's are.

    What the file does not record is EmbeddingGemma's: L2 normalisation at the end (its
    ``Normalize`` module; llama.cpp's server normalises by default too), its task prompts, pooled
    with the text (``include_prompt``), none by default, the longest input the context length,
    and ``<bos>``/``<eos>`` around a text as ``tokenizer.ggml.add_bos_token``/``add_eos_token``
    say (llama.cpp's tokenizer adds them the same way)."""
    m = f.metadata
    kind = int(m.get(f"{f.architecture}.pooling_type", 1))
    if kind not in POOLING_TYPES:
        raise UnsupportedModelError(f"{f.path}: pooling type {kind} is not supported (gemmakit pools a "
                                    "gemma-embedding file by mean (1), first token (2) or last token (3))")
    dense, width = [], decoder.hidden_size
    for name in _DENSE_NAMES:
        if name in f.tensors:
            out_features, in_features = f.tensors[name].shape
            if in_features != width:
                raise CheckpointError(f"{f.path}: tensor {name} takes {in_features} features where {width} arrive")
            dense.append(DenseLayer(in_features, out_features))
            width = out_features
    return EmbeddingConfig(
        decoder=decoder, pooling=(POOLING_TYPES[kind],), include_prompt=True, dense=tuple(dense), normalize=True,
        max_seq_length=decoder.max_position_embeddings, add_bos=bool(m.get("tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(m.get("tokenizer.ggml.add_eos_token", False)), prompts=EMBEDDING_GEMMA_PROMPTS,
        name=decoder.name)


def _gemma4_config(f: GGUFFile, get, base: dict) -> ModelConfig:
    """llama.cpp's ``gemma4`` metadata: per-layer arrays where the layers differ (KV heads of the
    global layers, the double-wide MLP of the layers sharing K/V); K=V global layers are those
    without ``attn_v``; the share of the global layers' rotating pairs is the count of 1s in
    ``rope_freqs`` (the others hold 1e30, i.e. frequency 0)."""
    layers = base["num_layers"]
    kinds = _layer_kinds(f, layers, 6)
    shared = int(get("attention.shared_kv_layers", 0))
    first_global = kinds.index("global") if "global" in kinds else None
    local_dim = int(get("attention.key_length_swa", base["head_dim"]))
    kv = _per_layer(get("attention.head_count_kv", base["num_heads"]), layers, "attention.head_count_kv", f)
    ff = _per_layer(get("feed_forward_length"), layers, "feed_forward_length", f)
    local_kv = next((kv[i] for i, k in enumerate(kinds) if k == "local"), kv[0])
    global_kv = kv[first_global] if first_global is not None else local_kv
    k_eq_v = first_global is not None and f"blk.{first_global}.attn_v.weight" not in f.tensors
    proportion = 1.0
    if "rope_freqs.weight" in f.tensors:
        factors = dequantize(f.tensors["rope_freqs.weight"].raw, f.tensors["rope_freqs.weight"].ggml_type,
                             f.tensors["rope_freqs.weight"].shape)
        proportion = float((factors == 1.0).sum()) / factors.numel()
    per_layer = int(get("embedding_length_per_layer_input", 0))
    experts = int(f.metadata.get("gemma4.expert_count", 0) or 0)
    return ModelConfig(
        family="gemma4", layer_kinds=kinds, query_pre_attn_scalar=1.0,
        sliding_window=int(get("attention.sliding_window")) if "local" in kinds else None,
        rope_theta=float(get("rope.freq_base", 1_000_000.0)), rope_local_theta=float(get("rope.freq_base_swa", 10_000.0)),
        rope_global_proportion=proportion, qk_norm=True, post_norms=True,
        final_logit_softcap=float(get("final_logit_softcapping", 30.0)),  # llama.cpp's default where absent
        norm_offset=0.0, v_norm=True, layer_scalar=True,
        global_head_dim=base["head_dim"], global_kv_heads=global_kv if global_kv != local_kv or k_eq_v else None,
        k_eq_v=k_eq_v, num_kv_shared_layers=shared, double_wide_mlp=len(set(ff)) > 1, per_layer_input_dim=per_layer,
        per_layer_vocab_size=f.tensors["per_layer_token_embd.weight"].shape[0] if per_layer else 0,
        num_experts=experts, experts_per_token=int(get("expert_used_count")) if experts else 0,
        expert_intermediate_size=int(get("expert_feed_forward_length")) if experts else 0,
        **{**base, "head_dim": local_dim, "num_kv_heads": local_kv, "intermediate_size": ff[0]},
    )


def _gemma3n_config(f: GGUFFile, get, base: dict) -> ModelConfig:
    """llama.cpp's ``gemma3n`` metadata. Its loader hard-codes 4 AltUp streams (stream 0 active),
    PLE width 256, LAuReL rank 64, keys and values from the first 20 layers, sparsity 0.95 on the
    first 10 layers and a final soft-cap of 30, reading none of the keys the converter writes for
    them; here the keys win where present (on the published models they agree with those
    constants), the constants stand in where absent, and LAuReL's rank, never written, is
    ``laurel_l``'s shape. AltUp's training-time coefficient clip is not stored: Gemma 3n's 120."""
    m, layers = f.metadata, base["num_layers"]

    def optional(key: str, default):
        value = m.get(f"gemma3n.{key}")
        return default if value is None else value

    if int(optional("altup.active_idx", 0)) != 0:
        raise UnsupportedModelError(f"{f.path}: AltUp's active stream must be stream 0 (gemma3n.altup.active_idx)")
    scales = optional("activation_sparsity_scale", None)
    if scales is None:
        sparsity = [0.95 if i < 10 else 0.0 for i in range(layers)]
    else:
        if len(scales) != layers:
            raise CheckpointError(f"{f.path}: gemma3n.activation_sparsity_scale has {len(scales)} entries "
                                  f"for {layers} layers")
        sparsity = [_sparsity_of(float(x)) for x in scales]
    ff = _per_layer(get("feed_forward_length"), layers, "feed_forward_length", f)
    per_layer = int(optional("embedding_length_per_layer_input", 256))
    kinds = _layer_kinds(f, layers, 5)
    return ModelConfig(
        family="gemma3n", layer_kinds=kinds, query_pre_attn_scalar=1.0,
        sliding_window=int(get("attention.sliding_window")) if "local" in kinds else None,
        rope_theta=float(get("rope.freq_base", 1_000_000.0)), rope_local_theta=float(get("rope.freq_base_swa", 10_000.0)),
        qk_norm=True, post_norms=True, final_logit_softcap=float(optional("final_logit_softcapping", 30.0)),
        norm_offset=0.0, v_norm=True, num_kv_shared_layers=int(optional("attention.shared_kv_layers", max(layers - 20, 0))),
        per_layer_input_dim=per_layer, per_layer_vocab_size=_per_layer_table_rows(f),
        intermediate_sizes=tuple(ff) if len(set(ff)) > 1 else (), activation_sparsity=tuple(sparsity) if any(sparsity) else (),
        altup_inputs=int(optional("altup.num_inputs", 4)), altup_coef_clip=120.0,
        laurel_rank=f.tensors["blk.0.laurel_l.weight"].shape[0] if "blk.0.laurel_l.weight" in f.tensors else 64,
        **{**base, "intermediate_size": ff[0]},
    )


def _sparsity_of(stds: float) -> float:
    """The target sparsity whose standard-normal quantile the converter stored (-inf: a dense layer),
    to 6 places: 1.6448536 -> 0.95, whose quantile gives back the stored float32."""
    return 0.0 if stds == -math.inf else round(0.5 * (1.0 + math.erf(stds / math.sqrt(2.0))), 6)


def _per_layer_table_rows(f: GGUFFile) -> int:
    """Rows of the per-layer embedding table that hold embeddings. llama.cpp's converter pads
    Gemma 3n's table with zero rows up to the vocabulary (262144 -> 262400: the image and audio
    soft-token ids), where transformers keeps the shorter table and reads row 0 for ids beyond it;
    the padding is found as the trailing all-zero rows (two reads of 256 rows on the published
    models), so that those ids read what they read in transformers."""
    t = f.tensors["per_layer_token_embd.weight"]
    end = t.shape[0]
    while end > 0:
        start = max(end - 256, 0)
        rows = _row_slice(t, start, end)
        used = (dequantize(rows.raw, rows.ggml_type, rows.shape) != 0).any(1).nonzero()
        if len(used):
            return start + int(used[-1]) + 1
        end = start
    return t.shape[0]


def _row_slice(t: GGUFTensor, start: int, end: int) -> GGUFTensor:
    """Rows ``start:end`` of a matrix (each row is whole blocks, so rows are contiguous bytes)."""
    row_bytes = t.raw.nbytes // t.shape[0]
    return GGUFTensor(name=t.name, shape=(end - start, *t.shape[1:]), ggml_type=t.ggml_type,
                      raw=t.raw[start * row_bytes:end * row_bytes], file_offset=t.file_offset + start * row_bytes)


def _per_layer(value, layers: int, key: str, f: GGUFFile) -> list[int]:
    """A metadata value llama.cpp writes as one number or as one per layer."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != layers:
            raise CheckpointError(f"{f.path}: {f.architecture}.{key} has {len(value)} entries for {layers} layers")
        return [int(v) for v in value]
    return [int(value)] * layers


def _layer_kinds(f: GGUFFile, layers: int, default_period: int) -> tuple[LayerKind, ...]:
    """Local/global per layer from ``{arch}.attention.sliding_window_pattern``, else the family default."""
    key = f"{f.architecture}.attention.sliding_window_pattern"
    pattern = f.metadata.get(key)
    if pattern is None:
        return alternating(layers, default_period)
    if isinstance(pattern, (int, np.integer)) and not isinstance(pattern, bool):
        return ("local",) * layers if int(pattern) == 0 else alternating(layers, int(pattern))
    flags = list(pattern) if isinstance(pattern, (list, tuple, np.ndarray)) else None
    if flags is None or len(flags) != layers or not all(isinstance(x, (bool, np.bool_)) for x in flags):
        raise CheckpointError(f"{f.path}: {key} must be an integer or {layers} booleans, got {pattern!r}")
    return tuple("local" if x else "global" for x in flags)


def _our_name(gguf_name: str) -> str | None:
    if gguf_name in _MODEL_NAMES:
        return _MODEL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blk":
        return None
    if parts[2] in _LAYER_NAMES_EXACT:
        return f"layers.{parts[1]}.{_LAYER_NAMES_EXACT[parts[2]]}"
    tensor, _, suffix = parts[2].partition(".")
    if suffix == "weight" and tensor in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[tensor]}.weight"
    return None


def gguf_names(config: ModelConfig) -> dict[str, str]:
    """Our parameter name -> the GGUF tensor name llama.cpp uses, for every parameter of ``config``."""
    ours_to_gguf = {f"{ours}.weight": f"{gguf}.weight" for gguf, ours in _LAYER_NAMES.items()}
    ours_to_gguf.update({ours: gguf for gguf, ours in _LAYER_NAMES_EXACT.items()})
    names = {ours: gguf for gguf, ours in _MODEL_NAMES.items()}
    shapes = parameter_shapes(config)
    for gguf, ours in _STACKED_NAMES.items():
        names.update({ours.format(i): f"{gguf}[{i}]" for i in range(max(config.altup_inputs - 1, 0))})
    for name in shapes:
        layer, _, rest = name.partition(".")
        if layer == "layers":
            i, _, tail = rest.partition(".")
            names[name] = f"blk.{i}.{ours_to_gguf.get(tail, tail)}"
    return {ours: names[ours] for ours in shapes}


def _loader(t: GGUFTensor, norm_offset: float) -> TensorLoader:
    def load() -> torch.Tensor:
        w = dequantize(t.raw, t.ggml_type, t.shape)
        t.release()
        return w - norm_offset if norm_offset else w

    return load


def _packed_loader(t: GGUFTensor):
    # The blocks stay in the file's memory map (see ggml_blocks). A layer's pages are mapped in now,
    # so the first prompt does not fault them in one by one. The embedding's are not: only the LM
    # head reads all of it, after a prefill has handed its scratch memory back (heap.py), and
    # mapped from the start it would sit under that scratch, raising the run's peak RSS by ~45 MB.
    def load():
        if t.name != "token_embd.weight":
            t.populate()
        return ggml_blocks(t.raw, t.ggml_type, t.shape)

    return load


def _stacked_loader(t: GGUFTensor, i: int) -> TensorLoader:
    def load() -> torch.Tensor:
        return dequantize(t.raw, t.ggml_type, t.shape)[i].clone()  # one matrix of the stack, not a view of all

    return load


def open_gguf_checkpoint(path: str | Path) -> Checkpoint:
    f = open_gguf(path)
    config = config_from_gguf(f)
    if config.bidirectional:
        return _embedding_checkpoint(f, config)
    tensors, packed, found = _file_tensors(f, config)
    names = gguf_names(config)
    check_file_tensors(str(path), parameter_shapes(config), found, names)
    return Checkpoint(config=config, tensors=tensors, source=str(path), tokenizer=_tokenizer(f),
                      metadata={"format": "gguf", "file_type": f.metadata.get("general.file_type")},
                      file_names=names, packed=packed)


def _tokenizer(f: GGUFFile) -> Tokenizer | None:
    return Tokenizer.from_gguf(f) if "tokenizer.ggml.tokens" in f.metadata else None


def _file_tensors(f: GGUFFile, config: ModelConfig, prefix: str = "", extra: dict[str, str] | None = None
                  ) -> tuple[dict[str, TensorLoader], dict, dict[str, tuple[int, ...]]]:
    """The decoder's tensors by our names (after ``prefix``), the quantised ones' blocks, and the
    shapes found; ``extra`` names tensors beside the decoder's (GGUF name -> our full name)."""
    tensors: dict[str, TensorLoader] = {}
    packed = {}
    found: dict[str, tuple[int, ...]] = {}
    shares_kv = {plan.index for plan in config.layer_plan if plan.reads_shared_kv}
    for name, t in f.tensors.items():
        if name in _STACKED_NAMES:
            for i in range(t.shape[0]):
                tensors[prefix + _STACKED_NAMES[name].format(i)] = _stacked_loader(t, i)
                found[prefix + _STACKED_NAMES[name].format(i)] = t.shape[1:]
            continue
        parts = name.split(".", 2)
        if parts[0] == "blk" and parts[2] in _UNUSED_SHARED_KV and int(parts[1]) in shares_kv:
            continue
        if config.family == "gemma3n" and name == "per_layer_token_embd.weight":
            t = _row_slice(t, 0, config.per_layer_vocab_size)  # without the converter's zero padding
        ours = (extra or {}).get(name) or (prefix + our if (our := _our_name(name)) else None)
        if ours is None:
            if name == "output.weight":  # an untied head would be a different model
                raise UnsupportedModelError(f"{f.path}: separate output.weight (untied LM head) is not a Gemma layout")
            if name.startswith("rope_freqs"):
                continue
            raise CheckpointError(f"{f.path}: unexpected tensor {name!r} for architecture {f.architecture}")
        if t.ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"{f.path}: tensor {name} uses quantisation type {t.ggml_type} which gemmakit cannot read"
            )
        # Gemma 1-3 files store norms as 1 + w (our weights are the offset from one); Gemma 4's as w
        tensors[ours] = _loader(t, config.norm_offset if name.endswith("norm.weight") else 0.0)
        if packable(t.ggml_type, t.shape):
            packed[ours] = _packed_loader(t)
        found[ours] = t.shape
    return tensors, packed, found


def _embedding_checkpoint(f: GGUFFile, decoder: ModelConfig) -> Checkpoint:
    """A ``gemma-embedding`` file: the decoder's tensors (under ``decoder.``) and the projections
    (``dense.N.linear.weight``), quantised ones kept as blocks like the decoder's."""
    config = embedding_config_from_gguf(f, decoder)
    projections = {name: f"dense.{i}.linear.weight" for i, name in enumerate(n for n in _DENSE_NAMES if n in f.tensors)}
    tensors, packed, found = _file_tensors(f, decoder, "decoder.", projections)
    shapes = {f"decoder.{ours}": shape for ours, shape in parameter_shapes(decoder).items()}
    shapes.update({f"dense.{i}.linear.weight": (layer.out_features, layer.in_features)
                   for i, layer in enumerate(config.dense)})
    names = {f"decoder.{ours}": theirs for ours, theirs in gguf_names(decoder).items()}
    names.update({ours: theirs for theirs, ours in projections.items()})
    check_file_tensors(str(f.path), shapes, found, names)
    return Checkpoint(config=config, tensors=tensors, source=str(f.path), tokenizer=_tokenizer(f),
                      metadata={"format": "gguf", "file_type": f.metadata.get("general.file_type")},
                      file_names=names, packed=packed)
