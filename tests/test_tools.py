"""Tool calls in each syntax (chat/tools.py): reading replies, the prompts, and the grammar of a forced call.

The grammar is checked by walking it: tokens drawn at random from each mask the grammar gives,
until it is complete; every finished walk must read back as calls whose arguments validate
(jsonschema, an independent validator) against the tool's schema.
"""

from __future__ import annotations

import json
import random

import pytest

from gemmakit.chat import render_chat
from gemmakit.chat.tools import (FUNCTIONGEMMA, GEMMA4, JSON_SYNTAX, ReplyParser, ToolSchemaError, call_grammar,
                                 parse_json_calls, parse_native_call, prompt_messages, tool_syntax)

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "additionalProperties": False, "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 8},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "hours": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 24}, "maxItems": 2},
        "where": {"type": "object", "required": ["lat"], "properties": {"lat": {"type": "number"},
                                                                        "exact": {"type": "boolean"}}},
        "note": {"type": ["string", "null"], "maxLength": 3, "pattern": "^[a-z]*$"}}}}}
NOW = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, NOW]
NAMES = ["get_weather", "now"]


@pytest.mark.parametrize("syntax", [GEMMA4, FUNCTIONGEMMA], ids=["gemma4", "functiongemma"])
def test_native_calls_read_back(syntax):
    q = syntax.quote
    body = f"call:get_weather{{city:{q}Paris, {{FR}}: x{q},days:3,hours:[1.5,-2e1],where:{{lat:48.8}},note:null}}"
    name, args = parse_native_call(body, syntax)
    assert name == "get_weather"
    assert args == {"city": "Paris, {FR}: x", "days": 3, "hours": [1.5, -20.0], "where": {"lat": 48.8}, "note": None}
    assert parse_native_call("call:now{}", syntax) == ("now", {})
    for broken in ("call:now{", f"call:get_weather{{city:{q}x}}", "get_weather{}", "call:now{} tail", "call:x{a}"):
        assert parse_native_call(broken, syntax) is None, broken


@pytest.mark.parametrize("syntax", [GEMMA4, FUNCTIONGEMMA], ids=["gemma4", "functiongemma"])
def test_reply_parser_streamed_in_any_pieces_reads_as_the_whole(syntax):
    q = syntax.quote
    reply = (f"Let me look.{syntax.open}call:get_weather{{city:{q}Oslo{q},unit:{q}c{q}}}{syntax.close}"
             f"{syntax.open}call:now{{}}{syntax.close}")
    rng = random.Random(0)
    for _ in range(20):
        parser, pieces, at = ReplyParser(syntax, NAMES), [], 0
        while at < len(reply):
            step = rng.randint(1, 7)
            pieces += parser.push(reply[at:at + step])
            at += step
        pieces += parser.flush()
        assert "".join(p.text for p in pieces if p.kind == "content") == "Let me look."
        calls = [p.call for p in pieces if p.kind == "tool_call"]
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo", "unit": "c"}),
                                                                       ("now", {})]
        assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_reply_parser_keeps_what_is_not_a_call_as_content():
    s = GEMMA4
    for text in (f"{s.open}call:unknown_tool{{}}{s.close}", f"{s.open}call:now{{oops", "just words",
                 f"{s.open}call:now{{a:}}{s.close}"):
        parser = ReplyParser(s, NAMES)
        pieces = parser.push(text) + parser.flush()
        assert "".join(p.text for p in pieces) == text and not parser.calls, text
    no_tools = ReplyParser(s, ())  # tool_choice "none": nothing is read as a call
    assert [p.kind for p in no_tools.push(f"{s.open}call:now{{}}{s.close}")] == ["content"]


def test_reply_parser_splits_gemma4_thoughts_from_content():
    parser = ReplyParser(GEMMA4, NAMES, thoughts=True)
    pieces = []
    for piece in ("<|chan", "nel>thought\nIt is", " cold.<channel|>Hi", f"{GEMMA4.open}call:now{{}}{GEMMA4.close}"):
        pieces += parser.push(piece)
    pieces += parser.flush()
    assert "".join(p.text for p in pieces if p.kind == "reasoning") == "It is cold."
    assert "".join(p.text for p in pieces if p.kind == "content") == "Hi"
    assert [p.call.name for p in pieces if p.kind == "tool_call"] == ["now"]


