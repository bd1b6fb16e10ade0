"""Writing GGUF files (llama.cpp's layout for the gemma, gemma2, gemma3 and gemma-embedding architectures).

The inverse of checkpoints/gguf.py: the metadata keys it reads, norms stored as ``1 + w`` as
llama.cpp's converter stores them, our tensor names mapped to llama.cpp's. ``gemmakit quantize``
uses it to write Q8_0 / Q4_1 files and llama.cpp's mixes (Q4_K_M, Q5_K_M, Q6_K, Q8_0), which
gemmakit then runs without expanding them (quant/grouped.py) and which llama.cpp reads too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from gemmakit.checkpoints import open_checkpoint
from gemmakit.checkpoints.base import parameter_shapes
from gemmakit.checkpoints.gguf import (DEFAULT_LOCAL_PERIOD, POOLING_TYPES, assumed_query_scalar, dense_names,
                                       gguf_names)
from gemmakit.errors import InvalidRequestError, UnsupportedModelError
from gemmakit.io import atomic_file
from gemmakit.models.config import ModelConfig, alternating
from gemmakit.models.encoder import EmbeddingConfig
from gemmakit.quant.ggml_ops import ggml_quantize
from gemmakit.quant.kquants import K_QUANTISERS
from gemmakit.tokenizer import model_pb2

# --scheme int8 / int4 -> the GGML block type of every matrix (norms stay float32)
UNIFORM = {"int8": "Q8_0", "int4": "Q4_1"}

# --scheme naming one of llama.cpp's mixes -> (its default matrix type, the file type it records).
# Some tensors then get more bits, as llama.cpp's quantiser gives them (tensor_type below).
MIXES = {
    "Q4_K_M": ("Q4_K", gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "Q5_K_M": ("Q5_K", gguf.LlamaFileType.MOSTLY_Q5_K_M),
    "Q6_K": ("Q6_K", gguf.LlamaFileType.MOSTLY_Q6_K),
    "Q8_0": ("Q8_0", gguf.LlamaFileType.MOSTLY_Q8_0),
}
SCHEMES = (*UNIFORM, *MIXES)

# A 256-weight K type on rows that are not a multiple of 256 falls back to the 32-weight type
# llama.cpp picks for it (src/llama-quant.cpp, tensor_type_fallback).
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def scheme_name(text: str) -> str:
    """``--scheme`` as written (any case) -> its canonical spelling: int8, int4, Q4_K_M, ..."""
    return text.lower() if text.lower() in UNIFORM else text.upper()


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _block_size(qtype: str) -> int:
    return gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)][0]


def tensor_type(name: str, shape: tuple[int, ...], scheme: str, num_layers: int) -> str:
    """The GGML type ``scheme`` stores tensor ``name`` (GGUF name, PyTorch-order ``shape``) in:
    "F32" for vectors (norms), else the scheme's matrix type, llama.cpp's choice for a mix.

    For a mix this follows llama.cpp's rules for a Gemma text model without an importance matrix:
    the token embedding (which is also the output matrix, Gemma ties them) gets Q6_K, or Q8_0
    when its rows are not a multiple of 256 or the mix is Q8_0; Q4_K_M and Q5_K_M give Q6_K to
    attn_v and ffn_down in the layers _more_bits picks; then a K type whose row length is not a
    multiple of 256 falls back (_FALLBACK), and a type that still does not fit becomes F16.
    """
    if len(shape) < 2:
        return "F32"
    if scheme in UNIFORM:
        return UNIFORM[scheme]
    qtype = MIXES[scheme][0]
    row = int(shape[-1])
    if name == "token_embd.weight":
        qtype = "Q8_0" if row % _block_size(qtype) or qtype == "Q8_0" else "Q6_K"
    elif scheme in ("Q4_K_M", "Q5_K_M") and name.endswith((".attn_v.weight", ".ffn_down.weight")):
        if _more_bits(int(name.split(".")[1]), num_layers):
            qtype = "Q6_K"
    if row % _block_size(qtype):
        qtype = _FALLBACK.get(qtype, qtype)
    if row % _block_size(qtype):
        qtype = "F16"
    return qtype


def add_model_metadata(writer, config: ModelConfig, name: str, sliding_window_pattern="auto") -> None:
    """The architecture keys checkpoints/gguf.py reads back into ``config`` (refusing what GGUF cannot say).

    ``sliding_window_pattern``: "auto" writes one bool per layer when the layer kinds differ from the
    family's default; None writes no key; anything else is written as given (tests of the reader).
    """
    c = config
    arch = c.family
    if c.bidirectional and writer.arch != "gemma-embedding":
        raise UnsupportedModelError("a bidirectional decoder is written only as part of an embedding model "
                                    "(llama.cpp's gemma-embedding)")
    if arch not in ("gemma", "gemma2", "gemma3") or "recurrent" in c.layer_kinds:
        raise UnsupportedModelError(f"GGUF (llama.cpp's format) has no layout for {arch} models; "
                                    "use `gemmakit convert` to write a transformers directory instead")
    expected_scalar = assumed_query_scalar(arch, c.num_layers, c.hidden_size, c.num_heads, c.head_dim)
    if c.query_pre_attn_scalar != expected_scalar:
        raise UnsupportedModelError("GGUF has no key for query_pre_attn_scalar and llama.cpp assumes "
                                    f"{expected_scalar:g} for this shape; this model uses {c.query_pre_attn_scalar:g}")
    if arch == "gemma3" and c.rope_local_theta != 10_000.0:
        raise UnsupportedModelError("GGUF has no key for the local RoPE base; llama.cpp assumes 10000")
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    if c.sliding_window:
        writer.add_sliding_window(c.sliding_window)
    if sliding_window_pattern == "auto":
        default = alternating(c.num_layers, DEFAULT_LOCAL_PERIOD[arch]) if arch in DEFAULT_LOCAL_PERIOD else c.layer_kinds
        if tuple(c.layer_kinds) != tuple(default):
            writer.add_sliding_window_pattern([kind == "local" for kind in c.layer_kinds])
    elif sliding_window_pattern is not None:
        writer.add_sliding_window_pattern(sliding_window_pattern)
    if c.attn_logit_softcap:
        writer.add_attn_logit_softcapping(c.attn_logit_softcap)
    if c.final_logit_softcap:
        writer.add_final_logit_softcapping(c.final_logit_softcap)
    if c.rope_scaling_factor != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_scaling_factor)


@dataclass(frozen=True)
class Vocabulary:
    """What ``tokenizer.ggml.*`` holds: SentencePiece pieces, scores, types and the special ids."""

    pieces: list[str]
    scores: list[float]
    types: list[int]  # SentencePiece's piece types, which GGUF's token types number the same way
    bos_id: int
    eos_id: int
    unk_id: int | None
    pad_id: int


def vocabulary_of(tokenizer) -> Vocabulary:
    """A gemmakit Tokenizer's vocabulary, read back from its SentencePiece model."""
    model_proto = getattr(tokenizer, "_model_proto", None)
    if model_proto is None:
        raise UnsupportedModelError("the source's tokenizer has no SentencePiece model (tokenizer.model) "
                                    "to write into the GGUF")
    model = model_pb2().ModelProto()
    model.ParseFromString(model_proto())
    return Vocabulary(pieces=[p.piece for p in model.pieces], scores=[p.score for p in model.pieces],
                      types=[int(p.type) for p in model.pieces], bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                      unk_id=tokenizer.unk_id, pad_id=tokenizer.pad_id)


