"""The one Gemma decoder: embedding, N residual blocks of per-layer kinds, final norm, tied head.

Gemma 1, Gemma 2, Gemma 3, Gemma 3n, Gemma 4 and RecurrentGemma are all this module;
:class:`~gemmakit.models.config.ModelConfig` decides which layers are global, local or recurrent
(Griffin), whether post-norms and QK-norms exist, the soft-caps and the RoPE settings, and which of
the later families' additions a block has (per-layer embeddings, experts, AltUp streams, LAuReL).
Nothing here branches on a model name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.heap import return_freed_heap
from gemmakit.huge_pages import move_to_huge_pages
from gemmakit.kernels import gemm, ops
from gemmakit.kernels.gemm import Linear
from gemmakit.models.altup import AltUp, AltUpStreams
from gemmakit.models.attention import Attention
from gemmakit.models.cache import KVCache, static_step_contexts, step_contexts
from gemmakit.models.config import LayerPlan, ModelConfig
from gemmakit.models.fused_decode import fused_hidden
from gemmakit.models.griffin import RecurrentBlock
from gemmakit.models.layers import GeGLU, Laurel, RMSNorm, softcap
from gemmakit.models.masks import StepContext
from gemmakit.models.moe import MixtureOfExperts
from gemmakit.models.row_cache import RowKVCache
from gemmakit.quant import ggml_ops
from gemmakit.quant.grouped import unmerged_projections


# A prefill of at least this many tokens returns its scratch memory to the OS before the LM head
# (heap.py). The call costs ~5-8 ms here: ~2% of a 512-token prefill, but 6% of a 64-token one,
# whose scratch is smaller anyway.
TRIM_ROWS = 256

# A step of at most this many positions continuing a sequence (a decode step, a speculative round's
# check) is decoding, which streams every weight. The model's HUGE_PAGES_AFTER_STEPS-th such step
# first moves the weights into huge pages (huge_pages.py): on a 2-core VM that one copy took
# 0.23-0.65 s for the 270M GGUF's 246 MB (fresh huge pages are slow to fault in there) and then
# saved ~2.5 ms a token, so short generations (and one-line chats) skip it.
DECODE_STEP_ROWS = 16
HUGE_PAGES_AFTER_STEPS = 32


class DecoderBlock(nn.Module):
    """pre-norm -> mixer -> (post-norm) -> residual; pre-norm -> GeGLU -> (post-norm) -> residual.

    The mixer is attention for global/local layers and Griffin's recurrent block for recurrent ones.
    Gemma 4 adds, where its config says: a mixture of experts beside the MLP (each with its own
    post-norm, summed before the shared one), the per-layer embedding's gated residual after the
    FFN, and a learnt scalar on the block's output.

    Gemma 3n's blocks take and return AltUp's ``[S, B, T, hidden]`` streams (models/altup.py):
    the steps above run on the active stream's prediction, with a LAuReL branch beside attention
    (the attention residual and LAuReL's output averaged as ``(a + b) / sqrt(2)``); AltUp's
    correction then spreads the result to every stream, and the per-layer embedding's residual,
    gated by the (scaled) corrected active stream rather than taken after the FFN as in Gemma 4,
    goes into the other streams, not the active one.
    """

    def __init__(self, config: ModelConfig, plan: LayerPlan) -> None:
        super().__init__()
        self.kind = kind = plan.mixer
        eps, offset, d = config.rms_norm_eps, config.norm_offset, config.hidden_size
        self.attn_norm = RMSNorm(d, eps, offset)
        if kind == "recurrent":
            self.recurrent = RecurrentBlock(config)
        else:
            self.attn = Attention(config, plan)
        self.post_attn_norm = RMSNorm(d, eps, offset) if config.post_norms else nn.Identity()
        self.mlp_norm = RMSNorm(d, eps, offset)
        self.mlp = GeGLU(d, plan.intermediate_size, bias=config.mlp_bias, sparsity=plan.activation_sparsity)
        self.post_mlp_norm = RMSNorm(d, eps, offset) if config.post_norms else nn.Identity()
        self.moe = MixtureOfExperts(config) if config.num_experts else None
        self.dense_norm = RMSNorm(d, eps, offset) if config.num_experts else None  # the MLP's own post-norm
        self.per_layer = PerLayerInput(config) if config.per_layer_input_dim else None
        self.layer_scalar = nn.Parameter(torch.ones(1)) if config.layer_scalar else None
        self.altup = AltUp(config) if config.altup_inputs else None
        self.altup_correct_scale = config.altup_correct_scale
        self.laurel = Laurel(d, config.laurel_rank, eps, offset) if config.laurel_rank else None

    def forward(self, h: torch.Tensor, ctx: StepContext, cache, last_row_only: bool = False,
                per_layer_input: torch.Tensor | None = None, shared_kv: dict | None = None) -> torch.Tensor:
        """``h [B, T, hidden]`` (with AltUp, ``[S, B, T, hidden]``) -> the block's output; with
        ``last_row_only``, that of the last row alone (``T`` = 1), the cache still receiving every
        row's state. ``per_layer_input [B, T, per_layer_input_dim]``: this layer's per-layer
        embedding; ``shared_kv``: see :meth:`Attention.forward`."""
        def cut(t: torch.Tensor) -> torch.Tensor:  # the rows this block returns
            return t[..., -1:, :] if last_row_only else t

        if per_layer_input is not None:
            per_layer_input = cut(per_layer_input)
        streams = None
        if self.altup is not None:
            streams = self.altup.predict(h)
            h = streams[0]
        x = self.attn_norm(h)
        if self.kind == "recurrent":  # the recurrence needs every row; only its output is cut
            mixed = cut(self.recurrent(x, ctx, cache))
        else:
            mixed = self.attn(x, ctx, cache, last_row_only, shared_kv)
        h = cut(h) + self.post_attn_norm(mixed)
        if self.laurel is not None:
            h = (h + self.laurel(cut(x))) / math.sqrt(2)
        ff = self.mlp(self.mlp_norm(h))
        if self.moe is not None:
            ff = self.dense_norm(ff) + self.moe(h)
        h = h + self.post_mlp_norm(ff)
        if streams is not None:
            return self._correct(cut(streams), h, per_layer_input)
        if self.per_layer is not None:
            h = h + self.per_layer(h, per_layer_input)
        return h if self.layer_scalar is None else h * self.layer_scalar

    def _correct(self, predictions: torch.Tensor, h: torch.Tensor, per_layer_input: torch.Tensor | None) -> torch.Tensor:
        """AltUp's correction of the ``[S, B, T, hidden]`` predictions by the block's output ``h``,
        then the per-layer embedding's residual into every stream but the active one."""
        streams = self.altup.correct(predictions, h)
        if self.per_layer is None:
            return streams
        active = self.altup.scaled_active(streams) if self.altup_correct_scale else streams[0]
        # out of place: autograd still needs the corrected active stream as it was
        return torch.cat([streams[:1], streams[1:] + self.per_layer(active, per_layer_input)])


class PerLayerInput(nn.Module):
    """A layer's share of the per-layer embeddings (PLE): ``norm(proj(gelu(gate(h)) * e))`` for the
    layer's embedding ``e`` of the token, added to the residual stream after the FFN."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, p = config.hidden_size, config.per_layer_input_dim
        self.gate = Linear(d, p, bias=False)
        self.proj = Linear(p, d, bias=False)
        self.norm = RMSNorm(d, config.rms_norm_eps, config.norm_offset)

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(F.gelu(self.gate(h), approximate="tanh") * embedding))


class GemmaModel(nn.Module):
    """A Gemma causal language model. ``model(ids)`` returns logits ``[B, T, vocab]``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config, plan) for plan in config.layer_plan)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)
        if config.per_layer_input_dim:  # per-layer embeddings (PLE): one table row per token, sliced by layer
            width = config.num_layers * config.per_layer_input_dim
            if config.per_layer_vocab_size:  # (EmbeddingGemma 2 has no table: the projection alone)
                self.per_layer_embed = nn.Embedding(config.per_layer_vocab_size, width)
            self.per_layer_model_proj = Linear(config.hidden_size, width, bias=False)
            self.per_layer_proj_norm = RMSNorm(config.per_layer_input_dim, config.rms_norm_eps, config.norm_offset)
        # AltUp's extra residual streams in and out (Gemma 3n); the blocks pass all of them on
        self.altup = AltUpStreams(config) if config.altup_inputs else None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    kv_int8 = False  # store keys/values as int8 with per-32-entry scales (load(..., kv_cache="int8"))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if self._compiled_step is None:
            return KVCache(self.config, batch, max_len, self.dtype, self.device, kv_int8=self.kv_int8)
        # The compiled step is specialised to the cache's shapes: sizes from a few power-of-two
        # buckets (at least a full sliding window) let it serve many requests without recompiling.
        size = max(256, self.config.sliding_window or 0, max_len)
        size = min(1 << (size - 1).bit_length(), max(max_len, self.config.max_position_embeddings))
        return KVCache(self.config, batch, size, self.dtype, self.device, static=True, kv_int8=self.kv_int8)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, T, hidden]`` scaled by sqrt(hidden), as the first block sees them.

        Callers that splice in other embeddings (image soft tokens) start from this and pass the
        result as ``inputs_embeds``; the spliced features are *not* scaled (as in the reference).
        """
        h = self.embed(input_ids)
        return h * self._embed_scale(h.dtype)

    def _embed_scale(self, dtype: torch.dtype, width: int | None = None) -> float:
        """sqrt(hidden) (or sqrt(width)) rounded to ``dtype`` (or first to bfloat16, as
        RecurrentGemma was trained), as a Python float: exactly representable in ``dtype``, so
        ``h * scale`` equals the product with a ``dtype`` tensor, without making that tensor every step."""
        scales = self.__dict__.setdefault("_embed_scales", {})
        width = width or self.config.hidden_size
        if (dtype, width) not in scales:
            scale_dtype = torch.bfloat16 if self.config.embed_scale_bf16 else dtype
            scales[dtype, width] = float(torch.tensor(width**0.5, dtype=scale_dtype).to(dtype))
        return scales[dtype, width]

    def per_layer_inputs(self, input_ids: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor | None:
        """Each layer's per-layer embedding ``[B, T, layers, per_layer_input_dim]`` (None without
        PLE): the token's row of the table (scaled by sqrt of its width) plus a normed projection
        of the token embeddings ``h``, the sum scaled by 1/sqrt(2); without a table
        (``per_layer_vocab_size`` 0, EmbeddingGemma 2), the normed projection alone, unscaled."""
        c = self.config
        if not c.per_layer_input_dim:
            return None
        shape = (*h.shape[:2], c.num_layers, c.per_layer_input_dim)
        projected = self.per_layer_proj_norm((self.per_layer_model_proj(h) * c.hidden_size**-0.5).view(shape))
        if not c.per_layer_vocab_size:
            return projected
        if input_ids is None:
            raise ValueError("a model with per-layer embeddings needs the token ids, not embeddings alone")
        if c.per_layer_vocab_size < c.vocab_size:
            # Gemma 3n's table covers the text vocabulary only (262144 of 262400 ids): the image and
            # audio soft-token ids beyond it read row 0, as in the reference
            input_ids = torch.where(input_ids < c.per_layer_vocab_size, input_ids, 0)
        table = self.per_layer_embed(input_ids)
        table = table * self._embed_scale(table.dtype, c.per_layer_input_dim)
        return (projected + table.view(shape)) * 2**-0.5

    def forward(
        self,
        input_ids: torch.Tensor | None,  # [B, T]
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,  # [B, T]; -1 marks left padding
        last_only: bool = False,
        inputs_embeds: torch.Tensor | None = None,  # [B, T, hidden], already scaled; replaces input_ids
        groups: torch.Tensor | None = None,  # [B, T]; tokens sharing a group >= 0 attend both ways
        with_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, vocab]`` (the last position's alone with ``last_only``); with
        ``with_hidden``, also the final norm's output ``[B, T, hidden]`` the head read (what a
        Gemma 4 assistant drafts from, models/assistant.py)."""
        if isinstance(cache, RowKVCache):
            if with_hidden:
                raise ValueError("the serving cache's forward returns logits only")
            return self._forward_rows(input_ids, cache, positions, last_only, inputs_embeds, groups)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=h.device).expand(B, T)
        if cache is not None:
            cache.check_room(T)
            self._settle_for_decoding(h, lambda: start > 0)
        per_layer = self.per_layer_inputs(input_ids, h)
        if (T == 1 and groups is None and cache is not None and cache.static and self._compiled_step is not None
                and not with_hidden):
            logits = self._run_compiled_step(h, positions, cache, per_layer)
            cache.advance(positions, groups)
            return logits
        if cache is None:
            contexts = step_contexts(self.config, positions, h.dtype, groups)
        else:
            contexts = cache.contexts(positions, h.dtype, groups)
        layer_caches = cache.layers if cache is not None else [None] * len(self.layers)
        fused = fused_hidden(self, h, contexts, cache) if T == 1 and cache is not None else None
        if fused is not None:  # the layers and final norm as one C++ call (models/fused_decode.py)
            out = (self._logits(fused), fused) if with_hidden else self._logits(fused)
        else:
            out = self._layers_and_head(h, contexts, layer_caches, last_only and T > 1, per_layer, with_hidden)
        if cache is not None:
            cache.advance(positions, groups)
        return out

    def _settle_for_decoding(self, h: torch.Tensor, continues: Callable[[], bool]) -> None:
        """Count a decoding step (``h [B, T, hidden]`` of at most DECODE_STEP_ROWS positions on the
        CPU, where ``continues()`` says some row already holds earlier positions); at the
        HUGE_PAGES_AFTER_STEPS-th, move the weights the model reads in place from a file's memory
        map into huge pages (huge_pages.py; ~15-19% faster decoding of the 270M GGUF on a 2-core
        VM). Not at load: there the LM head would sit resident under a prefill's scratch memory,
        raising the peak RSS. ``continues`` is asked last, as it may read a tensor (off the CPU it
        would be a device sync every step)."""
        if (self._settled or h.shape[1] > DECODE_STEP_ROWS or h.device.type != "cpu"
                or torch.compiler.is_compiling() or not continues()):
            return
        self._decoding_steps += 1
        if self._decoding_steps >= HUGE_PAGES_AFTER_STEPS:
            self.move_weights_to_huge_pages()

    def move_weights_to_huge_pages(self) -> int:
        """Move the weights read in place from a file mapping into huge pages now (huge_pages.py)
        rather than at the HUGE_PAGES_AFTER_STEPS-th decoding step: for processes that wait for
        input anyway (serve, chat). Once per model; returns the bytes moved in all."""
        if not self._settled:
            self._settled = True
            if self.device.type == "cpu":
                self.weights_in_huge_pages = move_to_huge_pages([*self.buffers(), *self.parameters()])
        return self.weights_in_huge_pages

    _settled = False  # whether move_weights_to_huge_pages has run
    _decoding_steps = 0  # decoding steps counted until then
    weights_in_huge_pages = 0  # the bytes it moved

    def _run_compiled_step(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                           per_layer: torch.Tensor | None = None) -> torch.Tensor:
        """One token through the compiled step (``compile_decode``): its rotary tables and masks are
        worked out inside the compiled graph too, so on CUDA a step is a few launches and one graph
        replay rather than dozens of small launches from Python around it."""
        args = (h, positions, *cache.static_step_inputs(), per_layer)
        if h.device.type != "cuda":
            return self._compiled_step(*args)
        # A CUDA-graph replay writes its outputs into the graph's own memory, which the next replay
        # reuses: start a new step explicitly (else a still-referenced previous output makes torch
        # record another graph instead of replaying) and hand back a copy.
        torch.compiler.cudagraph_mark_step_begin()
        return self._compiled_step(*args).clone()

    def _static_step(self, h: torch.Tensor, positions: torch.Tensor, index: torch.Tensor, layer_caches: list,
                     global_positions: torch.Tensor, ring_positions: torch.Tensor,
                     per_layer: torch.Tensor | None = None) -> torch.Tensor:
        """What ``compile_decode`` compiles: one token's contexts over a static cache, the blocks, the
        final norm and the head, as a function of tensors whose shapes never change."""
        contexts = static_step_contexts(self.config, positions, index, global_positions, ring_positions, h.dtype)
        return self._layers_and_head(h, contexts, layer_caches, False, per_layer)

    def _layers_and_head(self, h: torch.Tensor, contexts: dict, layer_caches: list, last_only: bool,
                         per_layer: torch.Tensor | None = None,
                         with_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Everything after the per-step bookkeeping: the blocks (given their per-layer embeddings
        ``per_layer``, see :meth:`per_layer_inputs`), the final norm and the head; with
        ``with_hidden``, the logits and the final norm's output.

        The compiled decode step (``_static_step``) runs it after building its contexts in the graph.
        """
        rows = h.shape[1]
        h = self._blocks(h, contexts, layer_caches, last_only, per_layer)
        if last_only:
            if rows >= TRIM_ROWS and h.device.type == "cpu" and not torch.compiler.is_compiling():
                return_freed_heap()  # the layers' scratch, before the head streams the whole embedding in
        h = self._final_hidden(h)
        return (self._logits(h), h) if with_hidden else self._logits(h)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The final norm's output ``[B, T, hidden]`` at every position of ``input_ids [B, T]``
        (``positions [B, T]``, -1 = padding), with no cache and no head: what an embedding model
        pools (models/encoder.py). The head would cost a vocabulary-wide product per token."""
        h = self.embed_tokens(input_ids)
        contexts = step_contexts(self.config, positions, h.dtype)
        h = self._blocks(h, contexts, [None] * len(self.layers), False, self.per_layer_inputs(input_ids, h))
        return self._final_hidden(h)

    def hidden_over(self, h: torch.Tensor, contexts: dict, shared_kv: dict) -> torch.Tensor:
        """The blocks over keys and values handed in from outside, by kind (``shared_kv``; each
        kind's context masks them), then the final norm: ``[B, T, hidden]`` in, the final norm's
        output out. For a model whose layers all read outside keys and values
        (``ModelConfig.external_kv``: a Gemma 4 assistant, models/assistant.py), which has no cache."""
        h = self._blocks(h, contexts, [None] * len(self.layers), False, None, dict(shared_kv))
        return self._final_hidden(h)

    def _blocks(self, h: torch.Tensor, contexts: dict, layer_caches: list, last_only: bool,
                per_layer: torch.Tensor | None, shared_kv: dict | None = None) -> torch.Tensor:
        """The residual blocks in order, each given its kind's context, its cache, its per-layer
        embedding and the keys/values earlier layers hand on (Attention.forward; ``shared_kv``
        may start with keys and values handed in from outside, :meth:`hidden_over`). With
        ``last_only``, the final layer works out its output for the last row alone (its keys and
        values still go to the cache): ~5% of a 512-token prefill of an 18-layer model."""
        shared_kv = {} if shared_kv is None else shared_kv
        if self.altup is not None:
            h = self.altup.spread(h)  # [S, B, T, hidden]
        final = len(self.layers) - 1
        for i, (layer, layer_cache) in enumerate(zip(self.layers, layer_caches)):
            h = layer(h, contexts[layer.kind], layer_cache, last_only and i == final,
                      None if per_layer is None else per_layer[:, :, i], shared_kv)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The last block's output (AltUp's streams merged first) through the final norm and the head."""
        return self._logits(self._final_hidden(h))

    def _final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The last block's output (AltUp's streams merged first) through the final norm."""
        if self.altup is not None:
            h = self.altup.merge(h)
        return self.final_norm(h)

    _compiled_step = None

    def compile_decode(self, **options) -> None:
        """Compile the one-token decode step with torch.compile (caches made afterwards are static).

        Decoding runs ~1,000 small ops per token whose dispatch overhead, on a CPU, costs as much
        as reading the weights; compiled, the blocks become a few fused kernels. Prefill and
        batched serving keep the eager path. Compiling takes tens of seconds on a small CPU (torch
        caches the result on disk for later runs); it happens here for the smallest cache size and
        again, once, for each larger power-of-two cache size a generation needs. On CUDA the
        default mode is "reduce-overhead" (CUDA graphs), and float q/k/v and gate/up are merged
        into one matmul each (:func:`fuse_dense_projections`); ``options`` go to
        torch.compile.
        """
        ggml_ops.register_custom_op()  # the block matmul and one-query attention as traceable ops
        ops.register_custom_ops()
        if self.device.type == "cuda":  # replay the step as a CUDA graph: one launch, not hundreds
            options.setdefault("mode", "reduce-overhead")
            fuse_dense_projections(self)  # two projection GEMMs a layer where there were five
        self._compiled_step = torch.compile(self._static_step, dynamic=False, **options)
        # Compile now for the smallest cache bucket (what short generations use), so that the cost
        # shows up as load time rather than as one very slow first token.
        with torch.inference_mode():
            cache = self.new_cache(1, 2)
            token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self(token, cache=cache)
            self(token, cache=cache)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied LM head and final soft-cap: ``[B, T, hidden] -> [B, T, vocab]``."""
        head = getattr(self.embed, "project", None)  # a quantised tied embedding brings its own head matmul
        if head is not None:
            logits = head(h)
        elif h.shape[0] * h.shape[1] > 1:
            # weight @ h^T rather than h @ weight^T: with a few rows and a 256K vocabulary, BLAS streams
            # the big matrix once this way round (measured ~2x faster on CPU at 16 rows).
            logits = (self.embed.weight @ h.reshape(-1, h.shape[-1]).T).T.reshape(*h.shape[:-1], -1)
        else:
            logits = gemm.linear(h, self.embed.weight)
        return softcap(logits, self.config.final_logit_softcap)

    def _forward_rows(self, input_ids: torch.Tensor, cache: RowKVCache, positions: torch.Tensor,
                      last_only: bool, inputs_embeds: torch.Tensor | None = None,
                      groups: torch.Tensor | None = None) -> torch.Tensor:
        """Forward over a cache whose rows advance independently (the serving engine's batches)."""
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, hidden]
        per_layer = self.per_layer_inputs(input_ids, h)
        self._settle_for_decoding(h, lambda: int(positions.max()) >= h.shape[1])  # (a row continues)
        contexts = cache.contexts(positions, h.dtype, groups)
        fused = fused_hidden(self, h, contexts, cache) if h.shape[1] == 1 else None
        if fused is not None:  # the layers and final norm as one C++ call (models/fused_decode.py)
            cache.advance(positions, groups)
            return self._logits(fused)
        h = self._blocks(h, contexts, cache.layers, False, per_layer)
        cache.advance(positions, groups)
        if last_only:
            h = h[..., -1:, :]
        return self._head(h)

