"""What issue 19 asks of the CUDA path, checked where this machine can: the steady-state calls of
distillation_loss, pool_store, gather and AdamW.step never read a device value on the host (on
the CPU, by running the sync-free branches on CPU tensors with every host read made an error; on
a GPU, with torch.cuda.set_sync_debug_mode("error")), bad indices still raise named errors, the
optimizer step can be captured in a CUDA graph, channels_last maps are pooled without a copy,
and `fasttl info` says whether the kernels' CUDA runtime can work beside the driver and torch."""
import contextlib

import pytest
import torch

import fasttl
from fasttl import _device_checks, _ops, _reference
from fasttl.cache.kernels import gather, pool_store
from fasttl.info import cuda_warnings, version_text
from conftest import CUDA_REASON

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


@pytest.fixture
def sync_free_cpu(monkeypatch):
    """The branches fasttl takes for CUDA tensors, taken for CPU tensors too."""
    monkeypatch.setattr(_device_checks, "SYNC_FREE_DEVICE_TYPES", ("cpu", "cuda"))
    _device_checks._pending.clear()
    yield
    _device_checks._pending.clear()


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every way Python reads a tensor's value on the host (each a sync for a CUDA tensor) raises."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host (a host sync on CUDA)")

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, refuse)
        yield


def _distill_inputs(rows=37, classes=301, dtype=torch.float32):
    student = torch.randn(rows, classes, dtype=dtype) * 3
    teacher = torch.randn(rows, classes, dtype=dtype) * 3
    target = torch.randint(0, classes, (rows,))
    target[::5] = -100
    return student, teacher, target


def _distill(student, teacher, target, upstream):
    s = student.clone().requires_grad_()
    loss = fasttl.distillation_loss(s, teacher, target, temperature=2.5, alpha=0.7)
    (loss * upstream).backward()
    return loss.detach(), s.grad


def test_the_guard_catches_a_host_read(monkeypatch):
    # The check below is only as good as this: each host read of a tensor must trip it.
    t = torch.tensor([1.0])
    with no_host_reads(monkeypatch):
        for read in (bool, float, int, lambda x: x.item(), lambda x: x.tolist(), lambda x: [0][x.long()]):
            with pytest.raises(AssertionError, match="host sync"):
                read(t)


def test_distillation_loss_takes_no_host_read_on_the_sync_free_branch(monkeypatch, sync_free_cpu):
    student, teacher, target = _distill_inputs()
    with monkeypatch.context() as m:
        m.setattr(_device_checks, "SYNC_FREE_DEVICE_TYPES", ())
        expected = _distill(student, teacher, target, 1.7)
    with no_host_reads(monkeypatch):
        got = _distill(student, teacher, target, 1.7)
    # The host branch folds the mean's 1/B into the kernel's gradient (fasttl::distill_loss), the
    # sync-free one scales after: the same math, rounded in another order (float32: ~1 ulp).
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-8)
    _device_checks.raise_device_errors()  # nothing was reported


def test_bad_target_on_the_sync_free_branch_raises_named_at_the_next_call(monkeypatch, sync_free_cpu):
    student, teacher, target = _distill_inputs(rows=6, classes=5)
    target[2] = 5
    with no_host_reads(monkeypatch):
        loss_rows, grad = _ops.distill_rows(student, teacher, target, 2.0, 0.5, -100)  # no raise, no sync
    # The bad row was replaced by ignore_index: it counts for nothing, and no other row changed.
    assert loss_rows[2] == 0 and (grad[2] == 0).all()
    good = target.clone()
    good[2] = -100
    with pytest.raises(ValueError, match=r"^target: an index out of range \(expected values in \[0, 5\) or "
                                         r"ignore_index=-100\)"):
        _ops.distill_rows(student, teacher, good, 2.0, 0.5, -100)
    # Reported once: the next call is clean.
    ref_rows, ref_grad = _ops.distill_rows(student, teacher, good, 2.0, 0.5, -100)
    torch.testing.assert_close(loss_rows, ref_rows, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.int8])
