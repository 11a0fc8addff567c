"""Feature cache kernels (pool-and-store, gather) against the float64 reference."""
import subprocess
import sys

import pytest
import torch

from fasttl import _reference
from fasttl.cache.kernels import gather, pool_store
from conftest import CUDA_REASON, devices

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
    (lambda f, c, r: pool_store(f, c, r.float()), TypeError, "rows"),
    (lambda f, c, r: pool_store(f, c.to(torch.int8), r), ValueError, "scales"),
    (lambda f, c, r: gather(c, r, out_dtype=torch.float16), ValueError, "out_dtype"),
    (lambda f, c, r: gather(c, r - 10), ValueError, "indices"),
])
def test_bad_arguments(call, error, match):
    features, cache, rows = torch.randn(2, 4, 2, 2), torch.zeros(6, 4), torch.tensor([0, 5])
    with pytest.raises(error, match=match):
        call(features, cache, rows)


# ---- the raw ops, torch.ops.fasttl.pool_store / gather, validate all they pass to the kernels --------
def _pool_inputs(cache_dtype=torch.float32, n=4, channels=8, rows=10):
    features = torch.randn(n, channels, 2, 2)
    cache, scales = _new_cache(rows, channels, cache_dtype, "cpu")
    return features, cache, scales, torch.randperm(rows)[:n]


def _interleaved(index):
    """The same values with a stride of 2 (a view into a larger tensor)."""
    return torch.stack([index, torch.full_like(index, -1)], 1)[:, 0]


# Each case: a call of the raw op on fresh inputs, the error, and the argument the message names.
POOL_STORE_BAD = {
    "rows_out_of_range": (lambda f, c, s, r: (f, c, s, torch.tensor([0, 1, 2, 10**9])), ValueError, "rows"),
    "rows_negative": (lambda f, c, s, r: (f, c, s, torch.tensor([0, 1, -1, 3])), ValueError, "rows"),
    "rows_float": (lambda f, c, s, r: (f, c, s, r.float()), TypeError, "rows"),
    "rows_2d": (lambda f, c, s, r: (f, c, s, r[:, None]), ValueError, "rows"),
    "rows_shorter": (lambda f, c, s, r: (f, c, s, r[:1]), ValueError, "rows"),
    "rows_repeated": (lambda f, c, s, r: (f, c, s, torch.tensor([3, 1, 3, 0])), ValueError, "rows"),
    "rows_on_meta": (lambda f, c, s, r: (f, c, s, r.to("meta")), ValueError, "rows"),
    "cache_transposed": (lambda f, c, s, r: (f[:, :, 0, 0], torch.zeros(8, 10).t(), s, r), ValueError, "cache"),
    "cache_expanded": (lambda f, c, s, r: (f, c[:1].expand(10, 8), s, r), ValueError, "cache"),
    "cache_fewer_columns": (lambda f, c, s, r: (f, c[:, :1].contiguous(), s, r), ValueError, "cache"),
    "cache_1d": (lambda f, c, s, r: (f[:, :1, 0, 0], c[:, 0].contiguous(), s, r), ValueError, "cache"),
    "cache_float64": (lambda f, c, s, r: (f, c.double(), s, r), TypeError, "cache"),
    "src_float64": (lambda f, c, s, r: (f.double(), c, s, r), TypeError, "src"),
    "src_3d": (lambda f, c, s, r: (f[:, :, 0], c, s, r), ValueError, "src"),
    "src_no_pixels": (lambda f, c, s, r: (f[:, :, :0], c, s, r), ValueError, "src"),
    "scales_for_a_float_cache": (lambda f, c, s, r: (f, c, torch.ones(10), r), ValueError, "scales"),
}
POOL_STORE_BAD_INT8 = {
    "scales_missing": (lambda f, c, s, r: (f, c, None, r), ValueError, "scales"),
    "scales_shorter": (lambda f, c, s, r: (f, c, s[:1], r), ValueError, "scales"),
    "scales_float64": (lambda f, c, s, r: (f, c, s.double(), r), TypeError, "scales"),
    "scales_strided": (lambda f, c, s, r: (f, c, torch.ones(20)[::2], r), ValueError, "scales"),
    "scales_on_meta": (lambda f, c, s, r: (f, c, s.to("meta"), r), ValueError, "scales"),
    "scales_view_of_the_cache": (lambda f, c, s, r: (f, c, c.view(-1).view(torch.float32)[:10], r), ValueError,
                                 "scales"),
}


