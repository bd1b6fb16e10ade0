"""Fine-tuning on tiny random models: data pipeline, LoRA, the loop, resume, PEFT round trip, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import gemmakit
from gemmakit.errors import CheckpointError, InvalidRequestError
from gemmakit.train.data import load_blocks, pack, parse_example, read_jsonl
from gemmakit.checkpoints.peft import save_adapter
from gemmakit.models.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from gemmakit.train.loop import Trainer, TrainConfig
from train_helpers import synthetic_task, tiny_gguf, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tokenizer(gguf):
    return gemmakit.load(gguf)[1]


# --- data -----------------------------------------------------------------------------------------


def test_chat_loss_only_on_model_turns(tokenizer):
    line = json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "the hat"}, {"role": "user", "content": "win"},
                                    {"role": "assistant", "content": "we sat"}]})
    ex = parse_example(line, tokenizer)
    scored = tokenizer.decode([i for i, t in zip(ex.ids, ex.targets) if t])
    assert scored == "the hat<end_of_turn>\nwe sat<end_of_turn>\n"
    assert tokenizer.decode(ex.ids[1:]) == gemmakit.chat.render_chat(
        json.loads(line)["messages"], add_generation_prompt=False)


def test_text_example_and_packing(tokenizer):
    ex = parse_example('{"text": "the cat"}', tokenizer)
    assert ex.ids[0] == tokenizer.bos_id and ex.ids[-1] == tokenizer.eos_id and ex.targets[0] is False
    blocks = pack([ex] * 5, seq_len=7, pad_id=tokenizer.pad_id)
    assert blocks.ids.shape[1] == 8
    assert blocks.ids.flatten()[:len(ex.ids) * 5].tolist() == ex.ids * 5  # packed end to end
    assert blocks.target_tokens == (len(ex.ids) - 1) * 5 - sum(1 for i in range(1, len(blocks)) if
                                                                blocks.mask[i, 0])  # first column is input only


def test_malformed_lines_named_and_skippable(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}, "{not json", {"other": 1}, {"text": "we win"}])
    with pytest.raises(InvalidRequestError, match=r"d\.jsonl:2: invalid JSON"):
        read_jsonl(path, tokenizer)
    warnings = []
    examples = read_jsonl(path, tokenizer, skip_bad=True, warn=warnings.append)
    assert len(examples) == 2
    assert [w.split(": ")[0].rsplit(":", 1)[1] for w in warnings] == ["2", "3"]


def test_empty_data_is_an_error(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InvalidRequestError, match="no usable examples"):
        read_jsonl(tmp_path / "empty.jsonl", tokenizer)


# --- LoRA -----------------------------------------------------------------------------------------


def test_unknown_lora_target_is_an_error(gguf):
    model, _ = gemmakit.load(gguf)
    with pytest.raises(InvalidRequestError, match="'qkv_proj' does not exist"):
        apply_lora(model, LoRAConfig(targets=("q_proj", "qkv_proj")))


def test_lora_starts_at_base_and_merge_is_exact(gguf):
    model, _ = gemmakit.load(gguf)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    base = model(ids)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "down_proj")))
    assert torch.equal(model(ids), base)  # B = 0 at start
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.1)
    adapted = model(ids)
    assert (adapted - base).abs().max() > 1e-3
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (model(ids) - adapted).abs().max() < 1e-4


# --- the loop -------------------------------------------------------------------------------------


def _trainer(gguf, data, out, **cfg):
    model, tok = gemmakit.load(gguf)
    train, held = load_blocks(data, tok, seq_len=32, heldout=0.2, seed=0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    config = TrainConfig(**{"lr": 1e-2, "epochs": 3, "batch_size": 4, "grad_accum": 2, **cfg})
    return Trainer(model, train, config, out, heldout=held, progress=False)


def test_lora_finetune_lowers_heldout_loss(tmp_path, gguf):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_task(60))
    trainer = _trainer(gguf, data, tmp_path / "out")
    before = trainer.evaluate()
    result = trainer.run()
    after = result.evals[-1][1]
    assert after < before - 1.0, (before, after)
    assert (tmp_path / "out" / "checkpoint.pt").is_file()


def test_resume_equals_unbroken_run(tmp_path, gguf):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_task(30))
    unbroken = _trainer(gguf, data, tmp_path / "a", max_steps=5)
    unbroken.run()
    first = _trainer(gguf, data, tmp_path / "b", max_steps=5)
    first.run(stop_after=2)  # "killed" after step 2 (its checkpoint is on disk)
    torch.manual_seed(1234)  # a fresh process would have other RNG state
    resumed = _trainer(gguf, data, tmp_path / "b", max_steps=5)
    resumed.load_checkpoint()
    assert resumed.step == 2
    resumed.run()
    for name, p in unbroken.params.items():
        assert torch.equal(p, resumed.params[name]), name


def test_corrupt_or_foreign_checkpoint_refused(tmp_path, gguf):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_task(30))
    trainer = _trainer(gguf, data, tmp_path / "out", max_steps=1)
    trainer.run()
    path = tmp_path / "out" / "checkpoint.pt"
    other = write_jsonl(tmp_path / "e.jsonl", synthetic_task(30, seed=5))
    with pytest.raises(CheckpointError, match="different training data"):
        _trainer(gguf, other, tmp_path / "out").load_checkpoint()
    path.write_bytes(path.read_bytes()[:1000])  # a truncated file (not produced by us: we rename)
    with pytest.raises(CheckpointError, match="not a readable training checkpoint"):
        _trainer(gguf, data, tmp_path / "out").load_checkpoint()
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary leftovers


def test_gradient_checkpointing_same_gradients(tmp_path, gguf):
    from gemmakit.train.loop import cross_entropy_sum

    data = write_jsonl(tmp_path / "d.jsonl", synthetic_task(20))
    grads = []
    for flag in (False, True):
        trainer = _trainer(gguf, data, None, grad_checkpointing=flag)
        ids, mask = trainer.train.ids[:4], trainer.train.mask[:4]
        trainer.model.train()
        cross_entropy_sum(trainer.model, ids, mask, torch.arange(4)).backward()  # dropout: checkpoint replays RNG
        grads.append({n: p.grad for n, p in trainer.params.items()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-5), name


# --- PEFT round trip ------------------------------------------------------------------------------


def test_adapter_loads_in_peft_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    hf = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=24, sliding_window=8, query_pre_attn_scalar=24,
                                            max_position_embeddings=128)).eval()
    hf.save_pretrained(tmp_path / "base")
    model, _ = gemmakit.load(tmp_path / "base")
    apply_lora(model, LoRAConfig(rank=4, alpha=12, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.2)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    ours = model(ids).detach()
    save_adapter(model, tmp_path / "adapter", LoRAConfig(rank=4, alpha=12,
                                                          targets=("q_proj", "v_proj", "o_proj", "up_proj",
                                                                   "down_proj")))
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (ours - theirs).abs().max() < 1e-4
    # and back: gemmakit.load(..., adapter=...) merges the same adapter
    merged, _ = gemmakit.load(tmp_path / "base", adapter=tmp_path / "adapter")
    assert (merged(ids) - theirs).abs().max() < 1e-4


def test_merged_model_saved_as_hf_directory(tmp_path, gguf):
    transformers = pytest.importorskip("transformers")
    from gemmakit.train.export import save_hf_directory

    model, tok = gemmakit.load(gguf)
    apply_lora(model, LoRAConfig(rank=2))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.2)
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(4))
    expected = model(ids).detach()
    save_hf_directory(merge_lora(model), tok, tmp_path / "merged")
    again, tok2 = gemmakit.load(tmp_path / "merged")
    assert (again(ids) - expected).abs().max() < 1e-4
    assert tok2.encode("the cat") == tok.encode("the cat")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (hf(ids).logits - expected).abs().max() < 1e-4
