"""Gemma 4 assistant drafters against transformers, on small random-weight models saved by transformers.

The target is E2B-like (per-layer embeddings, the last layers reading shared keys/values, K=V
global layers with their own KV-head count) with a sliding window of 5, shorter than the prompts.
The assistants have their own width, head count and layer count, one with a dense head and one
with the clustered head of the E2B/E4B assistants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import gemmakit
from gemmakit.engine.generate import generate_steps
from gemmakit.engine.speculative import speculative_greedy
from gemmakit.errors import InvalidRequestError
from gemmakit.models.assistant import AssistantModel
from tiny import VOCAB_SIZE, tiny_vocab

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma4AssistantForCausalLM"):
    pytest.skip("this transformers has no Gemma 4 assistant", allow_module_level=True)

WINDOW = 5
TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention", "full_attention"]
TARGET = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=len(TYPES),
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=WINDOW,
              layer_types=TYPES, max_position_embeddings=256, final_logit_softcapping=30.0, num_kv_shared_layers=3,
              use_double_wide_mlp=True, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB_SIZE,
              attention_k_eq_v=True, num_global_key_value_heads=1)
# the assistant's key/value shapes are the target's (it reads them); its width, heads and depth its own
ASSISTANT_TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                      sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                      max_position_embeddings=256, attention_k_eq_v=True, num_global_key_value_heads=1,
                      hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
UNIFIED_TEXT = {k: v for k, v in ASSISTANT_TEXT.items() if "per_layer_input" not in k}
CLUSTERS = dict(use_ordered_embeddings=True, num_centroids=13, centroid_intermediate_top_k=3)  # 299 = 13 x 23
PROMPT = [2, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150]  # longer than the window


@pytest.fixture(scope="module", autouse=True)
def all_shared_layers():
    """transformers 5.23's ``kv_sharing_modes`` (of Gemma4TextConfig and Gemma4UnifiedTextConfig)
    raises for a config whose layers all read shared keys and values, which every assistant is, so
    no assistant can be built; 5.25 returns "reuse" for each layer then. That answer is put in
    place where the installed version lacks it."""
    with pytest.MonkeyPatch.context() as patch:
        for cls in (transformers.Gemma4TextConfig, transformers.Gemma4UnifiedTextConfig):
            try:
                cls(**{**UNIFIED_TEXT, "num_kv_shared_layers": 3}).kv_sharing_modes  # noqa: B018
                continue
            except ValueError:
                pass

            def modes(self, original=cls.kv_sharing_modes):
                if self.num_kv_shared_layers == self.num_hidden_layers:
                    return ["reuse"] * self.num_hidden_layers
                return original.fget(self)

            patch.setattr(cls, "kv_sharing_modes", property(modes))
        yield


def _randomise(model, seed: int) -> None:
    """Weights far from their initial values, so that a mapping mistake shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("layer_scalar"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)


def _hf_assistant(clustered: bool, seed: int, **text):
    config = transformers.Gemma4AssistantConfig(
        text_config=transformers.Gemma4TextConfig(**{**ASSISTANT_TEXT, **text}),
        backbone_hidden_size=TARGET["hidden_size"], **(CLUSTERS if clustered else {}))
    model = transformers.Gemma4AssistantForCausalLM(config).eval()
    _randomise(model, seed)
    if clustered:
        order = torch.randperm(VOCAB_SIZE, generator=torch.Generator().manual_seed(seed))
        model.masked_embedding.token_ordering.copy_(order)
    return model


def _tokenizer():
    from gemmakit.tokenizer import Tokenizer, build_model_proto

    pieces, scores, types = tiny_vocab()
    proto = build_model_proto(pieces, scores, types, bos=(2, "<bos>"), eos=(1, "<eos>"), pad=(0, "<pad>"),
                              unk=(3, "<unk>"))
    return Tokenizer._from_proto(proto, source="tiny", types=types)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    hf = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**TARGET)).eval()
    _randomise(hf, 1)  # (a seed whose greedy continuation of PROMPT varies)
    path = tmp_path_factory.mktemp("target")
    hf.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    model, _ = gemmakit.load(path)
    return hf, model, path


