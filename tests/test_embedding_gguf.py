"""EmbeddingGemma as llama.cpp's ``gemma-embedding`` GGUF: a tiny random EmbeddingGemma-shaped
sentence-transformers directory, converted by llama.cpp's converter (F32) and quantised by its
quantiser (Q8_0), against sentence-transformers' ``encode`` on the directory and llama.cpp's own
embeddings on each file, recorded (tests/data/gguf_llamacpp/make_embedding.py) and, when
llama_cpp imports, live."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gemmakit
from gemmakit.api import LoadOptions, load_model
from gemmakit.checkpoints import open_checkpoint
from gemmakit.checkpoints.base import build_model
from gemmakit.checkpoints.gguf import embedding_config_from_gguf
from gemmakit.checkpoints.gguf_reader import open_gguf
from gemmakit.errors import UnsupportedModelError
from gemmakit.quant.grouped import GGMLWeight

DATA = Path(__file__).parent / "data" / "gguf_llamacpp"
F32, Q8_0 = DATA / "embeddinggemma-tiny.gguf", DATA / "embeddinggemma-tiny-q8_0.gguf"
RECORDED = json.loads((DATA / "embeddinggemma-tiny.json").read_text())
TEXTS, PROMPTS = RECORDED["texts"], RECORDED["prompts"]
WINDOW = 8


def _cosines(a, b) -> torch.Tensor:
    return F.cosine_similarity(torch.as_tensor(a).double(), torch.as_tensor(b).double(), dim=-1)


@pytest.fixture(scope="module")
def f32():
    return gemmakit.load(F32)


@pytest.fixture(scope="module")
def q8_0():
    return load_model(Q8_0)  # the file's Q8_0 blocks kept as they are


def test_the_file_reads_as_the_pipeline_it_was_converted_from(f32):
    config = f32[0].config
    decoder = config.decoder
    assert decoder.bidirectional and decoder.sliding_window == WINDOW  # the checkpoint's own window
    assert decoder.layer_kinds == ("local",) * 5 + ("global", "local")
    assert (decoder.rope_theta, decoder.rope_local_theta, decoder.query_pre_attn_scalar) == (1e6, 1e4, 16)
    assert config.pooling == ("mean",) and config.include_prompt and config.normalize
    assert [(d.in_features, d.out_features, d.bias, d.activation) for d in config.dense] == [
        (64, 256, False, "Identity"), (256, 64, False, "Identity")]
    assert (config.add_bos, config.add_eos, config.max_tokens, config.dimension) == (True, True, 256, 64)
    # EmbeddingGemma's task prompts, which the file does not carry
    assert config.prompt("query") == PROMPTS["query"] and config.prompt("document") == PROMPTS["document"]
    assert config.prompt(None) == ""
    tokenizer = f32[1]
    assert all(len(tokenizer.encode(PROMPTS["query"] + t)) > 2 * WINDOW for t in TEXTS)  # past the window


@pytest.mark.parametrize("prompt", [None, "query", "document"])
def test_f32_file_matches_sentence_transformers_and_llama_cpp(f32, prompt):
    got = gemmakit.embed(*f32, TEXTS, prompt=prompt, batch_size=3)
    expected = torch.tensor(RECORDED[f"sentence_transformers_{prompt or 'none'}"])
    assert _cosines(got, expected).min() >= 0.9999  # measured 1 - 3e-12
    torch.testing.assert_close(got, expected, atol=5e-6, rtol=1e-4)  # measured 6.6e-7
    llama = torch.tensor(RECORDED[f"llama_cpp_f32_{prompt or 'none'}"])
    assert _cosines(got, llama).min() >= 0.99999  # measured 1 - 6e-8


def test_f32_file_matches_its_source_directory_live(f32, tmp_path, monkeypatch):
    """The directory the file was converted from, rebuilt by make_embedding.py (the same seeds):
    sentence-transformers' encode on it and gemmakit's sentence-transformers reader both give
    the file's embeddings."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    pytest.importorskip("sentencepiece")
    monkeypatch.syspath_prepend(str(DATA))
    import make_embedding

    directory = make_embedding.directory(tmp_path / make_embedding.NAME)
    got = gemmakit.embed(*f32, TEXTS, prompt="query")
    expected = sentence_transformers.SentenceTransformer(str(directory), device="cpu").encode(
        TEXTS, prompt_name="query", convert_to_tensor=True)
    assert _cosines(got, expected).min() >= 0.9999
    torch.testing.assert_close(got, expected, atol=5e-6, rtol=1e-4)
    torch.testing.assert_close(gemmakit.embed(*gemmakit.load(directory), TEXTS, prompt="query"), got,
                               atol=1e-6, rtol=1e-5)


