#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and a torch that sees it (no install step: it runs
# from the source tree, so a lent machine's own torch, transformers and pytest serve; gguf and the
# bundled model are not needed). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # logs in $OUT (default /tmp/gpu_check)
#
# 1. tests/test_cuda.py: eager CUDA logits equal the CPU's; the compiled decode step replays CUDA
#    graphs (none skipped) with the eager greedy tokens.
# 2. benchmarks/bench.py --gpu: Gemma 3 1B-sized random bf16 weights, gemmakit eager and compiled
#    (CUDA graphs; then also max-autotune) against transformers, decode tok/s as a fraction of the
#    measured copy bandwidth's limit, and a profile of the compiled step (kernels a token, the
#    busiest kernels; a Chrome trace, decode_trace.json.gz, in $OUT).
# Each step has its own time limit so that one hang cannot cost the other's figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The CPU kernels play no part on the GPU; skip their one-off build (a minute of a lent machine's time).
export GEMMAKIT_KERNELS="${GEMMAKIT_KERNELS:-0}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$OUT/gpu.txt"
# The two limits add up to under the device tool's 600 s a command, with room for start-up; the
# benchmark prints each row as it is measured, so a cut-off run keeps what it had.
timeout "${TEST_LIMIT:-150}" "$PY" -m pytest -q -rA tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt"
timeout "${BENCH_LIMIT:-400}" "$PY" benchmarks/bench.py --gpu --trace-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench_gpu.txt"
if [ -f "$OUT/decode_trace.json" ]; then gzip -f "$OUT/decode_trace.json"; fi  # the device tool brings back 16 MiB a file
