"""What a kernel change costs: the bf16 + fp32-master AdamW step (25M params in 160 tensors, as
`fasttl bench adam`) timed with this checkout's build and with another build of fasttl, in
alternating fresh processes on the same machine, so that both see the same load.

    # a build of the commit before the change, without CUDA (faster), into its own folder:
    git worktree add /tmp/base BASE_COMMIT && FASTTL_CUDA=OFF pip install --no-build-isolation --no-deps \\
        -t /tmp/base_site /tmp/base
    python benchmarks/ab_builds.py /tmp/base_site --rounds 5 --json benchmarks/results/adam-resync-cpu.json

To isolate a check inside the kernel, build the same commit with the check compiled out instead
(here: `master_or_param` in csrc/include/fasttl/adam.h returning the master) into the other folder.

Used to measure the cost of the masters' resync (a param changed outside the optimizer becomes
the master): kernel_ratio is the native call's time with the check over its time without it
(the same pointers, no Python around it); step_ratio the whole opt.step(), Python included.
"""
import argparse
import json
import statistics
import subprocess
import sys

STEP = r"""
import sys, time, statistics
if sys.argv[1] != "-":
    # the other build: ahead of this checkout's editable install, whose finder would win otherwise
    sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    sys.path.insert(0, sys.argv[1])
import torch, fasttl
from fasttl._native import dtype_code, native
from fasttl.bench.adam import tensor_sizes
sizes = tensor_sizes(25_000_000, 160)
params = [torch.randn(n).bfloat16().requires_grad_() for n in sizes]
for p in params:
    p.grad = torch.randn(p.shape).bfloat16()
opt = fasttl.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
opt.step()  # the state (masters, moments, steps) as the optimizer makes it
state = [opt.state[p] for p in params]
address = lambda ts: [t.data_ptr() for t in ts]
args = (False, address(params), address([p.grad for p in params]), address([s["master_param"] for s in state]),
        address([s["exp_avg"] for s in state]), address([s["exp_avg_sq"] for s in state]), [0] * len(params),
        [p.numel() for p in params], address([s["step"] for s in state]), dtype_code(params[0]),
        dtype_code(params[0].grad), True, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, False, False, 0, 0, 0, 0)
def kernel():  # the native call alone: what the kernel change costs, without any Python around it
    native.adam_step(*args)
for _ in range(3):
    kernel()
times = []
for _ in range(21):
    t = time.perf_counter(); kernel(); times.append(time.perf_counter() - t)
steps = []
for _ in range(21):
    t = time.perf_counter(); opt.step(); steps.append(time.perf_counter() - t)
print(fasttl.__file__, statistics.median(times), min(times), statistics.median(steps))
"""


def one(site: str):
    out = subprocess.run([sys.executable, "-c", STEP, site], capture_output=True, text=True, check=True).stdout
    where, median, best, step = out.split()
    return where, float(median), float(best), float(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_site", help="folder holding the other build's fasttl package (pip install -t)")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two builds")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    this, base = [], []
    for _ in range(args.rounds):
        this.append(one("-"))
        base.append(one(args.base_site))
    assert this[0][0] != base[0][0], "both runs imported the same fasttl"
    this_median = statistics.median(r[1] for r in this)
    base_median = statistics.median(r[1] for r in base)
    this_step = statistics.median(r[3] for r in this)
    base_step = statistics.median(r[3] for r in base)
    result = {"kernel_this_ms": [1e3 * r[1] for r in this], "kernel_base_ms": [1e3 * r[1] for r in base],
              "kernel_this_median_ms": 1e3 * this_median, "kernel_base_median_ms": 1e3 * base_median,
              "kernel_ratio": this_median / base_median,
              "step_this_median_ms": 1e3 * this_step, "step_base_median_ms": 1e3 * base_step,
              "step_ratio": this_step / base_step, "this": this[0][0], "base": base[0][0]}
    print(json.dumps(result, indent=2))
    if args.json:
        from fasttl.bench.common import machine

        with open(args.json, "w") as f:
            json.dump(dict(result, machine=machine(), rounds=args.rounds), f, indent=2)


if __name__ == "__main__":
    main()
