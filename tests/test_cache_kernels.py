"""Feature cache kernels (pool-and-store, gather) against the float64 reference."""
import pytest
import torch

from fasttl import _reference
from fasttl.cache.kernels import gather, pool_store
from conftest import devices

SOURCE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CACHE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]
# Rounding of a pooled value into each cache dtype (relative), on top of the source's own rounding.
CACHE_RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SOURCE_TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
SHAPES = [(0, 5, 2, 2), (1, 1, 1, 1), (3, 1280, 4, 4), (17, 41, 3, 5), (6, 7), (1, 1)]


def _new_cache(rows, channels, dtype, device):
    if dtype == torch.int8:
        return torch.full((rows, channels), 99, dtype=dtype, device=device), \
            torch.full((rows,), float("nan"), device=device)
    return torch.full((rows, channels), float("nan"), dtype=dtype, device=device), None


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("source_dtype", SOURCE_DTYPES)
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pool_store_matches_reference(device, source_dtype, cache_dtype, shape):
    features = (torch.randn(shape) * 3).to(source_dtype).to(device)
    n, channels = shape[0], shape[1]
    total_rows = n + 4
    cache, scales = _new_cache(total_rows, channels, cache_dtype, device)
    rows = torch.randperm(total_rows, device=device)[:n]
    pool_store(features, cache, rows, scales)
    expected, expected_scales = _reference.pool_store(features.cpu(), cache_dtype)
    written = cache[rows].cpu()
    if cache_dtype == torch.int8:
        # The kernel pools in fp32, so a value sitting on a rounding boundary may land one step away.
        assert (written.double() - expected).abs().max() <= 1 if n else True
        torch.testing.assert_close(scales[rows].cpu().double(), expected_scales, rtol=SOURCE_TOL[source_dtype] + 1e-6,
                                   atol=0)
        # The stated bound: dequantized values within max|v| / 254 (+ fp32 pooling error) of the pooled value.
        pooled, _ = _reference.pool_store(features.cpu(), torch.float32)
        dequantized = written.double() * scales[rows].cpu().double()[:, None]
        bound = pooled.abs().amax(dim=1, keepdim=True) / 254 * 1.001 + 1e-6 if n else 0
        assert ((dequantized - pooled).abs() <= bound).all()
    else:
        torch.testing.assert_close(written.double(), expected, atol=1e-5,
                                   rtol=CACHE_RTOL[cache_dtype] + SOURCE_TOL[source_dtype] / 4)
    untouched = torch.ones(total_rows, dtype=torch.bool)
    untouched[rows.cpu()] = False
    if cache_dtype == torch.int8:
        assert (cache.cpu()[untouched] == 99).all()
    else:
        assert torch.isnan(cache.cpu()[untouched].float()).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, channels, count", [(10, 1280, 7), (1, 1, 1), (50, 33, 0), (300, 129, 1000)])
def test_gather_matches_reference(device, cache_dtype, out_dtype, rows, channels, count):
    if cache_dtype == torch.int8:
        cache = torch.randint(-127, 128, (rows, channels), dtype=torch.int8, device=device)
        scales = torch.rand(rows, device=device) + 0.01
    else:
        cache = torch.randn(rows, channels).to(cache_dtype).to(device)
        scales = None
    indices = torch.randint(0, rows, (count,), device=device)
    out = gather(cache, indices, scales, out_dtype)
    assert out.shape == (count, channels) and out.dtype == out_dtype and out.is_contiguous()
    expected = _reference.gather(cache.cpu(), indices.cpu(), None if scales is None else scales.cpu())
    rtol = 1e-6 if out_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.cpu().double(), expected, rtol=rtol, atol=1e-6)


def test_pool_then_gather_round_trip_int8_within_bound():
    features = torch.randn(64, 256, 3, 3)
    cache, scales = _new_cache(64, 256, torch.int8, "cpu")
    pool_store(features, cache, torch.arange(64), scales)
    back = gather(cache, torch.arange(64), scales)
    pooled = features.mean((2, 3))
    assert ((back - pooled).abs() <= pooled.abs().amax(1, keepdim=True) / 254 + 1e-6).all()


def test_all_zero_row_has_scale_one():
    cache, scales = _new_cache(2, 4, torch.int8, "cpu")
    pool_store(torch.zeros(2, 4), cache, torch.arange(2), scales)
    assert scales.tolist() == [1.0, 1.0] and (cache == 0).all()


def test_opcheck_on_cpu():
    features = torch.randn(3, 8, 2, 2)
    cache = torch.zeros(5, 8)
    torch.library.opcheck(torch.ops.fasttl.pool_store.default, (features, cache, None, torch.tensor([4, 0, 2])))
    torch.library.opcheck(torch.ops.fasttl.gather.default, (cache, None, torch.tensor([1, 1, 3]), torch.float32))


@pytest.mark.parametrize("call, error, match", [
    (lambda f, c, r: pool_store(f.int(), c, r), TypeError, "features"),
    (lambda f, c, r: pool_store(f[:, :, 0, 0, None], c, r), ValueError, "features"),
    (lambda f, c, r: pool_store(f, c[:, :3].contiguous(), r), ValueError, "columns"),
    (lambda f, c, r: pool_store(f, c, r + 100), ValueError, "rows"),
    (lambda f, c, r: pool_store(f, c, r.int()), TypeError, "rows"),
    (lambda f, c, r: pool_store(f, c.to(torch.int8), r), ValueError, "scales"),
    (lambda f, c, r: gather(c, r, out_dtype=torch.float16), ValueError, "out_dtype"),
    (lambda f, c, r: gather(c, r - 10), ValueError, "indices"),
])
def test_bad_arguments(call, error, match):
    features, cache, rows = torch.randn(2, 4, 2, 2), torch.zeros(6, 4), torch.tensor([0, 5])
    with pytest.raises(error, match=match):
        call(features, cache, rows)
