"""How close an engine is to what the machine can do: the multiply-accumulates a backbone spends
per image (counted from the modules that do them, at the size it runs), and the machine's own
dense fp32 and int8 matrix-multiply rates, measured in the same run as the engines they bound."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from fasttl.bench.common import timings

# A square GEMM this large keeps every core's vector units busy on a CPU or a GPU, so its rate is
# what the machine's dense arithmetic can reach in practice (not a datasheet's peak).
PEAK_SIZE = 1024


def macs_per_image(module: nn.Module, size: int, device="cpu") -> int:
    """Multiply-accumulates of one forward pass of `module` on one (3, size, size) image: every
    convolution (output elements x input channels per group x kernel area) and linear layer
    (output elements x input features). Pooling, activations and additions are left out (a few
    percent of the work in these networks, and not what GEMM units do)."""
    total = [0]

    def count(layer, inputs, output):
        per_output = layer.in_features if isinstance(layer, nn.Linear) else \
            layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        total[0] += output.numel() * per_output

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]


def _gemm_rate(a: torch.Tensor, b: torch.Tensor, matmul, device: str) -> float:
    """Operations per second (2 per multiply-accumulate) of `matmul(a, b)`, the best of its runs."""
    seconds = timings(lambda: matmul(a, b), device, repeats=5, warmup=2, min_seconds=0.5)["min"]
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / seconds


def machine_peaks(device: str = "cpu", size: int = PEAK_SIZE) -> Dict[str, Optional[float]]:
    """{"fp32_gflops", "int8_gops"}: this machine's dense matrix-multiply rates (int8: None where
    torch has no int8 GEMM for the device)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device) for _ in range(2))
    peaks = {"fp32_gflops": _gemm_rate(a, b, torch.mm, device) / 1e9, "int8_gops": None}
    qa, qb = ((t * 40).clamp(-127, 127).to(torch.int8) for t in (a, b))
    try:
        peaks["int8_gops"] = _gemm_rate(qa, qb, torch._int_mm, device) / 1e9
    except (RuntimeError, AttributeError, NotImplementedError):
        pass  # no int8 GEMM here: the fraction is shown against fp32 only
    return peaks
