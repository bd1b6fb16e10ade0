"""``/v1/embeddings`` and ``gemmakit embed`` with a random-weight EmbeddingGemma-shaped model and
the real Gemma tokenizer (tests/embedding_models.py), against sentence-transformers' ``encode``
on the same directory, through the openai client, raw HTTP and the command line."""

from __future__ import annotations

import base64
import json
import threading

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
sentence_transformers = pytest.importorskip("sentence_transformers")

from embedding_models import TEXTS  # noqa: E402
from live_server import live_server  # noqa: E402
from test_bad_input import assert_one_line_error, run_cli  # noqa: E402
from test_serve import KEY, post  # noqa: E402
from test_serve_errors import error_of  # noqa: E402

import gemmakit  # noqa: E402
from gemmakit.serve import build_app, model_id  # noqa: E402

pytestmark = pytest.mark.slow  # servers and CLI subprocesses: seconds a test


@pytest.fixture(scope="module")
def reference(embedding_gemma):
    return sentence_transformers.SentenceTransformer(str(embedding_gemma), device="cpu")


@pytest.fixture(scope="module")
def served(embedding_gemma):
    model, tokenizer = gemmakit.load(embedding_gemma)
    with live_server(build_app(model, tokenizer, model_id(embedding_gemma), api_key=KEY)) as url:
        yield url, model_id(embedding_gemma)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _vectors(response) -> torch.Tensor:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return torch.tensor([d.embedding for d in response.data], dtype=torch.float64)


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).min().item()


def test_openai_client_embeddings_match_sentence_transformers(client, served, reference):
    """The client's default asks for base64; float is asked for explicitly; dimensions truncate."""
    name = served[1]
    full = reference.encode(TEXTS, convert_to_tensor=True)
    for encoding in (openai.NOT_GIVEN, "float"):
        response = client.embeddings.create(model=name, input=TEXTS, encoding_format=encoding)
        assert response.model == name and len(response.data) == len(TEXTS)
        assert _min_cosine(_vectors(response), full) >= 0.9999
    tokenizer_counts = sum(len(reference.tokenize([t])["input_ids"][0]) for t in TEXTS)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokenizer_counts
    for dim in (48, 16):
        got = _vectors(client.embeddings.create(model=name, input=TEXTS, dimensions=dim))
        assert got.shape == (len(TEXTS), dim)
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS), dtype=torch.float64))
        assert _min_cosine(got, F.normalize(full[:, :dim], dim=-1)) >= 0.9999
    one = _vectors(client.embeddings.create(model=name, input=TEXTS[2]))
    assert one.shape == (1, 64) and _min_cosine(one, full[2:3]) >= 0.9999


def test_prompt_names_and_token_ids(client, served, reference, embedding_gemma):
    name = served[1]
    query = reference.encode(TEXTS[:3], prompt_name="query", convert_to_tensor=True)
    got = _vectors(client.embeddings.create(model=name, input=TEXTS[:3], extra_body={"prompt_name": "query"}))
    assert _min_cosine(got, query) >= 0.9999
    ids = reference.tokenize([TEXTS[0], TEXTS[4]])
    rows = [row[mask.bool()].tolist() for row, mask in zip(ids["input_ids"], ids["attention_mask"])]
    full = reference.encode([TEXTS[0], TEXTS[4]], convert_to_tensor=True)
    assert _min_cosine(_vectors(client.embeddings.create(model=name, input=rows)), full) >= 0.9999
    single = _vectors(client.embeddings.create(model=name, input=rows[0]))  # one list of ids is one input
    assert single.shape == (1, 64) and _min_cosine(single, full[:1]) >= 0.9999


