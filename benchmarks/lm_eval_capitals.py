"""lm-eval against `gemmakit serve`: the 20-question task in benchmarks/lm_eval/, scored through the server.

    pip install lm-eval                       # not a dependency of gemmakit: a client of its server
    PYTHONPATH=src python benchmarks/lm_eval_capitals.py [--lm-eval PATH] [--concurrent 4]

The script serves the default model (Gemma 3 270M) on a free loopback port and runs lm-eval's
``local-completions`` model on ``gemmakit_capitals`` (benchmarks/lm_eval/capitals.yaml, which
reads capitals.jsonl). Each choice becomes one loglikelihood request: /v1/completions with
``echo``, ``logprobs: 1`` and ``max_tokens: 1``, the prompt as token ids. With ``--concurrent``
requests in flight, the scoring prefills share the batch. Nothing is fetched from a model or
dataset hub.

lm-eval tokenises the prompts itself. ``--tokenizer hf`` (the default) hands it the model's
tokenizer as a transformers directory (Tokenizer.save_pretrained), with which it starts each
prompt with <bos>, as Gemma expects. ``--tokenizer remote`` has it tokenise through the
server's /tokenize and /tokenizer_info (vLLM's routes); lm-eval then adds no <bos>, and Gemma
scores worse without it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # live_server helper
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-eval", default=shutil.which("lm_eval") or "lm_eval", help="the lm_eval command")
    parser.add_argument("--concurrent", type=int, default=4, help="requests lm-eval keeps in flight")
    parser.add_argument("--tokenizer", choices=("hf", "remote"), default="hf",
                        help="how lm-eval tokenises: a saved transformers tokenizer, or the server's /tokenize")
    args = parser.parse_args()

    import gemmakit
    from gemmakit.serve import build_app
    from live_server import live_server

    model, tokenizer = gemmakit.load()
    app = build_app(model, tokenizer, "gemma-3-270m", max_batch=max(args.concurrent, 1), max_seq_len=512)
    with tempfile.TemporaryDirectory() as saved, live_server(app) as url:
        if args.tokenizer == "hf":
            tokenizer.save_pretrained(saved)
            tokenizing = f"tokenizer_backend=huggingface,tokenizer={saved},add_bos_token=True"
        else:
            tokenizing = "tokenizer_backend=remote"
        command = [args.lm_eval, "--model", "local-completions", "--tasks", "gemmakit_capitals",
                   "--include_path", str(HERE / "lm_eval"), "--batch_size", "1",
                   "--model_args", f"model=gemma-3-270m,base_url={url}/v1/completions,{tokenizing},"
                                   f"num_concurrent={args.concurrent},max_retries=1"]
        print(" ".join(command), flush=True)
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "none"}
        # the task's data_files path is relative: lm-eval reads it from the working directory
        code = subprocess.run(command, cwd=HERE / "lm_eval", env=env).returncode
    sys.exit(code)


if __name__ == "__main__":
    main()
