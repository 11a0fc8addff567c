#!/usr/bin/env bash
# One prepared check for a lent GPU machine (CUDA toolkit, PyTorch preinstalled, no DALI, no
# network), in this order:
#   1. driver, CUDA runtime and torch versions (before anything can fail)
#   2. build fasttl for the GPU present; `fasttl info` (runtime, driver, warnings)
#   3. the CUDA tests (pytest -k cuda: kernels against the float64 references, no host syncs,
#      named index errors, CUDA-graph capture of the optimizer step)
#   4. compute-sanitizer memcheck over every kernel, racecheck over the kernels that use shared
#      memory (distill, pool_store), on benchmarks/gpu_kernels.py --cases: odd shapes, sizes 1,
#      strided rows, channels_last maps and batch slices, strided int32 indices, unaligned params
#   5. each kernel's GB/s beside the device-to-device copy GB/s of the same run
#   6. the transfer job (`fasttl run --device cuda`, every strategy) and finetune throughput
#   7. LP-FT at 224 px beside its own probe (accuracy, training images/s; issue 18)
# Each step has its own time limit so the whole fits in about 8 minutes on an H100/H200.
# Logs and JSON go to $OUT (or ./gpu_check_out); send back the printed summary and $OUT.
#
# Before the device call, here: python benchmarks/make_gpu_subset.py   (gpu_data/, git-ignored, ~7 MB)
# The device call (one, prepared; leaves time to rerun once in a 15-minute budget):
#   run(command="bash benchmarks/gpu_check.sh", carry=["gpu_data"], timeout_s=540)
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_check_out}"
mkdir -p "$OUT"
cd "$REPO"
status=0
started=$SECONDS
step() { echo; echo "== [$((SECONDS - started)) s] $*"; }

step "versions: driver, CUDA runtime, torch"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/machine.txt" || {
  echo "no GPU visible (nvidia-smi failed): this script needs a CUDA GPU; stopping before the GPU steps"; exit 2; }
nvidia-smi 2>/dev/null | grep -m1 "CUDA Version" | tee -a "$OUT/machine.txt"
(nvcc --version 2>&1 | tail -2) | tee -a "$OUT/machine.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" \
  | tee -a "$OUT/machine.txt"

step "build for the GPU present (FASTTL_CUDA=ON, native architecture)"
ARCH=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
export FASTTL_CUDA=ON
export CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${ARCH}"
if ! timeout 240 python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "fasttl: |CMake Warning" "$OUT/build.log" | head -5
# Run from outside the checkout so `import fasttl` finds the installed package with its _C module.
cd /tmp
python3 -m fasttl info | tee "$OUT/info.txt"

step "CUDA tests"
timeout 120 python3 -m pytest "$REPO/tests" -q -x -k cuda -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" \
  > "$OUT/cuda_tests.log" 2>&1 || status=1
tail -5 "$OUT/cuda_tests.log"

step "compute-sanitizer: memcheck (every kernel), racecheck (shared-memory kernels)"
CASES="$REPO/benchmarks/gpu_kernels.py"
if command -v compute-sanitizer > /dev/null; then
  # Only fasttl's kernels are instrumented (their mangled names contain "fasttl"): torch's own
  # would take most of the time.
  FILTER=()
  compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name" && FILTER=(--kernel-name kns=fasttl)
  : > "$OUT/sanitizer_summary.txt"
  for run in "120 memcheck distill pool_store gather adam" "90 racecheck distill pool_store"; do
    set -- $run; limit=$1; tool=$2; shift 2
    timeout "$limit" compute-sanitizer --tool "$tool" "${FILTER[@]}" --error-exitcode 9 \
      python3 "$CASES" --cases "$@" > "$OUT/$tool.log" 2>&1
    rc=$?
    errors=$(grep -cE "^========= (Invalid|Race|Error|Program hit|Barrier|Uninitialized)" "$OUT/$tool.log")
    echo "$tool [$*]: exit $rc, $errors reports, $(grep -c '^ok ' "$OUT/$tool.log") cases ok, $(grep -c '^FAIL' "$OUT/$tool.log") failed" \
      | tee -a "$OUT/sanitizer_summary.txt"
    for kernel in distill_rows_kernel pool_store_kernel gather_kernel adam_kernel; do
      n=$(grep -A3 -E "^========= (Invalid|Race|Error)" "$OUT/$tool.log" | grep -c "$kernel")
      [ "$n" -gt 0 ] && echo "  $kernel: $n report lines" | tee -a "$OUT/sanitizer_summary.txt"
    done
    [ $rc -eq 0 ] || status=1
  done
else
  echo "compute-sanitizer not found; sanitizer runs skipped" | tee "$OUT/sanitizer_summary.txt"
  timeout 60 python3 "$CASES" --cases > "$OUT/cases.log" 2>&1 || status=1
  grep -E "^(ok|FAIL)" "$OUT/cases.log" | tail -3
fi

step "bandwidth: each kernel beside the device-to-device copy of this run"
timeout 90 python3 "$CASES" --bandwidth --json "$OUT/bandwidth.json" > "$OUT/bandwidth.log" 2>&1 || status=1
cat "$OUT/bandwidth.log"

step "GPU benchmarks against the PyTorch way"
timeout 45 python3 -m fasttl bench distill adam --device cuda --quick --json "$OUT/bench_gpu.json" \
  > "$OUT/bench_gpu.log" 2>&1 || status=1
timeout 30 python3 -m fasttl bench cache --device cuda --quick --json "$OUT/bench_gpu_cache.json" \
  >> "$OUT/bench_gpu.log" 2>&1 || status=1

step "the transfer job on CUDA (every strategy) and finetune throughput"
if [ -d "$REPO/gpu_data/cifar10-small" ]; then
  timeout 120 python3 "$REPO/benchmarks/gpu_job_check.py" --data "$REPO/gpu_data/cifar10-small" --out "$OUT/job" \
    > "$OUT/job_check.log" 2>&1 || status=1
else
  echo "gpu_data/cifar10-small missing: run python benchmarks/make_gpu_subset.py and carry gpu_data" \
    | tee "$OUT/job_check.log"; status=1
fi

step "LP-FT at 224 px on the carried subset (accuracy, images/s) beside its own probe"
if [ -d "$REPO/gpu_data/cifar10-small" ]; then
  timeout 150 python3 "$REPO/benchmarks/gpu_job_check.py" --data "$REPO/gpu_data/cifar10-small" --out "$OUT/lpft" \
    --lpft 224 > "$OUT/lpft.log" 2>&1 || status=1
  tail -4 "$OUT/lpft.log"
fi

step "summary"
cat "$OUT/machine.txt"
cat "$OUT/info.txt"
grep -E "passed|failed" "$OUT/cuda_tests.log" | tail -1
cat "$OUT/sanitizer_summary.txt"
cat "$OUT/bandwidth.log"
cat "$OUT/bench_gpu.log"
tail -20 "$OUT/job_check.log"
tail -4 "$OUT/lpft.log" 2>/dev/null
echo "total $((SECONDS - started)) s, status $status"
exit $status
