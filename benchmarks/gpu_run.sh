#!/usr/bin/env bash
# Everything a GPU session checks, run from the repository root on the GPU machine:
#
#   bash benchmarks/gpu_run.sh [STAGE ...]        (default: every stage, in order)
#
# Stages (each writes OUTDIR/<stage>.txt, sanitizer also racecheck.txt and initcheck.txt; the
# bench stages also <stage>.json):
#   env          device, driver, python/torch/cuda/triton/nvcc versions, commit, command
#   build        builds fastdiff against this machine's own torch (--no-build-isolation);
#                skipped when fastdiff._C already imports with its CUDA kernels
#   tests        the GPU test suites: oracle at full sizes with outputs poisoned, both GPU
#                backends, the faster modes against their documented bounds, weighted_mse and
#                the sampler steps on CUDA, plus the CPU suites of the same ops
#   sanitizer    compute-sanitizer memcheck, racecheck and initcheck on the small ragged STF cases
#   bench-stf    STF benchmarks: published, torch, triton, cuda, compile, floor (9 sizes)
#   bench-modes  STF precision modes tf32x3/tf32/bf16 against highest and their floors
#   bench-ops    weighted_mse and sampler-step benchmarks
#   bench-train  the train-step benchmark targets (DDPM++ CIFAR-10, batch 128)
#
# One device call may run at most 10 minutes, so the stages share a time budget
# (GPU_RUN_BUDGET seconds, default 560): each stage runs under `timeout` with what is left
# (pytest gets SIGINT first, so it still prints what it has), and a stage that would start
# with under 30 s left is skipped and says so. A session typically makes two or three calls:
#   bash benchmarks/gpu_run.sh env build tests sanitizer
#   bash benchmarks/gpu_run.sh build bench-stf bench-modes
#   bash benchmarks/gpu_run.sh build bench-ops bench-train
# Output goes to OUTDIR (default $OUT, else benchmarks/results/gpu-<date>). Commit what it
# writes under benchmarks/results/ with the device, versions, commit and command (env.txt);
# `python benchmarks/auto_table.py OUTDIR/bench-stf.json OUTDIR/bench-modes.json` then prints
# the measured backend="auto" table for fastdiff/ops/_dispatch.py.
set -uo pipefail
OUTDIR=${OUTDIR:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fastdiff-inductor}
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET:-560}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env build tests sanitizer bench-stf bench-modes bench-ops bench-train)
PY=${PYTHON:-python3}

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_timed STAGE SECONDS CMD...: CMD under the smaller of SECONDS and the budget left.
run_timed() {
  local stage=$1 want=$2; shift 2
  local have; have=$(( $(left) - 5 ))
  if [ "$have" -lt 30 ]; then
    echo "$stage: skipped, only $(left) s of the ${BUDGET} s budget left" | tee "$OUTDIR/$stage.txt"
    return 0
  fi
  local t=$(( want < have ? want : have ))
  echo "== $stage (up to ${t} s; $(left) s of the budget left)"
  local t0; t0=$(date +%s)
  timeout -s INT -k 15 "$t" "$@" > "$OUTDIR/$stage.txt" 2>&1
  local rc=$?
  echo "$stage: rc=$rc in $(( $(date +%s) - t0 )) s$([ $rc -eq 124 ] && echo ' (stopped by its time limit)')" \
    | tee -a "$OUTDIR/$stage.txt"
  return $rc
}

built() {  # fastdiff._C loads and registered every op's CUDA kernel
  $PY -c "from fastdiff import _ext; import sys; sys.exit(0 if all(_ext.has_kernel(op, 'CUDA') for op in
          ('stf_target', 'weighted_mse', 'sampler_affine', 'heun_correct')) else 1)" > /dev/null 2>&1
}

