"""``gemmakit finetune / distill / perplexity`` end to end on tiny models, and their bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gemmakit.cli import main
from train_helpers import synthetic_task, tiny_gguf, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from gemmakit.train.export import save_hf_directory
    from tiny import random_model, tiny_config

    tmp = tmp_path_factory.mktemp("cli")
    other = save_hf_directory(random_model(tiny_config("gemma3", num_layers=1, vocab_size=280)), None, tmp / "other")
    return {"model": tiny_gguf(tmp), "data": write_jsonl(tmp / "d.jsonl", synthetic_task(30)),
            "other_vocab": other, "tmp": tmp}


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gemmakit: error: ") and "\n" not in err, err
    return err


def _finetune(files, out, *extra):
    return main(["finetune", "--model", str(files["model"]), "--data", str(files["data"]), "--out", str(out),
                 "--seq-len", "24", "--batch-size", "2", "--lr", "1e-2", "--lora-rank", "4", "--no-progress",
                 "--lora-dropout", "0.1", *extra])


def test_finetune_resume_and_use_adapter(files, tmp_path, capsys):
    assert _finetune(files, tmp_path / "a", "--max-steps", "4") == 0
    assert _finetune(files, tmp_path / "b", "--max-steps", "2") == 0
    assert _finetune(files, tmp_path / "b", "--max-steps", "4", "--resume", "--merge") == 0
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["eval"][0]["perplexity"] > 1
    capsys.readouterr()
    # the adapter and the merged model generate the same text
    assert main(["generate", "--model", str(files["model"]), "--adapter", str(tmp_path / "b" / "adapter"),
                 "--json", "-n", "6", "the cat"]) == 0
    with_adapter = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(["generate", "--model", str(tmp_path / "b" / "model"), "--json", "-n", "6", "the cat"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == with_adapter


def test_distill_and_perplexity_cli(files, tmp_path, capsys):
    assert main(["distill", "--teacher", str(files["model"]), "--student", str(files["model"]), "--data",
                 str(files["data"]), "--out", str(tmp_path / "d"), "--seq-len", "24", "--max-steps", "2",
                 "--top-k", "8", "--precompute", str(tmp_path / "store"), "--no-progress"]) == 0
    assert (tmp_path / "store" / "meta.json").is_file() and (tmp_path / "d" / "model" / "config.json").is_file()
    text = tmp_path / "t.txt"
    text.write_text("the cat sat in the hat and we win. " * 20)
    capsys.readouterr()
    assert main(["perplexity", "--model", str(tmp_path / "d" / "model"), "--data", str(text), "--ctx", "32",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["scored"] == r["chunks"] * 15 and r["perplexity"] > 1


def test_bad_inputs_fail_before_training(files, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    assert "no usable examples" in _error(capsys, ["finetune", "--model", str(files["model"]), "--data", str(empty),
                                                   "--out", str(out)])
    assert "'attn_proj' does not exist" in _error(capsys, ["finetune", "--model", str(files["model"]), "--data",
                                                           str(files["data"]), "--out", str(out), "--targets",
                                                           "q_proj", "attn_proj"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "the cat"}, '{"text": 3}'])
    assert "bad.jsonl:2:" in _error(capsys, ["finetune", "--model", str(files["model"]), "--data", str(bad),
                                             "--out", str(out)])
    assert "different vocabularies" in _error(capsys, ["distill", "--teacher", str(files["model"]), "--student",
                                                       str(files["other_vocab"]), "--data", str(files["data"]),
                                                       "--out", str(out)])
    assert "nothing to resume" in _error(capsys, ["finetune", "--model", str(files["model"]), "--data",
                                                  str(files["data"]), "--out", str(out), "--resume"])
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
