"""Gemma's tokenizer: SentencePiece BPE with byte fallback, from a GGUF vocab, tokenizer.model or tokenizer.json.

We never run BPE ourselves. A GGUF stores the SentencePiece vocabulary (pieces, scores, types), so
we rebuild the ``ModelProto`` it came from and hand it to ``SentencePieceProcessor``; a
``tokenizer.json`` is run by the ``tokenizers`` library. What we add on top is small:

- **Special tokens in text.** SentencePiece never matches CONTROL pieces (``<start_of_turn>``,
  ``<bos>`` ...) in input text, but chat prompts contain them as text, and transformers and
  llama.cpp map them to their ids. So text is split on special-token strings first and only the
  pieces between them go to the BPE. (USER_DEFINED pieces such as ``\\n\\n`` or ``<table>``
  SentencePiece already matches atomically on its own.)
- **Decoding** is a table lookup (piece -> UTF-8 bytes, ``<0xNN>`` pieces -> one byte) followed by
  one UTF-8 decode. Streaming uses the same table with Python's incremental UTF-8 decoder, which
  holds back an incomplete multi-byte sequence instead of emitting U+FFFD, so the concatenated
  stream always equals :meth:`Tokenizer.decode` and each token costs O(1).
"""

from __future__ import annotations

import codecs
import json
import re
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sentencepiece as spm

from gemmakit.chat.template import pick_template, template_from_directory
from gemmakit.errors import ModelNotFoundError, TokenizerError
from gemmakit.io import read_json_object
from gemmakit.kernels import build

if TYPE_CHECKING:
    from gemmakit.checkpoints.gguf_reader import GGUFFile

# SentencePiece piece types (sentencepiece_model.proto); GGUF's token_type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_NOT_TEXT = frozenset({UNKNOWN, CONTROL, UNUSED})  # pieces that never stand for text of their own

_SPACE = "\u2581"  # SentencePiece writes a space as '▁'
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# A USER_DEFINED piece "looks special" (rather than like <table> or "\n\n") when it is <|...|> or
# has an underscore: <start_of_image>, <image_soft_token>, <|fim_prefix|>, <|file_separator|>.
_SPECIAL_LOOKING = re.compile(r"<\|[^<>\s]+\|>|<[^<>\s]*_[^<>\s]*>")
# Almost every special token is <...> without spaces; those are found with one cheap pattern and a
# dict lookup (6k alternatives like <unused123> in one regex would cost ~130 ms to compile and
# ~10 µs per '<' in the text). Any other special strings get literal alternatives, longest first.
_ANGLE = re.compile(r"<[^<>\s]+>")
# Gemma's end-of-turn (Gemma 4's is "<turn|>"); CodeGemma's end-of-file; the tokens a model
# writes after a tool call to hand over to the tool (Gemma 4's, FunctionGemma's)
_STOP_PIECES = ("<end_of_turn>", "<turn|>", "<|file_separator|>", "<|tool_response>", "<start_function_response>")


