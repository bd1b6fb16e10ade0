"""Distillation and perplexity on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

import gemmakit
from gemmakit.errors import CheckpointError, InvalidRequestError
from gemmakit.train.data import load_blocks
from gemmakit.train.distill import (check_same_tokenizer, distill_loss, kl_sum, load_teacher_store, mean_kl,
                                    precompute_teacher, random_student)
from gemmakit.train.loop import Trainer, TrainConfig
from gemmakit.train.perplexity import perplexity
from train_helpers import synthetic_task, tiny_gguf, write_jsonl

pytestmark = [pytest.mark.usefixtures("one_thread"),  # tiny models: threads only add contention
              pytest.mark.slow]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    teacher, tok = gemmakit.load(tiny_gguf(tmp, num_layers=3, seed=1))
    data = write_jsonl(tmp / "d.jsonl", synthetic_task(40))
    train, held = load_blocks(data, tok, seq_len=24, heldout=0.2)
    # A random teacher is nearly uniform; teach it the task first so it has something to pass on.
    teacher.requires_grad_(True)
    Trainer(teacher, train, TrainConfig(lr=3e-3, epochs=6, batch_size=4), None, progress=False).run()
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher, tok, train, held, tmp


def test_kl_is_zero_for_identical_and_topk_full_equals_full():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 30, generator=g), torch.randn(2, 5, 30, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert kl_sum(s, mask, 2.0, teacher_logits=s).abs() < 1e-5
    full = kl_sum(s, mask, 2.0, teacher_logits=t)
    values, ids = t.topk(30, dim=-1)
    assert torch.allclose(kl_sum(s, mask, 2.0, topk=(values, ids)), full, rtol=1e-5)
    # by hand, one position, T = 2
    p, q = torch.softmax(t[0, 0] / 2, -1), torch.softmax(s[0, 0] / 2, -1)
    one = torch.zeros(2, 5, dtype=torch.bool)
    one[0, 0] = True
    assert torch.allclose(kl_sum(s, one, 2.0, teacher_logits=t), 4 * (p * (p / q).log()).sum(), rtol=1e-5)


@pytest.mark.parametrize("mode", ["live", "precomputed"])
def test_random_student_kl_to_teacher_falls(setup, mode):
    teacher, tok, train, held, tmp = setup
    student = random_student(teacher.config.replace(num_layers=1, layer_kinds=("local",)), torch.float32, "cpu")
    student.requires_grad_(True)
    before = mean_kl(student, teacher, held)
    if mode == "live":
        loss = distill_loss(1.0, 0.8, teacher=teacher)
    else:
        precompute_teacher(teacher, train, k=16, directory=tmp / "store")
        loss = distill_loss(1.0, 1.0, store=load_teacher_store(tmp / "store", train))
    Trainer(student, train, TrainConfig(lr=3e-3, epochs=8, batch_size=4), None, loss_fn=loss, progress=False).run()
    after = mean_kl(student, teacher, held)
    assert after < 0.6 * before, (before, after)


def test_store_for_other_data_refused(setup):
    teacher, tok, train, held, tmp = setup
    precompute_teacher(teacher, held, k=4, directory=tmp / "held_store")
    with pytest.raises(CheckpointError, match="different data"):
        load_teacher_store(tmp / "held_store", train)


def test_tokenizer_mismatch_refused(setup, tmp_path):
    teacher, tok, *_ = setup
    other_cfg = teacher.config.replace(vocab_size=teacher.config.vocab_size + 5)
    with pytest.raises(InvalidRequestError, match="different vocabularies"):
        check_same_tokenizer(tok, tok, teacher.config, other_cfg)

    class Renamed:  # the same size, one piece different
        vocab_size = tok.vocab_size

        def id_to_piece(self, i):
            return "x" if i == 100 else tok.id_to_piece(i)

    with pytest.raises(InvalidRequestError, match="different tokenizers"):
        check_same_tokenizer(tok, Renamed(), teacher.config, teacher.config)


def test_perplexity_follows_llama_cpp_convention(setup):
    teacher, *_ = setup
    g = torch.Generator().manual_seed(0)
    ids = [2] + torch.randint(10, 290, (70,), generator=g).tolist()
    r = perplexity(teacher, ids, n_ctx=16, bos_id=2)
    assert r.chunks == 71 // 16 and r.scored == r.chunks * (16 - 1 - 8)
    # by hand: each window starts with <bos>, positions 8..14 predict tokens 9..15
    nll = []
    for c in range(r.chunks):
        window = torch.tensor([ids[c * 16:(c + 1) * 16]])
        window[0, 0] = 2
        logp = torch.log_softmax(teacher(window)[0], -1)
        nll += [-logp[j, window[0, j + 1]].item() for j in range(8, 15)]
    assert math.isclose(r.perplexity, math.exp(sum(nll) / len(nll)), rel_tol=1e-6)
    with pytest.raises(InvalidRequestError, match="needs at least 32"):
        perplexity(teacher, ids[:31], n_ctx=16, bos_id=2)
