"""What `gemmakit info` reports: architecture, parameter count, and memory from first principles.

Weight memory is parameters x bytes per parameter; KV-cache memory is, per layer, 2 (keys and
values) x kv_heads x head_dim x positions held x bytes, where a local layer holds at most its window.
Recurrent models (RecurrentGemma) report their generation *state* instead: the local layers' rings
plus each recurrent layer's RG-LRU and Conv1D state, a size that does not change with the context.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from gemmakit.checkpoints import open_checkpoint
from gemmakit.checkpoints.matformer import resolve_plan, slice_config
from gemmakit.models.cache import kv_int8_groups
from gemmakit.models.config import PRESETS, ModelConfig
from gemmakit.models.multimodal import VISION_PRESETS

# int8: a code per weight plus a float16 scale per 32 (Q8_0, what gemmakit's CPU int8 runs; off the
# CPU its float32 scales make 1.125)
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0625, "int4": 0.5}


def int8_kv_bytes_per_value(config: ModelConfig) -> float:
    """``--kv-cache int8``: a code per entry plus a float32 scale per group of 32 (models/cache.py)."""
    return 1.0 + 4.0 * kv_int8_groups(config.head_dim) / config.head_dim
GIB = 1024**3


def _config_for(source: str | None) -> tuple[ModelConfig, dict[str, Any]]:
    if source is not None and source in PRESETS and not Path(source).exists():
        return PRESETS[source], {"source": f"preset {source}"}
    if source is not None and source in VISION_PRESETS and not Path(source).exists():
        return VISION_PRESETS[source], {"source": f"preset {source}"}
    checkpoint = open_checkpoint(source)
    extra: dict[str, Any] = {"source": checkpoint.source}
    path = Path(checkpoint.source)
    if path.is_file():
        extra["file_bytes"] = path.stat().st_size
    return checkpoint.config, extra


def vision_report(config) -> dict[str, Any]:
    """What ``info`` says of a multimodal config's vision tower (its kind, shape and parameters)."""
    from gemmakit.models.gemma4_vision import UnifiedVisionConfig

    v = config.vision
    if hasattr(v, "architecture"):  # Gemma 3n's MobileNet-v5, named by its timm architecture
        tower, patch, layers = f"timm {v.architecture}", None, 0
    elif isinstance(v, UnifiedVisionConfig):  # the Gemma 4 12B: no encoder
        tower, patch, layers = "patch projection (no encoder)", v.patch_size * v.pooling_kernel_size, 0
    else:
        tower, patch, layers = "SigLIP" if hasattr(v, "image_size") else "Gemma 4 ViT", v.patch_size, v.num_layers
    # Gemma 4 keeps each image's aspect ratio: its budget bounds the tokens an image gets
    tokens = getattr(config, "tokens_per_image", None) or config.max_soft_tokens
    return {"tower": tower, "image_size": getattr(v, "image_size", None), "patch_size": patch, "layers": layers,
            "hidden_size": v.hidden_size, "tokens_per_image": tokens, "parameters": v.num_parameters()}


def audio_parameters(audio) -> int:
    """Parameters of the audio tower (encoder and embedder) that ``audio`` describes, counted on a
    skeleton with no storage."""
    from gemmakit.models.gemma3n_audio import Gemma3nAudioConfig, Gemma3nAudioTower
    from gemmakit.models.gemma4_audio import Gemma4AudioTower
    from gemmakit.models.gemma4_vision import FrameEmbedder, UnifiedAudioConfig

    kind = {Gemma3nAudioConfig: Gemma3nAudioTower, UnifiedAudioConfig: FrameEmbedder}.get(type(audio), Gemma4AudioTower)
    with torch.device("meta"):
        tower = kind(audio)
    return sum(p.numel() for p in tower.parameters())


