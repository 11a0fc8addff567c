"""Distillation loss, forward + backward: fasttl vs eager PyTorch vs torch.compile of the same."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

import fasttl
from fasttl import _reference
from fasttl.bench.common import copy_bandwidth, format_table, median_seconds

SHAPES = [(8192, 1000), (4096, 10), (256, 32000)]
QUICK_SHAPES = [(1024, 1000), (4096, 10)]


def _step(loss_fn, student, teacher, target):
    def run():
        student.grad = None
        loss_fn(student, teacher, target, temperature=4.0, alpha=0.5).backward()
    return run


def run(device: str = "cpu", quick: bool = False, compile: bool = True) -> Dict[str, object]:
    rows: List[Dict[str, object]] = []
    repeats = 5 if quick else 15
    compiled = torch.compile(_reference.distillation_loss) if compile and not quick else None
    for batch, classes in QUICK_SHAPES if quick else SHAPES:
        student = (torch.randn(batch, classes, device=device) * 3).requires_grad_()
        teacher = torch.randn(batch, classes, device=device) * 3
        target = torch.randint(0, classes, (batch,), device=device)
        result = {"shape": f"{batch}x{classes}", "dtype": "float32"}
        result["fasttl_ms"] = 1e3 * median_seconds(_step(fasttl.distillation_loss, student, teacher, target), device, repeats)
        result["eager_ms"] = 1e3 * median_seconds(_step(_reference.distillation_loss, student, teacher, target), device, repeats)
        if compiled is not None:
            result["compile_ms"] = 1e3 * median_seconds(_step(compiled, student, teacher, target), device, repeats, warmup=3)
        # forward reads student and teacher and writes the gradient; backward scales it in place.
        result["fasttl_gbps"] = 5 * batch * classes * 4 / (result["fasttl_ms"] / 1e3) / 1e9
        rows.append(result)
    bandwidth = copy_bandwidth(device)
    return {"name": "distill", "device": device, "rows": rows, "copy_gbps": bandwidth,
            "notes": [f"Forward + backward of a leaf tensor, T=4, alpha=0.5, float32, median of {repeats} runs. "
                      f"fasttl GB/s counts 5 x B x C x 4 bytes (read student and teacher, write the gradient, then "
                      f"read and write it again in backward); memory copy in the same run: {bandwidth:.1f} GB/s."]}


def speedups(result: Dict[str, object]) -> List[Tuple[str, float]]:
    """(label, alternative's time / fasttl's) for the bar chart."""
    return [(f"{r['shape']}\nvs {key[:-3]}", r[key] / r["fasttl_ms"]) for r in result["rows"]
            for key in ("eager_ms", "compile_ms") if r.get(key)]


def table(result: Dict[str, object]) -> str:
    has_compile = any("compile_ms" in r for r in result["rows"])
    columns = ["shape (B x C)", "fasttl ms", "fasttl GB/s", "eager ms", "eager / fasttl"]
    if has_compile:
        columns += ["torch.compile ms", "compile / fasttl"]
    out = []
    for r in result["rows"]:
        row = [r["shape"], r["fasttl_ms"], r.get("fasttl_gbps", float("nan")), r["eager_ms"],
               f"{r['eager_ms'] / r['fasttl_ms']:.1f}x"]
        if has_compile:
            row += [r["compile_ms"], f"{r['compile_ms'] / r['fasttl_ms']:.1f}x"]
        out.append(row)
    return format_table(columns, out)