class Tokenizer:
    """Text <-> token ids for Gemma models; build it with one of the ``from_*`` constructors."""

    def __init__(self, *, pieces: Sequence[str], types: Sequence[int], encode_plain: Callable[[str], list[int]],
                 bos_id: int, eos_id: int, pad_id: int, unk_id: int | None = None,
                 model_proto: Callable[[], bytes] | None = None, tokenizer_json: Callable[[], str] | None = None,
                 source: str = "") -> None:
        """Use the ``from_*`` classmethods; this takes an already-consistent vocabulary and backend."""
        self.vocab_size = len(pieces)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.source = source
        # The checkpoint's Jinja chat template (gemmakit.chat renders it), None where it ships none;
        # the from_* constructors read it from the same GGUF or directory as the vocabulary.
        self.chat_template: str | None = None
        self._pieces = pieces
        self._types = bytes(types)  # SentencePiece's piece types are 1..6: a byte each, not a list of ints
        self._encode_plain = encode_plain
        self._model_proto = model_proto
        self._tokenizer_json = tokenizer_json
        self._piece_ids: dict[str, int | None] = {}  # token_to_id's answers so far
        self._surface: dict[int, bytes] = {}  # id -> the UTF-8 bytes it decodes to (filled lazily)

        special: dict[str, int] = {}
        # numpy finds the few thousand non-normal pieces; Python only looks at those
        for i in np.flatnonzero(~np.isin(np.frombuffer(self._types, np.uint8), (NORMAL, BYTE))).tolist():
            piece, kind = pieces[i], self._types[i]
            if piece and (kind in _NOT_TEXT or (kind == USER_DEFINED and _SPECIAL_LOOKING.fullmatch(piece))):
                special.setdefault(piece, i)
        self._special_by_text = special
        self._special_ids = frozenset(special.values())
        self._special_re = _special_pattern(special)

    # --- vocabulary -----------------------------------------------------------------------------

    def token_to_id(self, piece: str) -> int | None:
        """Id of a vocabulary piece (``'▁the'``; a space may be written as a space), or None."""
        found = self._lookup(piece)
        if found is None and " " in piece:
            found = self._lookup(piece.replace(" ", _SPACE))
        return found

    def _lookup(self, piece: str) -> int | None:
        """The first id spelt ``piece``. Looked up by a scan of the vocabulary (a few ms for 262k
        pieces) and remembered, rather than through a dict of every piece, which would cost ~14 MB
        for the handful of lookups a run makes (stop tokens, FIM markers)."""
        if piece in self._piece_ids:
            return self._piece_ids[piece]
        found = self._special_by_text.get(piece)  # the same first id, without the scan
        if found is None:
            try:
                found = self._pieces.index(piece)
            except ValueError:
                found = None
        self._piece_ids[piece] = found
        return found

    def id_to_piece(self, i: int) -> str:
        """The vocabulary piece of id ``i`` as SentencePiece spells it (spaces as '▁')."""
        self._check_id(i)
        return self._pieces[i]

    def special_id(self, text: str) -> int | None:
        """The id of the special token spelt ``text`` (``<|tool_call>``), or None where there is none."""
        return self._special_by_text.get(text)

    def is_special(self, i: int) -> bool:
        """True for control tokens (``<bos>``, ``<start_of_turn>`` ...), which decode(skip_special=True) drops."""
        return i in self._special_ids

    def stop_ids(self) -> frozenset[int]:
        """Ids that end a generation: ``<eos>`` plus end-of-turn / end-of-file tokens when present."""
        ids = {self.eos_id} if self.eos_id >= 0 else set()
        for piece in _STOP_PIECES:
            i = self._special_by_text.get(piece)
            if i is None:
                i = self.token_to_id(piece)
            if i is not None:
                ids.add(i)
        return frozenset(ids)

    # --- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it (``<start_of_turn>``) become their ids."""
        if add_bos and self.bos_id < 0:
            raise TokenizerError(f"{self.source or 'this tokenizer'} has no <bos> token; encode with add_bos=False")
        ids = [self.bos_id] if add_bos else []
        pos = 0
        if self._special_re is not None:
            for m in self._special_re.finditer(text):
                special = self._special_by_text.get(m.group())
                if special is None:  # <something> that is not a token of ours: plain text
                    continue
                if m.start() > pos:
                    ids += self._encode_plain(text[pos:m.start()])
                ids.append(special)
                pos = m.end()
        if pos < len(text):
            ids += self._encode_plain(text[pos:] if pos else text)
        return ids

    # --- decoding -------------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``; special tokens appear as their strings unless ``skip_special``."""
        surface = self._surface_bytes
        return b"".join([surface(int(i), skip_special) for i in ids]).decode("utf-8", "replace")

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes id ``i`` decodes to (one byte for a ``<0xNN>`` piece; a special token's
        own string), as grammar masks match tokens against text (engine/grammar.py)."""
        return self._surface_bytes(int(i), False)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """A decoder that turns ids pushed one at a time into text, never splitting a character."""
        return StreamDecoder(self, skip_special)

    def _surface_bytes(self, i: int, skip_special: bool) -> bytes:
        if skip_special and i in self._special_ids:
            return b""
        out = self._surface.get(i)
        if out is None:
            self._check_id(i)
            piece, kind = self._pieces[i], self._types[i]
            m = _BYTE_PIECE.fullmatch(piece) if kind == BYTE else None
            out = bytes([int(m.group(1), 16)]) if m else piece.replace(_SPACE, " ").encode("utf-8")
            self._surface[i] = out
        return out

    def _check_id(self, i: int) -> None:
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        """Rebuild the SentencePiece model a GGUF's ``tokenizer.ggml.*`` metadata was made from."""
        m = gguf.metadata
        kind = m.get("tokenizer.ggml.model", "llama")
        if kind == "gemma4":
            return cls._from_gguf_bpe(gguf)
        if kind != "llama":  # llama.cpp's name for SentencePiece vocabularies
            raise TokenizerError(f"{gguf.path}: tokenizer type {kind!r} is neither SentencePiece ('llama') nor "
                                 "Gemma 4's BPE ('gemma4'), the vocabularies gemmakit runs")
        pieces = m.get("tokenizer.ggml.tokens")
        if not pieces:
            raise TokenizerError(f"{gguf.path}: GGUF has no tokenizer.ggml.tokens vocabulary")
        n = len(pieces)
        scores = _column(m, "tokenizer.ggml.scores", n, gguf.path)
        types = _column(m, "tokenizer.ggml.token_type", n, gguf.path)
        scores = scores.tolist() if scores is not None else [float(-i) for i in range(n)]
        types = [t if 1 <= t <= 6 else NORMAL for t in types.tolist()] if types is not None else [NORMAL] * n
        # llama.cpp's converter writes USER_DEFINED whitespace pieces with real spaces ("  ");
        # SentencePiece matches them after escaping, so they must be spelt with '▁' again.
        pieces = [p.replace(" ", _SPACE) if t == USER_DEFINED and " " in p else p for p, t in zip(pieces, types)]

        def special_id(key: str, piece: str) -> int:
            value = m.get(f"tokenizer.ggml.{key}_token_id")
            if value is None and piece in pieces[:1024]:
                value = pieces.index(piece)
            return int(value) if value is not None and 0 <= int(value) < n else -1

        unk = special_id("unknown", "<unk>")
        if unk >= 0 and UNKNOWN not in types[:1024] and types[unk] == CONTROL:
            types[unk] = UNKNOWN  # Gemma's own tokenizer.model marks <unk> UNKNOWN; some GGUFs say CONTROL
        spec = dict(bos=(special_id("bos", "<bos>"), "<bos>"), eos=(special_id("eos", "<eos>"), "<eos>"),
                    pad=(special_id("padding", "<pad>"), "<pad>"), unk=(unk, "<unk>"),
                    add_dummy_prefix=bool(m.get("tokenizer.ggml.add_space_prefix", False)))  # Gemma: False
        tokenizer = cls._compact(pieces, scores, types, spec, source=str(gguf.path))
        if tokenizer is None:
            tokenizer = cls._from_proto(build_model_proto(pieces, scores, types, **spec), source=str(gguf.path),
                                        types=types)
        tokenizer.chat_template = pick_template(m.get("tokenizer.chat_template"))
        return tokenizer

    @classmethod
    def _from_gguf_bpe(cls, gguf: GGUFFile) -> Tokenizer:
        """Gemma 4's vocabulary as llama.cpp stores it (``tokenizer.ggml.model`` "gemma4"): BPE merges
        over the whole text with spaces written as '▁' and byte fallback, SentencePiece-style (what
        its tokenizer.json says too), run by the ``tokenizers`` library."""
        # optional: only Gemma 4's GGUF vocabulary needs it
        from tokenizers import AddedToken, decoders, models, normalizers
        from tokenizers import Tokenizer as HFTokenizer

        m = gguf.metadata
        pieces = list(m.get("tokenizer.ggml.tokens") or [])
        merges_text = m.get("tokenizer.ggml.merges")
        if not pieces or merges_text is None:
            raise TokenizerError(f"{gguf.path}: a gemma4 vocabulary needs tokenizer.ggml.tokens and .merges")
        n = len(pieces)
        types = _column(m, "tokenizer.ggml.token_type", n, gguf.path)
        types = [t if 1 <= t <= 6 else NORMAL for t in types.tolist()] if types is not None else [NORMAL] * n
        merges = []
        for merge in merges_text:  # "a b"; the split is at the first space after the first character, as llama.cpp does
            cut = merge.find(" ", 1)
            if cut > 0:
                merges.append((merge[:cut], merge[cut + 1:]))
        unk = next((p for p, t in zip(pieces, types) if t == UNKNOWN), None)
        hf = HFTokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token=unk,
                                    fuse_unk=True, byte_fallback=True))
        hf.normalizer = normalizers.Replace(" ", _SPACE)
        hf.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
        hf.add_special_tokens([AddedToken(p, special=True, normalized=False)
                               for p, t in zip(pieces, types) if t == CONTROL])
        hf.add_tokens([AddedToken(p, normalized=False) for p, t in zip(pieces, types) if t == USER_DEFINED])

        def special_id(key: str, piece: str) -> int:
            value = m.get(f"tokenizer.ggml.{key}_token_id")
            if value is None:
                value = hf.token_to_id(piece)
            return int(value) if value is not None and 0 <= int(value) < n else -1

        tokenizer = cls(pieces=pieces, types=types, encode_plain=lambda text: hf.encode(text, add_special_tokens=False).ids,
                        bos_id=special_id("bos", "<bos>"), eos_id=special_id("eos", "<eos>"),
                        pad_id=special_id("padding", "<pad>"),
                        unk_id=pieces.index(unk) if unk is not None else None, tokenizer_json=hf.to_str,
                        source=str(gguf.path))
        tokenizer.chat_template = pick_template(m.get("tokenizer.chat_template"))
        return tokenizer

    @classmethod
    def _compact(cls, pieces: list[str], scores: list[float], types: list[int], spec: dict,
                 source: str) -> Tokenizer | None:
        """The vocabulary on the CPU kernel's BPE encoder (kernels/csrc/bpe.h): SentencePiece's
        algorithm and ids in ~9 MB where its processor holds ~43 MB. None where the kernel is
        unavailable or the vocabulary is one it does not take (a dummy-prefix space, no single
        unknown piece, missing byte pieces): SentencePiece itself then runs it, or refuses it."""
        if spec["add_dummy_prefix"] or types.count(UNKNOWN) != 1:
            return None
        ext = build.kernel()
        if ext is None:
            return None
        unk = types.index(UNKNOWN)  # SentencePiece's unk_id: the UNKNOWN piece
        type_bytes, n = bytes(types), len(pieces)
        try:
            vocab = ext.BPEVocab(pieces, scores, type_bytes, unk)
        except ValueError:
            return None
        score_array = np.asarray(scores, dtype=np.float32)

        def model_proto() -> bytes:  # for save_pretrained and GGUF export: rebuilt when asked for
            return build_model_proto([vocab.piece(i) for i in range(n)], score_array.tolist(), list(type_bytes), **spec)

        def special(given: tuple[int, str]) -> int:
            return _special_id(given[0], given[1], vocab.piece_to_id, unk)

        return cls(pieces=_VocabularyPieces(vocab.piece, vocab.piece_to_id, n), types=type_bytes,
                   encode_plain=vocab.encode,
                   bos_id=special(spec["bos"]), eos_id=special(spec["eos"]), pad_id=special(spec["pad"]), unk_id=unk,
                   model_proto=model_proto, source=source)

    @classmethod
    def from_sentencepiece_file(cls, path: str | Path) -> Tokenizer:
        """Load a SentencePiece ``tokenizer.model`` (the file Gemma checkpoints ship), with the chat
        template of the directory it is in."""
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such tokenizer.model file")
        tokenizer = cls._from_proto(path.read_bytes(), source=str(path))
        tokenizer.chat_template = template_from_directory(path.parent)
        return tokenizer

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face ``tokenizer.json`` with the ``tokenizers`` library, with the chat
        template of the directory it is in."""
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such tokenizer.json file")
        try:
            from tokenizers import Tokenizer as HFTokenizer  # optional: only tokenizer.json needs it
        except ImportError:
            raise TokenizerError(f"{path}: reading tokenizer.json needs the tokenizers package; "
                                 "run `pip install tokenizers`") from None
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({_first_line(e)})") from None
        n = hf.get_vocab_size(with_added_tokens=True)
        pieces = [""] * n
        for piece, i in hf.get_vocab(with_added_tokens=True).items():
            if 0 <= i < n:
                pieces[i] = piece
        types = [BYTE if p.startswith("<0x") and _BYTE_PIECE.fullmatch(p) else NORMAL for p in pieces]
        for i, added in hf.get_added_tokens_decoder().items():
            if 0 <= i < n:
                types[i] = CONTROL if added.special else USER_DEFINED
        config = read_json_object(path.parent / "tokenizer_config.json")

        def special_id(name: str, default: str) -> int:
            piece = config.get(f"{name}_token", default)
            piece = piece.get("content", default) if isinstance(piece, dict) else piece
            found = hf.token_to_id(piece) if isinstance(piece, str) else None
            return -1 if found is None else found

        def encode_plain(text: str) -> list[int]:
            return hf.encode(text, add_special_tokens=False).ids

        unk = special_id("unk", "<unk>")
        tokenizer = cls(pieces=pieces, types=types, encode_plain=encode_plain, bos_id=special_id("bos", "<bos>"),
                        eos_id=special_id("eos", "<eos>"), pad_id=special_id("pad", "<pad>"),
                        unk_id=unk if unk >= 0 else None, tokenizer_json=hf.to_str, source=str(path))
        tokenizer.chat_template = template_from_directory(path.parent)
        return tokenizer

    @classmethod
    def from_directory(cls, path: str | Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint directory: tokenizer.model, else tokenizer.json, else None."""
        path = Path(path)
        if not path.is_dir():
            raise ModelNotFoundError(f"{path}: no such checkpoint directory")
        if (path / "tokenizer.model").is_file():
            return cls.from_sentencepiece_file(path / "tokenizer.model")
        if (path / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(path / "tokenizer.json")
        return None

    @classmethod
    def _from_proto(cls, proto: bytes, source: str, types: list[int] | None = None) -> Tokenizer:
        """Load a serialized ModelProto; ``types`` (its pieces' types) may be passed when already known."""
        pb = model_pb2()
        try:
            if types is None:
                types = [p.type for p in pb.ModelProto.FromString(proto).pieces]
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(proto)
        except Exception as e:  # protobuf DecodeError / sentencepiece's RuntimeError
            raise TokenizerError(f"{source}: not a valid SentencePiece model ({_first_line(e)})") from None

        def special_id(sp_id: int, piece: str) -> int:
            return _special_id(sp_id, piece, sp.piece_to_id, sp.unk_id())

        unk = sp.unk_id()
        return cls(pieces=_VocabularyPieces(sp.id_to_piece, sp.piece_to_id, sp.get_piece_size()), types=types,
                   encode_plain=sp.encode,
                   bos_id=special_id(sp.bos_id(), "<bos>"), eos_id=special_id(sp.eos_id(), "<eos>"),
                   pad_id=special_id(sp.pad_id(), "<pad>"), unk_id=unk if unk >= 0 else None,
                   model_proto=sp.serialized_model_proto, source=source)

    # --- saving ---------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write tokenizer.model (or tokenizer.json) plus the configs transformers' AutoTokenizer reads."""
        if self._model_proto is None and self._tokenizer_json is None:
            raise TokenizerError("this tokenizer has no tokenizer.model or tokenizer.json to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._model_proto is not None:
            (directory / "tokenizer.model").write_bytes(self._model_proto())
        elif self._tokenizer_json is not None:
            (directory / "tokenizer.json").write_text(self._tokenizer_json(), encoding="utf-8")
        named = {name: self._pieces[i] for name, i in
                 (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id),
                  ("unk_token", self.unk_id if self.unk_id is not None else -1)) if 0 <= i < self.vocab_size}
        if self.token_to_id("<mask>") is not None:
            named["mask_token"] = "<mask>"
        # No "additional_special_tokens": transformers then takes every CONTROL and USER_DEFINED piece
        # of tokenizer.model as an added token, which is exactly how we split text.
        special_map: dict[str, Any] = dict(named)
        config: dict[str, Any] = {
            "tokenizer_class": "GemmaTokenizer",
            **special_map,
            "add_bos_token": True,  # Gemma prompts start with <bos>; encode(add_bos=...) is explicit here
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "padding_side": "left",
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                         encoding="utf-8")
        (directory / "special_tokens_map.json").write_text(
            json.dumps(special_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


class _VocabularyPieces(Sequence[str]):
    """A vocabulary's pieces as a read-only sequence over its encoder's own copy (a SentencePiece
    processor or the kernel's BPE vocabulary): a Python list of Gemma's 262k pieces beside it would
    cost another ~22 MB."""

    def __init__(self, piece_of: Callable[[int], str], id_of: Callable[[str], int], size: int) -> None:
        self._piece_of, self._id_of, self._n = piece_of, id_of, size

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._piece_of(i % self._n)

    def index(self, piece: str, *args) -> int:  # type: ignore[override]
        """The id spelt ``piece`` (both encoders refuse a vocabulary that spells two pieces alike)."""
        i = self._id_of(piece)
        if not 0 <= i < self._n or self._piece_of(i) != piece:
            raise ValueError(f"{piece!r} is not in the vocabulary")
        return i


class StreamDecoder:
    """Turns generated ids into text as they arrive, emitting only complete characters.

    Byte-fallback tokens spell a character over several ids (😀 = <0xF0><0x9F><0x98><0x80>); the
    incremental UTF-8 decoder keeps the unfinished bytes until the character is complete, so no
    U+FFFD from a split sequence ever reaches the caller and ``"".join(pushes) + flush()`` equals
    ``decode(ids)``. Each push costs one table lookup.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often all of it, '' mid-character)."""
        return self._utf8.decode(self._tokenizer._surface_bytes(int(token_id), self._skip_special))

    def flush(self) -> str:
        """Return what is still held back (an unfinished byte sequence becomes U+FFFD) and reset."""
        tail = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return tail


def build_model_proto(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                      bos: tuple[int, str], eos: tuple[int, str], pad: tuple[int, str], unk: tuple[int, str],
                      add_dummy_prefix: bool = False) -> bytes:
    """Serialize a SentencePiece BPE ModelProto configured the way Gemma's tokenizer.model is.

    Gemma: byte fallback on, no dummy-prefix space, whitespace escaped to '▁' and never collapsed,
    identity normalisation (no NFKC). The trainer-spec split flags only matter for training but are
    set to Gemma's values so that the saved file reads like the original.
    """
    pb = model_pb2()
    model = pb.ModelProto()
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = True
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.split_by_whitespace = True
    spec.treat_whitespace_as_suffix = False
    spec.unk_id, spec.unk_piece = unk[0], _piece_or(pieces, unk)
    spec.bos_id, spec.bos_piece = bos[0], _piece_or(pieces, bos)
    spec.eos_id, spec.eos_piece = eos[0], _piece_or(pieces, eos)
    spec.pad_id, spec.pad_piece = pad[0], _piece_or(pieces, pad)
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_dummy_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    # Serialised protobuf messages concatenate into their merge, so the 262k pieces are written
    # straight to wire format rather than built as Python protobuf objects first (which cost ~35 MB
    # of peak memory and most of a second for Gemma's vocabulary).
    return _piece_records(pieces, scores, types) + model.SerializeToString()


def model_pb2():
    """SentencePiece's protobuf messages (``ModelProto``), imported on first use: the protobuf
    runtime takes tens of ms to import, and a GGUF's vocabulary on the CPU kernel's encoder never
    needs it (only tokenizer.model files, the torch fallback and writing a model do)."""
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _piece_records(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> bytes:
    """``ModelProto.pieces`` (field 1) in protobuf wire format: one length-delimited
    ``SentencePiece {1: piece (string), 2: score (float32), 3: type (enum)}`` per entry."""
    pack_score = struct.Struct("<f").pack
    out = bytearray()
    for piece, score, kind in zip(pieces, scores, types):
        text = piece.encode()
        body = b"\x0a" + _varint(len(text)) + text + b"\x15" + pack_score(score) + b"\x18" + _varint(int(kind))
        out += b"\x0a" + _varint(len(body)) + body
    return bytes(out)


def _special_id(given: int, piece: str, piece_to_id: Callable[[str], int], unk: int) -> int:
    """A special token's id as SentencePiece resolves it: the one the model names, else the id of
    its usual piece (``<bos>``...), else -1 (a lookup that lands on ``<unk>`` found nothing)."""
    if given >= 0:
        return given
    found = piece_to_id(piece)
    return found if found != unk or piece == "<unk>" else -1


def _piece_or(pieces: Sequence[str], special: tuple[int, str]) -> str:
    i, default = special
    return pieces[i] if 0 <= i < len(pieces) else default


def _special_pattern(special: dict[str, int]) -> re.Pattern[str] | None:
    """One regex finding candidate special-token strings; candidates are confirmed by dict lookup."""
    if not special:
        return None
    angle = [s for s in special if _ANGLE.fullmatch(s)]
    other = sorted((s for s in special if not _ANGLE.fullmatch(s)), key=len, reverse=True)
    parts = [re.escape(s) for s in other]
    if angle:
        parts.append(rf"<[^<>\s]{{1,{max(map(len, angle)) - 2}}}>")
    return re.compile("|".join(parts))


def _column(metadata: dict[str, Any], key: str, n: int, path: Path) -> Any:
    """A per-token numeric array from GGUF metadata, checked to have one entry per token."""
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.shape != (n,):
        got = len(value) if hasattr(value, "__len__") else 1
        raise TokenizerError(f"{path}: {key} has {got} entries but the vocabulary has {n} tokens")
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