def test_the_sliding_window_is_the_files_own(f32):
    """Read as transformers' halved window or as a global one, the local layers see other keys and
    the embeddings leave llama.cpp's (measured cosines 0.61 and 0.73)."""
    llama = torch.tensor(RECORDED["llama_cpp_f32_query"])
    for window in (WINDOW // 2 + 1, 4 * WINDOW):
        checkpoint = open_checkpoint(F32)
        decoder = dataclasses.replace(checkpoint.config.decoder, sliding_window=window)
        other = build_model(dataclasses.replace(checkpoint, config=dataclasses.replace(checkpoint.config,
                                                                                          decoder=decoder)))
        assert _cosines(gemmakit.embed(other, f32[1], TEXTS, prompt="query"), llama).min() < 0.999


@pytest.mark.parametrize("prompt", [None, "query", "document"])
def test_q8_0_file_keeps_its_blocks_and_matches_llama_cpp(q8_0, prompt):
    model = q8_0.model
    assert q8_0.report.weights == "gguf"
    assert isinstance(model.dense[0].linear.w, GGMLWeight) and isinstance(model.decoder.embed.w, GGMLWeight)
    got = gemmakit.embed(model, q8_0.tokenizer, TEXTS, prompt=prompt)
    llama = torch.tensor(RECORDED[f"llama_cpp_q8_0_{prompt or 'none'}"])
    # llama.cpp also rounds the activations to 8 bits in each Q8_0 product; measured 0.99974
    assert _cosines(got, llama).min() >= 0.9995
    # and the quantised file stays close to the float model it was made from (measured 0.99941)
    expected = torch.tensor(RECORDED[f"sentence_transformers_{prompt or 'none'}"])
    assert _cosines(got, expected).min() >= 0.999


def test_int8_from_the_f32_file_is_llama_cpps_q8_0(f32, q8_0):
    """``quant="int8"`` rounds the F32 file's matrices to the blocks llama.cpp's quantiser wrote
    (Q8_0, the same rounding), so its embeddings are the Q8_0 file's; both stay close to float32."""
    loaded = load_model(F32, LoadOptions(quant="int8"))
    assert loaded.report.weights == "int8"
    for prompt in (None, "query"):
        got = gemmakit.embed(loaded.model, loaded.tokenizer, TEXTS, prompt=prompt)
        torch.testing.assert_close(got, gemmakit.embed(q8_0.model, q8_0.tokenizer, TEXTS, prompt=prompt),
                                   atol=1e-6, rtol=1e-5)
        assert _cosines(got, gemmakit.embed(*f32, TEXTS, prompt=prompt)).min() >= 0.999  # measured 0.99941
    requantised = load_model(Q8_0, LoadOptions(quant="int8"))  # from the file's blocks
    assert requantised.report.weights == "int8"
    torch.testing.assert_close(gemmakit.embed(requantised.model, requantised.tokenizer, TEXTS),
                               gemmakit.embed(q8_0.model, q8_0.tokenizer, TEXTS), atol=1e-6, rtol=1e-5)


def test_embeddings_match_llama_cpp_live(f32, q8_0):
    llama_cpp = pytest.importorskip("llama_cpp")
    texts = [PROMPTS["query"] + t for t in TEXTS]
    for path, (model, tokenizer), floor in ((F32, f32, 0.99999), (Q8_0, (q8_0.model, q8_0.tokenizer), 0.9995)):
        llm = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=256, n_batch=256, n_ubatch=256,
                              n_threads=2, verbose=False)
        for text in texts:  # the same tokens, <bos> and <eos> included
            assert llm.tokenize(text.encode()) == [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
        expected = torch.tensor(llm.embed(texts, normalize=True))
        assert _cosines(gemmakit.embed(model, tokenizer, TEXTS, prompt="query"), expected).min() >= floor


def test_unsupported_pooling_is_refused_in_one_line():
    f = open_gguf(F32)
    decoder = open_checkpoint(F32).config.decoder
    ranked = dataclasses.replace(f, metadata={**f.metadata, "gemma-embedding.pooling_type": 4})
    with pytest.raises(UnsupportedModelError, match="pooling type 4 is not supported"):
        embedding_config_from_gguf(ranked, decoder)
    for kind, mode in ((2, "cls"), (3, "lasttoken")):
        other = dataclasses.replace(f, metadata={**f.metadata, "gemma-embedding.pooling_type": kind})
        assert embedding_config_from_gguf(other, decoder).pooling == (mode,)


def test_quantize_writes_a_gemma_embedding_file(tmp_path, q8_0):
    """``gemmakit quantize`` on an embedding model writes llama.cpp's gemma-embedding layout: read
    back, it is the Q8_0 file llama.cpp's own quantiser made, and llama.cpp runs it alike."""
    from gemmakit.checkpoints.gguf_writer import quantize_checkpoint

    out = tmp_path / "tiny-int8.gguf"
    quantize_checkpoint(F32, out, "int8")
    loaded = load_model(out)
    assert loaded.report.weights == "gguf"

    def unnamed(config):
        return dataclasses.replace(config, name="", decoder=dataclasses.replace(config.decoder, name=""))

    assert unnamed(loaded.model.config) == unnamed(q8_0.model.config)
    got = gemmakit.embed(loaded.model, loaded.tokenizer, TEXTS, prompt="query")
    torch.testing.assert_close(got, gemmakit.embed(q8_0.model, q8_0.tokenizer, TEXTS, prompt="query"),
                               atol=1e-6, rtol=1e-5)
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(model_path=str(out), embedding=True, n_ctx=256, n_batch=256, n_ubatch=256, n_threads=2,
                          verbose=False)
    expected = llm.embed([PROMPTS["query"] + t for t in TEXTS], normalize=True)
    assert _cosines(got, expected).min() >= 0.9995
    assert _cosines(expected, RECORDED["llama_cpp_q8_0_query"]).min() >= 0.99999  # the same file, to llama.cpp


def test_what_gemma_embedding_cannot_say_is_refused(tmp_path):
    import gguf

    from gemmakit.checkpoints.gguf_writer import add_embedding_metadata
    from gemmakit.models.encoder import DenseLayer

    config = open_checkpoint(F32).config
    writer = gguf.GGUFWriter(tmp_path / "x.gguf", "gemma-embedding")
    for change, message in ((dict(pooling=("weightedmean",)), "pools by mean, cls or lasttoken"),
                            (dict(include_prompt=False), "include_prompt false"),
                            (dict(normalize=False), "normalising"),
                            (dict(dense=(DenseLayer(64, 64, True),)), "without bias or activation"),
                            (dict(dense=(DenseLayer(64, 80), DenseLayer(80, 32))), "model's width \\(64\\), not 32")):
        with pytest.raises(UnsupportedModelError, match=message):
            add_embedding_metadata(writer, dataclasses.replace(config, **change))


def test_quantize_writes_embeddinggemma_with_the_real_vocabulary(embedding_gemma, gemma_hf_tokenizer, tmp_path):
    """The random EmbeddingGemma-shaped directory of tests/embedding_models.py, with the real Gemma
    tokenizer.model at its root as the hub directory has it: written as a Q8_0 gemma-embedding
    file, it runs as ``quant="int8"`` runs the directory, and llama.cpp tokenises the multilingual
    texts as gemmakit does and embeds them alike (measured cosine 0.99954)."""
    import shutil

    from embedding_models import TEXTS as WORLD_TEXTS
    from gemmakit.checkpoints.gguf_writer import quantize_checkpoint

    source = tmp_path / "embeddinggemma"
    shutil.copytree(embedding_gemma, source)
    shutil.copy(gemma_hf_tokenizer.parent / "spm" / "tokenizer.model", source / "tokenizer.model")
    out = tmp_path / "embeddinggemma-q8_0.gguf"
    quantize_checkpoint(source, out, "int8")
    model, tokenizer = gemmakit.load(out)
    got = gemmakit.embed(model, tokenizer, WORLD_TEXTS, prompt="query")
    at_load = load_model(source, LoadOptions(quant="int8"))
    torch.testing.assert_close(got, gemmakit.embed(at_load.model, at_load.tokenizer, WORLD_TEXTS, prompt="query"),
                               atol=1e-6, rtol=1e-5)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2,
                          verbose=False)
    texts = [model.config.prompt("query") + t for t in WORLD_TEXTS]
    for text in texts:
        assert llm.tokenize(text.encode()) == [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    assert _cosines(got, llm.embed(texts, normalize=True)).min() >= 0.999  # llama.cpp's 8-bit activations
