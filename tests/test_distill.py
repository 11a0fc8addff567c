"""The fused distillation loss against the float64 PyTorch reference."""
import math
import subprocess
import sys

import pytest
import torch

import fasttl
from fasttl import _reference
from conftest import CUDA_REASON, devices

# (dtype, atol, rtol) of the loss and of the gradient against float64.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}
SHAPES = [(0, 10), (1, 1), (41, 1271), (4096, 10), (64, 131072), (3, 262144)]


def make_inputs(shape, dtype, device, scale=3.0):
    student = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)
    teacher = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)
    target = torch.randint(0, max(shape[1], 1), (shape[0],), device=device)
    return student, teacher, target


def reference(student, teacher, target, **kw):
    s64 = student.detach().double().requires_grad_()
    loss = _reference.distillation_loss(s64, teacher.double(), target, **kw)
    if loss.numel():
        loss.sum().backward()
    grad = s64.grad if s64.grad is not None else torch.zeros_like(s64)
    return loss.detach(), grad


def fused(student, teacher, target, **kw):
    s = student.detach().clone().requires_grad_()
    loss = fasttl.distillation_loss(s, teacher, target, **kw)
    assert loss.dtype == student.dtype
    if loss.numel():
        loss.sum().backward()
    grad = s.grad if s.grad is not None else torch.zeros_like(s)
    return loss.detach(), grad


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_matches_reference_over_shapes(device, dtype, shape, temperature):
    if shape[0] * shape[1] > 1_000_000 and dtype != torch.float32 and temperature == 4.0:
        pytest.skip("large shapes are covered for every dtype at T=1; T=4 there only in float32 (time)")
    student, teacher, target = make_inputs(shape, dtype, device)
    kw = dict(temperature=temperature, alpha=0.5, reduction="none")
    loss, grad = fused(student, teacher, target, **kw)
    ref_loss, ref_grad = reference(student, teacher, target, **kw)
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_target", [True, False])
def test_alpha_reduction_and_target(device, alpha, reduction, with_target):
    student, teacher, target = make_inputs((37, 53), torch.float32, device)
    target = target if with_target else None
    kw = dict(temperature=2.5, alpha=alpha, reduction=reduction)
    loss, grad = fused(student, teacher, target, **kw)
    ref_loss, ref_grad = reference(student, teacher, target, **kw)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows_count_in_neither_term(device, reduction):
    student, teacher, target = make_inputs((50, 17), torch.float32, device)
    target[::3] = -7
    kw = dict(temperature=3.0, alpha=0.3, reduction=reduction, ignore_index=-7)
    loss, grad = fused(student, teacher, target, **kw)
    ref_loss, ref_grad = reference(student, teacher, target, **kw)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")
    assert torch.all(grad[::3] == 0)
    if reduction == "none":
        assert torch.all(loss[::3] == 0)


