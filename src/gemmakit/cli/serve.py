"""``gemmakit serve``: an OpenAI-compatible HTTP server."""

from __future__ import annotations

from gemmakit.cli.common import EPILOG, add_mmproj_args, add_model_args, add_prefill_dtype_arg, invalid


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and text completions)", epilog=EPILOG,
                       description="Serve a model over HTTP with the OpenAI API (/v1/chat/completions, "
                                   "/v1/completions, /v1/models), batching concurrent requests.")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    s.add_argument("--max-batch", type=int, default=8, help="most sequences decoded at once (default 8)")
    s.add_argument("--max-seq-len", type=int, default=None,
                   help="most tokens per sequence, prompt included (default: the context, capped at 4096)")
    s.add_argument("--adapter", metavar="DIR", default=None, help="a LoRA adapter directory (PEFT layout) to apply")
    s.add_argument("--draft-model", metavar="SRC", default=None,
                   help="a smaller model with the same tokenizer, or the Gemma 4 assistant directory made for "
                        "--model: greedy single-choice requests (temperature 0, "
                        "no logprobs) are then served one at a time with speculative decoding, same tokens; "
                        "other requests keep the batching engine")
    s.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per round (default 4)")
    s.add_argument("--kv-cache-mib", type=int, default=None,
                   help="cap the key/value cache at this many MiB (fewer batch rows if needed; default: no cap)")
    s.add_argument("--kv-cache", choices=["auto", "int8"], default="auto",
                   help="key/value cache storage: auto = the compute dtype; int8 = int8 with one scale per 32 "
                        "entries (28%% of float32's bytes: about 3.5x the rows under --kv-cache-mib)")
    add_prefill_dtype_arg(s)
    add_mmproj_args(s)
    s.set_defaults(func=run)


def run(args) -> int:
    from gemmakit.serve import run_server

    if not 0 < args.port < 65536:
        raise invalid(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1:
        raise invalid(f"--max-batch must be >= 1, got {args.max_batch}")
    kv_bytes = args.kv_cache_mib * 2**20 if args.kv_cache_mib is not None else None
    if args.draft_tokens < 1:
        raise invalid(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    run_server(args.model, args.host, args.port, args.api_key, args.max_batch, args.dtype, args.max_seq_len, kv_bytes,
               adapter=args.adapter, draft_model=args.draft_model, draft_tokens=args.draft_tokens,
               quant=args.quant, device=args.device, kv_cache=args.kv_cache, prefill_dtype=args.prefill_dtype,
               matformer=args.matformer, mmproj=args.mmproj, activations=args.activations)
    return 0
