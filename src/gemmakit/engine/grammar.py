"""Constrained decoding: a grammar (JSON schema, regex, choice list, Lark or GBNF) as a token mask per row.

The work is llguidance's (Microsoft's Rust library behind Guidance, also a vLLM backend). It
was chosen over xgrammar because its wheel depends on nothing (xgrammar's pulls in torch's
triton and transformers at run time), it compiles a JSON schema lazily in about a millisecond
instead of ahead of time, it implements regex ``pattern`` and ``format`` in JSON schemas with its
own lexer (where Ollama's schema-to-grammar step breaks), and its mask computation releases the
GIL, so it runs on a thread while the forward pass runs.

The pieces, in the order a request meets them:

- :class:`Grammar`: what the output must match (data: a frozen kind and source text).
- :class:`GrammarCompiler` (one per tokenizer): checks a grammar against the vocabulary and
  gives a :class:`CompiledGrammar`; a bad schema or pattern is an :class:`InvalidRequestError`.
- :class:`GrammarMatcher` (one per sequence): where that sequence is in its grammar; the engine
  advances it with every sampled token and finishes the sequence when the grammar is complete.
- :func:`start_masks` computes the next-token masks of many matchers on a worker thread (while
  the forward pass runs); :func:`apply_mask` sets a row's disallowed logits to -inf.

The engine knows grammars only as these objects: nothing here knows of HTTP or of OpenAI's fields.
"""

from __future__ import annotations

import json
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gemmakit.errors import InvalidRequestError

KINDS = ("json_schema", "regex", "choice", "lark")
_NAMES = {"json_schema": "JSON schema", "regex": "regex", "choice": "choice", "lark": "grammar"}

# One line of JSON as json.dumps writes it. llguidance's default allows any whitespace between
# tokens, and a small model, once it starts emitting newlines inside an object, can keep going
# until max_tokens: fixed separators end that, and cost nothing a JSON reader notices.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(InvalidRequestError):
    """A grammar that cannot be compiled (a bad schema, pattern or rule), or a token it refused."""


