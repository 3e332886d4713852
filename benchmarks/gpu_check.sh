#!/usr/bin/env bash
# One GPU check, < 8 minutes on a CUDA machine with the `triton` extra (H100/H200 class):
#   1. the gpu-marked tests (tests/test_gpu.py: CUDA kernels vs the CPU references),
#   2. the kernel benchmarks (benchmarks/gpu_kernels.py --quick: grouped FFN vs cuBLAS dense at
#      >= 4096 tokens, HBM bandwidth at <= 16 tokens, causal spatial vs masked bmm; goals in its JSON),
#   3. the `ort` target on ONNX Runtime's CUDA provider in fp16 (benchmarks/ort_cuda.py: parity +
#      latency vs torch eager; a clear `skip:` line when the provider is not installed).
# Each step runs under its own time limit (the three add up to 7.5 min); a step that fails or times
# out is recorded and the next one still runs. JSON goes to benchmarks/results/ (gpu_check.json
# summarises the steps); the exit status is non-zero if any step failed.
#
#   benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --dry-run       # CPU: interpreter, tiny shapes, CPU provider (checks the script)
#   benchmarks/gpu_check.sh --out DIR       # results elsewhere
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUT" ]; then
  # a dry run measures nothing: keep it out of benchmarks/results unless asked
  if [ $DRY = 1 ]; then OUT=$(mktemp -d /tmp/gpu_check_dry.XXXXXX); else OUT=benchmarks/results; fi
fi
mkdir -p "$OUT"
STEPS="$OUT/gpu_check.steps.tmp"
: > "$STEPS"
T_START=$(date +%s)

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit} s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  [ $rc -ne 0 ] && status=failed
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && status=timeout
  echo "=== $name: $status (rc $rc, ${dt} s)"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$dt" "$*" >> "$STEPS"
}

if [ $DRY = 1 ]; then
  # tests/test_gpu.py skips here with its reason (no CUDA GPU): the step checks the skip is clean
  step gpu_tests 150 env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider
  step gpu_kernels 300 "$PY" benchmarks/gpu_kernels.py --dry-run --out "$OUT/gpu_kernels"
  step ort_cuda 300 "$PY" benchmarks/ort_cuda.py --dry-run --out "$OUT/ort_cuda"
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU visible to torch (use --dry-run on a CPU machine)" >&2; exit 1
  fi
  if ! "$PY" -c "import triton" 2>/dev/null; then
    echo "error: triton not installed (pip install -e '.[triton]')" >&2; exit 1
  fi
  step gpu_tests 120 env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider \
    --junitxml "$OUT/gpu_tests.xml"
  step gpu_kernels 210 "$PY" benchmarks/gpu_kernels.py --quick --out "$OUT/gpu_kernels"
  step ort_cuda 120 "$PY" benchmarks/ort_cuda.py --out "$OUT/ort_cuda"
fi

"$PY" - "$STEPS" "$OUT/gpu_check.json" "$DRY" "$T_START" <<'PYEOF'
import json, os, sys, time
steps_file, out, dry, t_start = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
steps = []
for line in open(steps_file):
    name, status, rc, dt, cmd = line.rstrip("\n").split("\t")
    steps.append(dict(name=name, status=status, rc=int(rc), seconds=int(dt), command=cmd))
try:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception:  # the summary must still be written
    gpu = None
report = dict(dry_run=dry, gpu=gpu, seconds=int(time.time()) - t_start, steps=steps,
              passed=all(s["status"] == "ok" for s in steps))
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
os.replace(tmp, out)
os.remove(steps_file)
print(f"gpu_check: {'all steps ok' if report['passed'] else 'FAILED steps: ' + ', '.join(s['name'] for s in steps if s['status'] != 'ok')}"
      f" in {report['seconds']} s; wrote {out}")
sys.exit(0 if report["passed"] else 1)
PYEOF