def test_json_syntax_replies():
    assert [(c.name, json.loads(c.arguments)) for c in parse_json_calls(
        '```json\n{"name": "get_weather", "parameters": {"city": "Rome"}}\n```', NAMES)] == [
        ("get_weather", {"city": "Rome"})]
    assert [c.name for c in parse_json_calls('[{"name": "now", "parameters": {}}, {"name": "now"}]', NAMES)] == \
        ["now", "now"]
    for text in ('{"name": "other", "parameters": {}}', '{"city": "Rome"}', "{not json", "[]", '"now"'):
        assert parse_json_calls(text, NAMES) is None, text
    parser = ReplyParser(JSON_SYNTAX, NAMES)
    assert parser.push('{"name": "now",') == []  # held: it may be a call
    assert [p.call.name for p in parser.push(' "parameters": {}}') + parser.flush()] == ["now"]
    plain = ReplyParser(JSON_SYNTAX, NAMES)
    assert [p.text for p in plain.push("Sure, {x}") + plain.flush()] == ["Sure, {x}"]


def test_the_syntax_is_read_from_the_template():
    from test_chat_template import OFFICIAL

    assert tool_syntax(OFFICIAL["gemma-4"]) is GEMMA4
    assert tool_syntax(STAND_IN_FUNCTIONGEMMA) is FUNCTIONGEMMA
    assert tool_syntax(OFFICIAL["gemma-3"]) is JSON_SYNTAX and tool_syntax(None) is JSON_SYNTAX


def _template(name: str) -> str:
    from pathlib import Path

    return (Path(__file__).parent / "data" / "chat_templates" / name).read_text(encoding="utf-8")


STAND_IN_FUNCTIONGEMMA = _template("functiongemma-style.jinja")

# An OpenAI client's exchange: arguments as JSON text, a tool result, the model's answer
OPENAI_CHAT = [{"role": "system", "content": "Be helpful."},
               {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
               {"role": "assistant", "content": "It is 18 C and sunny."},
               {"role": "user", "content": "Thanks!"}]


def test_gemma4_prompt_with_calls_and_results_matches_transformers():
    """JSON-text arguments are handed to the template as objects, as transformers' users pass them."""
    from test_chat_template import OFFICIAL, official, with_template

    tokenizer, hf = _tokenizers()
    messages, tools = prompt_messages(OPENAI_CHAT, TOOLS, GEMMA4)
    ours = render_chat(messages, tokenizer=with_template(tokenizer, OFFICIAL["gemma-4"]), tools=tools)
    as_objects = json.loads(json.dumps(OPENAI_CHAT))
    as_objects[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "days": 2}
    assert ours == official(hf, OFFICIAL["gemma-4"], as_objects, tools=TOOLS)
    assert "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:2}<tool_call|>" in ours
    assert "<|tool_response>response:get_weather{value:<|\"|>18 C, sunny<|\"|>}<tool_response|>" in ours


def test_json_syntax_prompt_declares_tools_and_replays_calls():
    from test_chat_template import OFFICIAL, with_template

    _tokenizers()
    tokenizer = _TOKENIZERS["functiongemma"][0]  # Gemma 3's turns
    messages, tools = prompt_messages(OPENAI_CHAT, TOOLS, JSON_SYNTAX)
    assert tools is None and [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant",
                                                               "user"]
    for template in (None, OFFICIAL["gemma-3"]):
        text = render_chat(messages, tokenizer=with_template(tokenizer, template))
        assert text.startswith("<start_of_turn>user\nBe helpful.\n\nYou have access to functions.")
        assert '"name": "get_weather"' in text and '"maxLength": 8' in text
        assert '<start_of_turn>model\n{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}' \
               '<end_of_turn>' in text
        assert "<start_of_turn>user\n```tool_outputs\n18 C, sunny\n```<end_of_turn>" in text
    two_results = OPENAI_CHAT[:3] + [{"role": "tool", "tool_call_id": "c1", "content": "a"},
                                     {"role": "tool", "tool_call_id": "c1", "content": "b"},
                                     {"role": "user", "content": "and?"}]
    messages, _ = prompt_messages(two_results, TOOLS, JSON_SYNTAX)
    assert messages[-1] == {"role": "user", "content": "```tool_outputs\na\n```\n```tool_outputs\nb\n```\n\nand?"}


_TOKENIZERS: dict = {}


def _tokenizers():
    """gemmakit's tiny tokenizer with Gemma 4's and FunctionGemma's control tokens, and transformers' copy."""
    if not _TOKENIZERS:
        import tempfile
        from pathlib import Path

        from transformers import AutoTokenizer

        from gemmakit.checkpoints import open_checkpoint
        from tiny import TOOL_TOKENS, VOCAB_SIZE, random_model, tiny_config, write_gguf

        tmp = Path(tempfile.mkdtemp())
        for kind in ("gemma4", "functiongemma"):
            config = tiny_config(num_layers=1, vocab_size=VOCAB_SIZE + len(TOOL_TOKENS[kind]))
            tok = open_checkpoint(write_gguf(tmp / f"{kind}.gguf", random_model(config), tool_tokens=kind)).tokenizer
            tok.save_pretrained(tmp / kind)
            _TOKENIZERS[kind] = (tok, AutoTokenizer.from_pretrained(tmp / kind))
    return _TOKENIZERS["gemma4"]


def _walk(compiled, tokenizer, rng: random.Random, limit: int = 400) -> str | None:
    """Text drawn token by token from the grammar's masks, or None if it ran past ``limit`` tokens."""
    import numpy as np

    from gemmakit.engine.grammar import fill_masks

    matcher, ids = compiled.matcher(), []
    for _ in range(limit):
        if matcher.finished:
            return tokenizer.decode(ids)
        mask = fill_masks([matcher])[0]
        allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:tokenizer.vocab_size])
        allowed = [int(t) for t in allowed]
        ends = [t for t in allowed if t in compiled.eos_ids]
        if ends and matcher.accepting and rng.random() < 0.5:
            return tokenizer.decode(ids)
        token = rng.choice([t for t in allowed if t not in compiled.eos_ids] or ends)
        if token in compiled.eos_ids:
            return tokenizer.decode(ids)
        matcher.advance(token)
        ids.append(token)
    return None


