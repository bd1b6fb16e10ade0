"""``/v1/responses`` with the openai client: text in and out, streamed events, function tools,
structured text, and what is refused. A response must say what the same chat completion says."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from live_server import live_server  # noqa: E402
from test_serve import KEY, post  # noqa: E402
from test_serve_errors import error_of  # noqa: E402
from test_serve_tools import SCHEMAS, _app  # noqa: E402
from test_tools import TOOLS, WEATHER  # noqa: E402

pytestmark = pytest.mark.slow  # servers: seconds a test

FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    app, tokenizer = _app(tmp_path_factory.mktemp("responses"), "gemma4")
    with live_server(app) as url:
        yield url, tokenizer


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=180)


def test_text_in_and_out_is_the_chat_completion(client):
    response = client.responses.create(model="tiny", input="Tell me a tale.", instructions="Be brief.",
                                       max_output_tokens=12, temperature=0)
    chat = client.chat.completions.create(model="tiny", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a tale."}])
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert (response.status == "incomplete") == (chat.choices[0].finish_reason == "length")
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    message = response.output[-1]
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"


def test_streamed_events_add_up_to_the_response(client):
    kwargs = dict(model="tiny", input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
                  max_output_tokens=10, temperature=0.8, extra_body={"seed": 3})
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    done = [e for e in events if e.type == "response.output_text.done"]
    assert [e.text for e in done] == [whole.output_text]
    assert events[-1].response.output_text == whole.output_text


def test_function_tools_call_and_continue(client):
    response = client.responses.create(model="tiny", input="Weather in Oslo?", tools=FLAT_TOOLS,
                                       tool_choice="required", parallel_tool_calls=False, max_output_tokens=250,
                                       temperature=0.7, extra_body={"seed": 2})
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])
    named = client.responses.create(model="tiny", input="Weather?", tools=FLAT_TOOLS, max_output_tokens=250,
                                    tool_choice={"type": "function", "name": "get_weather"},
                                    parallel_tool_calls=False, extra_body={"seed": 4})
    (call,) = [item for item in named.output if item.type == "function_call"]
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    # the output items go back as input, with the function's result: as the same chat would
    follow = client.responses.create(model="tiny", tools=FLAT_TOOLS, max_output_tokens=4, temperature=0, input=[
        {"role": "user", "content": "Weather?"}, *[item.model_dump(exclude_none=True) for item in named.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}])
    chat = client.chat.completions.create(model="tiny", tools=TOOLS, max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "18 C"}])
    assert follow.usage.input_tokens == chat.usage.prompt_tokens


def test_streamed_function_call_events(client):
    events = list(client.responses.create(model="tiny", input="Weather?", tools=FLAT_TOOLS, tool_choice="required",
                                          parallel_tool_calls=False, max_output_tokens=250, stream=True,
                                          extra_body={"seed": 6}))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert len(done) == 1 and deltas == done[0].arguments
    final = [item for item in events[-1].response.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in final] == [(done[0].name, done[0].arguments)]


def test_text_format_json_schema(client):
    schema = {"type": "object", "required": ["n"], "additionalProperties": False,
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    response = client.responses.create(model="tiny", input="A number?", max_output_tokens=40, temperature=0.7,
                                       text={"format": {"type": "json_schema", "name": "n", "schema": schema,
                                                        "strict": True}})
    jsonschema.validate(json.loads(response.output_text), schema)


def test_reasoning_effort_switches_gemma4_thinking(served, client):
    _, tokenizer = served
    from gemmakit.chat import render_chat

    ask = [{"role": "user", "content": "Hi"}]
    for effort, thinking in (("high", True), ("none", False)):
        response = client.responses.create(model="tiny", input="Hi", reasoning={"effort": effort},
                                           max_output_tokens=2, temperature=0)
        prompt = render_chat(ask, tokenizer=tokenizer, enable_thinking=thinking)
        assert response.usage.input_tokens == len(tokenizer.encode(prompt, add_bos=True))


def test_refused_requests(served):
    url, _ = served
    cases = [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]", "function tool"),
        ({"input": "x", "frobnicate": 1}, "frobnicate", "not supported"),
        ({"input": ""}, "input", "empty"),
        ({"input": [{"type": "file_search_call"}]}, "input[0]", "unsupported type"),
        ({"input": "x", "truncation": "auto"}, "truncation", "disabled"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}},
         "response_format.json_schema.name", "letters"),
        ({"input": "x", "reasoning": {"effort": "max"}}, "reasoning.effort", "effort"),
    ]
    for body, param, fragment in cases:
        err = error_of(post(url, "/v1/responses", body), 400)
        assert err["param"] == param and fragment in err["message"], (body, err)
