"""Random-weight GGUF files shaped like the published Gemma 4 models, written by llama.cpp's own
tools, for benchmarks/bench.py to time gemmakit against llama.cpp on:

    PYTHONPATH=src python benchmarks/gemma4_shapes.py e2b /tmp/shapes --llama-cpp DIR
    PYTHONPATH=src python benchmarks/bench.py --model /tmp/shapes/gemma4-e2b-Q4_K_M.gguf \\
        --modes llama.cpp gemmakit-gguf --pairs 3

The steps: gemmakit's preset (every per-layer size of the model, its 262,144-token vocabulary
taken from the bundled Gemma 3 270M) -> random bfloat16 weights in a Hugging Face directory ->
llama.cpp's convert_hf_to_gguf.py (DIR: llama.cpp's source, e.g. vendor/llama.cpp of
llama-cpp-python's sdist, `pip download --no-binary :all: --no-deps llama-cpp-python`) -> a bf16
GGUF -> llama-cpp-python's llama_model_quantize -> Q4_K_M. ``--layers N`` keeps the first N
layers (every size within a layer unchanged, K/V not shared) where the whole model would not fit the disk or the
time: tokens/s then scale with the layer count, the head and embedding aside.

Not a test: it needs llama-cpp-python and takes minutes (the E2B file: ~10 GB written on the way).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"e2b": "gemma4-e2b", "e4b": "gemma4-e4b", "26b-a4b": "gemma4-26b-a4b", "31b": "gemma4-31b",
          "12b": "gemma4-12b"}


def _random_tensors(config, seed: int):
    """(transformers name, tensor) of random bfloat16 weights, one tensor at a time: matrices ~N(0, 0.02),
    norm weights and scalars near 1 (Gemma 4's norms multiply by the weight itself)."""
    import torch

    from gemmakit.checkpoints.base import parameter_shapes
    from gemmakit.checkpoints.safetensors import hf_names

    g = torch.Generator().manual_seed(seed)
    shapes = parameter_shapes(config)
    for ours, theirs in hf_names(config, "model.").items():
        t = torch.empty(shapes[ours], dtype=torch.bfloat16)
        if t.dim() < 2 or "scale" in ours or "scalar" in ours:
            t.normal_(1.0, 0.05, generator=g)
        else:
            t.normal_(0.0, 0.02, generator=g)
        yield theirs, t


def hf_directory(shape: str, out: Path, layers: int | None) -> Path:
    from transformers import GemmaTokenizer

    from gemmakit.checkpoints import default_model_path, open_checkpoint
    from gemmakit.checkpoints.hf_writer import write_hf_directory
    from gemmakit.models.config import PRESETS

    config = PRESETS[SHAPES[shape]]
    if layers is not None:
        # (no K/V sharing: the shared layers are the last ones, which a cut model loses)
        config = config.replace(num_layers=layers, layer_kinds=config.layer_kinds[:layers], num_kv_shared_layers=0)
    tokenizer = open_checkpoint(default_model_path()).tokenizer
    if tokenizer.vocab_size != config.vocab_size:
        raise SystemExit(f"the bundled tokenizer has {tokenizer.vocab_size} tokens, {shape} {config.vocab_size}")
    directory = write_hf_directory(out / f"hf-{shape}", config, _random_tensors(config, 0), tokenizer)
    # llama.cpp's gemma4 converter reads tokenizer.json (a fast tokenizer), made here from tokenizer.model
    GemmaTokenizer.from_pretrained(directory, mask_token=None).save_pretrained(directory)
    return directory


def _convert(llama_cpp: Path, directory: Path, outfile: Path) -> None:
    """convert_hf_to_gguf.py, in this process: gguf-py's LlamaHfVocab asks the tokenizer for its whole
    vocabulary once per special token (a Gemma tokenizer has ~6,400), minutes for 262k tokens; the
    answer is memoised per tokenizer, which changes nothing else."""
    sys.path[:0] = [str(llama_cpp / "gguf-py"), str(llama_cpp)]
    import transformers.tokenization_utils_tokenizers as fast

    original = fast.TokenizersBackend.get_vocab

    def get_vocab(self):
        if "_memo_vocab" not in self.__dict__:
            self.__dict__["_memo_vocab"] = original(self)
        return self.__dict__["_memo_vocab"]

    fast.TokenizersBackend.get_vocab = get_vocab
    script = str(llama_cpp / "convert_hf_to_gguf.py")
    sys.argv = [script, str(directory), "--outfile", str(outfile), "--outtype", "bf16"]
    runpy.run_path(script, run_name="__main__")


def _quantize(source: Path, destination: Path, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed on {source}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path, help="folder for the files (the Q4_K_M GGUF stays, the rest is removed)")
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp's source folder (convert_hf_to_gguf.py)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--keep", action="store_true", help="keep the HF directory and the bf16 GGUF")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{SHAPES[args.shape]}{f'-{args.layers}l' if args.layers else ''}"
    start = time.time()
    directory = hf_directory(args.shape, args.out, args.layers)
    print(f"{directory}: written in {time.time() - start:.0f} s", flush=True)
    bf16 = args.out / f"{name}-bf16.gguf"
    # the converter runs in a child: it imports its own gguf-py and changes transformers' tokenizers
    subprocess.run([sys.executable, __file__, "--convert", str(args.llama_cpp), str(directory), str(bf16)], check=True)
    print(f"{bf16}: converted at {time.time() - start:.0f} s", flush=True)
    final = args.out / f"{name}-Q4_K_M.gguf"
    _quantize(bf16, final, args.threads)
    print(f"{final}: {final.stat().st_size / 2**30:.2f} GiB at {time.time() - start:.0f} s", flush=True)
    if not args.keep:
        bf16.unlink()
        shutil.rmtree(directory)
    (args.out / f"{name}.json").write_text(json.dumps({"shape": args.shape, "layers": args.layers}) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--convert"]:
        _convert(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
