"""Serving throughput: N concurrent streaming clients against `gemmakit serve`.

    PYTHONPATH=src python benchmarks/serve.py --clients 1 4 16
    PYTHONPATH=src python benchmarks/serve.py --vision --clients 1 8   # images beside text
    PYTHONPATH=src python benchmarks/serve.py --audio --clients 1 9    # images and clips beside text
    python benchmarks/serve.py --url http://127.0.0.1:8000 --clients 16   # a server you started

Each client sends `--requests` requests one after another (distinct prompts, `--max-tokens`
tokens each, end-of-turn ignored so every answer has the same length) and streams the answer.
Reported per client count: total output tokens/s over the wall time, and time to first token
(p50, p99) over all requests. Without --url the script starts the server itself on a free
loopback port, with --max-batch as large as the largest client count.

By default the server runs the default model and the clients send completions. With --vision it
runs a random-weight Gemma 3 with a SigLIP tower (built by transformers, which the test extras
install; the tests' tiny tokenizer), and each client count runs twice: every client sending text
chats, then every other client sending a 224x224 PNG with each chat ("mixed"). The image requests
run through the tower once each and then decode in the same batch as the text ones, so the mixed
round's tokens/s stays near the text round's at every client count. With --audio the model is a
random-weight Gemma 4 with vision and audio towers, and in the mixed round one client in three
sends a 224x224 PNG and one in three a 2-second WAV clip with each chat.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # live_server, the vision test helpers


def one_request(url: str, route: str, body: dict) -> tuple[float, int]:
    """Stream one request; return (seconds to first token, tokens received)."""
    body = {**body, "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with httpx.stream("POST", url + route, json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, tokens


def completion(c: int, k: int, max_tokens: int) -> tuple[str, dict]:
    prompt = f"Story {c}-{k}: a traveller from the city number {c * 31 + k} walks into the old forest and"
    return "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens}


def chat(c: int, k: int, max_tokens: int, image_uri: str | None, clip: str | None = None) -> tuple[str, dict]:
    content = [{"type": "text", "text": f"tell story {c}-{k} about the city {c * 31 + k}"}]
    if image_uri is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_uri}})
    if clip is not None:
        content.insert(0, {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}})
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


def run(url: str, clients: int, requests: int, body: Callable[[int, int], tuple[str, dict]]) -> dict:
    ttfts: list[float] = []
    total = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(requests):
            ttft, n = one_request(url, *body(c, k))
            with lock:
                ttfts.append(ttft)
                total[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    return {"clients": clients, "requests": len(ttfts), "output_tokens": total[0], "wall_s": round(wall, 2),
            "tokens_per_s": round(total[0] / wall, 2), "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p99_s": round(p99, 3)}


def vision_model(directory: Path):
    """A random-weight Gemma 3 with a SigLIP tower (224 px, 16 px patches, 49 soft tokens an image)
    and an 8-layer, 512-wide decoder, saved by transformers with the tests' tokenizer and loaded."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    import gemmakit
    from test_vision import _tokenizer

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                                image_size=224, patch_size=16)
    text = Gemma3TextConfig(vocab_size=tokenizer.vocab_size, hidden_size=512, intermediate_size=2048,
                            num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                            max_position_embeddings=1024, sliding_window=256, query_pre_attn_scalar=128,
                            hidden_activation="gelu_pytorch_tanh")
    soi, eoi, soft = (tokenizer.token_to_id(p) for p in ("<start_of_image>", "<end_of_image>", "<image_soft_token>"))
    hf = Gemma3ForConditionalGeneration(Gemma3Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), mm_tokens_per_image=49, image_token_index=soft,
        boi_token_index=soi, eoi_token_index=eoi)).eval()
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return gemmakit.load(directory)


