#!/usr/bin/env bash
# One prepared check for a lent GPU machine (CUDA toolkit, PyTorch preinstalled, no DALI, no
# network): build fasttl for the GPU present, run the CUDA tests, run compute-sanitizer memcheck
# over each kernel's CUDA tests, run the GPU benchmarks, and print a short table last.
# Then the transfer job itself: `fasttl run --device cuda` for every strategy on a small CIFAR-10
# subset, and fine-tuning throughput at 224 px (benchmarks/gpu_job_check.py).
# Logs and JSON go to $OUT (or ./gpu_check_out). Budget: under 8 minutes on an H100.
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
step() { echo; echo "== $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/machine.txt" || {
  echo "no GPU visible (nvidia-smi failed): this script needs a CUDA GPU; stopping before the GPU steps"; exit 2; }
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" \
  | tee -a "$OUT/machine.txt"

step "build for the GPU present (FASTTL_CUDA=ON, native architecture)"
ARCH=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
export FASTTL_CUDA=ON
export CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${ARCH}"
if ! python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
# Run from outside the checkout so `import fasttl` finds the installed package with its _C module.
cd /tmp
python3 -m fasttl info | tee "$OUT/info.txt"

step "CUDA tests"
python3 -m pytest "$REPO/tests" -q -x -k cuda -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" \
  > "$OUT/cuda_tests.log" 2>&1 || status=1
tail -5 "$OUT/cuda_tests.log"

step "compute-sanitizer memcheck (one small case per kernel)"
if command -v compute-sanitizer > /dev/null; then
  for case in "test_distill.py::test_matches_reference_over_shapes and cuda and 41x1271 and float32" \
              "test_optim.py::test_fp32_matches_torch_float64 and cuda and AdamW and plain" \
              "test_cache_kernels.py::test_pool_store_matches_reference and cuda and 17x41x3x5" \
              "test_cache_kernels.py::test_gather_matches_reference and cuda and 10-1280-7"; do
    file="${case%%::*}"; expr="${case#*::}"
    timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest "$REPO/tests/$file" -q \
      -p no:cacheprovider -k "$expr" >> "$OUT/memcheck.log" 2>&1
    rc=$?; echo "memcheck $file [$expr]: exit $rc" | tee -a "$OUT/memcheck_summary.txt"
    [ $rc -eq 0 ] || status=1
  done
else
  echo "compute-sanitizer not found; memcheck skipped" | tee "$OUT/memcheck_summary.txt"
fi

step "GPU benchmarks"
python3 -m fasttl bench distill adam --device cuda --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1 || status=1
python3 -m fasttl bench cache --device cuda --quick --json "$OUT/bench_gpu_cache.json" >> "$OUT/bench_gpu.log" 2>&1 || status=1

step "the transfer job on CUDA (every strategy) and finetune throughput"
if [ -d "$REPO/gpu_data/cifar10-small" ]; then
  timeout 300 python3 "$REPO/benchmarks/gpu_job_check.py" --data "$REPO/gpu_data/cifar10-small" --out "$OUT/job" \
    > "$OUT/job_check.log" 2>&1 || status=1
else
  echo "gpu_data/cifar10-small missing: run python benchmarks/make_gpu_subset.py and carry gpu_data" \
    | tee "$OUT/job_check.log"; status=1
fi

step "summary"
cat "$OUT/info.txt"
grep -E "passed|failed" "$OUT/cuda_tests.log" | tail -1
cat "$OUT/memcheck_summary.txt"
cat "$OUT/bench_gpu.log"
tail -20 "$OUT/job_check.log"
exit $status
