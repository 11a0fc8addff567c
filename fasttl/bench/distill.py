"""Distillation loss, forward + backward, fp32, T=4, alpha=0.9: fasttl.distillation_loss beside
the fastest way a PyTorch user would write it (eager: the faster of kl_div(log_target=True) +
cross_entropy and the log_softmax formula of fasttl._reference; torch.compile of the kl_div
one), with each time's minimum, median and spread, and the machine's own softmax and memory-copy
throughput in the same run for scale."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from fasttl.losses import distillation_loss
from fasttl import _reference
from fasttl.bench.common import copy_bandwidth, format_table, load_average, median_seconds, timings

SHAPES = [(8192, 1000), (4096, 10), (256, 32000)]
QUICK_SHAPES = [(1024, 1000), (4096, 10)]
TEMPERATURE, ALPHA = 4.0, 0.9


def _step(loss_fn, student, teacher, target):
    def run():
        student.grad = None
        loss_fn(student, teacher, target, temperature=TEMPERATURE, alpha=ALPHA).backward()
    return run


def cpu_isa() -> str:
    """The widest x86 vector extension this CPU reports (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    return "SSE2" if flags else "unknown"


def kernel_clone() -> str:
    from fasttl._native import native

    try:
        return native.cpu_kernel_clone()
    except AttributeError:  # an older build
        return "unknown"


def _exps_per_element(temperature: float) -> int:
    # exp((s - m)/T) and exp((t - m)/T); exp(s - m) is the first to the power T for T in 1..4.
    return 2 if temperature in (1.0, 2.0, 3.0, 4.0) else 3


def run(device: str = "cpu", quick: bool = False, compile: bool = True) -> Dict[str, object]:
    rows: List[Dict[str, object]] = []
    repeats = 5 if quick else 21
    # --quick (the test suite's smoke run) leaves torch.compile out: compiling alone takes ~30 s.
    compiled = torch.compile(_reference.distillation_loss_kl_div) if compile and not quick else None
    exps = _exps_per_element(TEMPERATURE)
    eager_ways = {"eager kl_div": _reference.distillation_loss_kl_div, "eager log_softmax": _reference.distillation_loss}
    for batch, classes in QUICK_SHAPES if quick else SHAPES:
        student = (torch.randn(batch, classes, device=device) * 3).requires_grad_()
        teacher = torch.randn(batch, classes, device=device) * 3
        target = torch.randint(0, classes, (batch,), device=device)
        elements = batch * classes
        result = {"shape": f"{batch}x{classes}", "dtype": "float32", "load_1m": load_average()}
        result["fasttl"] = timings(_step(distillation_loss, student, teacher, target), device, repeats)
        for name, fn in eager_ways.items():
            result[name] = timings(_step(fn, student, teacher, target), device, repeats)
        result["eager"] = min(eager_ways, key=lambda name: result[name]["median"])  # the baseline
        if compiled is not None:
            result["compile"] = timings(_step(compiled, student, teacher, target), device, repeats, warmup=3)
        fasttl_s = result["fasttl"]["median"]
        result["fasttl_ms"] = 1e3 * fasttl_s
        result["eager_ms"] = 1e3 * result[result["eager"]]["median"]
        if compiled is not None:
            result["compile_ms"] = 1e3 * result["compile"]["median"]
        # The forward reads student and teacher and writes the final gradient; backward is free.
        result["fasttl_gbps"] = 3 * elements * 4 / fasttl_s / 1e9
        result["fasttl_gexps"] = exps * elements / fasttl_s / 1e9
        with torch.no_grad():
            softmax_s = median_seconds(lambda: torch.softmax(teacher, 1), device, repeats)
        # softmax: one exp per element, reads the input and writes the output.
        result["softmax_ms"] = 1e3 * softmax_s
        result["softmax_gbps"] = 2 * elements * 4 / softmax_s / 1e9
        result["softmax_gexps"] = elements / softmax_s / 1e9
        rows.append(result)
    bandwidth = copy_bandwidth(device)
    notes = [f"Forward + backward of a leaf tensor (`loss.backward()` on the mean), T={TEMPERATURE:g}, "
             f"alpha={ALPHA:g}, float32; each time the median of {repeats} runs, with the minimum and the "
             "interquartile range (IQR, as a share of the median) in the JSON. eager: the faster of "
             "kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True) + cross_entropy and fasttl._reference's "
             "log_softmax formula (named in the table); torch.compile: of the kl_div one, default inductor.",
             f"fasttl GB/s counts 3 x B x C x 4 bytes (read student and teacher, write the gradient: the mean's "
             f"1/B is folded into the forward, so backward touches nothing); exps/s counts {exps} exps per element. "
             f"torch.softmax over the same (B, C) in the same run: 2 x B x C x 4 bytes, one exp per element. "
             f"Memory copy: {bandwidth:.1f} GB/s (bytes read + written)."]
    if device == "cpu":
        notes.append(f"CPU ISA: {cpu_isa()}; kernel clone that ran: {kernel_clone()}; "
                     f"{torch.get_num_threads()} threads.")
    return {"name": "distill", "device": device, "rows": rows, "copy_gbps": bandwidth,
            "isa": cpu_isa(), "kernel_clone": kernel_clone(), "notes": notes}


def speedups(result: Dict[str, object]) -> List[Tuple[str, float]]:
    """(label, alternative's time / fasttl's) for the bar chart."""
    return [(f"{r['shape']}\nvs {key[:-3]}", r[key] / r["fasttl_ms"]) for r in result["rows"]
            for key in ("eager_ms", "compile_ms") if r.get(key)]


def _time(r: Dict[str, object], key: str) -> str:
    t = r.get(key)
    if not isinstance(t, dict):
        return "-"
    return f"{1e3 * t['median']:.3g} ({1e3 * t['min']:.3g}, {100 * t['spread']:.0f}%)"


def table(result: Dict[str, object]) -> str:
    has_compile = any("compile_ms" in r for r in result["rows"])
    columns = ["shape (B x C)", "fasttl ms", "eager ms (way)", "eager / fasttl"]
    if has_compile:
        columns += ["torch.compile ms", "compile / fasttl"]
    columns += ["fasttl GB/s", "fasttl Gexp/s", "softmax GB/s", "load"]
    out = []
    for r in result["rows"]:
        row = [r["shape"], _time(r, "fasttl"), f"{_time(r, r['eager'])} ({r['eager'][6:]})",
               f"{r['eager_ms'] / r['fasttl_ms']:.1f}x"]
        if has_compile:
            row += [_time(r, "compile"), f"{r['compile_ms'] / r['fasttl_ms']:.1f}x" if r.get("compile_ms") else "-"]
        row += [r["fasttl_gbps"], r["fasttl_gexps"], r["softmax_gbps"], r.get("load_1m")]
        out.append(row)
    return format_table(columns, out) + "\n\nms: median (minimum, interquartile range as a share of the median)."