def fuse_dense_projections(model: nn.Module) -> int:
    """Merge each attention's float q/k/v and each MLP's gate/up into one ``Linear`` apiece (their
    weights concatenated; outputs split again by the layer); returns how many merges it made.

    For the compiled CUDA decode step (``GemmaModel.compile_decode``): a decode GEMM on a GPU is
    mostly fixed cost (a 1152x1024 bf16 matrix is half a microsecond of HBM traffic, a few
    microseconds of kernel), so five projection kernels a layer becoming two is most of what
    separates a Gemma 3 1B step from the bandwidth limit. Only bias-free plain ``Linear`` layers of
    one dtype and device merge (LoRA wrappers and quantised layers stay); the state dict's names
    change, so this is for inference, not for a model that is trained or exported afterwards.
    """
    merged = 0
    for module, parts in list(unmerged_projections(model)):
        if not all(type(p) is Linear and p.bias is None for p in parts):
            continue
        weights = [p.weight for p in parts]
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            continue
        with torch.no_grad():
            fused = Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=False,
                           device=weights[0].device, dtype=weights[0].dtype)
            fused.weight = nn.Parameter(torch.cat([w.detach() for w in weights]), requires_grad=False)
        module.fuse([w.shape[0] for w in weights], fused)
        merged += 1
    return merged


class DecoderAddOn(nn.Module):
    """Base of the models built around one :class:`GemmaModel` (``self.decoder``): a vision-language
    model, an assistant drafter, an embedding model. Their dtype and device are the decoder's."""

    decoder: GemmaModel

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.device