@pytest.mark.parametrize("device", devices())
def test_all_ignored_batch_gives_zero_loss_and_grad(device):
    student, teacher, _ = make_inputs((9, 5), torch.float32, device)
    target = torch.full((9,), -100, device=device)
    loss, grad = fused(student, teacher, target, reduction="mean")
    assert loss.item() == 0.0
    assert torch.all(grad == 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_non_contiguous_inputs(device, dtype):
    base_s, base_t, _ = make_inputs((40, 90), dtype, device)
    student = base_s[::2, 5:70]           # strided rows, unit column stride
    teacher = base_t.t().contiguous().t()[::2, 5:70]  # column-major: a real copy is needed
    assert not student.is_contiguous() and teacher.stride(1) != 1
    target = torch.randint(0, 65, (20,), device=device)
    kw = dict(temperature=2.0, alpha=0.7, reduction="none")
    loss, grad = fused(student, teacher, target, **kw)
    ref_loss, ref_grad = reference(student, teacher, target, **kw)
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("device", devices())
def test_mixed_student_and_teacher_dtypes(device):
    student, _, target = make_inputs((33, 70), torch.bfloat16, device)
    teacher = torch.randn(33, 70, device=device) * 3
    kw = dict(temperature=2.0, alpha=0.5, reduction="none")
    loss, grad = fused(student, teacher, target, **kw)
    ref_loss, ref_grad = reference(student, teacher, target, **kw)
    assert_close(loss, ref_loss, torch.bfloat16, "loss")
    assert_close(grad, ref_grad, torch.bfloat16, "grad")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("with_ignored", [False, True])
def test_kernel_writes_every_output_element(device, dtype, with_ignored):
    # Outputs start as NaN, so an element the kernel forgets to write fails the test.
    student, teacher, target = make_inputs((64, 301), dtype, device)
    if with_ignored:
        target[::4] = -100
    loss_rows = torch.full((64,), float("nan"), device=device)
    grad = torch.full((64, 301), float("nan"), dtype=dtype, device=device)
    fasttl._ops.run_distill_rows(student, teacher, target, 2.0, 0.5, -100, loss_rows, grad)
    assert torch.isfinite(loss_rows).all() and torch.isfinite(grad).all()
    ref_loss, ref_grad = reference(student, teacher, target, temperature=2.0, alpha=0.5, reduction="none")
    assert_close(loss_rows, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("device", devices())
def test_no_gradient_reaches_the_teacher(device):
    student, teacher, target = make_inputs((8, 6), torch.float32, device)
    student.requires_grad_()
    teacher.requires_grad_()
    fasttl.distillation_loss(student, teacher, target, temperature=2.0).backward()
    assert student.grad is not None and teacher.grad is None


@pytest.mark.parametrize("device", devices())
def test_nan_and_inf_propagate_without_crashing(device):
    student, teacher, target = make_inputs((4, 8), torch.float32, device)
    student[1, 3] = float("nan")
    teacher[2, 0] = float("inf")
    loss = fasttl.distillation_loss(student, teacher, target, reduction="none")
    ref = _reference.distillation_loss(student.double(), teacher.double(), target, reduction="none")
    assert math.isnan(loss[1].item()) and math.isnan(ref[1].item())
    assert not torch.isfinite(loss[2]) and not torch.isfinite(ref[2])
    torch.testing.assert_close(loss[[0, 3]].double(), ref[[0, 3]], atol=1e-5, rtol=1e-5)


def test_module_matches_function():
    student, teacher, target = make_inputs((12, 7), torch.float32, "cpu")
    module = fasttl.nn.DistillationLoss(temperature=3.0, alpha=0.25, reduction="sum")
    expected = fasttl.distillation_loss(student, teacher, target, temperature=3.0, alpha=0.25, reduction="sum")
    assert torch.equal(module(student, teacher, target), expected)
    assert "temperature=3.0" in repr(module)


def test_opcheck_on_cpu():
    student, teacher, target = make_inputs((6, 11), torch.float32, "cpu")
    student.requires_grad_()
    for args in [(student, teacher, target, 2.0, 0.5, -100), (student, teacher, None, 1.0, 1.0, -100)]:
        torch.library.opcheck(torch.ops.fasttl.distill_rows.default, args)


def test_works_under_torch_compile():
    student, teacher, target = make_inputs((16, 10), torch.float32, "cpu")

    def step(s, t, y):
        return fasttl.distillation_loss(s * 2.0, t, y, temperature=2.0, alpha=0.5)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    s1 = student.clone().requires_grad_()
    s2 = student.clone().requires_grad_()
    compiled(s1, teacher, target).backward()
    step(s2, teacher, target).backward()
    torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s, t, y: fasttl.distillation_loss(s, t[:, :3], y), ValueError, "teacher_logits"),
        (lambda s, t, y: fasttl.distillation_loss(s, t, y[:2]), ValueError, "target"),
        (lambda s, t, y: fasttl.distillation_loss(s, t, y.float()), TypeError, "target"),
        (lambda s, t, y: fasttl.distillation_loss(s, t, y + 100), ValueError, "target"),
        (lambda s, t, y: fasttl.distillation_loss(s, t, y, temperature=0.0), ValueError, "temperature"),
        (lambda s, t, y: fasttl.distillation_loss(s, t, y, temperature=float("inf")), ValueError, "temperature"),
        (lambda s, t, y: fasttl.distillation_loss(s, t, y, alpha=1.5), ValueError, "alpha"),
        (lambda s, t, y: fasttl.distillation_loss(s, t, y, alpha=-0.1), ValueError, "alpha"),
        (lambda s, t, y: fasttl.distillation_loss(s.long(), t, y), TypeError, "student_logits"),
        (lambda s, t, y: fasttl.distillation_loss(s, t.int(), y), TypeError, "teacher_logits"),
        (lambda s, t, y: fasttl.distillation_loss(s, t, y, reduction="avg"), ValueError, "reduction"),
        (lambda s, t, y: fasttl.distillation_loss(s[0, 0], t[0, 0], None), ValueError, "student_logits"),
        (lambda s, t, y: fasttl.distillation_loss(s[0], t[0], y), ValueError, "target: has shape \\(4,\\) \\(expected \\(\\)"),
        (lambda s, t, y: fasttl.distillation_loss(s, t.to("meta"), y), ValueError, "teacher_logits"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    student, teacher, target = make_inputs((4, 5), torch.float32, "cpu")
    with pytest.raises(error, match=match):
        call(student, teacher, target)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_through_a_retained_graph_with_another_upstream_works_as_in_torch(reduction):
    # As F.cross_entropy: an upstream gradient other than 1 scales a copy of the saved gradient,
    # so a second backward through the retained graph gets the same gradient again.
    student, teacher, target = make_inputs((6, 9), torch.float32, "cpu")
    student.requires_grad_()
    loss = fasttl.distillation_loss(student, teacher, target, reduction=reduction).sum() * 2.0
    loss.backward(retain_graph=True)
    once = student.grad.clone()
    loss.backward()
    torch.testing.assert_close(student.grad, 2 * once)
    s64 = student.detach().double().requires_grad_()
    (reference_loss(s64, teacher, target, reduction).sum() * 2.0).backward()
    torch.testing.assert_close(once.double(), s64.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_second_backward_with_upstream_one_accumulates_the_same_gradient(reduction):
    # With an upstream gradient of 1 the forward's gradient is handed on untouched, so a second
    # backward through a retained graph reads it unchanged and the leaf gets twice the gradient.
    student, teacher, target = make_inputs((6, 9), torch.float32, "cpu")
    student.requires_grad_()
    loss = fasttl.distillation_loss(student, teacher, target, reduction=reduction)
    loss.backward(retain_graph=True)
    once = student.grad.clone()
    loss.backward()
    torch.testing.assert_close(student.grad, 2 * once)
    _, expected = reference(student, teacher, target, reduction=reduction)
    torch.testing.assert_close(once.double(), expected, atol=1e-6, rtol=1e-5)


def reference_loss(s64, teacher, target, reduction):
    from fasttl import _reference

    return _reference.distillation_loss(s64, teacher.double(), target, reduction=reduction)


def _grad_with_upstream(student, teacher, target, upstream, fn, **kw):
    s = student.detach().clone().requires_grad_()
    loss = fn(s, teacher, target, **kw)
    loss.backward(upstream(loss))
    return loss.detach(), s.grad


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("shape", [(1, 1), (41, 1271), (5, 3001)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0, 4.0, 2.5])
def test_upstream_gradient_other_than_one_per_row(device, dtype, shape, temperature):
    # reduction="none" with a random upstream gradient per row: a backward that ignored it, or
    # scaled the wrong rows, fails. The integer temperatures run the kernel's es^T path.
    student, teacher, target = make_inputs(shape, dtype, device)
    upstream = torch.randn(shape[0], dtype=torch.float64).to(dtype).to(device)
    kw = dict(temperature=temperature, alpha=0.6, reduction="none")
    loss, grad = _grad_with_upstream(student, teacher, target, lambda _: upstream, fasttl.distillation_loss, **kw)
    ref_loss, ref_grad = _grad_with_upstream(student.double(), teacher.double(), target, lambda _: upstream.double(),
                                             _reference.distillation_loss, **kw)
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [1.0, -2.5])
@pytest.mark.parametrize("with_ignored", [False, True])
def test_reduced_loss_with_upstream_gradient(device, reduction, upstream, with_ignored):
    # "mean" and "sum" fold their factor into the forward's gradient; an upstream gradient other
    # than 1 (loss * k) must still reach it, and ignored rows must leave the mean's divisor.
    student, teacher, target = make_inputs((37, 203), torch.float32, device)
    if with_ignored:
        target[::5] = -100
    kw = dict(temperature=4.0, alpha=0.8, reduction=reduction)
    up = lambda loss: torch.full_like(loss, upstream)  # noqa: E731
    loss, grad = _grad_with_upstream(student, teacher, target, up, fasttl.distillation_loss, **kw)
    ref_loss, ref_grad = _grad_with_upstream(student.double(), teacher.double(), target, up,
                                             _reference.distillation_loss, **kw)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


def test_reduced_op_passes_opcheck():
    student, teacher, target = make_inputs((6, 11), torch.float32, "cpu")
    student.requires_grad_()
    for args in [(student, teacher, target, 4.0, 0.5, -100, 0.25), (student, teacher, None, 1.5, 1.0, -100, 1.0)]:
        torch.library.opcheck(torch.ops.fasttl.distill_loss.default, args)


def test_reports_the_cpu_kernel_clone_it_runs():
    from fasttl._native import native

    name = native.cpu_kernel_clone()
    assert name.split(" ")[0] in ("x86-64-v4", "x86-64-v3", "default", "single")


@pytest.mark.parametrize("device", devices())
def test_masked_logits_spanning_whole_stretches(device):
    # The CPU kernel sums rows in 512-class stretches against a growing max; whole stretches of
    # masked classes (-1e4) come first, so the sums must move across a jump of 1e4 in the max.
    student, teacher, target = make_inputs((5, 1300), torch.float32, device)
    student[:, :700] = -1e4
    teacher[:, :700] = -1e4
    target = torch.randint(700, 1300, (5,), device=device)
    kw = dict(temperature=2.0, alpha=0.5, reduction="none")
    loss, grad = fused(student, teacher, target, **kw)
    ref_loss, ref_grad = reference(student, teacher, target, **kw)
    assert torch.isfinite(loss).all()
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("classes", [7, 1300])
def test_classes_the_teacher_rules_out_add_nothing(device, classes):
    # -inf teacher logits (p = 0): 0 log 0 = 0, as torch's kl_div with probability targets; also
    # where the student's logit is -inf too. The loss and gradient stay finite and match torch.
    student, teacher, target = make_inputs((6, classes), torch.float32, device)
    masked = torch.rand(6, classes, device=device) < 0.3
    masked[:, 0] = False  # every row keeps a class the teacher allows
    teacher = teacher.masked_fill(masked, float("-inf"))
    student[1] = student[1].masked_fill(masked[1], float("-inf"))
    target = torch.zeros(6, dtype=torch.int64, device=device)
    kw = dict(temperature=2.0, alpha=0.7, reduction="none")
    loss, grad = fused(student, teacher, target, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ref_loss, ref_grad = reference(student, teacher, target, **kw)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")
    # torch's own kl_div on probability targets, on the rows without a -inf student logit
    rows = [0, 2, 3, 4, 5]
    s64, t64 = student[rows].double().cpu(), teacher[rows].double().cpu()
    kl = torch.nn.functional.kl_div(torch.log_softmax(s64 / 2.0, -1), torch.softmax(t64 / 2.0, -1),
                                    reduction="none").sum(-1) * 4.0
    expected = 0.7 * kl + 0.3 * torch.nn.functional.cross_entropy(s64, target[rows].cpu(), reduction="none")
    assert_close(loss[rows], expected, torch.float32, "loss against torch's kl_div")


# ---- the raw op, torch.ops.fasttl.distill_rows, validates all it passes to the kernel -------------
def _raw(student, teacher, target, temperature=2.0, alpha=0.5, ignore_index=-100):
    return torch.ops.fasttl.distill_rows(student, teacher, target, temperature, alpha, ignore_index)


def _with(target, index, value):
    target = target.clone()
    target[index] = value
    return target


# Each case: the call on (student, teacher, target) of shape (4096, 10), the error, and the argument
# its message must start with. The first ones read or wrote out of bounds before the op checked.
RAW_BAD_CASES = {
    "teacher_one_row": (lambda s, t, y: _raw(s, t[:1], y), ValueError, "teacher"),
    "teacher_fewer_classes": (lambda s, t, y: _raw(s, t[:, :3], y), ValueError, "teacher"),
    "target_shorter": (lambda s, t, y: _raw(s, t, y[:1]), ValueError, "target"),
    "target_2d": (lambda s, t, y: _raw(s, t, y[:, None]), ValueError, "target"),
    "target_out_of_range": (lambda s, t, y: _raw(s, t, _with(y, 7, 2**40)), ValueError, "target"),
    "target_negative": (lambda s, t, y: _raw(s, t, _with(y, 7, -5)), ValueError, "target"),
    "target_float": (lambda s, t, y: _raw(s, t, y.float()), TypeError, "target"),
    "target_bool": (lambda s, t, y: _raw(s, t, y > 3), TypeError, "target"),
    "target_on_meta": (lambda s, t, y: _raw(s, t, y.to("meta")), ValueError, "target"),
    "teacher_on_meta": (lambda s, t, y: _raw(s, t.to("meta"), y), ValueError, "teacher"),
    "student_float64": (lambda s, t, y: _raw(s.double(), t, y), TypeError, "student"),
    "teacher_int32": (lambda s, t, y: _raw(s, t.int(), y), TypeError, "teacher"),
    "student_1d": (lambda s, t, y: _raw(s[0], t[0], y), ValueError, "student"),
    "student_3d": (lambda s, t, y: _raw(s[None], t[None], y), ValueError, "student"),
    "no_classes": (lambda s, t, y: _raw(s[:, :0], t[:, :0], None), ValueError, "student"),
    "temperature_zero": (lambda s, t, y: _raw(s, t, y, temperature=0.0), ValueError, "temperature"),
    "temperature_negative": (lambda s, t, y: _raw(s, t, y, temperature=-1.0), ValueError, "temperature"),
    "temperature_nan": (lambda s, t, y: _raw(s, t, y, temperature=float("nan")), ValueError, "temperature"),
    "alpha_nan": (lambda s, t, y: _raw(s, t, y, alpha=float("nan")), ValueError, "alpha"),
    "alpha_above_one": (lambda s, t, y: _raw(s, t, y, alpha=1.5), ValueError, "alpha"),
}


@pytest.mark.parametrize("case", list(RAW_BAD_CASES))
def test_raw_op_refuses_bad_arguments_naming_them(case):
    call, error, name = RAW_BAD_CASES[case]
    student, teacher, target = make_inputs((4096, 10), torch.float32, "cpu")
    with pytest.raises(error, match=f"^{name}: "):
        call(student, teacher, target)


@pytest.mark.parametrize("case", [c for c in RAW_BAD_CASES if c not in ("target_out_of_range", "target_negative")])
def test_fake_refuses_what_the_kernel_refuses(case):
    # On meta tensors the fake implementation runs (as under torch.compile); it makes the same
    # metadata checks. Values (index ranges) are not there to check.
    call, error, name = RAW_BAD_CASES[case]
    student, teacher, target = (x.to("meta") for x in make_inputs((4096, 10), torch.float32, "cpu"))
    if "on_meta" in case:  # all on meta would be valid here: keep the student on the CPU instead
        student = torch.randn(4096, 10)
        teacher = teacher if case == "teacher_on_meta" else torch.randn(4096, 10)
        target = target if case == "target_on_meta" else torch.zeros(4096, dtype=torch.long)
    with pytest.raises(error, match=f"^{name}: "):
        call(student, teacher, target)


@pytest.mark.parametrize("device", devices())
def test_raw_op_takes_int32_and_strided_targets(device):
    student, teacher, target = make_inputs((40, 13), torch.float32, device)
    expected = _raw(student, teacher, target)
    interleaved = torch.stack([target, torch.full_like(target, 99)], 1)[:, 0]
    assert not interleaved.is_contiguous()
    for variant in (target.int(), interleaved, interleaved.int()):
        loss, grad = _raw(student, teacher, variant)
        assert torch.equal(loss, expected[0]) and torch.equal(grad, expected[1])


def test_raw_op_on_meta_gives_shapes():
    student, teacher, target = (x.to("meta") for x in make_inputs((6, 11), torch.bfloat16, "cpu"))
    loss, grad = _raw(student, teacher, target.int())
    assert loss.shape == (6,) and loss.dtype == torch.float32
    assert grad.shape == (6, 11) and grad.dtype == torch.bfloat16 and grad.device.type == "meta"


@pytest.mark.parametrize("ignore_index", [1.5, True, "-100", 2**63])
def test_public_refuses_an_ignore_index_that_is_no_int64(ignore_index):
    student, teacher, target = make_inputs((4, 5), torch.float32, "cpu")
    with pytest.raises(TypeError, match="^ignore_index: "):
        fasttl.distillation_loss(student, teacher, target, ignore_index=ignore_index)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_cuda_out_of_range_target_raises_named_without_a_host_sync():
    # On CUDA the range check needs no host sync: the bad target is replaced on the device (its row
    # counts for nothing), and the named ValueError comes once the GPU has run the call, here at
    # raise_device_errors(); the CUDA context survives. A subprocess keeps this process clean.
    code = ("import torch, fasttl\n"
            "from fasttl import _device_checks\n"
            "s = torch.randn(8, 10, device='cuda'); y = torch.randint(0, 10, (8,), device='cuda'); y[3] = 2**40\n"
            "loss, grad = torch.ops.fasttl.distill_rows(s, s, y, 2.0, 0.5, -100)\n"
            "torch.cuda.synchronize()\n"
            "try:\n"
            "    _device_checks.raise_device_errors()\n"
            "except ValueError as e:\n"
            "    print('CAUGHT', str(e).startswith('target: an index out of range'), float(loss[3]) == 0.0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert "CAUGHT True True" in proc.stdout, proc.stdout + proc.stderr
