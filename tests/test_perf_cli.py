"""`--quant`, `--draft-model` and `info --all-presets` through the CLI, on tiny GGUF files."""

from __future__ import annotations

import json

import pytest

from gemmakit.cli import main
from gemmakit.models.config import PRESETS
from tiny import random_model, tiny_config, write_gguf


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("perf")
    target = write_gguf(d / "target.gguf", random_model(tiny_config(num_layers=3), seed=5))
    draft = write_gguf(d / "draft.gguf", random_model(tiny_config(num_layers=1), seed=6))
    return str(target), str(draft)


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_draft_model_gives_the_targets_greedy_ids(files, capsys):
    target, draft = files
    plain = _json(capsys, ["generate", "--json", "-n", "12", "-m", target, "the cat"])
    spec = _json(capsys, ["generate", "--json", "-n", "12", "-m", target, "--draft-model", draft, "the cat"])
    assert spec["token_ids"] == plain["token_ids"]
    assert spec["speculative"]["rounds"] >= 1


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quant_flag_generates(files, capsys, quant):
    out = _json(capsys, ["generate", "--json", "-n", "5", "-m", files[0], "--quant", quant, "the cat"])
    assert len(out["token_ids"]) == 5


def test_unknown_quant_is_rejected_by_argparse(files):
    with pytest.raises(SystemExit) as e:
        main(["generate", "-m", files[0], "--quant", "int3", "x"])
    assert e.value.code == 2


def test_all_presets_table_is_weights_plus_kv_from_first_principles(capsys):
    assert main(["info", "--all-presets", "--context", "32768"]) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("| gemma3-1b |"))
    c = PRESETS["gemma3-1b"]
    globals_, locals_ = c.layer_kinds.count("global"), c.layer_kinds.count("local")
    kv_bf16 = 2 * c.num_kv_heads * c.head_dim * (globals_ * 32768 + locals_ * c.sliding_window) * 2
    expected = (2 * c.num_parameters() + kv_bf16) / 1024**3
    assert f"| {expected:.2f} GiB |" in row
