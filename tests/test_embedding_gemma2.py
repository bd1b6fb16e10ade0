"""EmbeddingGemma 2's text path against transformers' EmbeddingGemma2Model and sentence-transformers.

Random-weight models built and saved by transformers 5.23 (Gemma 4 layers run bidirectionally,
sliding and full layers with their own head sizes and KV heads, projection-only per-layer inputs,
the embedding projection), read by gemmakit from the directory transformers wrote. Texts are
longer than the sliding radius and batches are padded. The reference embedding is what the model
card prescribes: transformers' ``last_hidden_state`` (already projected) mean-pooled over the
attention mask, then L2-normalised; sentence-transformers' own pipeline where it can hold the model.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gemmakit
from embedding_models import TEXTS
from gemmakit.errors import CheckpointError, InvalidRequestError, UnsupportedModelError
from gemmakit.models.masks import encoder_mask

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.embedding_gemma2")

RADIUS = 6  # sliding layers see |q - k| <= 6; the texts below run to 40 tokens
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _text_config(vocab_size: int = 300, **changes):
    """Gemma 4 layers in EmbeddingGemma 2's shape, small: sliding layers with 2 KV heads of 16,
    full layers with 1 KV head of 32 (per_layer_config), PLE width 8, embeddings of 48."""
    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=RADIUS,
                    hidden_size_per_layer_input=8, embedding_dim=48, layer_types=list(LAYER_TYPES),
                    global_head_dim=32, num_global_key_value_heads=1, max_position_embeddings=512)
    return transformers.EmbeddingGemma2TextConfig(**{**settings, **changes})


def _randomise(model, seed: int):
    """Weights of a size that makes every part matter, the layer scalars (buffers) included."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.05)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    return model.eval()


def _save(model, directory):
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def composite(tmp_path_factory):
    """The composite EmbeddingGemma2Model (tensors under language_model.), as transformers saves it."""
    config = transformers.EmbeddingGemma2Config(text_config=_text_config())
    model = _randomise(transformers.EmbeddingGemma2Model(config), 0)
    return _save(model, tmp_path_factory.mktemp("eg2") / "composite"), model


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    """EmbeddingGemma2TextModel alone (model_type embedding_gemma2_text, tensors at the top level)."""
    from transformers.models.embedding_gemma2.modeling_embedding_gemma2 import EmbeddingGemma2TextModel

    model = _randomise(EmbeddingGemma2TextModel(_text_config()), 1)
    return _save(model, tmp_path_factory.mktemp("eg2") / "text"), model


def _batch(seed: int, lengths=(40, 29, 9, 1), vocab: int = 300):
    torch.manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T))
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    return ids * mask, mask, [ids[r, :n].tolist() for r, n in enumerate(lengths)]


def _reference(model, ids, mask):
    """(last_hidden_state, the final norm's output, the mean-pooled L2-normalised embedding)."""
    text = getattr(model, "language_model", model)
    seen = {}
    hook = text.norm.register_forward_hook(lambda module, args, out: seen.setdefault("normed", out))
    try:
        with torch.no_grad():
            states = model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        hook.remove()
    weights = mask[..., None].to(states.dtype)
    pooled = (states * weights).sum(1) / weights.sum(1)
    return states, seen["normed"], F.normalize(pooled, dim=-1)


def _cosines(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("which", ["composite", "text_only"])
def test_token_states_match_transformers(which, request):
    """Hidden states before and after the projection, at every real token of a padded batch."""
    directory, reference = request.getfixturevalue(which)
    model, tokenizer = gemmakit.load(directory, dtype="float32")
    config = model.config
    assert tokenizer is None and config.projection == 48 and config.dimension == 48
    assert config.pooling == ("mean",) and config.normalize and config.decoder.bidirectional
    plans = config.decoder.layer_plan
    assert [(p.mixer, p.head_dim, p.num_kv_heads) for p in plans[1:3]] == [("local", 16, 2), ("global", 32, 1)]
    ids, mask, _ = _batch(2)
    states, normed, _ = _reference(reference, ids, mask)
    positions = torch.where(mask.bool(), torch.arange(ids.shape[1]), -1)
    with torch.no_grad():
        got_normed = model.decoder.hidden_states(ids, positions)
        got_states = model.token_states(ids, positions)
    for row, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(got_normed[row, :n], normed[row, :n], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got_states[row, :n], states[row, :n], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["composite", "text_only"])
def test_embeddings_match_transformers_mean_pooled(which, request):
    directory, reference = request.getfixturevalue(which)
    model, tokenizer = gemmakit.load(directory, dtype="float32")
    ids, mask, rows = _batch(3, lengths=(40, 33, 13, 7, 2))
    _, _, expected = _reference(reference, ids, mask)
    got = gemmakit.embed(model, tokenizer, rows, batch_size=2)  # token ids taken as given
    assert got.shape == (5, 48) and got.dtype == torch.float32
    assert _cosines(got, expected).min() >= 0.9999
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # alone or padded into a batch of longer rows: the same vector
    torch.testing.assert_close(gemmakit.embed(model, tokenizer, [rows[3]])[0], got[3], atol=1e-6, rtol=1e-5)


def test_sliding_radius_is_inclusive_on_both_sides(composite):
    """The config's sliding_window is a radius R: the mask gemmakit builds is transformers' own
    ``|q - k| <= R`` (and padding stays hidden)."""
    model, _ = gemmakit.load(composite[0], dtype="float32")
    plan = model.config.decoder.kind_plans["local"]
    positions = torch.tensor([list(range(20)), list(range(15)) + [-1] * 5])
    got = encoder_mask(positions, plan.window)[:, 0]
    q, k = torch.arange(20)[:, None], torch.arange(20)[None, :]
    expected = ((q - k).abs() <= RADIUS).expand(2, 20, 20).clone()
    expected[1, :, 15:] = False
    real = positions >= 0
    assert torch.equal(got[real], expected[real])


def test_vision_and_audio_towers_are_left_unread(tmp_path):
    """A composite with Gemma 4 vision and audio towers: gemmakit reads the text path and matches
    transformers on text."""
    from transformers.models.gemma4 import Gemma4AudioConfig, Gemma4VisionConfig

    config = transformers.EmbeddingGemma2Config(
        text_config=_text_config(),
        vision_config=Gemma4VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=16),
        audio_config=Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       subsampling_conv_channels=[8, 8], output_proj_dims=32))
    reference = _randomise(transformers.EmbeddingGemma2Model(config), 4)
    directory = _save(reference, tmp_path / "with-towers")
    model, tokenizer = gemmakit.load(directory, dtype="float32")
    ids, mask, rows = _batch(5, lengths=(31, 8))
    _, _, expected = _reference(reference, ids, mask)
    got = gemmakit.embed(model, tokenizer, rows)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_an_embedding_model_does_not_generate(composite):
    model, _ = gemmakit.load(composite[0], dtype="float32")
    with pytest.raises(InvalidRequestError, match="embedding model"):
        gemmakit.generate(model, None, [2, 10, 11], max_tokens=2)


