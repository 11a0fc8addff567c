"""Optimizer step over 25M params in 160 tensors (ResNet-50's size): fasttl.optim.AdamW beside
torch.optim.AdamW (foreach and fused: the faster is the yardstick), and a bf16 model with fp32
master weights beside the PyTorch way of getting the same result (grads cast to fp32 masters,
fused fp32 AdamW, masters copied back). Each time: median, minimum and spread."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from fasttl import optim
from fasttl.bench.common import copy_bandwidth, format_table, inplace_bandwidth, load_average, timings


def tensor_sizes(total: int, count: int) -> List[int]:
    """`count` sizes spread over three orders of magnitude (like a CNN's layers) summing to `total`."""
    weights = [1.06 ** i for i in range(count)]
    scale = total / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def _params(sizes, dtype, device, grad_dtype=None):
    params = [torch.randn(n, device=device).to(dtype).requires_grad_() for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device).to(grad_dtype or dtype)
    return params


_OPTIONS = dict(lr=1e-3, weight_decay=0.01)  # every optimizer benchmarked takes the same


def run(device: str = "cpu", quick: bool = False) -> Dict[str, object]:
    total = 2_000_000 if quick else 25_000_000
    sizes = tensor_sizes(total, 160)
    repeats = 3 if quick else 21
    load = load_average()

    def timed(step) -> dict:
        return timings(step, device, repeats=repeats, warmup=2)

    rows = _fp32_rows(sizes, total, device, timed) + _bf16_master_rows(sizes, total, device, timed)
    bandwidth = inplace_bandwidth(device)
    copy = copy_bandwidth(device)
    return {"name": "adam", "device": device, "params": total, "tensors": len(sizes), "load_1m": load,
            "inplace_gbps": bandwidth, "copy_gbps": copy, "rows": rows,
            "notes": [f"{total:,} params in {len(sizes)} tensors. Bandwidth measured in the same run (bytes read + "
                      f"written): in-place stream x += 1: {bandwidth:.1f} GB/s (the yardstick, as Adam updates in "
                      f"place); copy into another buffer: {copy:.1f} GB/s.",
                      "GB/s counts the bytes each way must move: 28 per param for a fused pass, 40 for the two-step "
                      "way.",
                      "vs fasttl: median time of that row / fasttl's in the same precision (>1: fasttl faster); "
                      f"ms: median of {repeats} steps (minimum, interquartile range as a share of the median)."]}


def _fp32_rows(sizes, total: int, device: str, timed) -> List[dict]:
    """fp32: 28 bytes moved per param (read p, g, m, v; write p, m, v), 16 held (p, g, m, v)."""
    fp32 = {}
    for name, make in [
        ("fasttl", lambda ps: optim.AdamW(ps, **_OPTIONS)),
        ("torch foreach", lambda ps: torch.optim.AdamW(ps, foreach=True, **_OPTIONS)),
        ("torch fused", lambda ps: torch.optim.AdamW(ps, fused=True, **_OPTIONS)),
    ]:
        params = _params(sizes, torch.float32, device)
        opt = make(params)
        fp32[name] = timed(opt.step)
        del opt, params
    fastest_torch = min(("torch foreach", "torch fused"), key=lambda name: fp32[name]["median"])
    return [{"case": f"fp32 {name}" + (" (the faster torch)" if name == fastest_torch else ""),
             "ms": 1e3 * t["median"], "min_ms": 1e3 * t["min"], "spread": t["spread"],
             "gbps": 28 * total / t["median"] / 1e9, "bytes_per_param": 16,
             "vs_fasttl": t["median"] / fp32["fasttl"]["median"]} for name, t in fp32.items()]


def _bf16_master_rows(sizes, total: int, device: str, timed) -> List[dict]:
    """A bf16 model with fp32 master weights. fasttl: one pass, 28 bytes moved (read g2 w4 m4 v4,
    write w4 m4 v4 p2), 16 held (p2 g2 w4 m4 v4). The PyTorch way: grads cast to the fp32
    masters' .grad, fused fp32 AdamW, masters copied back to the bf16 model: 40 bytes moved
    (cast 2+4, step 28, copy 4+2), 20 held (+ fp32 master grads)."""
    params = _params(sizes, torch.bfloat16, device)
    opt = optim.AdamW(params, **_OPTIONS)
    ours = timed(opt.step)
    del opt, params

    model = _params(sizes, torch.bfloat16, device)
    masters = [p.detach().float().requires_grad_() for p in model]
    for m in masters:
        m.grad = torch.empty(m.shape, device=device)
    ref_opt = torch.optim.AdamW(masters, fused=True, **_OPTIONS)

    def two_step():
        torch._foreach_copy_([m.grad for m in masters], [p.grad for p in model])
        ref_opt.step()
        with torch.no_grad():
            torch._foreach_copy_(model, masters)

    theirs = timed(two_step)
    return [{"case": "bf16+master fasttl (one pass)", "ms": 1e3 * ours["median"], "min_ms": 1e3 * ours["min"],
             "spread": ours["spread"], "gbps": 28 * total / ours["median"] / 1e9, "bytes_per_param": 16,
             "vs_fasttl": 1.0},
            {"case": "bf16+master torch (cast, fused fp32 AdamW, copy)", "ms": 1e3 * theirs["median"],
             "min_ms": 1e3 * theirs["min"], "spread": theirs["spread"], "gbps": 40 * total / theirs["median"] / 1e9,
             "bytes_per_param": 20, "vs_fasttl": theirs["median"] / ours["median"]}]


def speedups(result: Dict[str, object]) -> List[Tuple[str, float]]:
    """(label, alternative's time / fasttl's) for the bar chart."""
    return [(r["case"], r["vs_fasttl"]) for r in result["rows"] if "fasttl" not in r["case"]]


def table(result: Dict[str, object]) -> str:
    rows = [[r["case"], f"{r['ms']:.3g} ({r['min_ms']:.3g}, {100 * r['spread']:.0f}%)", r["gbps"],
             f"{100 * r['gbps'] / result['inplace_gbps']:.0f}%", r["bytes_per_param"], f"{r['vs_fasttl']:.2f}x"]
            for r in result["rows"]]
    return format_table(["case", "ms / step", "GB/s", "of in-place BW", "bytes/param held", "time vs fasttl"], rows)