def test_base64_is_little_endian_float32(served, reference):
    url, name = served
    r = post(url, "/v1/embeddings", {"model": name, "input": ["hello", "world"], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["object"] for d in body["data"]] == ["embedding"] * 2
    decoded = torch.stack([torch.frombuffer(bytearray(base64.b64decode(d["embedding"])), dtype=torch.float32)
                           for d in body["data"]])
    assert _min_cosine(decoded, reference.encode(["hello", "world"], convert_to_tensor=True)) >= 0.9999


def test_concurrent_requests_share_batches_and_keep_their_answers(client, served, reference):
    """Requests sent together are embedded together, each getting its own texts' vectors."""
    name = served[1]
    expected = reference.encode(TEXTS, prompt_name="document", convert_to_tensor=True)
    results: dict[int, torch.Tensor] = {}

    def one(i: int) -> None:
        dims = 32 if i % 2 else None
        response = client.embeddings.create(model=name, input=[TEXTS[i]], dimensions=dims or openai.NOT_GIVEN,
                                            extra_body={"prompt_name": "document"})
        results[i] = _vectors(response)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(TEXTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in results.items():
        want = F.normalize(expected[i:i + 1, :32], dim=-1) if i % 2 else expected[i:i + 1]
        assert _min_cosine(got, want) >= 0.9999, i
    assert len(results) == len(TEXTS)


@pytest.mark.parametrize("body, param, fragment", [
    ({"input": "a", "dimensions": 65}, "dimensions", "1 to 64"),
    ({"input": "a", "dimensions": 0}, "dimensions", ">= 1"),
    ({"input": "a", "prompt_name": "search"}, "prompt_name", "unknown prompt 'search'"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": []}, "input", "non-empty list"),
    ({"input": [[2, 262_144]]}, "input", "token ids in [0, 262144)"),
    ({"input": [1.5]}, "input", "must be a string"),
    ({"input": ["a"] * 2049}, "input", "at most 2048"),
    ({"input": "a", "truncate_prompt_tokens": 8}, "truncate_prompt_tokens", "not supported"),
    ({"input": "a", "model": "other"}, "model", "does not exist"),
])
def test_bad_embedding_requests_are_400s(served, body, param, fragment):
    err = error_of(post(served[0], "/v1/embeddings", body), 400)
    assert err["param"] == param and fragment in err["message"], err


def test_generating_routes_refuse_an_embedding_model(served):
    url, name = served
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"}), ("/v1/responses", {"input": "hi"})):
        err = error_of(post(url, path, {"model": name, **body}), 400)
        assert err["code"] == "model_not_generative" and "embedding model" in err["message"], path
    r = post(url, "/tokenize", {"prompt": "hi"})  # the tokenizer is still served
    assert r.status_code == 200 and r.json()["max_model_len"] == 256
    models = httpx_get(url, "/v1/models").json()["data"]
    assert [m["id"] for m in models] == [name] and models[0]["max_model_len"] == 256
    metrics = httpx_get(url, "/metrics").text
    assert "gemmakit_embedding_requests_total" in metrics and "gemmakit_requests_total" not in metrics


def httpx_get(url: str, path: str):
    import httpx

    return httpx.get(url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_embed_command_prints_json_lines(embedding_gemma, reference, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:4]) + "\n\n", encoding="utf-8")
    out = tmp_path / "vectors.jsonl"
    proc = run_cli("embed", "-m", str(embedding_gemma), "--prompt", "document", "--dim", "32", "extra text",
                   "--file", str(texts), "-o", str(out))
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["index"] for line in lines] == list(range(5))
    assert [line["text"] for line in lines] == ["extra text", *TEXTS[:4]]
    got = torch.tensor([line["embedding"] for line in lines])
    want = F.normalize(reference.encode(["extra text", *TEXTS[:4]], prompt_name="document",
                                        convert_to_tensor=True)[:, :32], dim=-1)
    assert got.shape == (5, 32) and _min_cosine(got, want) >= 0.9999
    proc = run_cli("embed", "-m", str(embedding_gemma), TEXTS[0])
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["embedding"]) == 64


def test_embed_command_errors_are_one_line(embedding_gemma, real_model_path, tmp_path):
    assert_one_line_error(run_cli("embed", "hello"), "embed needs --model")
    assert_one_line_error(run_cli("embed", "-m", str(embedding_gemma)), "nothing to embed")
    assert_one_line_error(run_cli("embed", "-m", str(embedding_gemma), "--file", str(tmp_path / "none.txt")),
                          "cannot read --file")
    assert_one_line_error(run_cli("embed", "-m", str(embedding_gemma), "--prompt", "search", "x"),
                          "unknown prompt 'search'")
    assert_one_line_error(run_cli("embed", "-m", str(real_model_path), "x"), "this model generates text")
    assert_one_line_error(run_cli("generate", "-m", str(embedding_gemma), "x"), "embedding model")
