"""The Python API: ``load`` a model, then ``generate`` or ``stream`` text from it, or ``embed`` texts.

    model, tokenizer = gemmakit.load()                 # the default Gemma 3 270M
    print(gemmakit.generate(model, tokenizer, "The capital of France is", max_tokens=20))

    encoder, tokenizer = gemmakit.load("embeddinggemma-300m")   # a sentence-transformers directory
    vectors = gemmakit.embed(encoder, tokenizer, ["a text", "another"], prompt="document")
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from gemmakit.checkpoints import build_model, open_checkpoint
from gemmakit.checkpoints.matformer import MatformerPlan, resolve_plan
from gemmakit.checkpoints.peft import load_adapter
from gemmakit.engine.embed import DEFAULT_BATCH, embed_texts
from gemmakit.engine.generate import GenerationStats, generate_steps
from gemmakit.engine.grammar import CompiledGrammar, Grammar, GrammarCompiler
from gemmakit.engine.sampling import SamplingParams
from gemmakit.errors import InvalidRequestError, TokenizerError
from gemmakit.heap import forget_unused_code, keep_freed_heap, return_freed_heap
from gemmakit.kernels import build, gemm
from gemmakit.kernels.gemm import HALF_TYPES
from gemmakit.models.assistant import AssistantModel
from gemmakit.models.decoder import GemmaModel
from gemmakit.models.encoder import EmbeddingModel
from gemmakit.quant import ggml_ops
from gemmakit.quant.grouped import GGMLWeight, set_prefill_dtype
from gemmakit.quant.linear import default_compute_dtype, quantize_model, requantize_blocks
from gemmakit.vision.generate import prepare_vision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def _cpu(device: str | torch.device) -> bool:
    return torch.device(device).type == "cpu"


def checked_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this torch can run on, or an InvalidRequestError that says what
    to do (a CPU build of torch asked for CUDA is the usual case)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidRequestError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequestError(
                f"device {device!r}: torch {torch.__version__} sees no CUDA GPU; install torch's CUDA build "
                "for your driver (README: CPU or CUDA) or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidRequestError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA GPUs here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidRequestError(f"device {device!r}: this torch has no MPS backend here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InvalidRequestError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


QUANTS = ("auto", "none", "gguf", "int8", "int4")
KV_CACHES = ("auto", "int8")
PREFILL_DTYPES = ("auto", "float32", "bfloat16")
ACTIVATIONS = tuple(ggml_ops.ACTIVATIONS)  # the block kernel's: auto, float32, int8


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model, checked once when made: every option's allowed values live here.

    ``dtype`` None lets ``quant`` decide (float32 for float weights). See :func:`load` for what
    each option does."""

    dtype: torch.dtype | None = None
    quant: str = "auto"
    kv_cache: str = "auto"
    prefill_dtype: str = "auto"
    activations: str = "auto"
    device: torch.device = torch.device("cpu")
    compile: bool = False
    adapter: Path | None = None
    config: object = None  # a preset name or ModelConfig, for a .ckpt (which stores none)
    matformer: MatformerPlan | None = None  # a Gemma 3n sub-model to cut out (a plan's name, JSON path or dict)
    mmproj: Path | bool | None = None  # llama.cpp's vision file; None: the mmproj-*.gguf beside, False: none

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalise in place: the dataclass is frozen to callers
        set_(self, "dtype", None if self.dtype is None else parse_dtype(self.dtype))
        set_(self, "quant", self.quant or "auto")
        set_(self, "device", checked_device(self.device))
        set_(self, "adapter", None if self.adapter is None else Path(self.adapter))
        set_(self, "matformer", None if self.matformer is None else resolve_plan(self.matformer))
        if self.mmproj is True:
            raise InvalidRequestError("mmproj takes the vision file's path (or False for none, None to find it)")
        set_(self, "mmproj", self.mmproj if self.mmproj in (None, False) else Path(self.mmproj))
        for name, value, allowed, what in (("quant", self.quant, QUANTS, "quantisation"),
                                           ("kv_cache", self.kv_cache, KV_CACHES, "KV cache storage"),
                                           ("prefill_dtype", self.prefill_dtype, PREFILL_DTYPES, "prefill dtype"),
                                           ("activations", self.activations, ACTIVATIONS, "kernel activations")):
            if value not in allowed:
                raise InvalidRequestError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        if self.quant == "gguf" and self.adapter is not None:
            raise InvalidRequestError("a LoRA adapter is merged into float weights; use --quant none with --adapter")

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_model` decided and how long it took."""

    source: str  # the checkpoint's path (or the default model's)
    weights: str  # how the weights are held: "gguf" (quantised blocks), "int8"/"int4", a float dtype,
    #               or "bfloat16 (float32 compute)" for 16-bit matrices kept on the block kernel
    prefill_dtype: str  # "float32" or "bfloat16": what a prompt's products of quantised weights run in
    activations: str  # the block kernel's activations: "auto", "float32" or "int8" (ggml_ops.ACTIVATIONS)
    kv_cache: str  # "float" (the model's dtype) or "int8"
    seconds: float


class Loaded(NamedTuple):
    model: nn.Module
    tokenizer: object  # a Tokenizer, or None when the checkpoint carries no tokenizer files
    report: LoadReport


def load(source: str | Path | None = None, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", progress: bool = False, config=None,
         adapter: str | Path | None = None, quant: str | None = None, compile: bool = False,
         kv_cache: str = "auto", prefill_dtype: str = "auto", matformer=None,
         mmproj: str | Path | bool | None = None, activations: str = "auto"):
    """Load ``(model, tokenizer)`` from a .gguf file, a checkpoint directory, a gemma_pytorch
    ``.ckpt``, or the default model (:func:`load_model` also says what it decided).

    The tokenizer is ``None`` when the source carries no tokenizer files. ``config`` (a preset name
    or ModelConfig) names the architecture of a ``.ckpt``, which stores none. ``adapter`` is a LoRA
    adapter directory in PEFT's layout, merged into the weights after loading. ``quant`` ("int8" or
    "int4") requantises the weights (on the CPU as GGML Q8_0 / Q4_1 blocks on the block kernel with
    float32 compute; elsewhere int8 codes with float32 scales, and int4 groups in bfloat16); "gguf"
    keeps a GGUF file's quantised matrices as they are (the file's GGML blocks, in place, no float copy);
    "none" expands everything to ``dtype``. The default, "auto", is "gguf" on the CPU when no ``dtype``
    is asked for and the checkpoint has matrices the block kernel runs as stored: a quantised GGUF's
    (same outputs, a third of the memory, faster), or a bfloat16/float16 checkpoint's (GGUF or
    safetensors, where the CPU kernel is built: float32 compute on the 16-bit weights, which is
    exactly the float32 expansion's model at half its memory and about twice its decoding speed);
    else "none".
    ``compile`` compiles the one-token decode step (``GemmaModel.compile_decode``). ``kv_cache="int8"``
    stores generation caches' keys and values as int8 with a scale per 32 entries (models/cache.py).
    ``prefill_dtype="bfloat16"`` runs the products of quantised weights over a prompt (64 positions or
    more) in bfloat16 with float32 accumulation, about twice as fast on CPUs with bfloat16 dot
    products; decode steps (serving batches and speculative rounds too) stay float32. It moves
    logits by roughly bfloat16's rounding (relative 2^-9), below the error of the quantisation
    itself (Q8_0's step is ~2^-7 of a block's largest weight), so greedy text can change only where
    two tokens are close. ``"float32"`` is the reference numerics (the dequantised model up to
    float32 rounding). ``"auto"`` (the default) is bfloat16 for quantised (8-bit or fewer) weights
    on a CPU with bfloat16 dot products (AVX512_BF16 or AMX), float32 for everything else;
    the report's ``prefill_dtype`` says which was chosen.
    ``activations`` is what the block kernel multiplies quantised weights by in decode-sized
    products: "float32" keeps the reference numerics (the dequantised model up to float32
    rounding); "int8" rounds each 32 activations to 8 bits with one scale, as llama.cpp does, and
    multiplies integers (faster for every type); "auto" (the default) does that on AVX2 and AVX-512
    CPUs and keeps float32 elsewhere (docs/quantisation-and-speed.md has the figures).
    ``matformer`` loads a Gemma 3n E4B checkpoint as a smaller model nested in it: a named plan
    (``"e2b"``, see :data:`gemmakit.checkpoints.matformer.PLANS`), the path of a JSON plan, or its dict
    (``{"ffn_hidden_dims": [...], "layers_to_skip": [...]}``).
    ``mmproj`` is llama.cpp's vision file for a Gemma 3 GGUF (``convert_hf_to_gguf.py --mmproj``
    writes it): the text GGUF and it load as one vision-language model, the same one the Hugging
    Face directory gives. Left None, the one ``mmproj-*.gguf`` beside the GGUF is used, if any
    (several are an error); False loads the text model alone.
    """
    options = LoadOptions(dtype=dtype, quant=quant or "auto", kv_cache=kv_cache, prefill_dtype=prefill_dtype,
                          device=device, compile=compile, adapter=adapter, config=config, matformer=matformer,
                          mmproj=mmproj, activations=activations)
    model, tokenizer, _ = load_model(source, options, progress=progress)
    return model, tokenizer


def load_model(source: str | Path | None = None, options: LoadOptions = LoadOptions(),
               progress: bool = False) -> Loaded:
    """:func:`load` with its options made and checked beforehand; returns the model, its tokenizer
    and a :class:`LoadReport` of what was decided."""
    device, quant, dtype, adapter = options.device, options.quant, options.dtype, options.adapter
    t0 = time.perf_counter()
    keep_freed_heap()  # a prefill reuses its scratch memory instead of faulting it in again (heap.py)
    checkpoint = open_checkpoint(source, options.config, options.matformer, options.mmproj)
    keep = quant == "gguf" or (quant == "auto" and dtype is None and adapter is None and options.on_cpu
                               and bool(checkpoint.packed))
    if keep and quant == "auto" and checkpoint.metadata.get("format") != "gguf":
        # A checkpoint's 16-bit matrices pay only on the kernel: without it every product would
        # widen its matrix first, slower than holding the float32 expansion.
        keep = build.kernel() is not None
    if quant == "gguf" and not checkpoint.packed:
        raise InvalidRequestError(f"{checkpoint.source} has no quantised or 16-bit matrices to keep as stored; "
                                  "--quant gguf needs a quantised .gguf or a bfloat16/float16 checkpoint "
                                  "(or use int8/int4)")
    quantised = quant in ("int8", "int4")
    if quantised and dtype is None:
        dtype = default_compute_dtype(quant, device)  # float32 on the CPU's block kernels
    dtype = dtype or torch.float32
    # int8/int4 from a quantised GGUF: requantise its blocks directly, never building the float model
    via_blocks = quantised and adapter is None and options.on_cpu and bool(checkpoint.packed) and dtype == torch.float32
    if keep or via_blocks:
        build.kernel()  # build (first run only) or load the CPU kernel now, not in the middle of a prefill
    model = build_model(checkpoint, dtype, device, progress=progress, keep_quantised=keep or via_blocks)
    if adapter is not None:
        model = load_adapter(model, adapter)
    if quantised:
        if via_blocks:
            requantize_blocks(model, quant)
        # any float matrices left; an embedding model's table is its decoder's
        model = quantize_model(model, quant, dtype=dtype,
                               embedding_owner=model.decoder if isinstance(model, EmbeddingModel) else None)
    prefill = _set_prefill_dtype(model, options.prefill_dtype, keep or quantised, options.on_cpu)
    _set_activations(model, options.activations)
    decoder = getattr(model, "decoder", model)  # a vision model's language decoder holds the caches
    decoder.kv_int8 = options.kv_cache == "int8"
    if options.compile:
        if isinstance(model, AssistantModel):
            raise InvalidRequestError("--compile covers decoding models; a Gemma 4 assistant drafter runs eagerly")
        if isinstance(model, EmbeddingModel):
            raise InvalidRequestError("--compile covers decoding models; an embedding model runs eagerly")
        if "recurrent" in decoder.config.layer_kinds:
            raise InvalidRequestError("--compile covers attention models; RecurrentGemma runs eagerly")
        decoder.compile_decode()
    return_freed_heap()  # the vocabulary's parsing leaves ~10 MB of freed fragments
    forget_unused_code()  # ~85 MB of libtorch's code ran once, at import; a generation uses ~20 MB
    weights = _kept_format(model) if keep else (quant if quantised else str(model.dtype).removeprefix("torch."))
    report = LoadReport(source=str(checkpoint.source), weights=weights, prefill_dtype=prefill,
                        activations=options.activations,
                        kv_cache="int8" if decoder.kv_int8 else "float", seconds=time.perf_counter() - t0)
    return Loaded(model, checkpoint.tokenizer, report)


def _kept_format(model) -> str:
    """How weights kept as stored are held: "gguf" (quantised blocks), or "bfloat16"/"float16" for a
    checkpoint's 16-bit float matrices on the block kernel (float32 compute)."""
    types = {t for m in model.modules() if isinstance(m, GGMLWeight) for t in m.types}
    plain = {t: str(d).removeprefix("torch.") for d, t in HALF_TYPES.items()}
    if types and types <= set(plain):
        return "+".join(sorted(plain[t] for t in types)) + " (float32 compute)"
    return "gguf"


def settle_for_serving(model) -> int:
    """Move the weights a decode step streams from a file mapping into huge pages now, rather than
    at the model's 32nd decoding step (``GemmaModel.move_weights_to_huge_pages``): for processes
    that wait for input anyway (``serve``, ``chat``), so that no request pays the one-time copy.
    Returns the bytes moved (0 off the CPU, off Linux, or for weights in anonymous memory)."""
    decoder = getattr(model, "decoder", model)  # a vision model's text decoder holds the big weights
    return decoder.move_weights_to_huge_pages() if hasattr(decoder, "move_weights_to_huge_pages") else 0



def _set_activations(model, requested: str) -> None:
    """Apply ``load(activations=...)`` to every GGML-block weight (16-bit ones stay float32)."""
    weights = [m for m in model.modules() if isinstance(m, GGMLWeight)]
    if requested == "int8" and not any(set(w.types) - set(HALF_TYPES.values()) for w in weights):
        raise InvalidRequestError("--activations int8 applies to quantised blocks (a quantised .gguf's, or "
                                  "--quant int8 or int4); this model has none")
    for w in weights:
        w.activations = ggml_ops.ACTIVATIONS[requested]


def _set_prefill_dtype(model, requested: str, quantised: bool, on_cpu: bool) -> str:
    """Apply ``load(prefill_dtype=...)``; returns the dtype the quantised weights' prefill runs in.

    "auto" takes bfloat16 only where it is both fast (native bfloat16 dot products) and small
    against the weights' own error: GGML blocks of 8-bit or fewer codes, which is what
    ``quantised_codes_only`` selects (a 16-bit checkpoint's exact matrices keep float32)."""
    if requested == "float32":
        return "float32"
    if requested == "auto":
        if on_cpu and gemm.bf16_supported() and set_prefill_dtype(model, torch.bfloat16, quantised_codes_only=True):
            return "bfloat16"
        return "float32"
    if not quantised or set_prefill_dtype(model, torch.bfloat16) == 0:
        raise InvalidRequestError("--prefill-dtype bfloat16 applies to quantised weights (a quantised .gguf's "
                                  "blocks, or --quant int8 or int4); for float weights use --dtype bfloat16")
    if on_cpu and not gemm.bf16_supported():
        raise InvalidRequestError("--prefill-dtype bfloat16 needs a CPU with bfloat16 dot products (AVX512_BF16 "
                                  "or AMX), which this one lacks or oneDNN may not use; use --prefill-dtype "
                                  "float32 or auto")
    return "bfloat16"


@dataclass
class Generation:
    """Everything one generate call produced."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)


def _require_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise TokenizerError("this model has no tokenizer; pass token ids or a source with tokenizer files")


def require_generative(model) -> None:
    """Refuse an embedding model where text is to be generated, saying what it is for."""
    if isinstance(model, EmbeddingModel):
        raise InvalidRequestError("this is an embedding model: it makes embeddings (gemmakit embed, "
                                  "gemmakit.embed, /v1/embeddings), not text")


def stream_generation(model: GemmaModel, tokenizer, prompt: str | list[int], max_tokens: int = 256,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                      stop_ids: frozenset[int] | None = None, images: list | None = None,
                      pan_and_scan: bool = False, json_schema=None,
                      grammar: Grammar | CompiledGrammar | None = None,
                      audio: list | None = None, videos: list | None = None) -> Iterator[tuple[str, Generation]]:
    """Yield ``(new_text, generation_so_far)`` as tokens are produced (the engine of the API and CLI).

    ``images`` (paths, bytes or PIL images) need a vision-language model; see gemmakit.vision.
    ``audio`` (paths, bytes or 16 kHz samples) needs a Gemma 4 or Gemma 3n checkpoint with its audio
    tower; ``videos`` (files, bytes or ``[T, H, W, 3]`` uint8 frames) a Gemma 4 model with vision.
    ``json_schema`` (a dict, its JSON text, or a pydantic model class) makes the output one JSON
    value that validates against it; ``grammar`` (a :class:`~gemmakit.engine.grammar.Grammar`:
    a regex, a choice, a Lark or GBNF grammar) constrains it likewise. The generation ends when
    the output is complete.
    """
    require_generative(model)
    if json_schema is not None and grammar is not None:
        raise InvalidRequestError("give json_schema or grammar, not both")
    if json_schema is not None:
        schema = json_schema.model_json_schema() if hasattr(json_schema, "model_json_schema") else json_schema
        grammar = Grammar.json_schema(schema)
    compiled = grammar if isinstance(grammar, CompiledGrammar) else None
    if compiled is None and grammar is not None:  # a bad schema fails before any work
        _require_tokenizer(tokenizer)
        vocab = getattr(model, "decoder", model).config.vocab_size  # a vision model's text decoder
        compiled = GrammarCompiler.for_tokenizer(tokenizer, vocab).compile(grammar)
    # the vision add-on: checks everything before any work
    model, prompt, chunk = prepare_vision(model, tokenizer, prompt, images, pan_and_scan, audio, videos)
    if isinstance(prompt, str):
        _require_tokenizer(tokenizer)
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        prompt_ids = tokenizer.encode(prompt, add_bos=True)
    else:
        prompt_ids = list(prompt)
    if stop_ids is None:
        stop_ids = tokenizer.stop_ids() if tokenizer is not None else frozenset()
    if compiled is not None:  # a complete output may end with an end token
        stop_ids = stop_ids | compiled.eos_ids
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    result = Generation(prompt_ids=prompt_ids)
    decoder = tokenizer.stream_decoder() if tokenizer is not None else None
    for step in generate_steps(model, [prompt_ids], max_tokens, params, stop_ids, grammar=compiled, **chunk):
        token = step.tokens[0]
        result.stats = step.stats
        if token is None:
            break
        result.token_ids.append(token)
        piece = ""
        if decoder is not None and token not in stop_ids:
            piece = decoder.push(token)
        result.text += piece
        if piece:
            yield piece, result
    if decoder is not None:
        tail = decoder.flush()
        result.text += tail
        yield tail, result
    else:
        yield "", result


def generate(model: GemmaModel, tokenizer, prompt: str | list[int], max_tokens: int = 256, **kwargs) -> str:
    """Generate a continuation of ``prompt`` and return it as text.

    ``json_schema=`` (a dict, JSON text or pydantic model class) makes it JSON valid under that
    schema; ``grammar=`` takes any :class:`~gemmakit.engine.grammar.Grammar`. See stream_generation.
    """
    result = Generation(prompt_ids=[])
    for _, result in stream_generation(model, tokenizer, prompt, max_tokens, **kwargs):
        pass
    return result.text


def stream(model: GemmaModel, tokenizer, prompt: str | list[int], max_tokens: int = 256, **kwargs) -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece, never splitting a UTF-8 character."""
    for piece, _ in stream_generation(model, tokenizer, prompt, max_tokens, **kwargs):
        if piece:
            yield piece


def embed(model: EmbeddingModel, tokenizer, texts: str | list[str] | list[list[int]], dim: int | None = None,
          prompt: str | None = None, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """Embed ``texts`` (a string, a list of them, or lists of token ids) with an embedding model:
    a float32 tensor ``[len(texts), dim]`` (``[dim]`` for one string), L2-normalised where the
    model normalises (EmbeddingGemma does), so a dot product is the cosine similarity.

    ``prompt`` names one of the model's task prompts (EmbeddingGemma's "query", "document",
    "classification", ...), put before each text; ``dim`` keeps the first ``dim`` features
    (Matryoshka: EmbeddingGemma is trained for 768, 512, 256 and 128) and normalises again.
    Texts run ``batch_size`` to a forward pass, grouped by length.
    """
    vectors = embed_texts(model, tokenizer, texts, dim=dim, prompt=prompt, batch_size=batch_size)
    return vectors[0] if isinstance(texts, str) else vectors
