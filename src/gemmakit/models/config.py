"""Model configuration as data.

Every Gemma text model is the same decoder with switches. :class:`ModelConfig` holds those
switches, and :data:`PRESETS` names the published sizes. The forward pass reads only the config,
never a model name, so a new size is a new preset and nothing else.

Sources for the preset numbers (checked against each other where both exist):
  [hf]  the ``config.json`` of the checkpoint on the Hugging Face hub (google/<name>)
  [gp]  google/gemma_pytorch ``gemma/config.py`` (get_config_for_*)
  [g3]  Gemma 3 technical report (arXiv 2503.19786), Table 1 and section 2
  [g2]  Gemma 2 technical report (arXiv 2408.00118), Table 1
  [g1]  Gemma technical report (arXiv 2403.08295), Table 1
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from gemmakit.errors import ModelNotFoundError

LayerKind = Literal["global", "local", "recurrent"]


@dataclass(frozen=True)
class ModelConfig:
    """All the numbers and switches of one Gemma text decoder."""

    family: str  # "gemma", "gemma2", "gemma3": chooses chat template and export layout, not maths
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_kinds: tuple[LayerKind, ...]
    max_position_embeddings: int
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (head_dim for most sizes,
    # hidden/heads for Gemma 2 27B and Gemma 3 27B).
    query_pre_attn_scalar: float
    sliding_window: int | None = None
    rope_theta: float = 10_000.0  # global layers
    rope_local_theta: float = 10_000.0  # local (sliding-window) layers
    rope_scaling_factor: float = 1.0  # linear position scaling, global layers only (Gemma 3 >= 4B)
    qk_norm: bool = False  # RMSNorm on queries and keys per head (Gemma 3)
    post_norms: bool = False  # extra RMSNorm after attention and after the MLP (Gemma 2, 3)
    attn_logit_softcap: float | None = None  # Gemma 2: 50
    final_logit_softcap: float | None = None  # Gemma 2: 30
    rms_norm_eps: float = 1e-6
    name: str = "custom"
    extra: tuple[tuple[str, object], ...] = field(default=())  # format-specific facts kept for export

    def __post_init__(self) -> None:
        if len(self.layer_kinds) != self.num_layers:
            raise ValueError(f"layer_kinds has {len(self.layer_kinds)} entries for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if "local" in self.layer_kinds and not self.sliding_window:
            raise ValueError("local layers need a sliding_window")

    def replace(self, **changes: object) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def attention_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    def num_parameters(self) -> int:
        """Parameter count computed from the shapes (the LM head is tied to the embedding)."""
        d, h = self.hidden_size, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        norms_per_layer = d * (4 if self.post_norms else 2) + (2 * h if self.qk_norm else 0)
        mlp = 3 * d * self.intermediate_size
        return self.vocab_size * d + self.num_layers * (attn + mlp + norms_per_layer) + d

    def kv_cache_bytes(self, context: int, batch: int = 1, bytes_per_value: float = 2.0) -> int:
        """KV-cache size at a context length: local layers hold only their window."""
        total_positions = 0
        for kind in self.layer_kinds:
            if kind == "local":
                total_positions += min(context, self.sliding_window or context)
            elif kind == "global":
                total_positions += context
        return int(2 * batch * total_positions * self.num_kv_heads * self.head_dim * bytes_per_value)


def alternating(num_layers: int, period: int) -> tuple[LayerKind, ...]:
    """``period - 1`` local layers followed by one global layer, repeated (Gemma 2: 2, Gemma 3: 6)."""
    return tuple("global" if (i + 1) % period == 0 else "local" for i in range(num_layers))


def _gemma1(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int) -> ModelConfig:
    # [hf] google/gemma-2b, gemma-7b; [gp] get_config_for_2b/7b; [g1] Table 1. 256k vocab, 8k context.
    return ModelConfig(
        family="gemma", name=name, vocab_size=256_000, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=256, layer_kinds=("global",) * layers,
        max_position_embeddings=8192, query_pre_attn_scalar=256,
    )


def _gemma2(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int,
            scalar: float) -> ModelConfig:
    # [hf] google/gemma-2-{2b,9b,27b}; [gp] get_config_for_2b_v2/9b/27b; [g2] Table 1.
    # Local/global alternate starting with local; window 4096; soft-caps 50 (attention) and 30 (final).
    return ModelConfig(
        family="gemma2", name=name, vocab_size=256_000, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        layer_kinds=alternating(layers, 2), max_position_embeddings=8192, query_pre_attn_scalar=scalar,
        sliding_window=4096, post_norms=True, attn_logit_softcap=50.0, final_logit_softcap=30.0,
    )


def _gemma3(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int,
            scalar: float, window: int, context: int, vocab: int, rope_factor: float) -> ModelConfig:
    # [hf] google/gemma-3-{270m,1b-pt,4b-pt,12b-pt,27b-pt}; [gp] get_config_for_{1b,4b,12b,27b}_v3; [g3].
    # 5 local : 1 global; RoPE base 10k local, 1M global; linear scaling x8 on global layers for >= 4B
    # (128K context); QK-norm replaces Gemma 2's soft-capping.
    return ModelConfig(
        family="gemma3", name=name, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        layer_kinds=alternating(layers, 6), max_position_embeddings=context, query_pre_attn_scalar=scalar,
        sliding_window=window, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
        rope_scaling_factor=rope_factor, qk_norm=True, post_norms=True,
    )


def _presets() -> dict[str, ModelConfig]:
    table = [
        _gemma1("gemma-2b", 2048, 16384, 18, 8, 1),  # MQA
        _gemma1("gemma-7b", 3072, 24576, 28, 16, 16),  # MHA
        _gemma1("codegemma-2b", 2048, 16384, 18, 8, 1),  # [hf] google/codegemma-2b: gemma-2b shapes
        _gemma1("codegemma-7b", 3072, 24576, 28, 16, 16),  # [hf] google/codegemma-7b
        _gemma2("gemma2-2b", 2304, 9216, 26, 8, 4, 256, 256),
        _gemma2("gemma2-9b", 3584, 14336, 42, 16, 8, 256, 256),
        _gemma2("gemma2-27b", 4608, 36864, 46, 32, 16, 128, 144),  # scalar = hidden / heads
        _gemma3("gemma3-270m", 640, 2048, 18, 4, 1, 256, 256, 512, 32_768, 262_144, 1.0),
        _gemma3("gemma3-1b", 1152, 6912, 26, 4, 1, 256, 256, 512, 32_768, 262_144, 1.0),
        # 4B-27B: vocab 262208 as in [hf] (262144 + image tokens); [gp] embeds 262144 rows, and the .ckpt
        # loader takes the vocabulary from the file's embedding shape.
        _gemma3("gemma3-4b", 2560, 10240, 34, 8, 4, 256, 256, 1024, 131_072, 262_208, 8.0),
        _gemma3("gemma3-12b", 3840, 15360, 48, 16, 8, 256, 256, 1024, 131_072, 262_208, 8.0),
        _gemma3("gemma3-27b", 5376, 21504, 62, 32, 16, 128, 168, 1024, 131_072, 262_208, 8.0),
    ]
    presets = {c.name: c for c in table}
    # Instruction-tuned variants differ only in weights.
    for base in ["gemma-2b", "gemma-7b", "codegemma-7b", "gemma2-2b", "gemma2-9b", "gemma2-27b",
                 "gemma3-270m", "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b"]:
        presets[base + "-it"] = presets[base].replace(name=base + "-it")
    return presets


PRESETS: dict[str, ModelConfig] = _presets()


def preset(name: str) -> ModelConfig:
    """Look up a preset by name; the error lists what exists."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
