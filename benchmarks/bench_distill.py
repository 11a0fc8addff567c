"""pytest-benchmark suite: fused distillation loss (forward + backward) vs eager PyTorch."""
import pytest
import torch

import fasttl
from fasttl import _reference
from fasttl.bench.common import synchronize


@pytest.mark.parametrize("impl", ["fasttl", "eager"])
@pytest.mark.parametrize("shape", [(8192, 1000), (4096, 10), (256, 32000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_distill_forward_backward(benchmark, device, quick, impl, shape):
    batch, classes = (min(shape[0], 512), shape[1]) if quick else shape
    student = (torch.randn(batch, classes, device=device) * 3).requires_grad_()
    teacher = torch.randn(batch, classes, device=device) * 3
    target = torch.randint(0, classes, (batch,), device=device)
    loss_fn = fasttl.distillation_loss if impl == "fasttl" else _reference.distillation_loss

    def step():
        student.grad = None
        loss_fn(student, teacher, target, temperature=4.0, alpha=0.5).backward()
        synchronize(device)

    benchmark.pedantic(step, rounds=3 if quick else 15, warmup_rounds=1)
    assert student.grad is not None and torch.isfinite(student.grad).all()
