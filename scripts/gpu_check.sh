#!/usr/bin/env bash
# Everything that needs a GPU, as one prepared pass: the CUDA tests and the GPU benchmarks.
#
# A lent GPU machine (the device tool) has python3 with its own torch and most of clusterlm's
# dependencies, no network, and a budget of minutes, so the pass is prepared here and run there once:
#
#   bash scripts/gpu_check.sh wheels     # HERE (registry reachable): .whl/ = cp312 wheels of what that
#                                        # image lacks (zstandard, tomli-w, rouge-score, nltk)
#   bash scripts/gpu_check.sh run        # THERE, from the repository root, .whl carried:
#       device run  carry=[".whl"]  timeout_s=560  command="bash scripts/gpu_check.sh run"
#
# `run` writes at most 8 files to $OUT (or benchmarks/results/gpu_check/ where OUT is unset):
#   env.txt                        nvidia-smi, python, torch, CUDA, the GPU's name, missing imports
#   tests_gpu.log                  pytest tests/gpu -v (CUDA vs CPU, bf16 training, generation, MFU)
#   generate_speed_cuda_bfloat16.json   decode tokens/s of gpt2-124m: clusterlm vs transformers'
#                                  generate() on the same weights, bf16, compiled, against the HBM bound
#   train_distributed_gpu.json     tokens/s and peak memory under DDP and FSDP2 (NCCL, 1 rank),
#                                  gpt2-124m and llama-1b
#   gpt2_124m_train.log, gpt2_124m_metrics.jsonl   the gpt2_124m_1gpu recipe for --steps (default
#                                  60) steps: its MFU against the probed peak, step time, memory
#   run.log                        this script's own log (which step took how long, exit codes)
# Each step has its own time limit, so one that hangs costs its limit, not the pass. Steps run
# in the order of what a first GPU session needs most (correctness first). Expect about 7-9
# minutes on an H100 plus the machine's start.
# That machine's torch is 2.11 (2026-12): `bash scripts/test_torch.sh 2.11.0` runs the whole suite on
# it here, on the CPU, first (it passes: 1288 tests, 2026-12-06).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(zstandard==0.25.0 tomli-w==1.2.0 nltk==3.9.2)
SDIST_WHEELS=(rouge-score==0.1.2)  # sdist only on PyPI: built here into a py3-none-any wheel

wheels() {
  local py=${PYTHON:-.venv/bin/python}
  mkdir -p .whl
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" || { echo "gpu_check: pip download failed (is the registry reachable?)" >&2; exit 1; }
  "$py" -m pip wheel -q --no-deps -w .whl "${SDIST_WHEELS[@]}" || { echo "gpu_check: building ${SDIST_WHEELS[*]} failed" >&2; exit 1; }
  ls -l .whl
  du -sh .whl
}

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log its wall time and exit code
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$OUT/run.log"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/run.log"
  return 0
}

run() {
  OUT=${OUT:-benchmarks/results/gpu_check}
  mkdir -p "$OUT"
  : > "$OUT/run.log"
  local py=${PYTHON:-python3} steps=${STEPS:-60}
  export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  {
    nvidia-smi || true
    "$py" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs", "bf16",
          torch.cuda.is_bf16_supported(), "nccl", torch.distributed.is_nccl_available())
for m in ("clusterlm.train.loop", "clusterlm.eval.scorers", "clusterlm.parallel.parallelize", "transformers",
          "fastapi", "ctranslate2"):
    try:
        importlib.import_module(m)
        print("import ok:", m)
    except Exception as e:  # noqa: BLE001 - the point is to list every failure
        print("import FAILED:", m, type(e).__name__, e)
EOF
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"

  step tests_gpu 240 bash -o pipefail -c "'$py' -m pytest tests/gpu -v -p no:cacheprovider 2>&1 | tee '$OUT/tests_gpu.log'"
  step generate_speed 200 bash -o pipefail -c "'$py' benchmarks/generate_speed.py --device cuda --dtype bfloat16 --compile \
      --repeats 3 --out '$OUT/generate_speed_cuda_bfloat16.json' 2>&1 | tail -40"
  step train_distributed_gpu 150 bash -o pipefail -c "'$py' benchmarks/train_distributed_gpu.py \
      --out '$OUT/train_distributed_gpu.json' 2>&1 | tail -40"
  local run_dir
  run_dir=$(mktemp -d)
  step gpt2_124m_recipe 200 bash -o pipefail -c "'$py' -m clusterlm train recipes/gpt2_124m_1gpu.toml \
      --train.out_dir='$run_dir/run' --data.dir='$run_dir/data' --train.max_steps=$steps \
      --train.eval_interval=0 --checkpoint.interval=0 --train.log_interval=10 2>&1 | tee '$OUT/gpt2_124m_train.log' | tail -30"
  cp "$run_dir/run/metrics.jsonl" "$OUT/gpt2_124m_metrics.jsonl" 2>/dev/null || echo "no metrics.jsonl from the recipe run"
  echo "files in $OUT:"; ls -l "$OUT"
}

case "${1:-}" in
  wheels) wheels ;;
  run) run ;;
  *) echo "usage: bash scripts/gpu_check.sh wheels|run   (see the header of this script)" >&2; exit 2 ;;
esac