@dataclass(frozen=True)
class Grammar:
    """What a generation must match. ``source`` is JSON text for ``json_schema`` and ``choice``,
    a pattern for ``regex`` (the whole output matches it; ``\\d`` and ``\\w`` are ASCII), a Lark
    or GBNF grammar for ``lark``.

    ``lenient`` (JSON schema): ignore keywords llguidance does not implement instead of refusing
    the schema; OpenAI's non-strict ``json_schema`` is served this way.
    """

    kind: str
    source: str
    lenient: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; use one of {', '.join(KINDS)}")

    @classmethod
    def json_schema(cls, schema: Any, lenient: bool = False) -> Grammar:
        """A JSON schema given as a dict (or bool) or as its JSON text; ``{"type": "object"}`` is any object."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON ({exc})") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema is an object (or true/false), got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema), lenient)

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str]) -> Grammar:
        """Exactly one of ``options``."""
        if not options or not all(isinstance(o, str) for o in options):
            raise GrammarError("a choice is a non-empty list of strings")
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """A context-free grammar in Lark syntax (llguidance's) or llama.cpp's GBNF."""
        return cls("lark", text)


class CompiledGrammar:
    """A grammar checked against one vocabulary; :meth:`matcher` gives each sequence its own state."""

    def __init__(self, grammar: Grammar, pristine, eos_ids: frozenset[int], mask_words: int) -> None:
        self.grammar = grammar
        self._pristine = pristine  # an LLMatcher at the start, copied per sequence, never advanced
        self.eos_ids = eos_ids  # the tokens that end a complete output (the tokenizer's stop ids)
        self.mask_words = mask_words  # int32 words of one row's bit mask

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._pristine.deep_copy(), self)


class GrammarMatcher:
    """One sequence's place in its grammar: which tokens may come next, and whether it is complete."""

    def __init__(self, matcher, compiled: CompiledGrammar) -> None:
        self._m = matcher
        self.compiled = compiled

    def advance(self, token: int) -> None:
        """Take the sampled ``token``; a token the mask did not allow is a :class:`GrammarError`."""
        if not self._m.consume_token(int(token)):
            raise GrammarError(f"the grammar refused token {token}: {self._m.get_error()}")

    @property
    def finished(self) -> bool:
        """True once nothing but an end token may follow (a JSON value closed): the sequence ends."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        """True when the output so far is complete (an end token may come next)."""
        return self._m.is_accepting()


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


class GrammarCompiler:
    """Compiles grammars for one tokenizer. Building llguidance's view of a 262k vocabulary takes
    about a second, so there is one per tokenizer (:meth:`for_tokenizer`), built on first use."""

    def __init__(self, tokenizer, vocab_size: int | None = None) -> None:
        import llguidance  # ~50 ms, paid by the first grammar, not by every start of the CLI

        self._llg = llguidance
        n_vocab = max(vocab_size or 0, tokenizer.vocab_size)  # a model's padded rows: never allowed
        special = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
        tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        for i in special:  # llguidance's mark for a token no text spells (<start_of_turn>, <eos>)
            tokens[i] = b"\xff" + tokens[i]
        self.eos_ids = frozenset(tokenizer.stop_ids())
        self.mask_words = (n_vocab + 31) // 32
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer, tokens, special)),
                                                n_vocab=n_vocab, eos_token=sorted(self.eos_ids))

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int | None = None) -> GrammarCompiler:
        """The shared compiler of ``tokenizer`` (built once; safe from any thread)."""
        with _compilers_lock:
            found = _compilers.get(tokenizer)
            if found is None or vocab_size is not None and found.mask_words < (vocab_size + 31) // 32:
                found = _compilers[tokenizer] = cls(tokenizer, vocab_size)
            return found

    def compile(self, grammar: Grammar) -> CompiledGrammar:
        """``grammar`` checked and ready for matchers; a :class:`GrammarError` says what is wrong with it."""
        llg = self._llg
        try:
            if grammar.kind == "json_schema":
                text = llg.LLMatcher.grammar_from_json_schema(
                    grammar.source, defaults={**JSON_OPTIONS, "lenient": grammar.lenient})
            elif grammar.kind == "regex":  # \d and \w as ASCII, as in a JSON schema's "pattern"
                text = llg.LLMatcher.grammar_from_lark(f"start: /{llg.regex_to_lark(grammar.source, 'dw')}/")
            else:
                text = llg.grammar_from({"lark": "gbnf"}.get(grammar.kind, grammar.kind), grammar.source)
        except ValueError as exc:
            raise GrammarError(f"the {_NAMES[grammar.kind]} is not valid: {_one_line(exc)}") from None
        matcher = llg.LLMatcher(self.tokenizer, text, log_level=0)  # releases the GIL while it builds
        if matcher.is_error():
            raise GrammarError(f"the {_NAMES[grammar.kind]} is not valid: {_one_line(matcher.get_error())}")
        return CompiledGrammar(grammar, matcher, self.eos_ids, self.mask_words)


class _Vocabulary:
    """The tokenizer as llguidance's ``TokenizerWrapper`` reads it: bytes per id, the special ids,
    and an encoder it calls on text it needs tokenised (the forced start of a JSON key, say)."""

    def __init__(self, tokenizer, tokens: list[bytes], special: list[int]) -> None:
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
        self.tokens = tokens
        self.special_token_ids = special
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


# --- masks ----------------------------------------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_executor = None
_pool_lock = threading.Lock()


def _workers():
    global _pool, _executor
    with _pool_lock:
        if _pool is None:
            import llguidance

            # one Python thread that waits on llguidance's own threads, which split the rows
            _pool = ThreadPoolExecutor(1, thread_name_prefix="gemmakit-grammar")
            _executor = llguidance.LLExecutor()
        return _pool, _executor


def fill_masks(matchers: list[GrammarMatcher]) -> np.ndarray:
    """The next-token bit masks of ``matchers`` -> ``[len(matchers), words]`` int32 (bit t of row i:
    token t allowed for matcher i), computed by llguidance's threads without the GIL."""
    words = max(m.compiled.mask_words for m in matchers)
    masks = np.zeros((len(matchers), words), dtype=np.int32)
    _, executor = _workers()
    executor.unsafe_compute_mask_ptr([(m._m, i) for i, m in enumerate(matchers)], masks.ctypes.data,
                                     words * 4, len(matchers))
    return masks


def start_masks(matchers: list[GrammarMatcher]) -> Future:
    """:func:`fill_masks` on the worker thread: call it just before the forward pass, and the masks
    are computed while the model runs (both release the GIL); ``.result()`` when sampling."""
    pool, _ = _workers()
    return pool.submit(fill_masks, matchers)


def apply_mask(logits: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """``logits [V]`` with every token ``mask`` (one row of :func:`fill_masks`) disallows at -inf (a new tensor).

    On the CPU one masked copy into a row of -inf (~0.1-0.3 ms for 262k logits on a shared
    2-core VM, where the gather of the allowed indices cost up to 2 ms on wide masks and
    torch's masked_fill up to 20 ms while other threads held the cores).
    """
    vocab = logits.shape[-1]
    allowed = np.unpackbits(mask.view(np.uint8), count=vocab, bitorder="little").view(np.bool_)
    if not allowed.any():  # a matcher in an error state allows nothing; sampling would pick at random
        raise GrammarError("the grammar allows no next token")
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        out = np.full(vocab, -np.inf, dtype=np.float32)
        np.copyto(out, logits.numpy(), where=allowed)
        return torch.from_numpy(out)
    keep = torch.from_numpy(allowed).to(logits.device)
    return logits.masked_fill(~keep, float("-inf"))


def _one_line(message: Any, limit: int = 500) -> str:
    """llguidance's message (a regex error spans several lines) on one line, as errors are reported."""
    text = " ".join(str(message).split()) or "unknown error"
    return text if len(text) <= limit else text[:limit - 3] + "..."