def test_pool_store_and_gather_take_no_host_read_on_the_sync_free_branch(monkeypatch, sync_free_cpu, cache_dtype):
    features = torch.randn(9, 41, 3, 5).contiguous(memory_format=torch.channels_last)
    rows = torch.randperm(14)[:9]
    caches = []
    for sync_free in (False, True):
        cache = torch.full((14, 41), 7, dtype=cache_dtype)
        scales = torch.full((14,), float("nan")) if cache_dtype == torch.int8 else None
        with monkeypatch.context() as m:
            if not sync_free:
                m.setattr(_device_checks, "SYNC_FREE_DEVICE_TYPES", ())
            with no_host_reads(monkeypatch) if sync_free else contextlib.nullcontext():
                pool_store(features, cache, rows, scales)
                out = gather(cache, rows.flip(0)[::2], scales, torch.bfloat16)
        caches.append((cache, scales, out))
    for a, b in zip(*caches):
        if a is not None:
            assert torch.equal(a.float().nan_to_num(-1), b.float().nan_to_num(-1))
    _device_checks.raise_device_errors()


def test_bad_rows_on_the_sync_free_branch_write_nothing_and_raise_named(monkeypatch, sync_free_cpu):
    cache = torch.full((6, 4), float("nan"))
    with no_host_reads(monkeypatch):
        pool_store(torch.randn(3, 4, 2, 2), cache, torch.tensor([1, 6, -2]))
    assert not torch.isnan(cache[1]).any() and torch.isnan(cache[[0, 2, 3, 4, 5]]).all()
    with pytest.raises(ValueError, match=r"^rows: an index out of range \(expected values in \[0, 6\)\)"):
        _device_checks.raise_device_errors()
    with no_host_reads(monkeypatch):
        pool_store(torch.randn(2, 4), cache, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match=r"^rows: a row index repeated"):
        _device_checks.raise_device_errors()
    with no_host_reads(monkeypatch):
        out = gather(cache, torch.tensor([1, 9]))
    torch.testing.assert_close(out[0], cache[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^indices: an index out of range \(expected values in \[0, 6\)\)"):
        gather(cache, torch.tensor([1]))  # the next call reports it


def test_cpu_tensors_keep_their_immediate_errors():
    # Off the sync-free branch nothing changes: the value is checked before the kernel, named.
    with pytest.raises(ValueError, match=r"^target: index \[5\] out of range"):
        _ops.distill_rows(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([0, 5]), 2.0, 0.5, -100)
    with pytest.raises(ValueError, match=r"^rows: values span \[0, 6\]"):
        pool_store(torch.randn(2, 4), torch.empty(6, 4), torch.tensor([0, 6]))


@pytest.mark.parametrize("cls", [fasttl.optim.AdamW, fasttl.optim.Adam])
def test_adam_step_with_a_tensor_lr_takes_no_host_read_on_the_sync_free_branch(monkeypatch, sync_free_cpu, cls):
    shapes = [(33, 7), (5,), (1,), (129,)]
    results = []
    for sync_free in (False, True):
        torch.manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in shapes]
        opt = cls(params, lr=torch.tensor(3e-3), weight_decay=0.05, amsgrad=True)
        opt.grad_scale = torch.tensor(4.0)
        for i in range(3):
            for p in params:
                p.grad = torch.randn_like(p) * 4
            opt.found_inf = torch.tensor(1.0 if i == 1 else 0.0)  # the middle step is skipped
            with monkeypatch.context() as m:
                if not sync_free:
                    m.setattr(_device_checks, "SYNC_FREE_DEVICE_TYPES", ())
                with no_host_reads(monkeypatch) if sync_free else contextlib.nullcontext():
                    opt.step()
        results.append([p.detach().clone() for p in params] + [opt.state[p]["step"].clone() for p in params] +
                       [opt.state[p]["master_param"].clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(results[1][len(shapes)]) == 2.0  # two steps counted, the skipped one not


def test_capturable_follows_torch_optim():
    # torch 2.13 asserts at step() that capturable params are on a CUDA-like device; fasttl says so
    # as a named ValueError, at construction and at step (a param moved after construction).
    cpu = [torch.nn.Parameter(torch.randn(4))]
    with pytest.raises(ValueError, match=r"^capturable: params\[0\] on cpu"):
        fasttl.optim.AdamW(cpu, capturable=True)
    opt = fasttl.optim.AdamW(cpu, lr=1e-3)
    opt.param_groups[0]["capturable"] = True
    cpu[0].grad = torch.randn(4)
    with pytest.raises(ValueError, match=r"^capturable: params on cpu"):
        opt.step()
    assert fasttl.optim.AdamW(cpu).param_groups[0]["capturable"] is False


# ---- channels_last pooling without a copy ------------------------------------------------------
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("shape", [(0, 5, 2, 2), (1, 1, 1, 1), (1, 3, 1, 1), (5, 1280, 4, 4), (17, 41, 3, 5),
                                   (2, 7, 1, 9)], ids=lambda s: "x".join(map(str, s)))
def test_channels_last_maps_pool_without_a_copy_and_match_nchw(monkeypatch, source_dtype, cache_dtype, shape):
    nchw = (torch.randn(shape) * 3).to(source_dtype)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    read = []
    real_layout = _ops._pool_layout
    monkeypatch.setattr(_ops, "_pool_layout", lambda src: read.append(real_layout(src)) or read[-1])
    outs = []
    for src in (nchw, nhwc):
        rows = shape[0] + 3
        cache = torch.full((rows, shape[1]), 99 if cache_dtype == torch.int8 else float("nan")).to(cache_dtype)
        scales = torch.full((rows,), float("nan")) if cache_dtype == torch.int8 else None
        index = torch.randperm(rows)[:shape[0]]
        pool_store(src, cache, index, scales)
        outs.append((cache[index], None if scales is None else scales[index]))
    if shape[0] and shape[1] > 1 and shape[2] * shape[3] > 1:
        # The channels_last map was handed to the kernel as it is, with its own strides.
        assert read[-1][0].data_ptr() == nhwc.data_ptr() and read[-1][1][1] == 1
    # The same adds in the same order: the same bits as NCHW, and the reference's values.
    for a, b in zip(*outs):
        if a is not None:
            assert torch.equal(a.float(), b.float())
    expected, _ = _reference.pool_store(nchw, cache_dtype)
    if cache_dtype != torch.int8 and shape[0]:
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[cache_dtype] + {torch.float32: 0, torch.bfloat16: 8e-3,
                                                                         torch.float16: 1e-3}[source_dtype]
        torch.testing.assert_close(outs[1][0].double(), expected, rtol=tol, atol=1e-5)


def test_channels_last_view_of_a_larger_map_is_read_in_place():
    # A batch slice of a channels_last map is still channels_last-dense: read where it lies.
    big = torch.randn(6, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    part = big[2:5]
    cache = torch.full((3, 8), float("nan"))
    pool_store(part, cache, torch.arange(3))
    torch.testing.assert_close(cache.double(), part.double().mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
    src, strides = _ops._pool_layout(part)
    assert src.data_ptr() == part.data_ptr() and strides == (72, 1, 8)


# ---- the CUDA runtime beside the driver and torch --------------------------------------------
def test_cuda_warnings_name_what_cannot_work_together():
    assert version_text(12040) == "12.4" and version_text(13000) == "13.0" and version_text(0) == ""
    assert cuda_warnings(0, "", 0, 0, None) == []                       # no CUDA kernels built
    assert cuda_warnings(12040, "shared", 12010, 12080, "12.1") == []   # matched: runs where torch runs
    assert cuda_warnings(13000, "static", 13000, 0, None) == []         # no driver here: nothing to compare
    old_driver = cuda_warnings(13000, "static", 13000, 12040, "12.1")
    assert len(old_driver) == 2
    assert "driver supports CUDA 12.4" in old_driver[0] and "CUDA 13.0 runtime" in old_driver[0]
    assert "built with CUDA 13.0 (static runtime) but torch uses CUDA 12.1" in old_driver[1]
    assert cuda_warnings(13000, "static", 13000, 13010, "12.8")[0].startswith("fasttl's kernels were built")


def test_info_reports_the_cuda_runtime_driver_and_torch():
    from fasttl.info import collect, format_report

    info = collect()
    text = format_report(info)
    assert f"torch CUDA     {torch.version.cuda or 'none (a CPU build of torch)'}" in text
    if info["cuda_kernels"]:
        assert info["cuda_runtime_built"] and info["cuda_runtime_linking"] in ("shared", "static")
        assert f"CUDA runtime   built with {info['cuda_runtime_built']} ({info['cuda_runtime_linking']})" in text
        assert "CUDA driver    " in text
        if not torch.version.cuda:
            # A CPU torch: the runtime must be the static one, so the module imports without libcudart.
            assert info["cuda_runtime_linking"] == "static"
    for warning in info["cuda_warnings"]:
        assert f"warning: {warning}" in text


# ---- on a GPU ------------------------------------------------------------------------------------
@needs_gpu
def test_cuda_steady_state_calls_do_not_sync():
    from fasttl.cache.cache import FeatureCache  # noqa: F401  (the loader's gather is _ops.gather)

    dev = torch.device("cuda")
    student = torch.randn(64, 1000, device=dev, requires_grad=True)
    teacher, target = torch.randn(64, 1000, device=dev), torch.randint(0, 1000, (64,), device=dev)
    maps = torch.randn(32, 1280, 7, 7, device=dev).contiguous(memory_format=torch.channels_last)
    cache, scales = torch.empty(256, 1280, dtype=torch.int8, device=dev), torch.empty(256, device=dev)
    params = [torch.nn.Parameter(torch.randn(s, device=dev).bfloat16()) for s in ((512, 256), (256,), (7,))]
    opt = fasttl.optim.AdamW(params, lr=torch.tensor(1e-3, device=dev), capturable=True)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0, device=dev), torch.tensor(0.0, device=dev)
    for p in params:
        p.grad = torch.randn_like(p)

    # Index tensors made beforehand: only fasttl's calls are under test.
    rows = [torch.arange(b * 32, b * 32 + 32, device=dev) for b in range(4)]
    picks = [torch.randperm(256, device=dev)[:100] for _ in range(4)]

    def steady_state(batch):
        fasttl.distillation_loss(student, teacher, target, temperature=2.0, alpha=0.5).backward()
        pool_store(maps, cache, rows[batch], scales)
        gather(cache, picks[batch], scales)
        _ops.gather(cache, scales, picks[batch], torch.float32)  # the loader's call
        opt.step()

    steady_state(0)  # first calls: allocations, state initialization
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in range(1, 4):
            steady_state(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    _device_checks.raise_device_errors()


@needs_gpu
@pytest.mark.parametrize("op", ["distill_rows", "pool_store", "gather"])
def test_cuda_bad_index_raises_named_and_the_context_survives(op):
    dev = torch.device("cuda")
    c = torch.full((8, 4), float("nan"), device=dev)
    calls = {
        "distill_rows": (lambda: _ops.distill_rows(c, c, torch.tensor([0] * 7 + [2**40], device=dev), 2.0, 0.5,
                                                   -100), "target"),
        "pool_store": (lambda: _ops.pool_store(torch.randn(2, 4, device=dev), c, None,
                                               torch.tensor([0, -1], device=dev)), "rows"),
        "gather": (lambda: _ops.gather(c, None, torch.tensor([0, 2**40], device=dev), torch.float32), "indices"),
    }
    call, name = calls[op]
    call()  # no sync, no raise here
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=f"^{name}: an index out of range"):
        _device_checks.raise_device_errors()
    if op == "pool_store":
        assert not torch.isnan(c[0]).any() and torch.isnan(c[1:]).all()  # the bad row wrote nothing
    assert torch.ones(3, device=dev).sum().item() == 3.0  # the CUDA context is intact


@needs_gpu
@pytest.mark.parametrize("lr_on_device", [True, False])
def test_cuda_capturable_step_replays_in_a_cuda_graph(lr_on_device):
    dev = torch.device("cuda")
    shapes = [(1000, 33), (4097,), (1,), (70000,)]
    grads = [[torch.randn(s, device=dev).bfloat16() for s in shapes] for _ in range(4)]
    make = lambda: [torch.nn.Parameter(torch.ones(s, device=dev).bfloat16()) for s in shapes]  # noqa: E731
    lr = torch.tensor(1e-2, device=dev) if lr_on_device else 1e-2
    graphed, eager = make(), make()
    opt_g = fasttl.optim.AdamW(graphed, lr=lr, capturable=True)
    opt_e = fasttl.optim.AdamW(eager, lr=1e-2)
    for p, q, g in zip(graphed, eager, grads[0]):
        p.grad, q.grad = g.clone(), g.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt_g.step()  # warm-up: state allocated outside the capture
    torch.cuda.current_stream().wait_stream(side)
    opt_e.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for i, step_grads in enumerate(grads[1:]):
        if lr_on_device and i == 2:
            lr.fill_(5e-3)  # a scheduler's change reaches the replay
            opt_e.param_groups[0]["lr"] = 5e-3
        for p, q, g in zip(graphed, eager, step_grads):
            p.grad.copy_(g)
            q.grad.copy_(g)
        graph.replay()
        opt_e.step()
    torch.cuda.synchronize()
    for p, q in zip(graphed, eager):
        torch.testing.assert_close(opt_g.state[p]["master_param"], opt_e.state[q]["master_param"], rtol=0, atol=0)
        assert float(opt_g.state[p]["step"]) == 4.0
