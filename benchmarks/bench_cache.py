"""pytest-benchmark suite: gathering training batches from a feature cache vs torch indexing."""
import pytest
import torch

from fasttl.bench.common import synchronize
from fasttl.cache import gather


@pytest.mark.parametrize("impl", ["fasttl-gather", "torch-index"])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.int8], ids=["fp16", "int8"])
def test_gather_batch(benchmark, device, quick, impl, cache_dtype):
    rows = 5_000 if quick else 50_000
    if cache_dtype == torch.int8:
        cache = torch.randint(-127, 128, (rows, 1280), dtype=torch.int8, device=device)
        scales = torch.rand(rows, device=device)
    else:
        cache = torch.randn(rows, 1280, device=device).to(cache_dtype)
        scales = None
    indices = torch.randint(0, rows, (4096,), device=device)

    def fasttl_gather():
        out = gather(cache, indices, scales)
        synchronize(device)
        return out

    def torch_index():
        out = cache[indices].float()
        if scales is not None:
            out = out * scales[indices, None]
        synchronize(device)
        return out

    out = benchmark.pedantic(fasttl_gather if impl == "fasttl-gather" else torch_index, rounds=5 if quick else 30,
                             warmup_rounds=1)
    assert out.shape == (4096, 1280) and out.dtype == torch.float32
