"""Structured outputs through the server: ``response_format`` (json_object, json_schema strict or
not) and vLLM's ``structured_outputs`` (json, regex, choice, grammar), with the openai client.

The tiny random model checks the plumbing (every reply matches, streamed or not, beside free
requests; bad grammars are 400s naming their field). The real 270M checks what the issue asks:
replies to schemas with nesting, enums, arrays and string and numeric bounds, at temperature 0
and 0.7, in one batch with free requests, all parse and validate.
"""

from __future__ import annotations

import json
import re
import threading

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

from live_server import live_server  # noqa: E402
from test_serve import KEY, MESSAGES, MODEL, post, tiny_app  # noqa: E402
from test_serve_errors import error_of  # noqa: E402

from gemmakit.engine.scheduler import Engine  # noqa: E402
from gemmakit.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test

SMALL = {"type": "object", "additionalProperties": False, "required": ["word", "n", "pick"],
         "properties": {"word": {"type": "string", "minLength": 1, "maxLength": 5},
                        "n": {"type": "integer", "minimum": 0, "maximum": 9},
                        "pick": {"enum": ["a", "b"]}}}


def schema_format(schema: dict, strict: bool | None = True) -> dict:
    spec = {"name": "answer", "schema": schema}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    app, _, tokenizer, engine = tiny_app(tmp_path_factory.mktemp("structured"))
    with live_server(app) as url:
        yield url, tokenizer


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_response_format_json_schema_chat_and_completions(client):
    for strict in (True, False, None):
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0,
                                               response_format=schema_format(SMALL, strict))
        choice = reply.choices[0]
        jsonschema.validate(json.loads(choice.message.content), SMALL)
        assert choice.finish_reason == "stop"
    sampled = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0.7,
                                             seed=3, n=3, response_format=schema_format(SMALL))
    for choice in sampled.choices:
        jsonschema.validate(json.loads(choice.message.content), SMALL)
    text = client.completions.create(model=MODEL, prompt="the hat", max_tokens=120, temperature=1.0, seed=1,
                                     extra_body={"response_format": schema_format(SMALL)}).choices[0].text
    jsonschema.validate(json.loads(text), SMALL)


def test_streamed_structured_reply_equals_the_whole(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0.7, seed=11,
                  response_format=schema_format(SMALL))
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    jsonschema.validate(json.loads(whole), SMALL)


def test_structured_outputs_extension(client):
    def ask(spec: dict, **kwargs) -> str:
        return client.completions.create(model=MODEL, prompt="x", max_tokens=60, temperature=1.0,
                                         extra_body={"structured_outputs": spec}, **kwargs).choices[0].text

    for seed in range(3):
        assert ask({"choice": ["red", "green", "light blue"]}, seed=seed) in ("red", "green", "light blue")
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{2,3}", ask({"regex": r"[A-Z]{2}-\d{2,3}"}, seed=seed))
        assert re.fullmatch(r"x[0-9]+y", ask({"grammar": 'root ::= "x" [0-9]+ "y"'}, seed=seed, stop=None))
        jsonschema.validate(json.loads(ask({"json": SMALL}, seed=seed)), SMALL)
        jsonschema.validate(json.loads(ask({"json": json.dumps(SMALL)}, seed=seed)), SMALL)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0,
                                           extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert reply.choices[0].message.content in ("yes", "no")


def test_constrained_beside_free_requests(served):
    """Free requests in the same batch as constrained ones decode as they do alone."""
    url, _ = served
    free = {"model": MODEL, "prompt": "once upon", "max_tokens": 30, "temperature": 0, "ignore_eos": True,
            "logprobs": 0}
    alone = post(url, "/v1/completions", free).json()["choices"][0]["logprobs"]["tokens"]
    results: dict[int, dict] = {}

    def ask(i: int, body: dict) -> None:
        results[i] = post(url, "/v1/completions", body).json()

    bodies = [free, {**free, "response_format": schema_format(SMALL), "max_tokens": 120},
              free, {**free, "structured_outputs": {"regex": "[a-z]{3}"}, "temperature": 1.0, "seed": 2}]
    threads = [threading.Thread(target=ask, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results[0]["choices"][0]["logprobs"]["tokens"] == alone == results[2]["choices"][0]["logprobs"]["tokens"]
    jsonschema.validate(json.loads(results[1]["choices"][0]["text"]), SMALL)
    assert re.fullmatch("[a-z]{3}", results[3]["choices"][0]["text"])


def test_bad_constraints_are_400s_naming_the_field(served):
    url, _ = served
    chat = "/v1/chat/completions"
    cases = [
        ({"response_format": schema_format({"type": "strng"})}, "response_format.json_schema.schema", "not valid"),
        ({"response_format": schema_format({"type": "object", "dependentSchemas": {"a": {}}})},
         "response_format.json_schema.schema", "not valid"),  # strict: an unimplemented keyword is refused
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": SMALL}}},
         "response_format.json_schema.name", "letters"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SMALL, "x": 1}}},
         "response_format.json_schema.x", "not supported"),
        ({"response_format": {"type": "json_object", "schema": SMALL}}, "response_format.schema", "not supported"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", "regex is not valid"),
        ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs.grammar", "not valid"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty list"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern",
         "not supported"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
         "not both"),
    ]
    for extra, param, words in cases:
        err = error_of(post(url, chat, {"messages": MESSAGES, "max_tokens": 4, **extra}), 400)
        assert err["param"] == param and words in err["message"], (extra, err)
    # not strict, the same unimplemented keyword is ignored and the rest of the schema holds
    lenient = {"type": "object", "required": ["a"], "additionalProperties": False,
               "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 5}}, "dependentSchemas": {"a": {}}}
    r = post(url, chat, {"messages": MESSAGES, "max_tokens": 60, "response_format": schema_format(lenient, False)})
    assert r.status_code == 200
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), lenient)


