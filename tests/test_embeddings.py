"""Embedding models (EmbeddingGemma): the bidirectional decoder against transformers, pooling
against sentence-transformers' own module, and whole sentence-transformers directories against
``SentenceTransformer.encode`` with the real Gemma tokenizer (tests/embedding_models.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import gemmakit
from embedding_models import TEXTS, embedding_gemma_directory
from gemmakit.errors import CheckpointError, InvalidRequestError, UnsupportedModelError
from gemmakit.models.encoder import POOLING_MODES, pool

transformers = pytest.importorskip("transformers")


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.fixture(scope="module")
def bidirectional_dir(tmp_path_factory):
    """A random bidirectional Gemma3TextModel with a small vocabulary, saved by transformers."""
    config = transformers.Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
        max_position_embeddings=512, use_bidirectional_attention=True)
    torch.manual_seed(0)
    model = transformers.Gemma3TextModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.05)
    directory = tmp_path_factory.mktemp("bidirectional") / "gemma3-bidirectional"
    model.config.architectures = ["Gemma3TextModel"]
    model.save_pretrained(directory)
    return directory, model.eval()


def test_bidirectional_decoder_matches_transformers(bidirectional_dir):
    """Every token sees both sides; sliding layers see W // 2 each way (W = 16, texts of 40)."""
    directory, reference = bidirectional_dir
    ours, _ = gemmakit.load(directory, dtype="float32")
    assert ours.config.bidirectional
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (3, 40))
    lengths = [40, 29, 9]
    mask = torch.tensor([[1] * n + [0] * (40 - n) for n in lengths])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        positions = torch.where(mask.bool(), torch.arange(40), -1)
        got = ours.hidden_states(ids, positions)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(got[row, :n], expected[row, :n], atol=2e-5, rtol=1e-4)


def test_bidirectional_model_refuses_to_generate(bidirectional_dir):
    model, _ = gemmakit.load(bidirectional_dir[0], dtype="float32")
    with pytest.raises(InvalidRequestError, match="does not generate"):
        gemmakit.generate(model, None, [2, 10, 11], max_tokens=2)


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("prompt_length", [0, 3])
def test_pooling_matches_sentence_transformers(mode, prompt_length):
    st_modules = pytest.importorskip("sentence_transformers.sentence_transformer.modules")
    torch.manual_seed(2)
    tokens = torch.randn(3, 9, 16)
    attention = torch.tensor([[1] * n + [0] * (9 - n) for n in (9, 6, 4)])
    reference = st_modules.Pooling(16, mode, include_prompt=prompt_length == 0)
    features = {"token_embeddings": tokens, "attention_mask": attention}
    if prompt_length:
        features["prompt_length"] = prompt_length
    expected = reference(features)["sentence_embedding"]
    mask = attention.bool() & (torch.arange(9) >= prompt_length)
    torch.testing.assert_close(pool(tokens, mask, mode), expected)


def test_embeddings_match_sentence_transformers(embedding_gemma):
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(str(embedding_gemma), device="cpu")
    model, tokenizer = gemmakit.load(embedding_gemma)
    assert (model.config.add_bos, model.config.add_eos, model.config.max_seq_length) == (True, True, 256)
    for prompt in (None, "query", "document"):
        expected = st.encode(TEXTS, prompt_name=prompt, convert_to_tensor=True)
        got = gemmakit.embed(model, tokenizer, TEXTS, prompt=prompt, batch_size=4)
        assert got.shape == (len(TEXTS), 64) and got.dtype == torch.float32
        assert _cosines(got, expected).min() >= 0.9999
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # one text alone is the same as inside a batch of others (padding changes nothing)
    single = gemmakit.embed(model, tokenizer, TEXTS[1], prompt="query")
    torch.testing.assert_close(single, gemmakit.embed(model, tokenizer, TEXTS, prompt="query")[1], atol=1e-6, rtol=1e-5)


def test_long_text_is_cut_as_sentence_transformers_cuts_it(embedding_gemma):
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(str(embedding_gemma), device="cpu")
    model, tokenizer = gemmakit.load(embedding_gemma)
    text = "Tokens beyond the model's longest input are dropped, its special tokens kept. " * 40  # > 256 tokens
    assert len(tokenizer.encode(text)) > 256
    expected = st.encode([text], convert_to_tensor=True)
    assert _cosines(gemmakit.embed(model, tokenizer, [text]), expected).min() >= 0.9999


@pytest.mark.parametrize("dim", [48, 32, 16])
def test_matryoshka_dimensions_are_truncated_and_renormalised(embedding_gemma, dim):
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(str(embedding_gemma), device="cpu")
    model, tokenizer = gemmakit.load(embedding_gemma)
    full = st.encode(TEXTS, prompt_name="document", convert_to_tensor=True)
    expected = F.normalize(full[:, :dim], dim=-1)
    got = gemmakit.embed(model, tokenizer, TEXTS, dim=dim, prompt="document")
    assert got.shape == (len(TEXTS), dim)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)))
    assert _cosines(got, expected).min() >= 0.9999


