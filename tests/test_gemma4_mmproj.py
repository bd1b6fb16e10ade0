"""Gemma 4 vision from llama.cpp's two files: the text GGUF plus its ``gemma4v`` ``mmproj-*.gguf``.

The files in tests/data/gguf_llamacpp/gemma4-vision/ were written by llama.cpp's own converter
(``convert_hf_to_gguf.py``, with and without ``--mmproj``, both F32) from the tiny random
Gemma4ForConditionalGeneration saved beside them in ``hf/`` (tests/data/gguf_llamacpp/make.py).
gemmakit's Hugging Face path on that directory (itself checked against transformers in
tests/test_gemma4_vision.py) is the reference: the two files must give the very same model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import gemmakit
from gemmakit.errors import UnsupportedModelError
from gemmakit.models.gemma4_vision import Gemma4VisionLanguageModel

DATA = Path(__file__).parent / "data" / "gguf_llamacpp"
TEXT, MMPROJ = DATA / "gemma4-vision" / "gemma4-vision-f32.gguf", DATA / "gemma4-vision" / "mmproj-gemma4-vision-f32.gguf"
HF = DATA / "gemma4-vision" / "hf"


@pytest.fixture(scope="module")
def models():
    pytest.importorskip("transformers")  # (the tokenizer.json of hf/)
    gguf, _ = gemmakit.load(TEXT, mmproj=MMPROJ)
    hf, tokenizer = gemmakit.load(HF)
    return gguf, hf, tokenizer


def test_the_two_files_are_the_directorys_model(models):
    gguf, hf, _ = models
    assert isinstance(gguf, Gemma4VisionLanguageModel)
    assert gguf.config.vision == hf.config.vision and gguf.config.image_token_id == hf.config.image_token_id
    ours, theirs = gguf.state_dict(), hf.state_dict()
    vision = [n for n in theirs if not n.startswith("decoder.")]
    assert vision and all(torch.equal(ours[n], theirs[n]) for n in vision)


def test_logits_with_images_equal_the_directorys(models):
    from test_gemma4_vision import picture

    from gemmakit.vision.gemma4_preprocess import build_prompt, preprocess

    gguf, hf, tokenizer = models
    pixels, positions, tokens = preprocess([picture(1, (90, 60)), picture(2, (50, 70))], max_soft_tokens=70)
    ids = torch.tensor([build_prompt(hf.config, tokenizer, "look <|image|> and <|image|> here", tokens)])
    with torch.no_grad():
        expected = hf(ids, pixels, positions)
        got = gguf(ids, pixels, positions)
    assert (got - expected).abs().max() <= 1e-4
    other = preprocess([picture(3, (90, 60)), picture(2, (50, 70))], max_soft_tokens=70)
    assert (gguf(ids, *other[:2]) - expected).abs().max() > 1e-3  # the image matters


def test_the_mmproj_beside_the_model_is_found(models, tmp_path):
    shutil.copy(TEXT, tmp_path / TEXT.name)
    shutil.copy(MMPROJ, tmp_path / MMPROJ.name)
    found, _ = gemmakit.load(tmp_path / TEXT.name)
    assert isinstance(found, Gemma4VisionLanguageModel)


def test_a_gemma3_text_model_refuses_a_gemma4_mmproj():
    gemma3 = DATA / "gemma3-vision" / "gemma3-vision-f32.gguf"
    with pytest.raises(UnsupportedModelError, match="a Gemma 4 vision file"):
        gemmakit.load(gemma3, mmproj=MMPROJ)
    with pytest.raises(UnsupportedModelError, match="a Gemma 3 vision file"):
        gemmakit.load(TEXT, mmproj=DATA / "gemma3-vision" / "mmproj-gemma3-vision-f32.gguf")


def test_cli_generate_with_the_two_files(models, tmp_path, capsys):
    import json

    from test_gemma4_vision import picture

    from gemmakit.cli import main

    picture(1, (90, 60)).save(tmp_path / "p.png")
    assert main(["generate", "--model", str(TEXT), "--mmproj", str(MMPROJ), "--image", str(tmp_path / "p.png"),
                 "--json", "-n", "3", "look <|image|> here"]) == 0
    out = json.loads(capsys.readouterr().out)
    gguf, _, _ = models
    assert len(out["token_ids"]) == 3 and out["prompt_ids"].count(gguf.config.image_token_id) > 0