bench() {  # bench STAGE SECONDS PYTEST-ARGS...: the run, then its ratio report from the JSON
  local stage=$1 t=$2; shift 2
  run_timed "$stage" "$t" $PY -m pytest "$@" --benchmark-only --benchmark-json="$OUTDIR/$stage.json" -q
  grep -E "passed|failed|skipped|error|deselected" "$OUTDIR/$stage.txt" | tail -1
  if [ -s "$OUTDIR/$stage.json" ]; then
    $PY benchmarks/report.py "$OUTDIR/$stage.json"
  fi
}

for stage in "${STAGES[@]}"; do
  case $stage in
    env)
      {
        echo "command: bash benchmarks/gpu_run.sh ${STAGES[*]}"
        echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${FASTDIFF_COMMIT:-unknown (no .git; set FASTDIFF_COMMIT)}")"
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
        $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
        nvcc --version 2>&1 | tail -1
        nproc
      } > "$OUTDIR/env.txt" 2>&1
      cat "$OUTDIR/env.txt" ;;
    build)
      if built; then
        echo "== build: fastdiff._C already imports with its CUDA kernels; not rebuilt"
      else
        MAX_JOBS=${MAX_JOBS:-$(nproc)} run_timed build 400 \
          $PY -m pip install --no-build-isolation --no-deps -v -e . || { tail -40 "$OUTDIR/build.txt"; exit 1; }
        grep -E "nvcc|error" "$OUTDIR/build.txt" | tail -3
      fi
      $PY -c "import fastdiff; print({k: v.reason for k, v in fastdiff.available_backends().items()})" \
        | tee -a "$OUTDIR/env.txt" ;;
    tests)
      # without the CUDA kernels every cuda test would skip, and the run would say nothing
      built || { echo "tests: fastdiff._C is missing or lacks its CUDA kernels; run the build stage" \
        | tee "$OUTDIR/tests.txt"; exit 1; }
      run_timed tests 330 $PY -m pytest tests/test_stf_gpu.py tests/test_weighted_mse.py tests/test_sampling.py \
        tests/test_dispatch.py tests/test_stf.py tests/test_stf_triton.py -q -rfEs
      grep -E "^(FAILED|ERROR)" "$OUTDIR/tests.txt" | head -40; grep -E "passed|failed|error" "$OUTDIR/tests.txt" | tail -1 ;;
    sanitizer)   # the small ragged cases (tests/test_stf_gpu.py's docstring): out-of-bounds, races, uninitialised reads
      run_timed sanitizer 100 compute-sanitizer --tool memcheck --error-exitcode 9 \
        $PY -m pytest tests/test_stf_gpu.py -q -k "7-1023-3071 or ragged"
      tail -2 "$OUTDIR/sanitizer.txt"
      run_timed racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 9 \
        $PY -m pytest tests/test_stf_gpu.py -q -k "ragged and cuda and 0.5"
      tail -2 "$OUTDIR/racecheck.txt"
      run_timed initcheck 60 compute-sanitizer --tool initcheck --error-exitcode 9 \
        $PY -m pytest tests/test_stf_gpu.py -q -k "ragged and cuda"
      tail -2 "$OUTDIR/initcheck.txt" ;;
    bench-stf)   bench bench-stf 330 benchmarks/test_stf_bench.py -k test_stf_target ;;
    bench-modes) bench bench-modes 240 benchmarks/test_stf_bench.py -k test_stf_precision_modes ;;
    bench-ops)   bench bench-ops 200 benchmarks/test_weighted_mse_bench.py benchmarks/test_sampling_bench.py \
                   -k "not cpu" ;;   # the CPU cases are in results/cpu-2core.txt
    bench-train) bench bench-train 400 benchmarks/test_train_bench.py -k "cuda and bf16" ;;
    *) echo "unknown stage '$stage'; stages: env build tests sanitizer bench-stf bench-modes bench-ops bench-train" >&2
       exit 2 ;;
  esac
done
echo "gpu_run: done in $(( $(date +%s) - START )) s"
