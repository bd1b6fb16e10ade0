"""The chat surfaces with a checkpoint's template: `gemmakit chat`, `gemmakit serve`'s chat route,
and the warning both give at start for a pretrained model (no template, no "-it" in its name)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gemmakit
from gemmakit.chat import render_chat
from tiny import random_model, tiny_config, write_gguf

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test

GEMMA_3_TEMPLATE = (Path(__file__).parent / "data" / "chat_templates" / "google-gemma-3-it.jinja").read_text()
# A template unlike the built-in format, so that a prompt shows which of the two rendered it.
MARKED_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if 'forbidden' in m.content %}"
                   "{{ raise_exception('no forbidden words') }}{% endif %}"
                   "<start_of_turn>{{ m.role }}:{{ m.content }}<end_of_turn>{% endfor %}"
                   "{% if add_generation_prompt %}<start_of_turn>{% endif %}")
WARNING = "has no chat template and looks pretrained"


def tiny(path: Path, chat_template: str | None = None) -> Path:
    return write_gguf(path, random_model(tiny_config(max_position_embeddings=256)), chat_template=chat_template)


def chat(model: Path, stdin: str = "What is the capital of France?\n") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", "chat", "--model", str(model), "-n", "3"],
                          input=stdin, capture_output=True, text=True, timeout=180)


def test_chat_warns_once_for_a_pretrained_model(tmp_path):
    proc = chat(tiny(tmp_path / "tiny.gguf"), "hello\nagain\n")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if WARNING in line]
    assert warnings == ["gemmakit: warning: tiny.gguf has no chat template and looks pretrained, so chat replies "
                        "may just continue or repeat the text; use an instruction-tuned (-it) checkpoint"]
    assert len(proc.stdout.splitlines()) == 2  # the chat itself goes on


@pytest.mark.parametrize("name, template", [("tiny-it.gguf", None), ("tiny.gguf", GEMMA_3_TEMPLATE)],
                         ids=["it-name", "has-template"])
def test_chat_does_not_warn_for_a_chat_model(tmp_path, name, template):
    proc = chat(tiny(tmp_path / name, template))
    assert proc.returncode == 0, proc.stderr
    assert WARNING not in proc.stderr


def test_chat_template_errors_are_one_line(tmp_path):
    proc = chat(tiny(tmp_path / "tiny-it.gguf", MARKED_TEMPLATE), "a forbidden question\n")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["gemmakit: error: the model's chat template refuses this chat: "
                                                "no forbidden words"]


def test_serve_warns_at_start_for_a_pretrained_model(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from gemmakit.serve import run_server

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)  # build everything, serve nothing
    run_server(str(tiny(tmp_path / "tiny.gguf")))
    assert capsys.readouterr().err.count(WARNING) == 1
    run_server(str(tiny(tmp_path / "tiny-it.gguf")))
    run_server(str(tiny(tmp_path / "tiny-with-template.gguf", GEMMA_3_TEMPLATE)))
    assert WARNING not in capsys.readouterr().err


@pytest.fixture(scope="module")
def templated_server(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from gemmakit.engine.scheduler import Engine
    from gemmakit.serve.app import create_app
    from live_server import live_server

    model, tokenizer = gemmakit.load(tiny(tmp_path_factory.mktemp("serve") / "tiny.gguf", MARKED_TEMPLATE))
    with live_server(create_app(Engine(model, tokenizer, max_batch=2), tokenizer, "tiny")) as url:
        yield url, tokenizer


def post(url: str, path: str, body: dict):
    import httpx

    return httpx.post(url + path, content=json.dumps(body), timeout=60)


def test_serve_chat_route_renders_the_checkpoint_template(templated_server):
    url, tokenizer = templated_server
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "bye"}]
    prompt = render_chat(messages, tokenizer=tokenizer)
    assert prompt == "<start_of_turn>user:hi<end_of_turn><start_of_turn>assistant:yo<end_of_turn>" \
                     "<start_of_turn>user:bye<end_of_turn><start_of_turn>"
    ids = tokenizer.encode(prompt, add_bos=True)
    assert post(url, "/tokenize", {"messages": messages}).json()["tokens"] == ids
    reply = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 2, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == len(ids)


def test_serve_chat_route_answers_a_template_refusal_with_400(templated_server):
    url, _ = templated_server
    reply = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "forbidden"}]})
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "the model's chat template refuses this chat: no forbidden words"
