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
  [hf4] transformers ``models/gemma4/convert_gemma4_weights.py`` (``_VARIANTS``) and, for the 12B,
        ``models/gemma4_unified/convert_gemma4_unified_weights.py``
  [dm4] google-deepmind/gemma ``gemma/gm/nn/gemma4`` model configs
  [hf3n] transformers ``models/gemma3n/convert_gemma3n_weights.py`` (``_VARIANTS``) and the defaults of
        ``Gemma3nTextConfig`` (which are E4B's), checked against [dm3n] google-deepmind/gemma
        ``gemma/gm/nn/gemma3n/_gemma3n.py``
  [rg]  google-deepmind/recurrentgemma ``recurrentgemma/common.py`` (Preset.RECURRENT_GEMMA_*_V1) and
        the RecurrentGemma report (arXiv 2404.07839), Table 1; [hf] google/recurrentgemma-{2b,9b}
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Literal

from gemmakit.errors import ModelNotFoundError

LayerKind = Literal["global", "local", "recurrent"]

# LayerPlan.kv_source of a layer that attends to keys and values handed in from outside the model
# (ModelConfig.external_kv: a Gemma 4 assistant reads those of the model it drafts for)
EXTERNAL_KV = -1


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer as data: what the model builds, what its cache holds and which mask and
    rotary tables it gets. :attr:`ModelConfig.layer_plan` derives one per layer from the config's
    switches; the model, the caches and the masks read these rather than the switches."""

    mixer: LayerKind  # "global" attention, "local" (sliding-window) attention or "recurrent" (Griffin)
    window: int | None  # keys a query may see, its own included (local layers); None = unbounded
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    rope_scaling: float  # linear position scaling
    rotary_dim: int  # leading dims of each head that RoPE rotates (the rest pass through)
    kv_source: int  # the layer whose keys and values this layer attends to (its own index: no sharing; EXTERNAL_KV)
    index: int = 0  # this layer's place in the stack
    intermediate_size: int = 0  # the MLP's width (Gemma 4 doubles it on layers that read shared keys/values)
    # Gemma 3n's "gaussian top-k": the share of MLP gate activations a layer zeroes (0 = dense MLP)
    activation_sparsity: float = 0.0
    # Share of each head's frequency pairs that rotate, the rest having frequency 0 (pass through):
    # Gemma 4's "proportional" RoPE on global layers, whose exponents still divide by the whole head_dim.
    rope_proportion: float = 1.0
    k_eq_v: bool = False  # the values are the key projection's output (Gemma 4's global layers)
    stores_kv: bool = False  # a later layer reads this layer's keys and values

    @property
    def attends(self) -> bool:
        return self.mixer != "recurrent"

    @property
    def reads_shared_kv(self) -> bool:
        """Whether this layer attends to an earlier layer's keys and values instead of its own
        (it has no key/value projections and no cache)."""
        return self.kv_source != self.index

    @property
    def shared_kv_key(self) -> int | str:
        """Where the keys and values this layer reads come from, as ``Attention.forward``'s
        ``shared_kv`` holds them: the producing layer's index, or for keys and values handed in
        from outside the model (``kv_source`` EXTERNAL_KV), the layer kind."""
        return self.mixer if self.kv_source == EXTERNAL_KV else self.kv_source

    @property
    def context_key(self) -> tuple:
        """What a step context (rotary tables, mask) depends on: equal for all layers of a kind."""
        return (self.mixer, self.window, self.head_dim, self.num_kv_heads, self.rope_theta, self.rope_scaling,
                self.rotary_dim, self.rope_proportion)


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
    # Vision prompts (models/multimodal.py): whether a bidirectional group of tokens ignores the
    # sliding window (PaliGemma 2's prefix-LM) or stays bounded by it (Gemma 3's images).
    group_bypasses_window: bool = False
    # which layer kinds honour those groups (Gemma 4's images: sliding-window layers only, its
    # global layers stay causal)
    group_layer_kinds: tuple[LayerKind, ...] = ("global", "local")
    name: str = "custom"
    extra: tuple[tuple[str, object], ...] = field(default=())  # format-specific facts kept for export
    # Griffin (RecurrentGemma) switches; the defaults leave Gemma 1/2/3 untouched.
    lru_width: int | None = None  # width of the RG-LRU and its Conv1D (None = hidden_size)
    conv1d_width: int = 4  # temporal width of the causal Conv1D before the RG-LRU
    rope_fraction: float = 1.0  # share of each head's dims that RoPE rotates (RecurrentGemma: 0.5)
    embed_scale_bf16: bool = False  # sqrt(hidden) rounded to bfloat16 before scaling (as RecurrentGemma trained)
    mlp_bias: bool = False  # biases on the MLP projections (RecurrentGemma)
    attn_out_bias: bool = False  # bias on the attention output projection (RecurrentGemma)
    # Gemma 4 switches; the defaults leave the earlier families untouched.
    norm_offset: float = 1.0  # RMSNorm scales by (norm_offset + weight): 1 up to Gemma 3, 0 from Gemma 4
    global_head_dim: int | None = None  # global layers' own head size (None = head_dim)
    global_kv_heads: int | None = None  # global layers' own KV-head count (None = num_kv_heads)
    rope_global_proportion: float = 1.0  # LayerPlan.rope_proportion of global layers
    k_eq_v: bool = False  # global layers' values are their keys' projection (no v_proj)
    v_norm: bool = False  # an RMSNorm without scale on the values
    num_kv_shared_layers: int = 0  # the last N layers read the keys/values of the last earlier layer of their kind
    double_wide_mlp: bool = False  # layers that read shared keys/values have an MLP twice as wide
    layer_scalar: bool = False  # each layer's output is multiplied by a learnt scalar
    per_layer_input_dim: int = 0  # per-layer embeddings (PLE): each layer's slice of the table (0 = none)
    # rows of the per-layer embedding table; 0 with per_layer_input_dim set: no table, the per-layer
    # inputs are the projection of the token embeddings alone (EmbeddingGemma 2's "projection-only" PLE)
    per_layer_vocab_size: int = 0
    num_experts: int = 0  # mixture-of-experts FFN beside the dense MLP (0 = none)
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    # Gemma 3n switches; the defaults leave the other families untouched.
    intermediate_sizes: tuple[int, ...] = ()  # each layer's MLP width where they differ (() = intermediate_size)
    activation_sparsity: tuple[float, ...] = ()  # per layer, LayerPlan.activation_sparsity (() = all dense)
    altup_inputs: int = 0  # AltUp's parallel residual streams, of which stream 0 runs through the layers (0 = none)
    altup_coef_clip: float | None = None  # AltUp's coefficient matrices are clipped to this while training
    altup_correct_scale: bool = True  # the corrected active stream is scaled (learnt) before it gates the PLE
    laurel_rank: int = 0  # LAuReL's low-rank residual branch beside attention (0 = none)
    # Every layer attends to keys and values handed in by kind from outside the model (a Gemma 4
    # assistant drafter reads its target's cache): no layer has k/v projections or a cache.
    external_kv: bool = False
    # Every query sees the keys on both sides of it, with no cache (EmbeddingGemma's encoder): a
    # local layer's query then sees sliding_window // 2 keys each way (models/masks.py encoder_mask;
    # EmbeddingGemma 2 states a radius R, read as a window of 2R + 1 keys centred on the query).
    bidirectional: bool = False

    def __post_init__(self) -> None:
        if len(self.layer_kinds) != self.num_layers:
            raise ValueError(f"layer_kinds has {len(self.layer_kinds)} entries for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if "local" in self.layer_kinds and not self.sliding_window:
            raise ValueError("local layers need a sliding_window")
        if "recurrent" in self.layer_kinds and self.recurrent_width % self.num_heads:
            raise ValueError(f"lru_width {self.recurrent_width} is not a multiple of num_heads {self.num_heads}")
        for name in ("intermediate_sizes", "activation_sparsity"):
            if getattr(self, name) and len(getattr(self, name)) != self.num_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {self.num_layers} layers")
        if self.altup_inputs == 1 or self.altup_inputs < 0:
            raise ValueError(f"altup_inputs {self.altup_inputs}: AltUp needs at least 2 streams (0 = none)")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token {self.experts_per_token} must be in 1..{self.num_experts}")
        # Worked out now, not on first use: a compiled step reads them, and Python 3.11's cached_property
        # takes a lock that torch.compile cannot trace (a graph break in every compiled step).
        self.kind_plans  # noqa: B018  (also raises for plans the layer kinds cannot share)

    def kv_sources(self) -> list[int]:
        """For each layer, the layer whose keys and values it attends to. The last
        ``num_kv_shared_layers`` layers read those of the last earlier layer of the same kind (as
        Gemma 3n and Gemma 4 do), so only the layers before them need a cache. With
        ``external_kv``, every layer's is EXTERNAL_KV."""
        if self.external_kv:
            return [EXTERNAL_KV] * self.num_layers
        first_shared = self.num_layers - self.num_kv_shared_layers
        sources = list(range(self.num_layers))
        for i in range(first_shared, self.num_layers):
            kind = self.layer_kinds[i]
            earlier = [j for j in range(first_shared) if self.layer_kinds[j] == kind]
            if not earlier:
                raise ValueError(f"layer {i} ({kind}) shares keys and values, but no earlier {kind} layer has any")
            sources[i] = earlier[-1]
        return sources

    def kv_producers(self) -> dict[LayerKind, int]:
        """For each attention kind, the layer whose keys and values this model's last layer of that
        kind attends to (the last of the kind with its own, when later ones share them): what a
        Gemma 4 assistant drafting for this model reads, as transformers' ``shared_kv_states``."""
        sources = self.kv_sources()
        return {kind: sources[max(i for i, k in enumerate(self.layer_kinds) if k == kind)]
                for kind in dict.fromkeys(self.layer_kinds) if kind != "recurrent"}

    @functools.cached_property
    def layer_plan(self) -> tuple[LayerPlan, ...]:
        """Each layer's :class:`LayerPlan` (made once per config)."""
        plans = []
        sources = self.kv_sources()
        for i, kind in enumerate(self.layer_kinds):
            local, shared = kind == "local", sources[i] != i
            head_dim = self.head_dim if local else self.global_head_dim or self.head_dim
            width = self.intermediate_sizes[i] if self.intermediate_sizes else self.intermediate_size
            plans.append(LayerPlan(
                mixer=kind, window=self.sliding_window if local else None, head_dim=head_dim,
                num_kv_heads=self.num_kv_heads if local else self.global_kv_heads or self.num_kv_heads,
                rope_theta=self.rope_local_theta if local else self.rope_theta,
                rope_scaling=1.0 if local else self.rope_scaling_factor,
                rotary_dim=int(head_dim * self.rope_fraction), kv_source=sources[i], index=i,
                intermediate_size=width * (2 if shared and self.double_wide_mlp else 1),
                activation_sparsity=self.activation_sparsity[i] if self.activation_sparsity else 0.0,
                rope_proportion=1.0 if local else self.rope_global_proportion,
                k_eq_v=self.k_eq_v and kind == "global", stores_kv=i in sources[i + 1:]))
        return tuple(plans)

    @functools.cached_property
    def kind_plans(self) -> dict[LayerKind, LayerPlan]:
        """The plan all layers of each kind share: one step context (rotary tables, mask) serves
        them all, so the layers of a kind must agree on everything a context depends on."""
        out: dict[LayerKind, LayerPlan] = {}
        for plan in self.layer_plan:
            first = out.setdefault(plan.mixer, plan)
            if plan.context_key != first.context_key:
                raise ValueError(f"the {plan.mixer} layers do not share one plan: {first} and {plan}")
        return out

    def replace(self, **changes: object) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def plain_blocks(self) -> bool:
        """Whether every block is a Gemma 1-3 one (what the fused C++ decode step implements): no
        norm without unit offset, value norm, shared, K=V or outside keys, experts, per-layer
        embeddings, layer scalars, per-layer MLP widths, sparse activations, AltUp streams or LAuReL."""
        return (self.norm_offset == 1.0 and not (self.v_norm or self.k_eq_v or self.num_kv_shared_layers
                or self.num_experts or self.per_layer_input_dim or self.layer_scalar or self.double_wide_mlp
                or self.intermediate_sizes or any(self.activation_sparsity) or self.altup_inputs
                or self.laurel_rank or self.external_kv)
                and self.global_head_dim in (None, self.head_dim) and self.global_kv_heads in (None, self.num_kv_heads)
                and self.rope_global_proportion == 1.0)

    @property
    def attention_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    @property
    def recurrent_width(self) -> int:
        return self.lru_width or self.hidden_size

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (the rest pass through unchanged)."""
        return int(self.head_dim * self.rope_fraction)

    def num_parameters(self) -> int:
        """Parameter count computed from the shapes (the LM head is tied to the embedding)."""
        d, heads = self.hidden_size, self.num_heads
        total = self.vocab_size * d + d + self.per_layer_embedding_parameters()
        if self.per_layer_input_dim:  # the model projection into the table's width and its norm
            total += d * self.num_layers * self.per_layer_input_dim + self.per_layer_input_dim
        S = self.altup_inputs
        if S:  # each extra stream's projections in from the embedding and back out before the final norm
            total += 2 * (S - 1) * d * d
        w, k = self.recurrent_width, self.conv1d_width
        for plan in self.layer_plan:
            hd, kv, inter = plan.head_dim, plan.num_kv_heads, plan.intermediate_size
            total += d * (4 if self.post_norms else 2) + 3 * d * inter
            total += (2 * inter + d) if self.mlp_bias else 0
            if plan.mixer == "recurrent":
                total += 3 * d * w + 2 * w + d + (k * w + w) + 2 * (w * w // heads + w) + w
                continue
            own_kv = not plan.reads_shared_kv
            total += 2 * d * heads * hd + (d if self.attn_out_bias else 0)  # q and o
            total += own_kv * d * kv * hd * (1 if plan.k_eq_v else 2)
            total += hd * (1 + own_kv) if self.qk_norm else 0
            if self.num_experts:  # router (scale, projection, per-expert scales), experts, three norms
                E, i = self.num_experts, self.expert_intermediate_size
                total += d + d * E + E + 3 * E * i * d + 3 * d
            if self.per_layer_input_dim:
                total += 2 * d * self.per_layer_input_dim + d
            total += 1 if self.layer_scalar else 0
            if S:  # router (norm, projection), prediction and correction coefficients, output scale
                total += d + d * S + S * S * S + S * S + d
            if self.laurel_rank:
                total += 2 * d * self.laurel_rank + d
        return total

    def per_layer_embedding_parameters(self) -> int:
        """The per-layer embedding table's size (PLE): a lookup table that need not sit in fast memory."""
        return self.per_layer_vocab_size * self.num_layers * self.per_layer_input_dim

    def active_parameters(self) -> int:
        """Parameters a token runs through: the experts it was not routed to and the PLE table
        (one row read per token) left out."""
        unused = self.num_layers * 3 * (self.num_experts - self.experts_per_token) * self.expert_intermediate_size
        return self.num_parameters() - unused * self.hidden_size - self.per_layer_embedding_parameters()

    def kv_cache_bytes(self, context: int, batch: int = 1, bytes_per_value: float = 2.0) -> int:
        """KV-cache size at a context length: local layers hold only their window, layers reading
        another layer's keys and values hold none."""
        values = 0
        for i, plan in enumerate(self.layer_plan):
            if plan.attends and plan.kv_source == i:
                values += min(context, plan.window or context) * plan.num_kv_heads * plan.head_dim
        return int(2 * batch * values * bytes_per_value)

    def recurrent_state_bytes(self, batch: int = 1, bytes_per_value: float = 2.0) -> int:
        """Recurrent layers' state, the same at any context: RG-LRU state (float32) + Conv1D history."""
        per_layer = self.recurrent_width * (4 + (self.conv1d_width - 1) * bytes_per_value)
        return int(batch * per_layer * self.layer_kinds.count("recurrent"))


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


def griffin_pattern(num_layers: int) -> tuple[LayerKind, ...]:
    """RecurrentGemma's residual pattern: recurrent, recurrent, local attention, repeated."""
    return tuple("local" if (i + 1) % 3 == 0 else "recurrent" for i in range(num_layers))


def _recurrentgemma(name: str, hidden: int, layers: int, heads: int) -> ModelConfig:
    # [rg] Preset.RECURRENT_GEMMA_{2B,9B}_V1: width, 3*width MLP, heads, lru_width = width, pattern
    # (R, R, A) cycled, embeddings scaled by sqrt(width) (rounded to bfloat16 in the reference), window 2048,
    # logits soft-cap 30; local attention is multi-query (one KV head, [hf] num_key_value_heads 1) with
    # head_dim = width / heads and RoPE (base 10k) on the first half of each head ([hf] partial_rotary_factor 0.5).
    # The state does not grow with the context, so there is no architectural limit: max_position_embeddings
    # is set far beyond the 8192-token training sequences ([rg] report section 3) and only bounds requests.
    return ModelConfig(
        family="recurrentgemma", name=name, vocab_size=256_000, hidden_size=hidden, intermediate_size=3 * hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=1, head_dim=hidden // heads,
        layer_kinds=griffin_pattern(layers), max_position_embeddings=1 << 20, query_pre_attn_scalar=hidden // heads,
        sliding_window=2048, rope_theta=10_000.0, rope_local_theta=10_000.0, final_logit_softcap=30.0,
        lru_width=hidden, conv1d_width=4, rope_fraction=0.5, embed_scale_bf16=True, mlp_bias=True,
        attn_out_bias=True,
    )


def _gemma4(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int, period: int, window: int,
            context: int, global_kv: int | None = None, shared: int = 0, per_layer: int = 0, double_wide: bool = False,
            experts: tuple[int, int, int] = (0, 0, 0)) -> ModelConfig:
    # [hf4] transformers models/gemma4/convert_gemma4_weights.py _VARIANTS (gemma4_unified's converter
    # for the 12B), checked against [dm4] google-deepmind/gemma gm/nn/gemma4 configs; shared by all:
    # vocab 262144, head size 256 (sliding) / 512 (global), RoPE 10k default (sliding) / 1M
    # proportional with 1/4 of the pairs rotating (global), attention scale 1, final soft-cap 30,
    # RMSNorm scaling by the weight itself, value norms, layer scalars. K=V global layers with their
    # own KV-head count where ``global_kv`` is given.
    num_experts, top_k, expert_width = experts
    return ModelConfig(
        family="gemma4", name=name, vocab_size=262_144, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=256, layer_kinds=alternating(layers, period),
        max_position_embeddings=context, query_pre_attn_scalar=1.0, sliding_window=window,
        rope_theta=1_000_000.0, rope_local_theta=10_000.0, rope_global_proportion=0.25, qk_norm=True,
        post_norms=True, final_logit_softcap=30.0, norm_offset=0.0, v_norm=True, layer_scalar=True,
        global_head_dim=512, global_kv_heads=global_kv, k_eq_v=global_kv is not None, num_kv_shared_layers=shared,
        double_wide_mlp=double_wide, per_layer_input_dim=per_layer, per_layer_vocab_size=262_144 if per_layer else 0,
        num_experts=num_experts, experts_per_token=top_k, expert_intermediate_size=expert_width,
    )


def _gemma3n(name: str, inter: int, layers: int, shared: int) -> ModelConfig:
    # [hf3n] _VARIANTS (E2B: 30 layers, MLP 8192, 10 shared; E4B: Gemma3nTextConfig's defaults: 35 layers,
    # MLP 16384, 15 shared), checked against [dm3n] _get_gemma3n_config; shared by both: width 2048, 8 heads,
    # 2 KV heads of 256, 4 sliding : 1 global (window 512), RoPE 10k / 1M, attention scale 1, RMSNorm
    # scaling by the weight itself, value norms, gaussian top-k sparsity 0.95 on the first 10 layers,
    # 4 AltUp streams (coefficients clipped to 120 in training), LAuReL rank 64, PLE 256 from a
    # 262144-row table. The vocabulary is the HF checkpoints' 262400 (the text's 262144, then 128
    # image and 128 audio soft-token ids; [dm3n] counts 262144). Final soft-cap 30 as in [hf3n]
    # (and llama.cpp), where [dm3n] has none: the HF checkpoints' outputs are the reference.
    return ModelConfig(
        family="gemma3n", name=name, vocab_size=262_400, hidden_size=2048, intermediate_size=inter,
        num_layers=layers, num_heads=8, num_kv_heads=2, head_dim=256, layer_kinds=alternating(layers, 5),
        max_position_embeddings=32_768, query_pre_attn_scalar=1.0, sliding_window=512,
        rope_theta=1_000_000.0, rope_local_theta=10_000.0, qk_norm=True, post_norms=True, final_logit_softcap=30.0,
        norm_offset=0.0, v_norm=True, num_kv_shared_layers=shared, per_layer_input_dim=256,
        per_layer_vocab_size=262_144, activation_sparsity=(0.95,) * 10 + (0.0,) * (layers - 10),
        altup_inputs=4, altup_coef_clip=120.0, laurel_rank=64,
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
        _recurrentgemma("recurrentgemma-2b", 2560, 26, 10),
        _recurrentgemma("recurrentgemma-9b", 4096, 38, 16),
        # E2B is E4B's 30-layer MatFormer sub-model (half the MLP width); both keep the first 20 layers'
        # keys and values, the later ones reading those of layers 18 (sliding) and 19 (global)
        _gemma3n("gemma3n-e2b", 8192, 30, 10),
        _gemma3n("gemma3n-e4b", 16_384, 35, 15),
        # E2B: 4 sliding : 1 global, the last 20 layers read shared K/V with an MLP twice as wide (12288)
        _gemma4("gemma4-e2b", 1536, 6144, 35, 8, 1, 5, 512, 131_072, shared=20, per_layer=256, double_wide=True),
        _gemma4("gemma4-e4b", 2560, 10240, 42, 8, 2, 6, 512, 131_072, shared=18, per_layer=256),
        _gemma4("gemma4-12b", 3840, 15360, 48, 16, 8, 6, 1024, 262_144, global_kv=1),
        # 26B-A4B: 128 experts of width 704, 8 per token, beside a dense MLP of width 2112 in every layer
        _gemma4("gemma4-26b-a4b", 2816, 2112, 30, 16, 8, 6, 1024, 262_144, global_kv=2, experts=(128, 8, 704)),
        _gemma4("gemma4-31b", 5376, 21504, 60, 32, 16, 6, 1024, 262_144, global_kv=4),
    ]
    presets = {c.name: c for c in table}
    # Instruction-tuned variants differ only in weights.
    for base in ["gemma-2b", "gemma-7b", "codegemma-7b", "gemma2-2b", "gemma2-9b", "gemma2-27b",
                 "gemma3-270m", "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b",
                 "recurrentgemma-2b", "recurrentgemma-9b", "gemma3n-e2b", "gemma3n-e4b", "gemma4-e2b", "gemma4-e4b", "gemma4-12b",
                 "gemma4-26b-a4b", "gemma4-31b"]:
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