@pytest.mark.parametrize("case", list(POOL_STORE_BAD) + list(POOL_STORE_BAD_INT8))
def test_raw_pool_store_refuses_bad_arguments_naming_them(case):
    make, error, name = {**POOL_STORE_BAD, **POOL_STORE_BAD_INT8}[case]
    features, cache, scales, rows = _pool_inputs(torch.int8 if case in POOL_STORE_BAD_INT8 else torch.float32)
    args = make(features, cache, scales, rows)
    before = cache.clone()
    with pytest.raises(error, match=f"^{name}: "):
        torch.ops.fasttl.pool_store(*args)
    assert torch.equal(cache, before) or torch.isnan(before).all() and torch.isnan(cache).all()


GATHER_BAD = {
    "indices_out_of_range": (lambda c, s, i: (c, s, torch.tensor([0, 10**10]), torch.float32), ValueError, "indices"),
    "indices_negative": (lambda c, s, i: (c, s, torch.tensor([0, -1]), torch.float32), ValueError, "indices"),
    "indices_2d": (lambda c, s, i: (c, s, i.view(2, 3), torch.float32), ValueError, "indices"),
    "indices_bool": (lambda c, s, i: (c, s, i > 4, torch.float32), TypeError, "indices"),
    "indices_float": (lambda c, s, i: (c, s, i.float(), torch.float32), TypeError, "indices"),
    "indices_on_meta": (lambda c, s, i: (c, s, i.to("meta"), torch.float32), ValueError, "indices"),
    "indices_into_an_empty_cache": (lambda c, s, i: (c[:0], s if s is None else s[:0], i, torch.float32), ValueError,
                                    "indices"),
    "out_dtype_float16": (lambda c, s, i: (c, s, i, torch.float16), ValueError, "out_dtype"),
    "out_dtype_int8": (lambda c, s, i: (c, s, i, torch.int8), ValueError, "out_dtype"),
    "cache_transposed": (lambda c, s, i: (torch.randn(8, 10).t(), s, i, torch.float32), ValueError, "cache"),
    "cache_float64": (lambda c, s, i: (c.double(), s, i, torch.float32), TypeError, "cache"),
    "cache_1d": (lambda c, s, i: (c[:, 0], s, i, torch.float32), ValueError, "cache"),
    "scales_for_a_float_cache": (lambda c, s, i: (c, torch.ones(10), i, torch.float32), ValueError, "scales"),
}
GATHER_BAD_INT8 = {
    "scales_missing": (lambda c, s, i: (c, None, i, torch.float32), ValueError, "scales"),
    "scales_shorter": (lambda c, s, i: (c, s[:1], i, torch.float32), ValueError, "scales"),
    "scales_float16": (lambda c, s, i: (c, s.half(), i, torch.float32), TypeError, "scales"),
}


def _gather_inputs(cache_dtype=torch.float32, rows=10, channels=8, count=6):
    if cache_dtype == torch.int8:
        cache, scales = torch.randint(-127, 128, (rows, channels), dtype=torch.int8), torch.rand(rows) + 0.1
    else:
        cache, scales = torch.randn(rows, channels).to(cache_dtype), None
    return cache, scales, torch.randint(0, rows, (count,))


@pytest.mark.parametrize("case", list(GATHER_BAD) + list(GATHER_BAD_INT8))
def test_raw_gather_refuses_bad_arguments_naming_them(case):
    make, error, name = {**GATHER_BAD, **GATHER_BAD_INT8}[case]
    args = make(*_gather_inputs(torch.int8 if case in GATHER_BAD_INT8 else torch.float32))
    with pytest.raises(error, match=f"^{name}: "):
        torch.ops.fasttl.gather(*args)


@pytest.mark.parametrize("case", [c for c in GATHER_BAD if "range" not in c and "negative" not in c
                                  and "empty" not in c and "meta" not in c])