@pytest.mark.parametrize("kind", ["gemma4", "functiongemma", "json"])
@pytest.mark.parametrize("parallel", [True, False])
def test_every_walk_of_a_forced_call_grammar_is_a_valid_call(kind, parallel):
    from gemmakit.engine.grammar import Grammar, GrammarCompiler

    _tokenizers()
    tokenizer = _TOKENIZERS["functiongemma" if kind == "functiongemma" else "gemma4"][0]
    syntax = {"gemma4": GEMMA4, "functiongemma": FUNCTIONGEMMA, "json": JSON_SYNTAX}[kind]
    grammar_kind, grammar = call_grammar(TOOLS, syntax, parallel=parallel, special_id=tokenizer.special_id)
    compiled = GrammarCompiler.for_tokenizer(tokenizer).compile(
        Grammar.lark(grammar) if grammar_kind == "lark" else Grammar.json_schema(grammar))
    schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "maxProperties": 0})
               for t in TOOLS}
    rng, finished, names = random.Random(1), 0, set()
    for _ in range(40):
        text = _walk(compiled, tokenizer, rng)
        if text is None:
            continue
        finished += 1
        parser = ReplyParser(syntax, NAMES)
        pieces = parser.push(text) + parser.flush()
        assert parser.calls and not [p for p in pieces if p.kind == "content"], text
        assert parallel or len(parser.calls) == 1
        for call in parser.calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            names.add(call.name)
    assert finished >= 20 and names == set(NAMES)


def test_native_grammar_refuses_what_it_cannot_follow():
    odd = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "format": "date-time"}}}}}
    with pytest.raises(ToolSchemaError, match="format"):
        call_grammar([odd], GEMMA4)
    missing = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": ["b"],
                                                                            "properties": {"a": {}}}}}
    with pytest.raises(ToolSchemaError, match="requires"):
        call_grammar([missing], GEMMA4)
    assert call_grammar([odd], JSON_SYNTAX)[0] == "json_schema"  # JSON: llguidance's own schema support
