"""``gemmakit generate``: continue a prompt (or fill in the middle), streaming the text."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from gemmakit.cli.common import (
    EPILOG, add_decode_args, add_image_args, add_mmproj_args, add_model_args, add_sampling_args, invalid, load_model,
    sampling_kwargs, tokenizer_missing,
)


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Continue PROMPT and stream the text as it is produced.", epilog=EPILOG)
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object with ids, text and speed instead")
    g.add_argument("--fim-prefix", metavar="TEXT", default=None,
                   help="fill in the middle (CodeGemma): the code before the gap; use instead of PROMPT")
    g.add_argument("--fim-suffix", metavar="TEXT", default=None, help="fill in the middle: the code after the gap")
    g.add_argument("--adapter", metavar="DIR", default=None, help="a LoRA adapter directory (PEFT layout) to apply")
    g.add_argument("--draft-model", metavar="SRC", default=None,
                   help="a smaller model with the same tokenizer that drafts tokens for --model to verify "
                        "(speculative decoding; greedy only, output identical to --model alone), or the Gemma 4 "
                        "assistant directory made for --model (Gemma4AssistantForCausalLM), which drafts from "
                        "--model's own cache and hidden state. It loads as "
                        "its own default (a quantised .gguf stays in its blocks whatever --quant says), so "
                        "the same file can draft for its float32 self: --quant none --draft-model FILE")
    g.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per round (default 4)")
    g.add_argument("--json-schema", metavar="FILE", default=None,
                   help="a JSON schema file: the output is one JSON value valid under it (constrained decoding)")
    add_decode_args(g)
    add_image_args(g)
    g.add_argument("--audio", metavar="FILE", action="append", default=None,
                   help="an audio clip (wav, flac, mp3, ...) for a Gemma 4 or Gemma 3n model with its audio tower; "
                        "repeat for several; the model's audio marker in the prompt (<|audio|>, <audio_soft_token>) "
                        "marks where each goes, else they come first")
    g.add_argument("--video", metavar="FILE", action="append", default=None,
                   help="a video file (mp4, webm, mkv, ...; needs pip install 'gemmakit[video]') for a Gemma 4 "
                        "model with vision: 32 frames taken evenly, 70 soft tokens each; repeat for several; "
                        "<|video|> in the prompt marks where each goes, else they come first")
    add_mmproj_args(g)
    g.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                   help="the text to continue ('-' reads standard input)")
    g.set_defaults(func=run)


def run(args) -> int:
    from gemmakit.api import stream_generation
    from gemmakit.fim import fim_prompt, fim_stop_ids
    from gemmakit.vision.preprocess import load_image

    fim = args.fim_prefix is not None or args.fim_suffix is not None
    if fim and args.prompt is not None:
        raise invalid("give either PROMPT or --fim-prefix/--fim-suffix, not both")
    if args.prompt is None and not fim:
        raise invalid("a PROMPT (or --fim-prefix/--fim-suffix) is needed")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not fim and not prompt:
        raise invalid("the prompt is empty")
    images = args.image or []
    for path in images:  # a bad image fails before the model is loaded
        load_image(path)
    clips = args.audio or []
    if clips:
        from gemmakit.audio.io import load_audio

        clips = [load_audio(path) for path in clips]  # so does a bad clip
    videos = args.video or []
    if videos:
        from gemmakit.vision.video import probe_video

        for path in videos:  # and a file that is no video
            probe_video(path)
    grammar = _json_schema(args.json_schema) if args.json_schema else None  # so does a bad schema file
    model, tokenizer, report = load_model(args)
    if tokenizer is None:
        raise tokenizer_missing(args.model)
    stop_ids = None
    if fim:
        prompt = fim_prompt(tokenizer, args.fim_prefix or "", args.fim_suffix or "")
        stop_ids = fim_stop_ids(tokenizer)
    if getattr(args, "draft_model", None):
        if fim or images or clips or videos or grammar:
            raise invalid("--draft-model works with plain text prompts, not with images, audio, video, "
                          "fill-in-the-middle or --json-schema")
        return _generate_speculative(args, model, tokenizer, prompt)
    result = None
    for piece, result in stream_generation(model, tokenizer, prompt, stop_ids=stop_ids, images=images or None,
                                           audio=clips or None, videos=videos or None,
                                           pan_and_scan=args.pan_and_scan, grammar=grammar,
                                           **sampling_kwargs(args)):
        if not args.json and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if args.json:
        s = result.stats
        print(json.dumps({
            "prompt_ids": result.prompt_ids, "token_ids": result.token_ids, "text": result.text,
            "stats": {"prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
                      "load_s": round(report.seconds, 4),
                      "weights": report.weights, "weight_bytes": _weight_bytes(model),
                      "prefill_dtype": report.prefill_dtype, "activations": report.activations,
                      # (moved at the 32nd decoding step: gemmakit/huge_pages.py)
                      "huge_page_bytes": getattr(getattr(model, "decoder", model), "weights_in_huge_pages", 0),
                      "prefill_tokens_per_s": round(s.prefill_tokens_per_s, 2),
                      "decode_tokens_per_s": round(s.decode_tokens_per_s, 2)},
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


def _json_schema(path: str):
    """The grammar of the JSON schema in the file at ``path``; a missing or non-JSON file is a one-line error."""
    from gemmakit.engine.grammar import Grammar

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise invalid(f"cannot read the JSON schema {path}: {exc.strerror or exc}") from None
    return Grammar.json_schema(text)


def _weight_bytes(model) -> int:
    """Bytes of parameters and buffers: what the weights take in memory, however they are held."""
    return sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())


def _generate_speculative(args, model, tokenizer, prompt: str) -> int:
    from gemmakit.api import LoadOptions, load_model
    from gemmakit.engine.speculative import speculative_greedy

    if args.temperature != 0.0:
        raise invalid("--draft-model decodes greedily; use --temperature 0")
    # The draft loads as its own default (as serve's does): a quantised GGUF stays in its blocks
    # whatever --quant the target asked for, since only its token ids reach the output.
    draft, _, draft_report = load_model(args.draft_model, LoadOptions(dtype=args.dtype, device=args.device,
                                                                          mmproj=False))
    ids = tokenizer.encode(prompt, add_bos=True)
    stops = tokenizer.stop_ids()
    t0 = time.perf_counter()
    out, stats = speculative_greedy(model, draft, ids, args.max_tokens, k=args.draft_tokens, stop_ids=stops)
    seconds = time.perf_counter() - t0
    text = tokenizer.decode([t for t in out if t not in stops])
    if args.json:
        stats = {**stats, "draft_weights": draft_report.weights, "seconds": round(seconds, 3),
                 "tokens_per_s": round(len(out) / seconds, 2)}  # both prefills included
        print(json.dumps({"prompt_ids": ids, "token_ids": out, "text": text, "speculative": stats},
                         ensure_ascii=False))
    else:
        print(text)
    return 0