@pytest.mark.parametrize("variant", [
    dict(pooling="weightedmean", include_prompt=False, dense=((64, 80, True, "Tanh"),)),
    dict(pooling="lasttoken", dense=(), normalize=False),
    dict(pooling=("cls", "max"), dense=((128, 64, True, "GELU"), (64, 32, False, "Identity"))),
])
def test_pipeline_variants_match_sentence_transformers(embedding_gemma, gemma_hf_tokenizer, tmp_path, variant):
    """Other pooling modes, prompts left out of the pooling, dense biases and activations, no Normalize."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    directory = embedding_gemma_directory(tmp_path / "variant", gemma_hf_tokenizer, **variant)
    st = sentence_transformers.SentenceTransformer(str(directory), device="cpu")
    model, tokenizer = gemmakit.load(directory)
    expected = st.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
    got = gemmakit.embed(model, tokenizer, TEXTS, prompt="query", batch_size=3)
    assert got.shape == expected.shape
    assert _cosines(got, expected).min() >= 0.9999


def test_token_id_inputs_are_taken_as_given(embedding_gemma):
    model, tokenizer = gemmakit.load(embedding_gemma)
    ids = [tokenizer.bos_id, *tokenizer.encode(TEXTS[0]), tokenizer.eos_id]
    torch.testing.assert_close(gemmakit.embed(model, tokenizer, [ids])[0], gemmakit.embed(model, tokenizer, TEXTS[0]))


def test_bad_requests_say_what_is_wrong(embedding_gemma, real_model):
    model, tokenizer = gemmakit.load(embedding_gemma)
    with pytest.raises(InvalidRequestError, match="unknown prompt 'search'.*classification, document, query|"
                                                  "unknown prompt 'search'.*query"):
        gemmakit.embed(model, tokenizer, ["a"], prompt="search")
    with pytest.raises(InvalidRequestError, match="dimensions 65 is out of range.*1 to 64"):
        gemmakit.embed(model, tokenizer, ["a"], dim=65)
    with pytest.raises(InvalidRequestError, match="no input"):
        gemmakit.embed(model, tokenizer, [])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        gemmakit.embed(model, tokenizer, [[2, 262_144]])
    with pytest.raises(InvalidRequestError, match="embedding model: it makes embeddings"):
        gemmakit.generate(model, tokenizer, "hello", max_tokens=2)
    with pytest.raises(InvalidRequestError, match="this model generates text; embeddings need an embedding model"):
        gemmakit.embed(*real_model, ["hello"])


def test_unsupported_pipelines_are_refused_in_one_line(embedding_gemma, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(embedding_gemma, broken)
    modules = json.loads((broken / "modules.json").read_text())
    modules.insert(2, {"idx": 9, "name": "9", "path": "9_LayerNorm",
                       "type": "sentence_transformers.sentence_transformer.modules.layer_norm.LayerNorm"})
    (broken / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModelError, match="module 'LayerNorm' is not supported"):
        gemmakit.load(broken)
    (broken / "modules.json").write_text("[")
    with pytest.raises(CheckpointError, match="modules.json: invalid JSON"):
        gemmakit.load(broken)


@pytest.mark.parametrize("prefill_dtype, floor", [("float32", 0.999), ("auto", 0.998)])
def test_int8_embeddings_stay_close_to_float32(embedding_gemma, prefill_dtype, floor):
    """``quant="int8"``: the decoder's matrices, its embedding table and the dense layers as 8-bit
    blocks. On this random model the decoder's matrices give most of the error (cosine 0.99953
    alone), the table 0.99987, the dense layers 0.99996; the whole: 0.99941 with float32
    products over the texts, 0.99913 with the default bfloat16 ones."""
    from gemmakit.api import LoadOptions, load_model
    from gemmakit.quant.grouped import GroupedEmbedding, GroupedLinear

    reference, tokenizer = gemmakit.load(embedding_gemma)
    loaded = load_model(embedding_gemma, LoadOptions(quant="int8", prefill_dtype=prefill_dtype))
    model = loaded.model
    assert loaded.report.weights == "int8"
    assert isinstance(model.decoder.embed, GroupedEmbedding) and isinstance(model.dense[1].linear, GroupedLinear)
    for prompt in (None, "query", "document"):
        expected = gemmakit.embed(reference, tokenizer, TEXTS, prompt=prompt)
        got = gemmakit.embed(model, tokenizer, TEXTS, prompt=prompt)
        assert _cosines(got, expected).min() >= floor