# --- the real model -----------------------------------------------------------------------------

PERSON = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "age", "height_m", "role", "skills", "address"],
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 24},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "height_m": {"type": "number", "minimum": 1.0, "maximum": 2.5},
        "role": {"enum": ["engineer", "artist", "teacher"]},
        "skills": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 16},
                   "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
    },
}
ORDER = {
    "type": "object", "additionalProperties": False, "required": ["status", "express", "lines"],
    "properties": {
        "status": {"enum": ["new", "paid", "shipped"]},
        "express": {"type": "boolean"},
        "lines": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "additionalProperties": False, "required": ["sku", "qty", "price"],
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                           "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000,
                                     "multipleOf": 0.01}}}},
        "note": {"type": "string", "maxLength": 30},
    },
}


def test_real_model_structured_replies_validate_in_a_mixed_batch(real_model):
    """json_schema at temperature 0 and 0.7 and json_object, seven constrained requests and two free
    ones in one batch of the real 270M: every constrained reply parses (and validates), and the
    free ones answer as they do alone."""
    model, tokenizer = real_model
    engine = Engine(model, tokenizer, max_batch=9, max_seq_len=512)
    with live_server(create_app(engine, tokenizer, "gemma-3-270m")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        ask_person = [{"role": "user", "content": "Describe a person as JSON."}]
        ask_order = [{"role": "user", "content": "Write a shop order as JSON."}]
        # json_object has no bounds: a pretrained 270M may loop in a free-form object (a 40-digit
        # number) until max_tokens, as OpenAI documents for JSON mode; this prompt and these seeds end
        ask_object = [{"role": "user", "content": "Return a JSON object with a name and an age."}]
        free = dict(model="gemma-3-270m", messages=[{"role": "user", "content": "Name three colours."}],
                    max_tokens=24, temperature=0)
        alone = client.chat.completions.create(**free).choices[0].message.content
        jobs = {
            "person t0": (dict(messages=ask_person, temperature=0, response_format=schema_format(PERSON)), PERSON),
            "person t0.7": (dict(messages=ask_person, temperature=0.7, seed=1, n=2,
                                 response_format=schema_format(PERSON)), PERSON),
            "order t0": (dict(messages=ask_order, temperature=0, response_format=schema_format(ORDER, None)), ORDER),
            "order t0.7": (dict(messages=ask_order, temperature=0.7, seed=2, response_format=schema_format(ORDER)),
                           ORDER),
            "object t0": (dict(messages=ask_object, temperature=0, response_format={"type": "json_object"}), None),
            "object t0.7": (dict(messages=ask_object, temperature=0.7, seed=11, n=2,
                                 response_format={"type": "json_object"}), None),
            "free 1": (free, "free"),
            "free 2": (free, "free"),
        }
        replies: dict[str, object] = {}

        def ask(name: str) -> None:
            kwargs = {"model": "gemma-3-270m", "max_tokens": 300, **jobs[name][0]}
            replies[name] = client.chat.completions.create(**kwargs)

        threads = [threading.Thread(target=ask, args=(name,)) for name in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
    for name, (_, schema) in jobs.items():
        for choice in replies[name].choices:
            text = choice.message.content
            if schema == "free":
                assert text == alone, name
                continue
            assert choice.finish_reason == "stop", (name, text)
            value = json.loads(text)
            if schema is None:
                assert isinstance(value, dict), (name, text)
            else:
                jsonschema.validate(value, schema)