def media_model(directory: Path):
    """A random-weight Gemma 4 with vision and audio towers (8-layer, 512-wide decoder; 2-layer
    encoders), saved by transformers with the tests' Gemma 4 tokenizer and loaded."""
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    import gemmakit
    from test_gemma4_media import AUDIO, BOA, EOA, tokenizer
    from test_gemma4_vision import BOI, EOI, IMAGE, VIDEO

    text = dict(vocab_size=306, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=1, head_dim=128, global_head_dim=256, sliding_window=256,
                hidden_size_per_layer_input=64, vocab_size_per_layer_input=306, max_position_embeddings=1024,
                layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3
                + ["full_attention"], use_bidirectional_attention="vision")
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=32, patch_size=16, position_embedding_size=1024, pooling_kernel_size=3)
    audio = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[128, 32],
                 conv_kernel_size=5, output_proj_dims=128)
    torch.manual_seed(0)
    hf = Gemma4ForConditionalGeneration(Gemma4Config(
        text_config=text, vision_config=vision, audio_config=audio, image_token_id=IMAGE, boi_token_id=BOI,
        eoi_token_id=EOI, video_token_id=VIDEO, audio_token_id=AUDIO, boa_token_id=BOA, eoa_token_index=EOA)).eval()
    hf.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    Gemma4ImageProcessorPil(max_soft_tokens=70).save_pretrained(directory)
    return gemmakit.load(directory)


def wav_b64(seconds: float = 2.0) -> str:
    import numpy as np
    import soundfile

    t = np.arange(int(16000 * seconds)) / 16000
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * (200 + 800 * t) * t)).astype(np.float32), 16000, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


def png_uri(k: int) -> str:
    from test_vision import picture

    buffer = io.BytesIO()
    picture(k, (224, 224)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server (default: start one on the default model)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vision", action="store_true",
                    help="serve a random-weight Gemma 3 with a vision tower; half the clients send images")
    ap.add_argument("--audio", action="store_true",
                    help="serve a random-weight Gemma 4 with vision and audio towers; a third of the clients send "
                         "images, a third audio clips")
    args = ap.parse_args()
    text = lambda c, k: completion(c, k, args.max_tokens)  # noqa: E731
    if args.url:
        for n in args.clients:
            print(json.dumps(run(args.url, n, args.requests, text)), flush=True)
        return
    import torch

    import gemmakit
    from gemmakit.models.mobilenet import import_torchvision
    from gemmakit.serve import build_app
    from live_server import live_server

    with tempfile.TemporaryDirectory() as tmp:
        if args.vision or args.audio:
            import_torchvision()
            model, tokenizer = media_model(Path(tmp)) if args.audio else vision_model(Path(tmp))
            name = "random Gemma 4 with vision and audio" if args.audio else "random Gemma 3 with vision"
        else:
            model, tokenizer = gemmakit.load(dtype=args.dtype)
            name = f"default model, {args.dtype}"
        app = build_app(model, tokenizer, "gemma", max_batch=max(args.clients), max_seq_len=512)
        engine = app.state.gemmakit.engine
        print(f"# {name}, torch threads {torch.get_num_threads()}, max_batch {engine.rows}, "
              f"KV cache {engine.cache.nbytes() / 2**20:.0f} MiB", flush=True)
        with live_server(app) as url:
            if not (args.vision or args.audio):
                one_request(url, *completion(0, 0, 4))
                for n in args.clients:
                    print(json.dumps(run(url, n, args.requests, text)), flush=True)
                return
            images = [png_uri(k) for k in range(8)]
            clip = wav_b64() if args.audio else None
            one_request(url, *chat(0, 0, 4, images[0], clip))
            every = 3 if args.audio else 2  # which clients send an image (c % every == 0), a clip (== 1, --audio)
            for n in args.clients:
                for mixed in (False, True):
                    def body(c, k):
                        image = images[(c + k) % 8] if mixed and c % every == 0 else None
                        return chat(c, k, args.max_tokens, image, clip if mixed and args.audio and c % 3 == 1 else None)

                    stats = run(url, n, args.requests, body)
                    stats["images"] = sum(c % every == 0 for c in range(n)) * args.requests if mixed else 0
                    if args.audio:
                        stats["clips"] = sum(c % 3 == 1 for c in range(n)) * args.requests if mixed else 0
                    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
