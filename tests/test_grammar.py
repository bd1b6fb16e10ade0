"""Constrained decoding (engine/grammar.py): grammars compile or fail with one line, and every
output of a constrained row matches its grammar, in the batching engine beside free rows and in
the single-request path, greedy and sampled.

A tiny random model has no idea of JSON, which is the point: whatever it would say, the mask
makes it valid. Its vocabulary is letters, a few merges and the 256 byte tokens.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import pytest

jsonschema = pytest.importorskip("jsonschema")

from tiny import random_model, tiny_config, write_gguf  # noqa: E402

import gemmakit  # noqa: E402
from gemmakit.engine.grammar import Grammar, GrammarCompiler, GrammarError  # noqa: E402
from gemmakit.engine.sampling import SamplingParams  # noqa: E402
from gemmakit.engine.scheduler import Engine, Request  # noqa: E402
from gemmakit.errors import InvalidRequestError  # noqa: E402

SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["name", "n", "kind", "tags", "inner"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "n": {"type": "integer", "minimum": -5, "maximum": 40},
        "kind": {"enum": ["cat", "dog", 3]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-c]{1,3}$"}, "minItems": 1,
                 "maxItems": 3},
        "inner": {"type": "object", "required": ["ok", "x"], "additionalProperties": False,
                  "properties": {"ok": {"type": "boolean"},
                                 "x": {"type": "number", "exclusiveMinimum": 0, "maximum": 2,
                                       "multipleOf": 0.01}}},
    },
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    path = write_gguf(tmp_path_factory.mktemp("grammar") / "tiny.gguf",
                      random_model(tiny_config("gemma3", max_position_embeddings=512)))
    model, tokenizer = gemmakit.load(path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def engine(tiny):
    _, model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=6, prefill_chunk=16)
    yield engine
    engine.shutdown()


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t not in tokenizer.stop_ids()])


def test_bad_grammars_are_one_line_errors(tiny):
    _, model, tokenizer = tiny
    compiler = GrammarCompiler.for_tokenizer(tokenizer, model.config.vocab_size)
    assert GrammarCompiler.for_tokenizer(tokenizer) is compiler  # built once per tokenizer
    for grammar, words in [(Grammar.regex("a(b"), "regex is not valid"),
                           (Grammar.json_schema({"type": "strng"}), "JSON schema is not valid"),
                           (Grammar.lark("start: missing_rule"), "grammar is not valid"),
                           (Grammar.json_schema({"type": "string", "format": "no-such-format"}), "format")]:
        with pytest.raises(GrammarError) as caught:
            compiler.compile(grammar)
        assert words in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
        assert isinstance(caught.value, InvalidRequestError)  # the server answers it with a 400
    for bad in ("{not json", "[1, 2]"):
        with pytest.raises(GrammarError):
            Grammar.json_schema(bad)
    with pytest.raises(GrammarError):
        Grammar("yaml", "x")
    # a keyword llguidance does not implement: refused when strict, ignored when lenient
    odd = {"type": "object", "properties": {"a": {"type": "integer"}}, "dependentSchemas": {"a": {}}}
    with pytest.raises(GrammarError):
        compiler.compile(Grammar.json_schema(odd))
    compiler.compile(Grammar.json_schema(odd, lenient=True))


def test_constrained_and_free_rows_share_the_batch(engine, tiny):
    """Free rows decode exactly as alone; every constrained row's output matches its grammar."""
    _, _, tokenizer = tiny
    prompt = tuple(tokenizer.encode("the hat", add_bos=True))
    free = Request(prompt, max_tokens=24, stop_ids=frozenset())
    sampled_free = Request(prompt, max_tokens=24, params=SamplingParams(temperature=1.0, seed=9),
                           stop_ids=frozenset())
    alone = engine.generate([free, sampled_free])
    schema = Grammar.json_schema(SCHEMA)
    requests = [free,
                Request(prompt, max_tokens=200, grammar=schema),
                Request(prompt, max_tokens=200, params=SamplingParams(temperature=1.0, seed=1), n=2, grammar=schema),
                sampled_free,
                Request(prompt, max_tokens=40, params=SamplingParams(temperature=1.0, seed=2),
                        grammar=Grammar.regex(r"[a-c]{2,4}-\d{3}")),
                Request(prompt, max_tokens=40, params=SamplingParams(temperature=0.7, top_k=5, seed=3),
                        grammar=Grammar.choice(["yes", "no", "maybe not"])),
                Request(prompt, max_tokens=40, grammar=Grammar.lark('start: "(" num ("," num)* ")"\nnum: /[0-9]{1,2}/')),
                Request(prompt, max_tokens=40, params=SamplingParams(temperature=1.0, seed=4),
                        grammar=Grammar.lark('root ::= "x" [0-9] [0-9]? "y"'))]  # GBNF, llama.cpp's syntax
    out = engine.generate(requests)
    assert out[0] == alone[0] and out[3] == alone[1]
    for ids in [out[1][0], *out[2]]:
        jsonschema.validate(json.loads(text_of(tokenizer, ids)), SCHEMA)
    assert re.fullmatch(r"[a-c]{2,4}-[0-9]{3}", text_of(tokenizer, out[4][0]))
    assert text_of(tokenizer, out[5][0]) in ("yes", "no", "maybe not")
    assert re.fullmatch(r"\([0-9]{1,2}(,[0-9]{1,2})*\)", text_of(tokenizer, out[6][0]))
    assert re.fullmatch(r"x[0-9]{1,2}y", text_of(tokenizer, out[7][0]))


