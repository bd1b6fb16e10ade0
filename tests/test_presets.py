"""The preset registry against published numbers, and `gemmakit info` from a preset alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gemmakit.models.config import PRESETS

# Parameter totals of the published checkpoints (the safetensors "total_size" / 2 bytes of the bf16
# repositories google/gemma-2b, gemma-7b, gemma-2-2b, gemma-2-9b, gemma-2-27b, gemma-3-270m, gemma-3-1b-pt).
PUBLISHED_PARAMETERS = {
    "gemma-2b": 2_506_172_416, "gemma-7b": 8_537_680_896, "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984, "gemma2-27b": 27_227_128_320, "gemma3-270m": 268_098_176,
    "gemma3-1b": 999_885_952,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_parameter_count_matches_published_checkpoint(name):
    assert PRESETS[name].num_parameters() == PUBLISHED_PARAMETERS[name]


def test_every_size_of_the_family_is_there():
    for name in ["gemma-2b", "gemma-7b", "codegemma-2b", "codegemma-7b", "codegemma-7b-it", "gemma2-2b", "gemma2-9b",
                 "gemma2-27b", "gemma3-270m", "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b"]:
        assert name in PRESETS
    # instruction-tuned variants differ only in weights
    assert PRESETS["codegemma-7b-it"] == PRESETS["codegemma-7b"].replace(name="codegemma-7b-it")
    assert PRESETS["gemma2-27b-it"] == PRESETS["gemma2-27b"].replace(name="gemma2-27b-it")


def test_layer_patterns():
    assert PRESETS["gemma-7b"].layer_kinds == ("global",) * 28
    g2 = PRESETS["gemma2-27b"].layer_kinds
    assert g2[:2] == ("local", "global") and g2.count("global") == 23
    g3 = PRESETS["gemma3-27b"].layer_kinds
    assert g3[:6] == ("local",) * 5 + ("global",) and g3.count("global") == 10


def test_layer_plan_follows_the_published_layouts():
    """Each layer's plan as Gemma 3 27B's config.json and RecurrentGemma's reference state them:
    local layers see a 1024-key window with RoPE base 10k and no scaling, global ones everything with
    base 1M scaled x8; Griffin's recurrent layers hold no keys; every layer reads its own keys."""
    plans = PRESETS["gemma3-27b"].layer_plan
    local, glob = plans[0], plans[5]
    assert (local.mixer, local.window, local.rope_theta, local.rope_scaling) == ("local", 1024, 10_000.0, 1.0)
    assert (glob.mixer, glob.window, glob.rope_theta, glob.rope_scaling) == ("global", None, 1_000_000.0, 8.0)
    assert {(p.head_dim, p.num_kv_heads, p.rotary_dim) for p in plans} == {(128, 16, 128)}
    assert [p.kv_source for p in plans] == list(range(62))
    griffin = PRESETS["recurrentgemma-2b"]
    assert [p.mixer for p in griffin.layer_plan[:3]] == ["recurrent", "recurrent", "local"]
    assert griffin.kind_plans["local"].rotary_dim == 128 and griffin.kind_plans["local"].window == 2048
    # the plan that a kind's one step context is built from
    assert PRESETS["gemma3-27b"].kind_plans["global"] == glob


def test_caches_are_shaped_by_the_plan():
    from gemmakit.models.cache import KVCache, RecurrentState
    from gemmakit.models.row_cache import RowKVCache

    config = PRESETS["recurrentgemma-2b"].replace(num_layers=3, layer_kinds=("recurrent", "recurrent", "local"))
    for cache, extra in ((KVCache(config, 2, 4096, torch.float32, "meta"), 0),
                         (RowKVCache(config, 2, 4096, torch.float32, "meta"), 1)):
        assert isinstance(cache.layers[0], RecurrentState) and isinstance(cache.layers[1], RecurrentState)
        assert tuple(cache.layers[2].keys.shape) == (2, 1, 2048 + extra, 256)


def test_info_from_preset_alone():
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "info", "--model", "gemma2-27b", "--json",
                           "--context", "8192"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["parameters"] == 27_227_128_320
    assert report["weight_bytes"]["bfloat16"] == 2 * 27_227_128_320
    # 23 global layers x 8192 + 23 local layers x 4096 positions, K and V, 16 kv heads x 128, bf16
    assert report["kv_cache_bytes"]["bfloat16"] == 2 * (23 * 8192 + 23 * 4096) * 16 * 128 * 2
