#!/usr/bin/env bash
# Everything a GPU session checks, in one command on the GPU machine, run from
# the repository root:  bash benchmarks/gpu_run.sh [OUTDIR]
# Builds fastdiff against that machine's own torch, runs the GPU test suites
# (oracle at full sizes, outputs poisoned), compute-sanitizer on the small
# ragged case, and the benchmark suite; writes at most 7 files to OUTDIR
# (default $OUT, else benchmarks/results/gpu-<date>). Commit what it writes
# under benchmarks/results/ with the device, versions, commit and command
# (env.txt holds them).
set -uo pipefail
OUTDIR=${1:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fastdiff-inductor}
{
  echo "command: bash benchmarks/gpu_run.sh $*"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${FASTDIFF_COMMIT:-unknown (no .git; set FASTDIFF_COMMIT)}")"
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
  nvcc --version 2>&1 | tail -1
} > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

echo "== build"
if ! MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install --no-build-isolation --no-deps -e . > "$OUTDIR/build.log" 2>&1; then
  tail -40 "$OUTDIR/build.log"; exit 1
fi
python3 -c "import fastdiff; print({k: v.reason for k, v in fastdiff.available_backends().items()})" | tee -a "$OUTDIR/env.txt"

echo "== GPU tests"
python3 -m pytest tests/test_stf_gpu.py tests/test_stf_triton.py tests/test_weighted_mse.py tests/test_sampling.py \
  tests/test_stf.py -q -rs -x > "$OUTDIR/gpu_tests.txt" 2>&1
echo "tests rc=$?"; tail -3 "$OUTDIR/gpu_tests.txt"

echo "== compute-sanitizer"
compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest tests/test_stf_gpu.py -q -k "7-1023-3071" \
  > "$OUTDIR/sanitizer.txt" 2>&1
echo "sanitizer rc=$?"; tail -3 "$OUTDIR/sanitizer.txt"

echo "== benchmarks"
python3 -m pytest benchmarks/ --benchmark-only --benchmark-json="$OUTDIR/bench.json" > "$OUTDIR/bench.txt" 2>&1
echo "bench rc=$?"; sed -n '/fastdiff ratios/,/^---/p' "$OUTDIR/bench.txt" | head -120
