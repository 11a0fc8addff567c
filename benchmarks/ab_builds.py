"""What a kernel change costs: the bf16 + fp32-master AdamW step (25M params in 160 tensors, as
`fasttl bench adam`) timed with this checkout's build and with another build of fasttl, in
alternating fresh processes on the same machine, so that both see the same load.

    # a build of the commit before the change, without CUDA (faster), into its own folder:
    git worktree add /tmp/base BASE_COMMIT && FASTTL_CUDA=OFF pip install --no-build-isolation --no-deps \\
        -t /tmp/base_site /tmp/base
    python benchmarks/ab_builds.py /tmp/base_site --rounds 5 --json benchmarks/results/adam-resync-cpu.json

Used to measure the cost of the masters' resync (a param changed outside the optimizer becomes
the master): `this / base` is the step time with the check over the step time without it.
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
from fasttl.bench.adam import tensor_sizes
sizes = tensor_sizes(25_000_000, 160)
params = [torch.randn(n).bfloat16().requires_grad_() for n in sizes]
for p in params:
    p.grad = torch.randn(p.shape).bfloat16()
opt = fasttl.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
for _ in range(3):
    opt.step()
times = []
for _ in range(21):
    t = time.perf_counter(); opt.step(); times.append(time.perf_counter() - t)
print(fasttl.__file__, statistics.median(times), min(times))
"""


def one(site: str):
    out = subprocess.run([sys.executable, "-c", STEP, site], capture_output=True, text=True, check=True).stdout
    where, median, best = out.split()
    return where, float(median), float(best)


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
    this_median = statistics.median(m for _, m, _ in this)
    base_median = statistics.median(m for _, m, _ in base)
    result = {"this_ms": [1e3 * m for _, m, _ in this], "base_ms": [1e3 * m for _, m, _ in base],
              "this_median_ms": 1e3 * this_median, "base_median_ms": 1e3 * base_median,
              "ratio": this_median / base_median, "this": this[0][0], "base": base[0][0]}
    print(json.dumps(result, indent=2))
    if args.json:
        from fasttl.bench.common import machine

        with open(args.json, "w") as f:
            json.dump(dict(result, machine=machine(), rounds=args.rounds), f, indent=2)


if __name__ == "__main__":
    main()