@pytest.fixture(scope="module", params=["dense", "clustered"])
def assistant(request, tmp_path_factory):
    hf = _hf_assistant(request.param == "clustered", seed=2)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, tokenizer = gemmakit.load(path)
    assert isinstance(model, AssistantModel) and tokenizer is None
    return hf, model, path


def plain_greedy(model, prompt, n):
    return [s.tokens[0] for s in generate_steps(model, [prompt], n)]


def test_logits_match_transformers_for_the_targets_state(target, assistant):
    """Three drafting steps from the target's state after the prompt: the target's embedding of the
    next token and its last hidden state in, then the assistant's own state, over the target's keys
    and values (transformers is handed the sliding ones a query at the next position sees)."""
    hf, ours, _ = assistant
    _compare_drafting_steps(target, hf, ours)


def test_unified_assistant_logits_match_transformers(target, tmp_path):
    """The 12B's assistant (gemma4_unified_assistant, whose text config has no per-layer embeddings)."""
    config = transformers.Gemma4UnifiedAssistantConfig(
        text_config=transformers.Gemma4UnifiedTextConfig(**UNIFIED_TEXT), backbone_hidden_size=TARGET["hidden_size"],
        **CLUSTERS)
    hf = transformers.Gemma4UnifiedAssistantForCausalLM(config).eval()
    _randomise(hf, 7)
    hf.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB_SIZE, generator=torch.Generator().manual_seed(7)))
    hf.save_pretrained(tmp_path)
    ours, _ = gemmakit.load(tmp_path)
    _compare_drafting_steps(target, hf, ours)


