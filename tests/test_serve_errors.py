"""Every error the server answers is OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``).

The tiny model of test_serve.py behind a real loopback server, with a small body limit so that
the 413 needs only a few KiB. Each status (400, 401, 404, 405, 413, 500) is provoked for real
and the server is checked to keep serving afterwards.
"""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from live_server import live_server  # noqa: E402
from test_serve import KEY, MESSAGES, MODEL, post, tiny_app  # noqa: E402

LIMIT = 4096
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    app, _, _, engine = tiny_app(tmp_path_factory.mktemp("errors"), max_body_bytes=LIMIT)
    with live_server(app) as url:
        yield url, engine


def error_of(r: httpx.Response, status: int) -> dict:
    """The error object of ``r``, after checking the status and OpenAI's exact body shape."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text and "detail" not in body
    return body["error"]


def still_serving(url: str) -> None:
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_unknown_fields_are_400s_that_name_them(served):
    url, _ = served
    cases = [
        ("/v1/chat/completions", {"messages": MESSAGES, "frobnicate": 1}, "frobnicate"),
        ("/v1/chat/completions", {"messages": MESSAGES, "functions": []}, "functions"),  # the legacy API
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "ann"}]},
         "messages[0].name"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                                              "cache": 1}]}]},
         "messages[0].content[0].cache"),
        ("/v1/chat/completions", {"messages": MESSAGES, "stream_options": {"continuous_usage_stats": True}},
         "stream_options.continuous_usage_stats"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"prompt": "x", "max_completion_tokens": 4}, "max_completion_tokens"),  # chat's only
        ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, "add_generation_prompt"),
        ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, "skip_special_tokens"),
    ]
    for path, body, field in cases:
        err = error_of(post(url, path, body), 400)
        assert err["param"] == field and f"'{field}'" in err["message"], (path, err)
        assert err["type"] == "invalid_request_error" and err["code"] == "unsupported_field"
    # null is "not given", as in OpenAI's API: a known field sent as null is no error
    r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2, "seed": None, "stop": None})
    assert r.status_code == 200


def test_bad_values_are_400s_with_the_field_as_param(served):
    url, _ = served
    cases = {
        "temperature": ({"messages": MESSAGES, "temperature": "hot"}, "'temperature' must be int or float, got str"),
        "max_tokens": ({"messages": MESSAGES, "max_tokens": True}, "'max_tokens' must be int, got bool"),
        "n": ({"messages": MESSAGES, "n": 17}, "'n' must be between 1 and 16, got 17"),
        "top_logprobs": ({"messages": MESSAGES, "top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
        "stop": ({"messages": MESSAGES, "stop": ["a", ""]}, "at most 4 non-empty strings"),
        "messages": ({"messages": "hello"}, "'messages' must be a non-empty list"),
        "model": ({"model": "gpt-9", "messages": MESSAGES}, "does not exist"),
    }
    for param, (body, words) in cases.items():
        err = error_of(post(url, "/v1/chat/completions", body), 400)
        assert err["param"] == param and words in err["message"], (param, err)
        assert "\n" not in err["message"]
    assert error_of(post(url, "/v1/chat/completions", {"model": "gpt-9", "messages": MESSAGES}),
                    400)["code"] == "model_not_found"
    err = error_of(post(url, "/v1/completions", {"max_tokens": 2}), 400)
    assert err["param"] == "prompt"
    # OpenAI answers invalid parameters with 400, never FastAPI's 422: not JSON, or not an object
    assert "JSON" in error_of(post(url, "/v1/chat/completions", b"{not json"), 400)["message"]
    assert "JSON object" in error_of(post(url, "/v1/chat/completions", [1, 2]), 400)["message"]
    assert "JSON" in error_of(post(url, "/v1/completions", b""), 400)["message"]
    # the body is JSON whatever its Content-Type says (curl -d sends a form type)
    r = httpx.post(url + "/v1/completions", content=json.dumps({"prompt": "x", "max_tokens": 2}),
                   headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    assert r.status_code == 200
    still_serving(url)


def test_401_without_the_key_and_before_the_body_is_read(served):
    url, _ = served
    for key in (None, "wrong"):
        for method, path, body in [("GET", "/v1/models", None), ("GET", "/metrics", None),
                                   ("POST", "/v1/chat/completions", b"{not json"),
                                   ("POST", "/v1/completions", {"prompt": "x", "unknown": 1})]:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            content = body if body is None or isinstance(body, bytes) else json.dumps(body)
            err = error_of(httpx.request(method, url + path, content=content, headers=headers, timeout=60), 401)
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key", (key, path)
    r = httpx.get(url + "/v1/models", headers={"Authorization": KEY})  # no scheme
    assert r.status_code == 401
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # open to load balancers
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200


def test_404_and_405_are_openai_errors(served):
    url, _ = served
    for path in ("/v1/nothing", "/"):
        err = error_of(httpx.post(url + path, content=b"{}", headers=AUTH, timeout=60), 404)
        assert path in err["message"] and err["type"] == "invalid_request_error"
    # a generative model's server has the route, and says that it needs an embedding model
    err = error_of(httpx.post(url + "/v1/embeddings", content=b'{"input": "hi"}', headers=AUTH, timeout=60), 400)
    assert err["code"] == "model_not_embedding" and "needs an embedding model" in err["message"]
    r = httpx.get(url + "/v1/chat/completions", headers=AUTH)
    err = error_of(r, 405)
    assert "GET" in err["message"] and "POST" in r.headers["allow"]
    err = error_of(httpx.post(url + "/v1/models", content=b"{}", headers=AUTH, timeout=60), 405)
    assert "POST" in err["message"]


def test_413_for_a_body_over_the_limit_declared_or_streamed(served):
    url, _ = served
    body = {"model": MODEL, "prompt": "x" * (LIMIT + 10), "max_tokens": 2}
    err = error_of(post(url, "/v1/completions", body), 413)  # refused on its Content-Length
    assert str(LIMIT) in err["message"] and err["code"] == "request_too_large"

    def chunks():  # no Content-Length: the body is counted as it arrives
        text = json.dumps(body).encode()
        for i in range(0, len(text), 512):
            yield text[i:i + 512]

    r = httpx.post(url + "/v1/completions", content=chunks(), headers=AUTH, timeout=60)
    assert "transfer-encoding" not in r.request.headers or r.request.headers["transfer-encoding"] == "chunked"
    assert error_of(r, 413)["code"] == "request_too_large"
    text = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    exact = text + b" " * (LIMIT - len(text))  # JSON padded to the limit itself
    for content in (exact, iter([exact[:1000], exact[1000:]])):  # declared, then chunked
        assert post(url, "/v1/completions", content).status_code == 200
    assert error_of(post(url, "/v1/completions", exact + b" "), 413)["code"] == "request_too_large"
    still_serving(url)


def test_500_without_a_traceback_and_the_others_are_served(served, monkeypatch):
    url, engine = served
    submit = engine.submit

    def failing(request, on_event):  # an unexpected bug, only for requests asking for 7 tokens
        if request.max_tokens == 7:
            raise RuntimeError("boom in submit")
        return submit(request, on_event)

    monkeypatch.setattr(engine, "submit", failing)
    before = _count_500(url)
    streamed: list[str] = []

    def stream() -> None:  # a request under way while another one fails
        body = {"model": MODEL, "prompt": "go", "max_tokens": 40, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", content=json.dumps(body), headers=AUTH, timeout=60) as r:
            streamed.extend(r.iter_lines())

    other = threading.Thread(target=stream)
    other.start()
    err = error_of(post(url, "/v1/completions", {"prompt": "x", "max_tokens": 7}), 500)
    assert err["type"] == "server_error" and err["message"] == "internal error: RuntimeError: boom in submit"
    other.join(60)
    data = [line for line in streamed if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and not any('"error"' in line for line in data)
    assert sum(json.loads(line[6:])["choices"][0]["text"] != "" for line in data[:-1]) > 0
    still_serving(url)
    assert _count_500(url) == before + 1


def _http_counts(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("gemmakit_http_requests_total{")}


def _count_500(url: str) -> float:
    return _http_counts(url).get('gemmakit_http_requests_total{path="/v1/completions",status="500"}', 0.0)


def test_errors_are_counted_by_status_in_metrics(served):
    url, _ = served
    before = _http_counts(url)
    post(url, "/v1/completions", {"prompt": "x", "nope": 1})
    httpx.get(url + "/v1/models")
    after = _http_counts(url)
    for key in ('gemmakit_http_requests_total{path="/v1/completions",status="400"}',
                'gemmakit_http_requests_total{path="/v1/models",status="401"}'):
        assert after[key] == before.get(key, 0.0) + 1, key


def test_the_default_body_limit_is_32_mib(tmp_path):
    app = tiny_app(tmp_path)[0]
    assert app.state.gemmakit.max_body_bytes == 32 * 2**20
