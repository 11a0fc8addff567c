"""Seeded fuzzing of fasttl's raw ops (torch.ops.fasttl.*) and their public wrappers.

Each op is fuzzed in a subprocess, so a crash (segfault, abort) shows as a failed exit rather
than a dead pytest. Every call gets random shapes (0 and 1 included), strides (transposed,
sliced, offset, expanded), dtypes (wrong ones included), devices (cpu, meta) and index tensors
(int32/int64, out of range, negative, repeated, strided). A call must either raise ValueError or
TypeError whose message starts with an argument's name, or return what the float64 reference in
fasttl/_reference.py returns, within the dtype's tolerance. The fuzzer also knows which faults
it injected: a call with one must be refused, a call without must be accepted.

Run one op by hand: python tests/test_op_fuzz.py <op> <seed> <calls>
"""
import json
import math
import os
import random
import signal
import subprocess
import sys
import zlib

import pytest
import torch

# Calls per op: 1,200 in all, about 15 s on a 2-core CPU.
CALLS = {"distill_rows": 300, "pool_store": 300, "gather": 300, "public": 300}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


@pytest.mark.parametrize("op", list(CALLS))
def test_fuzzed_calls_are_refused_or_right_never_crash(op, request):
    seed = zlib.crc32(request.node.nodeid.encode())
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), op, str(seed), str(CALLS[op])],
                          capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    lines = proc.stdout.splitlines()
    cases = [line[5:] for line in lines if line.startswith("CASE ")]
    assert proc.returncode == 0, (f"{op} fuzzing (seed {seed}) died with {_exit_reason(proc.returncode)} "
                                  f"at call {len(cases)}: {cases[-1] if cases else '-'}\n{proc.stderr[-3000:]}")
    summary = json.loads(next(line[8:] for line in lines if line.startswith("SUMMARY ")))
    print(f"{op}: {summary['calls']} calls, {summary['accepted']} accepted, {summary['refused']} refused")
    assert summary["calls"] == CALLS[op]
    assert not summary["failures"], f"{op} (seed {seed}): " + "\n".join(summary["failures"][:10])
    # A fuzzer that only ever hits one branch tests little.
    assert summary["accepted"] >= CALLS[op] // 5 and summary["refused"] >= CALLS[op] // 5, summary


# ------------------------------------------------------------------------ the child process
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
WRONG_FLOATS = (torch.float64, torch.int32, torch.bool)
CACHE_DTYPES = FLOATS + (torch.int8,)
# Relative rounding of each dtype (what a value stored in it may be off by).
ROUNDING = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# (atol, rtol) of the distillation gradient against float64, per student dtype (as tests/test_distill.py).
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (2e-2, 2e-2),
            torch.float64: (1e-10, 1e-10)}
LAYOUTS = ("contiguous", "contiguous", "contiguous", "transposed", "sliced", "offset", "expanded")


class Fault(Exception):
    """The fuzzer's own finding: a refusal where none was due, a wrong result, ..."""


class Fuzzer:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.faulty = False
        torch.manual_seed(seed)

    def new_call(self) -> None:
        # About half the calls are clean, so valid inputs are exercised as much as faults.
        self.faulty = self.chance(0.5)

    def bad(self, p: float) -> bool:
        """Whether to inject a fault here (never in a clean call)."""
        return self.faulty and self.chance(p)

    def choose(self, valid, wrong, p: float):
        return self.pick(list(wrong)) if self.bad(p) else self.pick(list(valid))

    def pick(self, options, weights=None):
        return self.rng.choices(options, weights=weights)[0]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def size(self, big: int) -> int:
        return self.pick([0, 1, 2, 3, 5, 17, big], [1, 3, 2, 2, 2, 3, 2])

    def floats(self, shape, dtype, layout=None):
        """Random normal values (times 3) in `dtype`, of the given logical shape, in a random layout."""
        layout = layout or self.pick(LAYOUTS)
        shape = list(shape)
        if layout == "transposed" and len(shape) >= 2:
            made = self._values(shape[::-1], dtype)
            return made.permute(*range(len(shape) - 1, -1, -1))
        if layout == "sliced" and shape:
            return self._values([2 * shape[0]] + shape[1:], dtype)[::2]
        if layout == "offset" and shape:
            return self._values([shape[0] + 1] + shape[1:], dtype)[1:]
        if layout == "expanded" and shape:
            return self._values([1] + shape[1:], dtype).expand(*shape)
        return self._values(shape, dtype)

    @staticmethod
    def _values(shape, dtype):
        x = torch.randn(shape, dtype=torch.float64) * 3
        return x.to(dtype) if dtype.is_floating_point else (x > 0 if dtype == torch.bool else x.to(dtype))

    def index(self, values, dtype):
        """An index tensor holding `values` (1-D) in `dtype`, contiguous or a strided/offset view."""
        layout = self.pick(["contiguous", "sliced", "offset"], [3, 1, 1])
        values = values.to(dtype)
        junk = torch.full_like(values, -7)
        if layout == "sliced":
            return torch.stack([values, junk], 1)[:, 0]
        if layout == "offset":
            return torch.cat([junk[:1], values])[1:] if values.numel() else values
        return values

    def devices(self, count: int):
        """Where each of `count` tensors goes: all on the CPU, all on meta (shape-only, valid), or
        one of them on meta (a fault)."""
        if self.bad(0.1):
            devices = ["cpu"] * count
            devices[self.rng.randrange(count)] = "meta"
            return devices
        return ["meta"] * count if self.chance(0.05) else ["cpu"] * count