def add_vocabulary(writer, vocab: Vocabulary, add_eos: bool | None = None) -> None:
    user_defined = 4
    # llama.cpp's converter spells user-defined pieces with real spaces; checkpoints/gguf.py undoes it
    pieces = [p.replace("\u2581", " ") if t == user_defined else p for p, t in zip(vocab.pieces, vocab.types)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    if vocab.unk_id is not None and vocab.unk_id >= 0:
        writer.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id >= 0:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(True)
    if add_eos is not None:
        writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(False)


def add_embedding_metadata(writer, config: EmbeddingConfig) -> dict[str, str]:
    """An embedding model's pooling and projections as llama.cpp's ``gemma-embedding`` keys;
    returns the projections' names (ours -> GGUF). Refuses what llama.cpp would run differently:
    it pools one way (mean, first or last token, over every token), applies at most two
    bias-free projections without activation and cannot skip the normalisation clients apply.
    The prompts are not written (a reader gives EmbeddingGemma's back)."""
    modes = {mode: kind for kind, mode in POOLING_TYPES.items()}
    if len(config.pooling) != 1 or config.pooling[0] not in modes:
        raise UnsupportedModelError(f"llama.cpp's gemma-embedding pools by mean, cls or lasttoken, not "
                                    f"{'+'.join(config.pooling)}")
    if not config.include_prompt:
        raise UnsupportedModelError("llama.cpp's gemma-embedding pools every token, a prompt's too "
                                    "(this model leaves prompts out: include_prompt false)")
    if not config.normalize:
        raise UnsupportedModelError("a gemma-embedding GGUF is read as normalising its embeddings; this model does not")
    if len(config.dense) > 2 or any(d.bias or d.activation != "Identity" for d in config.dense):
        raise UnsupportedModelError("llama.cpp's gemma-embedding applies at most two dense layers, without bias "
                                    "or activation")
    if len(config.dense) == 2 and config.dense[1].out_features != config.decoder.hidden_size:
        raise UnsupportedModelError("llama.cpp's gemma-embedding wants its second dense layer to return the "
                                    f"model's width ({config.decoder.hidden_size}), not {config.dense[1].out_features}")
    if not config.add_bos:
        raise UnsupportedModelError("llama.cpp's Gemma vocabulary puts <bos> before every text; this model does not")
    writer.add_pooling_type(gguf.PoolingType(modes[config.pooling[0]]))
    names = {}
    for i, (layer, gguf_name) in enumerate(zip(config.dense, dense_names(len(config.dense)))):
        writer.add_dense_features_dims(gguf_name.removesuffix(".weight"), layer.in_features, layer.out_features)
        names[f"dense.{i}.linear.weight"] = gguf_name
    return names


def quantize_blocks(data: np.ndarray, qtype_name: str) -> np.ndarray:
    """Float32 rows -> the GGML blocks of ``qtype_name`` as uint8 rows (F16: float16 values)."""
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    if qtype_name == "F16":
        return data.astype(np.float16)
    if qtype_name in K_QUANTISERS:
        return K_QUANTISERS[qtype_name](data)
    if qtype in (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):  # gguf-py's bytes, ~20x faster
        return ggml_quantize(torch.from_numpy(data), qtype).numpy()
    return gguf.quants.quantize(data, qtype)  # Q4_0, Q5_0, Q5_1: llama.cpp's reference rounding


def add_tensor(writer, name: str, data: np.ndarray, qtype_name: str | None) -> None:
    """Add one tensor (float32 numpy, GGUF name); matrices in ``qtype_name`` blocks (None or
    "F32": float32)."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if name.endswith("norm.weight"):
        data = data + 1.0  # llama.cpp's converter stores Gemma norms as 1 + w
    if qtype_name not in (None, "F32") and data.ndim == 2:
        qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
        blocks = quantize_blocks(data, qtype_name)
        writer.add_tensor(name, blocks, raw_dtype=None if qtype_name == "F16" else qtype)
    else:
        writer.add_tensor(name, data)


@dataclass
class QuantizeReport:
    tensors: int
    bytes: int
    seconds: float
    qtype: str  # the scheme's matrix type (int8: Q8_0, int4: Q4_1) or the mix's name (Q4_K_M, ...)
    types: dict[str, int]  # GGML type -> how many tensors the file stores in it


def quantize_checkpoint(source, destination: str | Path, scheme: str, force: bool = False, config=None,
                        progress: Callable | None = None) -> QuantizeReport:
    """Read any source gemmakit loads, write ``destination`` as a GGUF whose matrices are ``scheme``:
    int8 (all Q8_0), int4 (all Q4_1) or one of llama.cpp's mixes (MIXES, any case; tensor_type).

    Tensors are read, quantised and written one at a time (memory: about one tensor); the file
    appears under its name only when complete (written next to it under a temporary name, then
    renamed).
    """
    scheme = scheme_name(str(scheme))
    if scheme not in SCHEMES:
        raise InvalidRequestError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    destination = Path(destination)
    if destination.exists() and not force:
        raise InvalidRequestError(f"{destination} exists; pass --force to replace it")
    if destination.is_dir():
        raise InvalidRequestError(f"{destination} is a directory; give the path of the .gguf file to write")
    if not destination.parent.is_dir():
        raise InvalidRequestError(f"directory {destination.parent} does not exist")
    t0 = time.perf_counter()
    checkpoint = open_checkpoint(source, config)
    cfg = checkpoint.config
    embedding = cfg if isinstance(cfg, EmbeddingConfig) else None
    if embedding is not None:
        cfg = embedding.decoder
    if getattr(cfg, "text", None) is not None:
        raise UnsupportedModelError("vision models are not written to GGUF by gemmakit (llama.cpp keeps the "
                                    "vision tower in a separate mmproj file); quantise at load with --quant int8")
    if checkpoint.tokenizer is None:
        raise UnsupportedModelError(f"{checkpoint.source} has no tokenizer to write into the GGUF")
    vocab = vocabulary_of(checkpoint.tokenizer)
    all_names = gguf_names(cfg)
    names = {ours: all_names[ours] for ours in parameter_shapes(cfg)}  # the tensors this config really has
    if embedding is not None:  # an embedding model's decoder is ``decoder.`` in its checkpoint
        names = {f"decoder.{ours}": theirs for ours, theirs in names.items()}
    if scheme in UNIFORM:
        file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if scheme == "int8" else gguf.LlamaFileType.MOSTLY_Q4_1
    else:
        file_type = MIXES[scheme][1]
    types: dict[str, int] = {}
    with atomic_file(destination) as tmp:
        # use_temp_file: each tensor's blocks go to a spool file as soon as they are made, so memory
        # holds one tensor and its blocks, never the whole quantised model.
        writer = gguf.GGUFWriter(tmp, "gemma-embedding" if embedding is not None else cfg.family, use_temp_file=True)
        add_model_metadata(writer, cfg, Path(str(source)).stem + f"-{scheme}")
        writer.add_file_type(file_type)
        if embedding is not None:
            names.update(add_embedding_metadata(writer, embedding))
        add_vocabulary(writer, vocab, add_eos=embedding.add_eos if embedding is not None else None)
        if checkpoint.tokenizer.chat_template is not None:
            writer.add_chat_template(checkpoint.tokenizer.chat_template)
        items = list(names.items())
        for ours, theirs in (progress(items) if progress else items):
            data = checkpoint.tensors[ours]().float().numpy()
            qtype = tensor_type(theirs, data.shape, scheme, cfg.num_layers)
            types[qtype] = types.get(qtype, 0) + 1
            add_tensor(writer, theirs, data, qtype)
            del data
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return QuantizeReport(tensors=len(names), bytes=destination.stat().st_size, seconds=time.perf_counter() - t0,
                          qtype=UNIFORM.get(scheme, scheme), types=types)