def test_a_grammar_ends_the_sequence_and_its_text(engine, tiny):
    """A complete output ends the row with "stop" (no end token needed), even with ignore_eos."""
    _, _, tokenizer = tiny
    events = []
    done = threading.Event()

    def on_event(ev):
        events.append(ev)
        if ev.finish_reason:
            done.set()

    engine.start()
    engine.submit(Request(tuple(tokenizer.encode("x", add_bos=True)), max_tokens=50, stop_ids=frozenset(),
                          grammar=engine.compile_grammar(Grammar.choice(["abc", "abd"]))), on_event)
    assert done.wait(60)
    assert events[-1].finish_reason == "stop" and "".join(e.text for e in events) in ("abc", "abd")
    assert len(events) <= 4


def test_generate_with_a_json_schema(tiny):
    path, model, tokenizer = tiny
    for kwargs in ({}, {"temperature": 1.0, "seed": 5}):
        text = gemmakit.generate(model, tokenizer, "hello", max_tokens=200, json_schema=SCHEMA, **kwargs)
        jsonschema.validate(json.loads(text), SCHEMA)
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        x: int = pydantic.Field(ge=0, le=99)
        label: str = pydantic.Field(max_length=4)

    Point.model_validate_json(gemmakit.generate(model, tokenizer, "a point", max_tokens=80, json_schema=Point))
    assert gemmakit.generate(model, tokenizer, "x", max_tokens=20, stop_ids=frozenset(),
                             grammar=Grammar.choice(["left", "right"])) in ("left", "right")
    with pytest.raises(GrammarError):
        gemmakit.generate(model, tokenizer, "x", json_schema={"type": "nope"})
    with pytest.raises(InvalidRequestError):
        gemmakit.generate(model, tokenizer, "x", json_schema=SCHEMA, grammar=Grammar.regex("a"))


@pytest.mark.slow  # CLI subprocesses
def test_cli_json_schema(tiny, tmp_path):
    path = tiny[0]
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    cli = [sys.executable, "-m", "gemmakit.cli", "generate", "--model", str(path), "--max-tokens", "200"]
    proc = subprocess.run([*cli, "--json-schema", str(schema), "hello"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(proc.stdout), SCHEMA)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "nope"}')
    for arg, words in [(str(bad), "not valid"), (str(tmp_path / "missing.json"), "cannot read")]:
        proc = subprocess.run([*cli, "--json-schema", arg, "hello"], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("gemmakit: error: ") and words in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
