"""pytest-benchmark suite: one optimizer step, fasttl AdamW vs torch.optim.AdamW (fused)."""
import pytest
import torch

import fasttl
from fasttl.bench.adam import tensor_sizes
from fasttl.bench.common import synchronize


@pytest.mark.parametrize("impl", ["fasttl", "torch-fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adamw_step(benchmark, device, quick, impl, dtype):
    if impl == "torch-fused" and dtype == torch.bfloat16:
        pytest.skip("torch fused AdamW on bf16 params has no fp32 master weights; compared in fasttl bench adam")
    sizes = tensor_sizes(200_000 if quick else 5_000_000, 160)
    params = [torch.randn(n, device=device).to(dtype).requires_grad_() for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fasttl.optim.AdamW(params, lr=1e-3) if impl == "fasttl" else torch.optim.AdamW(params, lr=1e-3, fused=True)

    def step():
        opt.step()
        synchronize(device)

    benchmark.pedantic(step, rounds=3 if quick else 10, warmup_rounds=1)
    assert all(torch.isfinite(p).all() for p in params)
