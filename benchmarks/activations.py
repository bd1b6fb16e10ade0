"""What 8-bit activations do to a model's numbers: the block kernel with ``activations="int8"``
(every quantised type's decode-sized products on int8-rounded activations, as llama.cpp computes
them) against the reference ``"float32"``, on the same GGUF, and llama.cpp's own logits beside them.

    PYTHONPATH=src python benchmarks/activations.py [--model x.gguf] [--tokens 256] [--new-tokens 64]

Teacher-forced over a text (one decode step per token, so every product is decode-sized and runs on
the kernel): relative L2 error of each position's logits against float32's, and how often the top
token agrees. Then greedy continuations of a few prompts: tokens generated before the first
difference. llama.cpp (when llama-cpp-python is installed) is scored against the same float32
logits: its error is what rounding activations to 8 bits costs there.

Not a test: it takes a minute or two, and reads whatever model it is given.
"""

from __future__ import annotations

import argparse

import torch

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden press adapted from those used for wine. Within fifty years "
        "presses were at work in more than two hundred cities, and the price of books fell so far that reading "
        "spread from monasteries and universities to merchants and artisans. ") * 4
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are"]


def teacher_forced(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float32 logits, one token a step through the decode path."""
    cache = model.new_cache(1, len(ids) + 1)
    rows = []
    with torch.inference_mode():
        for pos, token in enumerate(ids):
            logits = model(torch.tensor([[token]]), cache=cache, positions=torch.tensor([[pos]]))
            rows.append(logits[0, -1].float())
    return torch.stack(rows)


def greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    from gemmakit.engine.generate import generate_steps

    ids = tokenizer.encode(prompt, add_bos=True)
    out = []
    for step in generate_steps(model, [ids], n):
        out.append(step.tokens[0])
    return out


def compare(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    rel = ((other - ref).norm(dim=-1) / ref.norm(dim=-1)).mean().item()
    top1 = (other.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return rel, top1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a quantised .gguf (default: the bundled Gemma 3 270M Q4_K_M)")
    p.add_argument("--tokens", type=int, default=256, help="teacher-forced positions (default 256)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from gemmakit.api import LoadOptions, load_model
    from gemmakit.checkpoints import default_model_path

    path = args.model or str(default_model_path())
    logits, greedy_out = {}, {}
    tokenizer = None
    for mode in ("float32", "int8"):
        model, tokenizer, _ = load_model(path, LoadOptions(quant="gguf", activations=mode))
        ids = tokenizer.encode(TEXT, add_bos=True)[:args.tokens]
        logits[mode] = teacher_forced(model, ids)
        greedy_out[mode] = [greedy(model, tokenizer, q, args.new_tokens) for q in PROMPTS]
    rows = [("gemmakit int8 activations", *compare(logits["float32"], logits["int8"]))]
    try:
        from llama_cpp import Llama

        llm = Llama(model_path=path, n_ctx=len(ids) + 8, logits_all=True, verbose=False, n_threads=args.threads)
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[:len(ids)], dtype=torch.float32)
        rows.append(("llama.cpp", *compare(logits["float32"], theirs)))
    except ImportError:
        pass
    print(f"{path}: {len(ids)} teacher-forced positions, against gemmakit's float32 activations")
    print(f"{'':28} {'rel. L2 error':>14} {'top-1 agrees':>13}")
    for name, rel, top1 in rows:
        print(f"{name:28} {rel:14.2e} {100 * top1:12.1f}%")
    same = []
    for a, b in zip(greedy_out["float32"], greedy_out["int8"]):
        same.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)))
    print(f"greedy: int8 equals float32 for {same} of {args.new_tokens} tokens on {len(PROMPTS)} prompts")


if __name__ == "__main__":
    main()
