"""Random-weight GGUF files shaped like the published Gemma models, written by llama.cpp's own
tools, for benchmarks/bench.py to time gemmakit against llama.cpp on:

    PYTHONPATH=src python benchmarks/shapes.py e2b /tmp/shapes --llama-cpp DIR
    PYTHONPATH=src python benchmarks/bench.py --model /tmp/shapes/gemma4-e2b-Q4_K_M.gguf \\
        --modes llama.cpp gemmakit-gguf --pairs 3

    # one file per quant type, every matrix in that type, a 384-token vocabulary (the layers' time):
    PYTHONPATH=src python benchmarks/shapes.py gemma3-4b /tmp/shapes --layers 4 --pure --small-vocab \\
        --ftype Q2_K IQ2_XXS IQ4_XS TQ1_0 --llama-cpp DIR

The steps: gemmakit's preset (every per-layer size of the model; its vocabulary is the bundled
Gemma 3 270M's 262,144 tokens, which Gemma 3 4B's 262,208 is rounded down to) -> random bfloat16
weights in a Hugging Face directory -> llama.cpp's convert_hf_to_gguf.py (DIR: llama.cpp's source,
e.g. vendor/llama.cpp of llama-cpp-python's sdist, `pip download --no-binary :all: --no-deps
llama-cpp-python`) -> a bf16 GGUF -> llama-cpp-python's llama_model_quantize -> each ``--ftype``
(default Q4_K_M). The types llama.cpp refuses to make without an importance matrix (IQ1_*, IQ2_*,
IQ3_* with --pure, Q2_K_S) get a uniform one: the weights are random, so no input column matters more than another.
``--layers N`` keeps the first N layers (every size within a layer unchanged, K/V not shared) where
the whole model would not fit the disk or the time: tokens/s then scale with the layer count, the
head and embedding aside.

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
          "12b": "gemma4-12b", "gemma3-4b": "gemma3-4b"}
# llama.cpp's quantiser stops on these without an importance matrix (the IQ3 ones where --pure)
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M"}


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


def hf_directory(shape: str, out: Path, layers: int | None, small_vocab: bool = False) -> Path:
    from transformers import GemmaTokenizer

    from gemmakit.checkpoints import default_model_path, open_checkpoint
    from gemmakit.checkpoints.hf_writer import write_hf_directory
    from gemmakit.models.config import PRESETS

    config = PRESETS[SHAPES[shape]]
    if layers is not None:
        # (no K/V sharing: the shared layers are the last ones, which a cut model loses)
        config = config.replace(num_layers=layers, layer_kinds=config.layer_kinds[:layers], num_kv_shared_layers=0)
    if small_vocab:  # the tests' 384-piece tokenizer: the layers' products, not the head's, take the time
        make = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tests/data/gguf_llamacpp/make.py"))
        scratch = out / "tokenizer"
        scratch.mkdir(parents=True, exist_ok=True)
        config = config.replace(vocab_size=make["tokenizer"](scratch, gemma3=config.family != "gemma4"))
        directory = write_hf_directory(out / f"hf-{shape}", config, _random_tensors(config, 0), None)
        for f in scratch.iterdir():
            shutil.copy(f, directory / f.name)
        shutil.rmtree(scratch)
        return directory
    tokenizer = open_checkpoint(default_model_path()).tokenizer
    if config.family == "gemma3" and config.vocab_size > tokenizer.vocab_size:  # 4B-27B: 64 unused ids more
        config = config.replace(vocab_size=tokenizer.vocab_size)
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


def _uniform_imatrix(source: Path):
    """An importance matrix of ones for every matrix of ``source``, as llama_model_quantize takes it:
    a NULL-terminated array of (tensor name, values, count), one value per input column (per expert)."""
    import gguf
    import llama_cpp
    import numpy as np

    keep = []
    entries = []
    for t in gguf.GGUFReader(source).tensors:
        if len(t.shape) < 2 or not t.name.endswith(".weight"):
            continue
        count = int(t.shape[0]) * (int(t.shape[2]) if len(t.shape) == 3 else 1)  # ne[0] (x experts)
        values = np.ones(count, dtype=np.float32)
        name = t.name.encode()
        keep += [values, name]
        entries.append((name, values))
    array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    for i, (name, values) in enumerate(entries):
        array[i].name = name
        array[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = values.size
    return array, keep


def _quantize(source: Path, destination: Path, ftype: str, threads: int, pure: bool) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    params.pure = pure
    if ftype in NEEDS_IMATRIX:
        imatrix, _alive = _uniform_imatrix(source)
        params.imatrix = ctypes.cast(imatrix, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed on {source} ({ftype})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path, help="folder for the files (the quantised GGUFs stay, the rest is removed)")
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp's source folder (convert_hf_to_gguf.py)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--ftype", nargs="+", default=["Q4_K_M"], metavar="TYPE",
                   help="llama.cpp file types to write (its LLAMA_FTYPE_MOSTLY_* names: Q4_K_M, IQ2_XXS, TQ1_0, ...)")
    p.add_argument("--pure", action="store_true",
                   help="every matrix in the file type's own block type (llama.cpp's --pure): a per-type benchmark")
    p.add_argument("--small-vocab", action="store_true",
                   help="the tests' 384-piece tokenizer instead of the 262,144-token one: no big head or embedding, "
                        "so decoding times the layers' matrices (a per-type kernel benchmark)")
    p.add_argument("--keep", action="store_true", help="keep the HF directory and the bf16 GGUF")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{SHAPES[args.shape]}{f'-{args.layers}l' if args.layers else ''}{'-v384' if args.small_vocab else ''}"
    start = time.time()
    directory = hf_directory(args.shape, args.out, args.layers, args.small_vocab)
    print(f"{directory}: written in {time.time() - start:.0f} s", flush=True)
    bf16 = args.out / f"{name}-bf16.gguf"
    # the converter runs in a child: it imports its own gguf-py and changes transformers' tokenizers
    subprocess.run([sys.executable, __file__, "--convert", str(args.llama_cpp), str(directory), str(bf16)], check=True)
    print(f"{bf16}: converted at {time.time() - start:.0f} s", flush=True)
    for ftype in args.ftype:
        final = args.out / f"{name}-{ftype}{'-pure' if args.pure else ''}.gguf"
        _quantize(bf16, final, ftype, args.threads, args.pure)
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
