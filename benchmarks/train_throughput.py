"""LoRA training throughput on the real Gemma 3 270M: gemmakit vs transformers + peft, same weights.

    PYTHONPATH=src python benchmarks/train_throughput.py --seq-len 128 --batch-size 2 --steps 3

Both sides train the same LoRA (rank 8, all seven projections, float32) with AdamW on the same
random token blocks; the first step of each is a warm-up and not timed. The peer reads the GGUF's
weights through an HF directory written by gemmakit's exporter, so both start from identical numbers.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F


def _time_steps(step, steps: int) -> float:
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import gemmakit
    from gemmakit.train.export import save_hf_directory
    from gemmakit.models.lora import LoRAConfig, apply_lora

    model, tok = gemmakit.load()
    ids = torch.randint(3, 200_000, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    tokens = args.batch_size * args.seq_len * args.steps
    print(f"threads={torch.get_num_threads()} batch={args.batch_size} seq_len={args.seq_len} steps={args.steps}")

    peer_dir = None
    if not args.no_peer:
        peer_dir = tempfile.mkdtemp()
        save_hf_directory(model, tok, peer_dir)
    apply_lora(model, LoRAConfig(rank=8, alpha=16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def ours():
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()

    s = _time_steps(ours, args.steps)
    print(f"gemmakit LoRA:          {tokens / s:8.1f} training tokens/s ({s / args.steps:.2f} s/step)")
    if peer_dir is None:
        return
    model = opt = None  # free them before the peer loads its copy
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(peer_dir, dtype=torch.float32)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    hf.train()
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)

    def theirs():
        logits = hf(input_ids=ids[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()

    s = _time_steps(theirs, args.steps)
    print(f"transformers+peft LoRA: {tokens / s:8.1f} training tokens/s ({s / args.steps:.2f} s/step)")


if __name__ == "__main__":
    main()