def describe(source: str | None, context: int | None = None, matformer=None) -> dict[str, Any]:
    """``matformer`` (a plan, as :func:`gemmakit.load` takes it) describes the Gemma 3n sub-model it
    cuts out of ``source`` instead."""
    config, extra = _config_for(source)
    if matformer is not None:
        plan = resolve_plan(matformer)
        whole = config
        config, kept = slice_config(whole, plan)
        extra["matformer"] = {"plan": plan.name, "source": plan.source, "layers_kept": len(kept),
                              "layers_of": whole.num_layers,
                              "skipped": sorted(set(range(whole.num_layers)) - set(kept)),
                              "mlp_widths": sorted({p.intermediate_size for p in config.layer_plan}),
                              "unsliced_parameters": whole.num_parameters()}
    embedding = config if hasattr(config, "pooling") else None
    if embedding is not None:  # an embedding model: its decoder, and what its tokens become
        extra["embedding"] = {"dimension": embedding.dimension, "pooling": list(embedding.pooling),
                              "projection": embedding.projection, "dense_layers": len(embedding.dense),
                              "normalize": embedding.normalize, "max_tokens": embedding.max_tokens,
                              # what a bidirectional sliding layer sees each way (models/masks.py encoder_mask)
                              "sliding_radius": (embedding.decoder.sliding_window or 0) // 2 or None}
        config = embedding.decoder
    context = context or config.max_position_embeddings
    params = (embedding or config).num_parameters()
    if hasattr(config, "vision"):  # a vision-language model: report its decoder, and the tower beside it
        extra["vision"] = vision_report(config)
        if (audio := getattr(config, "audio", None)) is not None:  # Gemma 4 / Gemma 3n's Conformer
            conformer = getattr(audio, "conformer", None)  # (none for the 12B's frame projection)
            extra["audio"] = {"layers": conformer.num_layers if conformer else 0,
                              "hidden_size": conformer.hidden_size if conformer else audio.frame_samples,
                              # Gemma 3n reserves a fixed count a clip; Gemma 4 one token per 40 ms
                              "tokens_per_clip": getattr(audio, "soft_tokens", None),
                              "parameters": audio_parameters(audio)}
        config = config.text
    if hasattr(config, "backbone_hidden_size"):  # an assistant drafter: its layers keep no cache
        extra["assistant"] = {"target_hidden_size": config.backbone_hidden_size,
                              "clusters": config.num_centroids, "clusters_scored": config.centroid_top_k}
        config = config.decoder
    kinds = Counter(config.layer_kinds)
    return {
        **extra,
        "name": config.name,
        "family": config.family,
        "layers": config.num_layers,
        "layer_kinds": dict(kinds),
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "sliding_window": config.sliding_window,
        "max_context": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "parameters": params,
        "weight_bytes": {name: int(params * b) for name, b in BYTES_PER_PARAM.items()},
        **_gemma4_extras(config),
        "context": context,
        "kv_cache_bytes": {name: config.kv_cache_bytes(context, bytes_per_value=b)
                           for name, b in (("float32", 4.0), ("bfloat16", 2.0),
                                           ("int8", int8_kv_bytes_per_value(config)))},
    } | _state(config, context)


def _gemma4_extras(config: ModelConfig) -> dict[str, Any]:
    """What sets Gemma 4 (and 3n) apart in memory: the per-layer embedding table, which is read a
    row per token and can stay mapped on disk; the experts a token does not run; layers without a
    cache of their own; global layers' own head shape."""
    out: dict[str, Any] = {}
    if config.per_layer_embedding_parameters():  # (EmbeddingGemma 2's per-layer inputs have no table)
        out["per_layer_embedding_parameters"] = config.per_layer_embedding_parameters()
    if config.num_experts:
        out["experts"] = {"count": config.num_experts, "per_token": config.experts_per_token,
                          "width": config.expert_intermediate_size}
    if config.num_experts or config.per_layer_embedding_parameters():
        out["active_parameters"] = config.active_parameters()
    if config.num_kv_shared_layers:
        out["kv_shared_layers"] = config.num_kv_shared_layers
    glob = config.kind_plans.get("global")
    if glob is not None and (glob.head_dim, glob.num_kv_heads) != (config.head_dim, config.num_kv_heads):
        out["global_attention"] = {"head_dim": glob.head_dim, "kv_heads": glob.num_kv_heads, "k_eq_v": glob.k_eq_v}
    return out


def _state(config: ModelConfig, context: int) -> dict[str, Any]:
    """State memory of models with recurrent layers (constant in the context when no layer is global)."""
    if "recurrent" not in config.layer_kinds:
        return {}
    return {"state_bytes": {name: config.kv_cache_bytes(context, bytes_per_value=b)
                            + config.recurrent_state_bytes(bytes_per_value=b)
                            for name, b in (("float32", 4.0), ("bfloat16", 2.0))},
            "state_is_constant": "global" not in config.layer_kinds}


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def format_report(r: dict[str, Any]) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in r["layer_kinds"].items())
    lines = [
        f"model        {r['name']} ({r['family']}) from {r['source']}",
        f"layers       {r['layers']} ({kinds}); window {r['sliding_window'] or '-'}",
        f"width        hidden {r['hidden_size']}, MLP {r['intermediate_size']}, heads {r['heads']} "
        f"(kv {r['kv_heads']}) x {r['head_dim']}",
        f"vocabulary   {r['vocab_size']}; max context {r['max_context']}",
        f"parameters   {r['parameters']:,} ({r['parameters'] / 1e6:.0f}M)",
    ]
    if "global_attention" in r:
        g = r["global_attention"]
        lines[2] += f"; global layers kv {g['kv_heads']} x {g['head_dim']}" + (" (K=V)" if g["k_eq_v"] else "")
    if "per_layer_embedding_parameters" in r:
        ple = r["per_layer_embedding_parameters"]
        lines.append(f"             of which the per-layer embedding table {ple / 1e6:.0f}M "
                     f"(a row per token; bfloat16 {_gib(2 * ple)}, can stay on disk)")
    if "experts" in r:
        e = r["experts"]
        lines.append(f"experts      {e['count']} of width {e['width']} per layer, {e['per_token']} per token")
    if "active_parameters" in r:
        lines.append(f"active       {r['active_parameters'] / 1e6:.0f}M parameters per token")
    if "kv_shared_layers" in r:
        lines.append(f"K/V sharing  the last {r['kv_shared_layers']} layers reuse earlier layers' keys/values "
                     "(no cache of their own)")
    if "assistant" in r:
        a = r["assistant"]
        head = (f"clustered head: {a['clusters']} clusters, {a['clusters_scored']} scored" if a["clusters"]
                else "dense head")
        lines.append(f"assistant    drafts for a Gemma 4 model of width {a['target_hidden_size']}, reading its "
                     f"keys/values (no cache of its own); {head}")
    if "vision" in r:
        v = r["vision"]
        size = f" {v['image_size']}px" if v["image_size"] else ""
        patch = f" / {v['patch_size']}" if v["patch_size"] else ""
        lines.append(f"vision       {v['tower']}{size}{patch}, {v['layers']} layers x {v['hidden_size']}, "
                     f"{'up to ' if not v['image_size'] else ''}{v['tokens_per_image']} tokens per image, "
                     f"{v['parameters'] / 1e6:.0f}M parameters (included above)")
    if "audio" in r:
        a = r["audio"]
        per = f"{a['tokens_per_clip']} tokens per clip" if a["tokens_per_clip"] else "25 tokens a second"
        tower = (f"Conformer, {a['layers']} layers x {a['hidden_size']}" if a["layers"]
                 else f"frame projection (no encoder), {a['hidden_size']} samples a token")
        lines.append(f"audio        {tower}, {per}, "
                     f"{a['parameters'] / 1e6:.0f}M parameters (not included above)")
    if "matformer" in r:
        m = r["matformer"]
        skipped = f" (skipping {', '.join(map(str, m['skipped']))})" if m["skipped"] else ""
        lines.append(f"MatFormer    plan {m['plan']}: {m['layers_kept']} of {m['layers_of']} layers{skipped}, "
                     f"MLP widths {', '.join(map(str, m['mlp_widths']))}; "
                     f"cut from {m['unsliced_parameters']:,} parameters")
    if "embedding" in r:
        e = r["embedding"]
        steps = ([f"projected to {e['projection']}"] if e["projection"] else []) + ["+".join(e["pooling"]) + " pooling"]
        steps += [f"{e['dense_layers']} dense layer(s)"] if e["dense_layers"] else []
        steps += ["L2-normalised"] if e["normalize"] else []
        lines.append(f"embedding    {e['dimension']} features per text (at most {e['max_tokens']} tokens): "
                     + ", ".join(steps))
        if e["sliding_radius"]:
            lines[1] += f" (bidirectional: {e['sliding_radius']} tokens each way)"
    if "file_bytes" in r:
        lines.append(f"file         {_gib(r['file_bytes'])}")
    lines.append("weights      " + ", ".join(f"{k} {_gib(v)}" for k, v in r["weight_bytes"].items()))
    if "embedding" in r:  # each text is read whole, with no cache
        return "\n".join(lines)
    if "state_bytes" in r:
        when = "at any context" if r["state_is_constant"] else f"at {r['context']} tokens"
        lines.append(f"state        {when} (attention rings + recurrent state): "
                     + ", ".join(f"{k} {_gib(v)}" for k, v in r["state_bytes"].items()))
        bf16 = r["weight_bytes"]["bfloat16"] + r["state_bytes"]["bfloat16"]
        lines.append(f"total        bfloat16 weights + state: {_gib(bf16)}")
        return "\n".join(lines)
    lines.append(f"KV cache at {r['context']} tokens: "
                 + ", ".join(f"{k} {_gib(v)}" for k, v in r["kv_cache_bytes"].items()))
    bf16 = r["weight_bytes"]["bfloat16"] + r["kv_cache_bytes"]["bfloat16"]
    lines.append(f"total        bfloat16 weights + cache: {_gib(bf16)}")
    return "\n".join(lines)