VALUE_FAULTS = ("target out of range", "rows out of range", "rows repeated", "indices out of range")


def without_value_faults(faults, devices):
    """Meta tensors hold no values, so only the faults in their metadata can be seen there."""
    if all(d == "meta" for d in devices):
        return [fault for fault in faults if fault not in VALUE_FAULTS]
    return faults


def _on(x, device):
    if x is None or device == "cpu":
        return x
    # empty_strided: .to("meta") would make a strided tensor contiguous.
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)


def _name_of(error: BaseException) -> str:
    return str(error).split(":", 1)[0]


def run_case(names, call, faults, check):
    """Calls `call`; refusal must come with a fault, acceptance without one, then `check` passes."""
    try:
        result = call()
    except (ValueError, TypeError) as error:
        if _name_of(error) not in names:
            raise Fault(f"message does not start with an argument's name: {error}")
        if not faults:
            raise Fault(f"valid call refused: {type(error).__name__}: {error}")
        return "refused"
    except Exception as error:  # noqa: BLE001 - anything else is a finding
        raise Fault(f"raised {type(error).__name__} (expected ValueError/TypeError): {error}")
    if faults:
        raise Fault(f"accepted a call with faults {faults}")
    check(result)
    return "accepted"


def close(actual, expected, atol, rtol, what):
    if actual.shape != expected.shape:
        raise Fault(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if actual.device.type == "meta":
        return
    actual = actual.detach().double().cpu()
    ok = torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if not bool(ok.all()):
        worst = (actual - expected).abs().nan_to_num(float("inf")).max().item()
        raise Fault(f"{what}: differs from the float64 reference by up to {worst:g} (atol {atol}, rtol {rtol})")


# ---- distill_rows ---------------------------------------------------------------------------
def distill_inputs(f: Fuzzer, accepted=FLOATS):
    """`accepted`: the logit dtypes of the call under test (the public loss also takes float64,
    through the plain-PyTorch formula; the raw op does not)."""
    faults = []
    rows, classes = f.size(257), f.choose([1, 1, 2, 5, 5, 33, 513, 1100], [0], 0.08)
    s_dtype = f.choose(FLOATS, WRONG_FLOATS, 0.2)
    t_dtype = f.choose(FLOATS, WRONG_FLOATS, 0.2)
    faults += [f"student {s_dtype}"] * (s_dtype not in accepted) + [f"teacher {t_dtype}"] * (t_dtype not in accepted)
    s_shape = t_shape = [rows, classes]
    if f.bad(0.1):
        s_shape = t_shape = f.pick([[rows], [1, rows, classes]])
        faults.append(f"student {len(s_shape)}-D")
    elif f.bad(0.15):
        t_shape = f.pick([[1, classes], [rows + 1, classes], [rows, classes + 1], [rows, max(classes - 1, 0)]])
        faults += ["teacher shape"] * (t_shape != s_shape)
    if len(s_shape) == 2 and classes == 0:
        faults.append("no classes")
    student, teacher = f.floats(s_shape, s_dtype), f.floats(t_shape, t_dtype)
    target, ignore_index = None, f.pick([-100, 0])
    if f.chance(0.75):
        target, target_faults = distill_target(f, rows, classes, ignore_index)
        faults += target_faults
    temperature = f.choose([1.0, 2.0, 0.5, 4.0], [0.0, -1.0, math.nan, math.inf], 0.15)
    alpha = f.choose([0.0, 0.3, 0.3, 1.0], [-0.5, 1.5, math.nan], 0.15)
    faults += ["temperature"] * (not (math.isfinite(temperature) and temperature > 0))
    faults += ["alpha"] * (not 0.0 <= alpha <= 1.0)
    devices = f.devices(3)
    student, teacher, target = _on(student, devices[0]), _on(teacher, devices[1]), _on(target, devices[2])
    faults += ["devices differ"] * (teacher.device != student.device or target is not None and
                                    target.device != student.device)
    return student, teacher, target, temperature, alpha, ignore_index, without_value_faults(faults, devices)


def distill_target(f: Fuzzer, rows, classes, ignore_index):
    length = f.pick([max(rows - 1, 0), rows + 1, 1]) if f.bad(0.12) else rows
    values = torch.randint(0, max(classes, 1), (length,))
    if length and f.chance(0.3):
        values[torch.randint(0, length, (1,))] = ignore_index
    if length and f.bad(0.2):
        values[torch.randint(0, length, (1,))] = f.pick([classes, -1, -(2**40), 2**40])
    dtype = f.choose([torch.int64, torch.int64, torch.int32], [torch.float32, torch.bool, torch.int16], 0.12)
    if dtype not in (torch.int64, torch.int32):
        return values.to(dtype), [f"target {dtype}"]
    target = f.index(values, dtype)
    final = target.long()
    faults = ["target length"] * (length != rows)
    faults += ["target out of range"] * bool(((final != ignore_index) & ((final < 0) | (final >= classes))).any())
    if f.bad(0.06):
        target = target[:, None]
        faults.append("target 2-D")
    return target, faults


def distill_reference(student, teacher, target, temperature, alpha, ignore_index, reduction="none"):
    from fasttl import _reference

    s64 = student.detach().double().requires_grad_()
    loss = _reference.distillation_loss(s64, teacher.double(), None if target is None else target.long(),
                                        temperature=temperature, alpha=alpha, reduction=reduction,
                                        ignore_index=ignore_index)
    if loss.numel():
        loss.sum().backward()
    grad = s64.grad if s64.grad is not None else torch.zeros_like(s64)
    return loss.detach(), grad


def fuzz_distill_rows(f: Fuzzer):
    student, teacher, target, temperature, alpha, ignore_index, faults = distill_inputs(f)

    def check(result):
        loss_rows, grad = result
        if loss_rows.dtype != torch.float32 or grad.dtype != student.dtype:
            raise Fault(f"output dtypes {loss_rows.dtype}, {grad.dtype}")
        if student.device.type == "meta":
            close(grad, torch.empty(tuple(student.shape)), 0, 0, "grad")
            return
        ref_loss, ref_grad = distill_reference(student, teacher, target, temperature, alpha, ignore_index)
        close(loss_rows, ref_loss, 1e-4, 1e-4, "loss_rows")
        close(grad, ref_grad, *GRAD_TOL[student.dtype], "grad")

    names = ("student", "teacher", "target", "temperature", "alpha")
    describe = (f"distill_rows(student {_meta(student)}, teacher {_meta(teacher)}, target {_meta(target)}, "
                f"T={temperature}, alpha={alpha}, ignore_index={ignore_index}) faults={faults}")
    return describe, lambda: run_case(names, lambda: torch.ops.fasttl.distill_rows(
        student, teacher, target, temperature, alpha, ignore_index), faults, check)


# ---- pool_store -----------------------------------------------------------------------------
def pool_store_inputs(f: Fuzzer):
    faults = []
    n, channels = f.size(40), f.pick([0, 1, 3, 8, 41, 300], [1, 2, 2, 3, 2, 1])
    total = n + f.pick([0, 1, 4])
    src_dtype = f.choose(FLOATS, WRONG_FLOATS, 0.15)
    faults += [f"src {src_dtype}"] * (src_dtype not in FLOATS)
    spatial = f.choose([[], [], [1, 1], [2, 3], [2, 3], [4, 4]], [[0, 2], [3]], 0.12)
    faults += ["src H*W = 0"] * (spatial == [0, 2]) + ["src 3-D"] * (spatial == [3])
    src = f.floats([n, channels] + spatial, src_dtype)
    cache_dtype = f.choose(CACHE_DTYPES + (torch.int8,), (torch.float64, torch.int32), 0.15)
    faults += [f"cache {cache_dtype}"] * (cache_dtype not in CACHE_DTYPES)
    cache_columns = channels if not f.bad(0.12) else channels + f.pick([1, -1]) if channels else 1
    cache = poisoned(cache_dtype, (total, cache_columns))
    if f.bad(0.12):
        cache = f.pick([cache.t(), cache[::2], cache[:1].expand(total, cache_columns), cache[:, :0]])
    if f.bad(0.05):
        cache = cache.reshape(-1)
    if cache.dim() != 2:
        faults.append("cache not 2-D")
    elif not cache.is_contiguous():
        faults.append("cache not contiguous")
    elif cache.shape[1] != channels:
        faults.append("cache columns")
    scales, scale_faults = make_scales(f, cache, cache_dtype, written=True)
    faults += scale_faults
    rows, row_faults = make_rows(f, n, cache.shape[0] if cache.dim() == 2 else total)
    faults += row_faults
    devices = f.devices(4)
    src, cache, scales, rows = (_on(x, d) for x, d in zip((src, cache, scales, rows), devices))
    others = [x for x in (cache, scales, rows) if x is not None]
    faults += ["devices differ"] * any(x.device != src.device for x in others)
    return src, cache, scales, rows, without_value_faults(faults, devices)


def poisoned(dtype, shape):
    """A cache whose every element shows whether it was written: NaN, or 99 for integer dtypes."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.full(shape, 99, dtype=dtype)


def make_scales(f: Fuzzer, cache, cache_dtype, written: bool):
    rows = cache.shape[0] if cache.dim() == 2 else 0
    if cache_dtype != torch.int8:
        if f.bad(0.1):
            return torch.full((rows,), float("nan")), ["scales on a non-int8 cache"]
        return None, []
    choice = f.choose(["ok", "ok", "strided"], ["none", "short", "float64", "strided", "2-D"], 0.4)
    scales = torch.full((rows,), float("nan")) if written else torch.rand(rows) + 0.05
    if choice == "none":
        return None, ["scales missing"]
    if choice == "short":
        return scales[:max(rows - 1, 0)], ["scales length"] * (rows > 0)
    if choice == "float64":
        return scales.double(), ["scales float64"]
    if choice == "strided":
        strided = torch.stack([scales, scales], 1)[:, 0]
        return strided, ["scales not contiguous"] * (written and not strided.is_contiguous())
    if choice == "2-D":
        return scales[:, None], ["scales 2-D"]
    return scales, []


def make_rows(f: Fuzzer, n, limit):
    values = torch.randperm(max(limit, 1))[:n]
    values = torch.cat([values, torch.randint(0, max(limit, 1), (n - values.numel(),))])
    if n and f.bad(0.15):
        values[torch.randint(0, n, (1,))] = f.pick([limit, -1, 2**40, -(2**40)])
    if n >= 2 and f.bad(0.12):
        values[1] = values[0]
    if f.bad(0.08):
        values = values[:max(n - 1, 0)] if f.chance(0.5) else torch.cat([values, values[:1]])
    dtype = f.choose([torch.int64, torch.int64, torch.int32], [torch.float32, torch.uint8], 0.12)
    if dtype not in (torch.int64, torch.int32):
        return values.to(dtype), [f"rows {dtype}"]
    rows = f.index(values, dtype)
    final = rows.long()
    faults = ["rows length"] * (final.numel() != n)
    faults += ["rows out of range"] * bool(((final < 0) | (final >= limit)).any())
    faults += ["rows repeated"] * (final.unique().numel() != final.numel())
    if f.bad(0.05):
        rows = rows[None]
        faults.append("rows 2-D")
    return rows, faults


def check_pool_store(src, cache, scales, rows, before, before_scales):
    from fasttl import _reference

    if cache.device.type == "meta":
        return
    rows = rows.long()
    written = torch.zeros(cache.shape[0], dtype=torch.bool)
    written[rows] = True
    if cache.dtype == torch.int8 and src.shape[1] == 0:
        expected, expected_scales = torch.zeros(src.shape[0], 0, dtype=torch.float64), torch.ones(src.shape[0])
    else:
        expected, expected_scales = _reference.pool_store(src, cache.dtype)
    if cache.dtype == torch.int8:
        close(cache[rows], expected.round(), 1.0, 0.0, "int8 rows")  # fp32 pooling may land one step away
        close(scales[rows], expected_scales.double(), 1e-7, ROUNDING[src.dtype] + 1e-6, "scales")
        close(scales[~written], before_scales[~written].double(), 0, 0, "unwritten scales")
    else:
        close(cache[rows], expected, 1e-5, ROUNDING[cache.dtype] + ROUNDING[src.dtype] / 4, "written rows")
    close(cache[~written], before[~written].double(), 0, 0, "unwritten rows")


def _pool_store_case(f: Fuzzer, call_op, names):
    src, cache, scales, rows, faults = pool_store_inputs(f)
    before = cache.clone()
    before_scales = None if scales is None else scales.clone()
    describe = (f"pool_store(src {_meta(src)}, cache {_meta(cache)}, scales {_meta(scales)}, rows {_meta(rows)}) "
                f"faults={faults}")

    def check(_):
        check_pool_store(src, cache, scales, rows, before, before_scales)

    return describe, lambda: run_case(names, lambda: call_op(src, cache, scales, rows), faults, check)


def fuzz_pool_store(f: Fuzzer):
    return _pool_store_case(f, torch.ops.fasttl.pool_store, ("src", "cache", "scales", "rows"))


# ---- gather ---------------------------------------------------------------------------------
def gather_inputs(f: Fuzzer, public: bool):
    faults = []
    rows, channels, count = f.size(60), f.pick([0, 1, 7, 64, 300], [1, 2, 3, 3, 1]), f.size(80)
    cache_dtype = f.choose(CACHE_DTYPES + (torch.int8,), (torch.float64, torch.bool), 0.15)
    faults += [f"cache {cache_dtype}"] * (cache_dtype not in CACHE_DTYPES)
    if cache_dtype == torch.int8:
        cache = torch.randint(-127, 128, (rows, channels), dtype=torch.int8)
    else:
        cache = f.floats([rows, channels], cache_dtype, layout="contiguous")
    if f.bad(0.12):
        cache = f.pick([cache.t(), cache[::2], cache[:1].expand(rows, channels)])
    if f.bad(0.05):
        cache = cache.reshape(-1)
    if cache.dim() != 2:
        faults.append("cache not 2-D")
    elif not cache.is_contiguous():
        faults.append("cache not contiguous")
    scales, scale_faults = make_scales(f, cache, cache_dtype, written=False)
    if public and scale_faults == ["scales on a non-int8 cache"]:
        scale_faults = []  # the public gather drops the scales of a non-int8 cache
    faults += scale_faults
    limit = cache.shape[0] if cache.dim() == 2 else 0
    values = torch.randint(0, max(limit, 1), (count,))
    if count and f.bad(0.2):
        values[torch.randint(0, count, (1,))] = f.pick([limit, -1, 2**40, -(2**40)])
    dtype = f.choose([torch.int64, torch.int64, torch.int32], [torch.float32, torch.bool], 0.12)
    if dtype in (torch.int64, torch.int32):
        indices = f.index(values, dtype)
        faults += ["indices out of range"] * bool(((indices.long() < 0) | (indices.long() >= limit)).any())
    else:
        indices = values.to(dtype)
        faults.append(f"indices {dtype}")
    if f.bad(0.05):
        indices = indices[None]
        faults.append("indices 2-D")
    out_dtype = f.choose([torch.float32, torch.float32, torch.bfloat16], [torch.float16, torch.int8], 0.12)
    faults += [f"out_dtype {out_dtype}"] * (out_dtype not in (torch.float32, torch.bfloat16))
    devices = f.devices(3)
    cache, scales, indices = (_on(x, d) for x, d in zip((cache, scales, indices), devices))
    checked = [indices] + [scales] * (scales is not None and not (public and cache.dtype != torch.int8))
    faults += ["devices differ"] * any(x.device != cache.device for x in checked)
    return cache, scales, indices, out_dtype, without_value_faults(faults, devices)


def _gather_case(f: Fuzzer, call_op, names, public: bool):
    from fasttl import _reference

    cache, scales, indices, out_dtype, faults = gather_inputs(f, public)

    def check(out):
        if out.dtype != out_dtype or (out.numel() and not out.is_contiguous()):
            raise Fault(f"output {out.dtype}, contiguous={out.is_contiguous()}")
        if cache.device.type == "meta":
            close(out, torch.empty(indices.shape[0], cache.shape[1]), 0, 0, "out")
            return
        expected = _reference.gather(cache, indices.long(), scales if cache.dtype == torch.int8 else None)
        close(out, expected, 1e-6, 1e-6 if out_dtype == torch.float32 else ROUNDING[out_dtype], "out")

    describe = (f"gather(cache {_meta(cache)}, scales {_meta(scales)}, indices {_meta(indices)}, {out_dtype}) "
                f"faults={faults}")
    return describe, lambda: run_case(names, lambda: call_op(cache, scales, indices, out_dtype), faults,
                                      check)


def fuzz_gather(f: Fuzzer):
    return _gather_case(f, torch.ops.fasttl.gather, ("cache", "scales", "indices", "out_dtype"), public=False)


# ---- public wrappers ------------------------------------------------------------------------
def fuzz_public(f: Fuzzer):
    from fasttl.cache import kernels

    which = f.pick(["distillation_loss", "pool_store", "gather"], [2, 1, 1])
    if which == "pool_store":
        return _pool_store_case(f, lambda src, cache, scales, rows: kernels.pool_store(src, cache, rows, scales),
                                ("features", "cache", "scales", "rows"))
    if which == "gather":
        return _gather_case(f, lambda cache, scales, indices, out_dtype: kernels.gather(cache, indices, scales,
                                                                                        out_dtype),
                            ("cache", "scales", "indices", "out_dtype"), public=True)
    return fuzz_distillation_loss(f)


def fuzz_distillation_loss(f: Fuzzer):
    import fasttl

    student, teacher, target, temperature, alpha, ignore_index, faults = distill_inputs(f, FLOATS + (torch.float64,))
    reduction = f.pick(["mean", "sum", "none"])
    leaf = student.detach().requires_grad_() if student.is_floating_point() else student

    def call():
        loss = fasttl.distillation_loss(leaf, teacher, target, temperature=temperature, alpha=alpha,
                                        reduction=reduction, ignore_index=ignore_index)
        if leaf.device.type != "meta" and loss.numel():
            # An upstream gradient other than 1, drawn from no RNG so that the calls' inputs do not depend
            # on which calls ran.
            upstream = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
            (loss * upstream).sum().backward()
        return loss

    def check(loss):
        if loss.dtype != student.dtype:
            raise Fault(f"loss dtype {loss.dtype}, expected {student.dtype}")
        if student.device.type == "meta":
            return
        ref_loss, _ = distill_reference(student, teacher, target, temperature, alpha, ignore_index, reduction)
        atol, rtol = GRAD_TOL[student.dtype]
        close(loss, ref_loss, max(atol, 1e-4), max(rtol, 1e-4), "loss")
        if loss.numel() and leaf.grad is None:
            raise Fault("no gradient reached the student")

    names = ("student_logits", "teacher_logits", "target", "temperature", "alpha", "reduction", "ignore_index")
    describe = (f"distillation_loss(student {_meta(student)}, teacher {_meta(teacher)}, target {_meta(target)}, "
                f"T={temperature}, alpha={alpha}, {reduction}) faults={faults}")
    return describe, lambda: run_case(names, call, faults, check)


def _meta(x) -> str:
    if x is None:
        return "None"
    return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}/{list(x.stride())}@{x.device.type}"


FUZZERS = {"distill_rows": fuzz_distill_rows, "pool_store": fuzz_pool_store, "gather": fuzz_gather,
           "public": fuzz_public}


def main(op: str, seed: int, calls: int) -> None:
    import fasttl  # noqa: F401 - registers torch.ops.fasttl

    f = Fuzzer(seed)
    counts = {"accepted": 0, "refused": 0}
    failures, injected = [], {}
    for _ in range(calls):
        f.new_call()
        describe, run = FUZZERS[op](f)
        print("CASE " + describe, flush=True)  # the last one names the culprit of a crash
        for fault in describe.split("faults=")[1].strip("[]").replace("'", "").split(", "):
            injected[fault] = injected.get(fault, 0) + bool(fault)
        try:
            counts[run()] += 1
        except Fault as fault:
            failures.append(f"{describe}: {fault}")
    summary = {"calls": calls, **counts, "failures": failures, "faults": injected}
    print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