def test_unsupported_and_broken_directories_say_why(composite, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(composite[0], broken)
    raw = json.loads((broken / "config.json").read_text())
    raw["text_config"]["per_layer_config"]["0"] = {"head_dim": 32}  # a sliding layer of its own shape
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="per_layer_config sets head_dim on layer 0 \\(local\\)"):
        gemmakit.load(broken)
    del raw["text_config"]["per_layer_config"]["0"]
    raw["text_config"]["per_layer_config"]["4"] = {"head_dim": 64}  # the global layers disagree
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="config.json: per_layer_config gives the global layers different"):
        gemmakit.load(broken)
    shutil.copy(composite[0] / "config.json", broken / "config.json")
    tensors = load_file(broken / "model.safetensors")
    del tensors["language_model.layers.3.ple_block.per_layer_projection.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors language_model.layers.3.ple_block.per_layer_projection"):
        gemmakit.load(broken)


# --- with the real Gemma tokenizer (slow) --------------------------------------------------------


@pytest.fixture(scope="module")
def with_tokenizer(gemma_hf_tokenizer, tmp_path_factory):
    """A text model with the real Gemma vocabulary and tokenizer (<bos> and <eos> around a text)."""
    from transformers.models.embedding_gemma2.modeling_embedding_gemma2 import EmbeddingGemma2TextModel

    reference = _randomise(EmbeddingGemma2TextModel(_text_config(vocab_size=262_144)), 6)
    directory = _save(reference, tmp_path_factory.mktemp("eg2") / "eg2-tokenizer")
    transformers.AutoTokenizer.from_pretrained(gemma_hf_tokenizer).save_pretrained(directory)
    return directory, reference


def test_texts_match_transformers_with_its_tokenizer(with_tokenizer):
    """Texts tokenised as transformers' tokenizer does (its special tokens pooled with the text)."""
    directory, reference = with_tokenizer
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    batch = hf_tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0] == hf_tokenizer.bos_token_id
    _, _, expected = _reference(reference, batch["input_ids"], batch["attention_mask"])
    model, tokenizer = gemmakit.load(directory, dtype="float32")
    assert (model.config.add_bos, model.config.add_eos) == (True, True)
    got = gemmakit.embed(model, tokenizer, TEXTS, batch_size=4)
    assert _cosines(got, expected).min() >= 0.9999
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pooling,dense", [("mean", False), ("max", True)])
def test_sentence_transformers_directory_matches_encode(with_tokenizer, tmp_path, pooling, dense):
    """sentence-transformers 6.3 holds EmbeddingGemma2TextModel as its Transformer module (the
    composite EmbeddingGemma2Model needs a multimodal processor it cannot build from a tokenizer):
    its pooling reads the projected tokens, so max pooling too sees the projection first."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    modules = [Transformer(str(with_tokenizer[0]), max_seq_length=64), Pooling(48, pooling)]
    if dense:
        torch.manual_seed(7)
        modules.append(Dense(48, 24, bias=True, activation_function=torch.nn.Tanh()))
    modules.append(Normalize())
    prompts = {"query": "task: search result | query: ", "document": "title: none | text: "}
    directory = tmp_path / "st"
    st.SentenceTransformer(modules=modules, prompts=prompts, device="cpu").save(str(directory))
    reference = st.SentenceTransformer(str(directory), device="cpu")
    model, tokenizer = gemmakit.load(directory, dtype="float32")
    assert model.config.projection == 48 and model.config.max_seq_length == 64
    for prompt in (None, "query"):
        expected = reference.encode(TEXTS, prompt_name=prompt, convert_to_tensor=True)
        got = gemmakit.embed(model, tokenizer, TEXTS, prompt=prompt, batch_size=3)
        assert got.shape == expected.shape
        assert _cosines(got, expected).min() >= 0.9999
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_info_reports_the_text_path(composite):
    """`gemmakit info`: the parameters counted from the config are the text path's tensors in the
    file (the projection included), and the report names the pipeline and the radius."""
    from gemmakit.info import describe, format_report

    directory, _ = composite
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        stored = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys() if k.startswith("language_model."))
    report = describe(str(directory))
    assert report["parameters"] == stored
    text = format_report(report)
    assert "48 features per text" in text and "projected to 48, mean pooling, L2-normalised" in text
    assert f"{RADIUS} tokens each way" in text and "KV cache" not in text