def preset_table(context: int | None = None, names: list[str] | None = None) -> str:
    """Weights + KV cache for every preset, per storage format, at ``context`` (default: each maximum).

    First principles only: weights = parameters x bytes per parameter (int8 as 1.0625 bytes with its
    Q8_0 scales; int4 as 0.5 byte, scales not counted, as published tables count it: gemmakit's CPU
    int4, Q4_1, holds 0.625 with its scales and minimums), KV = 2 x kv_heads x
    head_dim x positions held per layer (a local layer holds at most its window) x bytes per value
    (int8 KV: 1.125 with its scales).
    """
    rows = ["| preset | context | params | bf16 weights+KV | int8 weights+KV (int8 KV) | int4 weights + bf16 KV |",
            "|---|---|---|---|---|---|"]
    for name in names or sorted(PRESETS):
        c = PRESETS[name]
        ctx = context or c.max_position_embeddings
        p = c.num_parameters()
        kv16 = c.kv_cache_bytes(ctx, bytes_per_value=2.0)
        kv8 = c.kv_cache_bytes(ctx, bytes_per_value=int8_kv_bytes_per_value(c))
        b = BYTES_PER_PARAM
        rows.append(f"| {name} | {ctx} | {p / 1e9:.2f}B | {_gib(b['bfloat16'] * p + kv16)} | "
                    f"{_gib(b['int8'] * p + kv8)} | {_gib(b['int4'] * p + kv16)} |")
    return "\n".join(rows)