def _compare_drafting_steps(target, hf, ours) -> None:
    hf_target, model, _ = target
    ids = torch.tensor([PROMPT])
    P = len(PROMPT)
    with torch.no_grad():
        out = hf_target(ids, output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
        shared = {kind: (k, v) for kind, (k, v) in out.shared_kv_states.items()}
        k, v = shared["sliding_attention"]
        shared["sliding_attention"] = (k[:, :, P - WINDOW + 1:], v[:, :, P - WINDOW + 1:])
        token, state = out.logits[:, -1:].argmax(-1), out.hidden_states[-1][:, -1:]
        expected = []
        for _ in range(3):
            step = hf(inputs_embeds=torch.cat([hf_target.get_input_embeddings()(token), state], -1),
                      position_ids=torch.tensor([[P]]), shared_kv_states=shared)
            expected.append((step.logits, step.last_hidden_state))
            token, state = step.logits.argmax(-1), step.last_hidden_state

    cache = model.new_cache(1, 32)
    with torch.inference_mode():
        logits, hidden = model(ids, cache=cache, last_only=True, with_hidden=True)
        reading = cache.read_by_kind(ours.config.decoder, torch.tensor([[P]]), ours.dtype)
        token, state = logits.argmax(-1), hidden
        for want_logits, want_state in expected:
            got_logits, state = ours(model.embed_tokens(token), state, reading)
            assert (got_logits - want_logits).abs().max().item() <= 1e-4
            assert (state - want_state).abs().max().item() <= 1e-4
            token = got_logits.argmax(-1)


def test_info_counts_an_assistant_and_convert_refuses_it(assistant, tmp_path):
    from gemmakit.convert import convert
    from gemmakit.info import describe

    hf, ours, path = assistant
    report = describe(str(path))
    assert report["parameters"] == sum(p.numel() for p in hf.parameters()) + ours.config.decoder.num_layers
    assert report["parameters"] == sum(p.numel() for p in ours.parameters())
    assert report["kv_cache_bytes"]["float32"] == 0  # it reads its target's
    with pytest.raises(InvalidRequestError, match="assistant drafter"):
        convert(path, tmp_path / "out")


def test_propose_is_the_argmax_of_the_logits(target, assistant):
    _, model, _ = target
    _, ours, _ = assistant
    cache = model.new_cache(1, 32)
    with torch.inference_mode():
        logits, hidden = model(torch.tensor([PROMPT]), cache=cache, last_only=True, with_hidden=True)
        reading = cache.read_by_kind(ours.config.decoder, torch.tensor([[len(PROMPT)]]), ours.dtype)
        token, state = logits.argmax(-1), hidden
        for _ in range(4):
            embedding = model.embed_tokens(token)
            full, next_state = ours(embedding, state, reading)
            proposed, proposed_state = ours.propose(embedding, state, reading)
            assert proposed.tolist() == full.argmax(-1).tolist()
            assert torch.equal(proposed_state, next_state)
            token, state = proposed, next_state


@pytest.mark.parametrize("k", [1, 3])
def test_assistant_drafting_gives_the_targets_greedy_tokens(target, assistant, k):
    hf_target, model, _ = target
    _, ours, _ = assistant
    expected = plain_greedy(model, PROMPT, 24)
    with torch.no_grad():
        out = hf_target.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
    assert expected == out[0, len(PROMPT):].tolist()
    got, stats = speculative_greedy(model, ours, PROMPT, 24, k=k)
    assert got == expected
    assert stats["rounds"] > 0


@pytest.mark.parametrize("kept", [0, 2, 3])
def test_after_a_round_the_assistant_drafts_from_the_kept_tokens(target, assistant, kept):
    """A round of 3 drafts of which the target keeps ``kept`` (rollback of the rest, the ring's
    included): the next round's drafting state (the target's hidden state after the last kept
    token, its cache read at the next position) gives the logits a fresh prefill of the kept
    tokens gives."""
    from gemmakit.engine.speculative import _AssistantDrafter, _rollback, _snapshot

    _, model, _ = target
    _, ours, _ = assistant
    greedy = plain_greedy(model, PROMPT, 5)
    proposals = (greedy[1:1 + kept] + [(greedy[1 + kept] + 1) % VOCAB_SIZE] * 3)[:3]

    def next_logits(drafter: _AssistantDrafter, token: int) -> torch.Tensor:
        reading = drafter.cache.read_by_kind(ours.config.decoder, torch.tensor([[drafter.cache.length]]), ours.dtype)
        return ours(model.embed_tokens(torch.tensor([[token]])), drafter.state, reading)[0]

    with torch.inference_mode():
        cache = model.new_cache(1, 32)
        drafter = _AssistantDrafter(model, ours)
        drafter.start(None, 32, cache, model(torch.tensor([PROMPT]), cache=cache, last_only=True, with_hidden=True)[1])
        block = torch.tensor([[greedy[0]] + proposals])
        snap = _snapshot(cache, block.shape[1])
        logits, hidden = model(block, cache=cache, with_hidden=True)
        assert logits[0].argmax(-1).tolist()[:kept + 1] == greedy[1:kept + 2]
        _rollback(cache, snap, kept + 1)
        drafter.accepted(proposals, kept, hidden)
        got = next_logits(drafter, greedy[kept + 1])

        fresh_cache = model.new_cache(1, 32)
        fresh = _AssistantDrafter(model, ours)
        fresh.start(None, 32, fresh_cache, model(torch.tensor([PROMPT + greedy[:kept + 1]]), cache=fresh_cache,
                                                 last_only=True, with_hidden=True)[1])
        assert cache.length == fresh_cache.length
        assert (got - next_logits(fresh, greedy[kept + 1])).abs().max().item() <= 1e-5


def _copying_assistant(hf_target):
    """A dense assistant made to propose the token it is given: identity blocks (no attention or MLP
    output), and a head whose rows are the unit directions of the projected target embeddings."""
    hf = _hf_assistant(False, seed=5)
    d = ASSISTANT_TEXT["hidden_size"]
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            layer.layer_scalar.fill_(1.0)
        hf.model.norm.weight.fill_(1.0)
        w = torch.randn(d, TARGET["hidden_size"], generator=torch.Generator().manual_seed(6))
        hf.pre_projection.weight.copy_(torch.cat([w, torch.zeros_like(w)], 1))
        rows = hf_target.model.embed_tokens.weight @ w.T
        hf.model.embed_tokens.weight.copy_(rows / rows.norm(dim=-1, keepdim=True))
    return hf


def test_drafts_that_the_target_accepts(target, tmp_path):
    """The target repeats tokens here and there; an assistant that proposes the last token has those
    drafts accepted. Rounds and accepted drafts are what that rule gives on the target's greedy tokens."""
    hf_target, model, _ = target
    _copying_assistant(hf_target).save_pretrained(tmp_path / "copy")
    ours, _ = gemmakit.load(tmp_path / "copy")
    N, k = 30, 3
    greedy = plain_greedy(model, PROMPT, N + k)
    rounds = accepted = produced = i = 0
    while True:  # the rounds of engine/speculative.py with drafts [g_i] * k
        produced += 1
        if produced >= N:
            break
        n = 0
        while n < k and greedy[i + 1 + n] == greedy[i]:
            n += 1
        rounds, accepted = rounds + 1, accepted + n
        produced += min(n, N - produced)
        if produced >= N:
            break
        i += n + 1
    got, stats = speculative_greedy(model, ours, PROMPT, N, k=k)
    assert got == greedy[:N]
    assert accepted > 0 and stats == {"rounds": rounds, "accepted": accepted}


@pytest.mark.slow  # a CLI subprocess
def test_cli_generate_with_an_assistant(target, assistant):
    _, model, target_path = target
    _, _, path = assistant
    run = subprocess.run([sys.executable, "-m", "gemmakit.cli", "generate", "-m", str(target_path), "--json",
                          "-n", "12", "--draft-model", str(path), "--draft-tokens", "3", "the cat"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    stops = _tokenizer().stop_ids()
    expected = plain_greedy(model, out["prompt_ids"], 12)
    expected = expected[:next((i + 1 for i, t in enumerate(expected) if t in stops), len(expected))]
    assert out["token_ids"] == expected
    assert out["speculative"]["rounds"] > 0


@pytest.mark.slow  # a CLI subprocess
def test_an_assistant_for_another_target_is_a_one_line_error(target, tmp_path):
    _, model, target_path = target
    hf = _hf_assistant(False, seed=3)
    hf.config.backbone_hidden_size = 48
    hf.pre_projection = torch.nn.Linear(96, 32, bias=False)
    hf.post_projection = torch.nn.Linear(32, 48, bias=False)
    hf.save_pretrained(tmp_path / "other")
    other, _ = gemmakit.load(tmp_path / "other")
    with pytest.raises(InvalidRequestError, match="does not fit the target: it was made for a target of width 48"):
        speculative_greedy(model, other, PROMPT, 4)
    run = subprocess.run([sys.executable, "-m", "gemmakit.cli", "generate", "-m", str(target_path), "-n", "4",
                          "--draft-model", str(tmp_path / "other"), "the"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit the target" in lines[0], run.stderr


def test_an_assistant_of_other_key_value_heads_is_refused(target, tmp_path):
    _, model, _ = target
    hf = _hf_assistant(False, seed=4, num_key_value_heads=1, num_attention_heads=2)
    hf.save_pretrained(tmp_path / "mqa")
    other, _ = gemmakit.load(tmp_path / "mqa")
    with pytest.raises(InvalidRequestError, match="local layers read 1 key/value heads of 16"):
        speculative_greedy(model, other, PROMPT, 4)


@pytest.mark.slow  # a live server
def test_serve_with_an_assistant(target, tmp_path):
    """`serve --draft-model ASSISTANT`: greedy requests drafted by the assistant, the tokens of the
    server without a draft."""
    import httpx
    import openai

    from gemmakit.serve import build_app
    from live_server import live_server

    _, model, _ = target
    _hf_assistant(True, seed=2).save_pretrained(tmp_path / "assistant")
    ours, _ = gemmakit.load(tmp_path / "assistant")
    tokenizer = _tokenizer()

    def complete(app) -> tuple[str, str]:
        with live_server(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            text = client.completions.create(model="m", prompt="the cat", max_tokens=16, temperature=0)
            return text.choices[0].text, httpx.get(url + "/metrics").text

    want, _ = complete(build_app(model, tokenizer, "m", max_batch=2))
    got, metrics = complete(build_app(model, tokenizer, "m", max_batch=2, draft=ours, draft_tokens=3))
    assert got == want and want
    assert float(next(line.split()[-1] for line in metrics.splitlines()
                      if line.startswith("gemmakit_speculative_rounds_total"))) > 0