def test_fake_gather_refuses_what_the_kernel_refuses(case):
    make, error, name = GATHER_BAD[case]
    args = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in make(*_gather_inputs())]
    with pytest.raises(error, match=f"^{name}: "):
        torch.ops.fasttl.gather(*args)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_raw_ops_take_int32_and_strided_indices(device, cache_dtype):
    features, cache, scales, rows = _pool_inputs(cache_dtype)
    features, cache = features.to(device), cache.to(device)
    scales = None if scales is None else scales.to(device)
    for variant in (rows.int(), _interleaved(rows), _interleaved(rows.int())):
        torch.ops.fasttl.pool_store(features, cache, scales, variant.to(device))
        expected, _ = _reference.pool_store(features.cpu(), cache_dtype)
        written = cache[rows.to(device)].cpu().double()
        if cache_dtype == torch.int8:
            assert (written - expected).abs().max() <= 1
        else:
            torch.testing.assert_close(written, expected, atol=1e-5, rtol=CACHE_RTOL[cache_dtype] + 1e-6)
        cache.fill_(0)
    cache, scales, indices = _gather_inputs(cache_dtype)
    expected = _reference.gather(cache, indices, scales)
    strided_scales = None if scales is None else _interleaved(scales).to(device)  # read-only: copied
    for variant in (indices.int(), _interleaved(indices), _interleaved(indices.int())):
        out = torch.ops.fasttl.gather(cache.to(device), strided_scales, variant.to(device), torch.float32)
        torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-6, atol=1e-6)


def test_raw_pool_store_reads_a_source_that_is_a_view_of_the_cache():
    # Rows 0-3 move one row down, in place: without a copy of the source, row 1 would be read
    # after row 0 had been written into it.
    cache = torch.randn(8, 5)
    expected = cache[:4].clone()
    torch.ops.fasttl.pool_store(cache[:4], cache, None, torch.tensor([1, 2, 3, 0]))
    assert torch.equal(cache[[1, 2, 3, 0]], expected)


def test_raw_ops_on_meta_give_shapes_and_zero_sizes_work():
    cache, scales, indices = (x.to("meta") for x in _gather_inputs(torch.int8))
    out = torch.ops.fasttl.gather(cache, scales, indices.int(), torch.bfloat16)
    assert out.shape == (6, 8) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    empty = torch.ops.fasttl.gather(torch.zeros(4, 0), None, torch.tensor([3, 0]), torch.float32)
    assert empty.shape == (2, 0)
    cache, scales = _new_cache(3, 0, torch.int8, "cpu")
    torch.ops.fasttl.pool_store(torch.zeros(2, 0), cache, scales, torch.tensor([2, 0]))
    assert scales[0] == 1.0 and scales[2] == 1.0 and torch.isnan(scales[1])


def test_public_wrappers_take_strided_indices_and_refuse_repeated_rows():
    features, cache, _, rows = _pool_inputs()
    pool_store(features, cache, _interleaved(rows))
    torch.testing.assert_close(cache[rows].double(), _reference.pool_store(features, torch.float32)[0])
    indices = torch.tensor([rows[2], rows[0], rows[2]])
    torch.testing.assert_close(gather(cache, _interleaved(indices)), cache[indices])
    with pytest.raises(ValueError, match="^rows: "):
        pool_store(features, cache, torch.tensor([1, 2, 1, 3]))
    int8_cache, scales = _new_cache(10, 8, torch.int8, "cpu")
    with pytest.raises(TypeError, match="^scales: "):
        gather(int8_cache, indices, scales.half())


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("op", ["gather", "pool_store"])
def test_cuda_out_of_range_index_raises_named_without_a_host_sync(op):
    # On CUDA the range check needs no host sync: a bad index is replaced on the device (a bad
    # pool_store row writes nothing), and the named ValueError comes once the GPU has run the call;
    # the CUDA context survives. A subprocess keeps this process clean.
    call, name = {"gather": ("torch.ops.fasttl.gather(c, None, torch.tensor([0, 2**40], device='cuda'), "
                             "torch.float32)", "indices"),
                  "pool_store": ("torch.ops.fasttl.pool_store(c[:2].clone(), c, None, "
                                 "torch.tensor([0, -1], device='cuda'))", "rows")}[op]
    code = ("import torch, fasttl\n"
            "from fasttl import _device_checks\n"
            "c = torch.randn(8, 4, device='cuda'); before = c.clone()\n"
            f"{call}\n"
            "torch.cuda.synchronize()\n"
            "try:\n"
            "    _device_checks.raise_device_errors()\n"
            "except ValueError as e:\n"
            f"    print('CAUGHT', str(e).startswith('{name}: an index out of range'), "
            "torch.equal(c[1:], before[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert "CAUGHT True True" in proc.stdout, proc.stdout + proc.stderr
