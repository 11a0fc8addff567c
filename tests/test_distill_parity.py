"""fasttl.distillation_loss as a torch loss: its dtype under autocast, GradScaler with fp16, double
backward and torch.func, (B, T, C) logits, float64, label smoothing and class weights beside
torch's own cross_entropy, and its numerics at the edges of what it accepts (within 1e-3 of a
50-digit evaluation of the formula)."""
import decimal
import zlib

import pytest
import torch
import torch.nn.functional as F

import fasttl
from fasttl import _reference


def generator(request, salt: str = "") -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32((request.node.nodeid + salt).encode()))


def inputs(request, shape=(6, 7), dtype=torch.float32, scale=3.0):
    g = generator(request)
    student = (torch.randn(shape, generator=g) * scale).to(dtype).requires_grad_()
    teacher = (torch.randn(shape, generator=g) * scale).to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return student, teacher, target


def test_the_benchmarks_kl_div_baseline_computes_the_same_loss(request):
    # fasttl bench distill times it as "eager kl_div": it must be the same loss, or the ratio lies.
    student, teacher, target = inputs(request, (16, 30), torch.float64)
    ours = fasttl.distillation_loss(student.float(), teacher.float(), target, temperature=4.0, alpha=0.9)
    theirs = _reference.distillation_loss_kl_div(student, teacher, target, temperature=4.0, alpha=0.9)
    torch.testing.assert_close(ours.double(), theirs.detach(), rtol=1e-5, atol=1e-6)


# ---- autocast and GradScaler ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_is_fp32_under_autocast_as_torch_losses(request, dtype):
    g = generator(request)
    layer = torch.nn.Linear(12, 7)
    x, teacher, y = torch.randn(5, 12, generator=g), torch.randn(5, 7, generator=g), torch.randint(0, 7, (5,))
    with torch.autocast("cpu", dtype=dtype):
        logits = layer(x)
        assert logits.dtype == dtype
        ours = fasttl.distillation_loss(logits, teacher, y, temperature=2.0)
        theirs = F.cross_entropy(logits, y)
    assert ours.dtype == theirs.dtype == torch.float32
    ours.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    # Outside autocast a low-precision student keeps its dtype, as cross_entropy does.
    assert fasttl.distillation_loss(logits.detach(), teacher, y).dtype == dtype == F.cross_entropy(
        logits.detach(), y).dtype


def test_grad_scaler_takes_the_first_fp16_step(request):
    # With an fp16 loss, GradScaler's 65536 became inf on the way back and every first step was
    # skipped (the scale halved). As torch's losses, the first step is taken.
    g = generator(request)
    model = torch.nn.Linear(16, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    x, teacher, y = torch.randn(8, 16, generator=g), torch.randn(8, 10, generator=g) * 3, torch.randint(0, 10, (8,))
    before = model.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = fasttl.distillation_loss(model(x), teacher, y, temperature=4.0, alpha=0.9)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 65536.0  # no inf found
    assert not torch.equal(model.weight.detach(), before)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp16_gradient_times_gradscalers_scale_is_taken_in_fp32(request, reduction):
    # Under autocast the loss is fp32, and GradScaler's 65536 reaches backward as an fp32 upstream
    # gradient: rounded to fp16 first it would be inf; times a mean's 1/B it fits.
    student, teacher, target = inputs(request, (4, 9), torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = fasttl.distillation_loss(student, teacher, target, temperature=2.0, reduction=reduction)
    assert loss.dtype == torch.float32
    scaled = loss * 65536.0 if reduction == "mean" else loss.mean() * 65536.0
    scaled.backward()
    ref = student.detach().double().requires_grad_()
    (_reference.distillation_loss(ref, teacher.double(), target, temperature=2.0, reduction="mean") * 65536.0).backward()
    assert torch.isfinite(student.grad).all()
    torch.testing.assert_close(student.grad.double(), ref.grad, rtol=5e-3, atol=5e-3 * float(ref.grad.abs().max()))


# ---- double backward and torch.func -----------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_double_backward_is_the_derivative_of_the_same_gradient(request, reduction, label_smoothing):
    student, teacher, target = inputs(request, (5, 6))
    target[1] = -100
    kw = dict(temperature=3.0, alpha=0.7, reduction=reduction, label_smoothing=label_smoothing)
    v = torch.randn(student.shape, generator=generator(request, "v"))
    loss = fasttl.distillation_loss(student, teacher, target, **kw)
    (grad,) = torch.autograd.grad(loss.sum() * 1.5, student, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * v).sum(), student)
    ref = student.detach().double().requires_grad_()
    ref_loss = _reference.distillation_loss(ref, teacher.double(), target, **kw)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum() * 1.5, ref, create_graph=True)
    (ref_hvp,) = torch.autograd.grad((ref_grad * v.double()).sum(), ref)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hvp.double(), ref_hvp, rtol=1e-4, atol=1e-5)
    assert hvp.abs().max() > 1e-3  # a second derivative that is there


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_gradgradcheck_of_the_fused_op(request):
    student, teacher, target = inputs(request, (3, 4), scale=1.0)

    def f(s):
        return fasttl.distillation_loss(s, teacher, target, temperature=2.0, alpha=0.6, reduction="none")

    # fp32 (the fused kernel's precision): a coarse finite-difference step, tolerances to match.
    assert torch.autograd.gradgradcheck(f, (student.detach().requires_grad_(),), eps=1e-2, atol=2e-2, rtol=2e-2)


def test_torch_func_grad_vmap_and_hessian(request):
    student, teacher, target = inputs(request, (4, 5))

    def f(s):
        return fasttl.distillation_loss(s, teacher, target, temperature=2.0, alpha=0.5)

    grad = torch.func.grad(f)(student.detach())
    loss = f(student)
    loss.backward()
    torch.testing.assert_close(grad, student.grad, rtol=1e-5, atol=1e-6)
    hessian = torch.func.hessian(f)(student.detach())
    assert hessian.shape == (4, 5, 4, 5) and torch.isfinite(hessian).all()
    rows = torch.func.vmap(lambda s, t, y: fasttl.distillation_loss(s[None], t[None], y[None]))(
        student.detach(), teacher, target)
    torch.testing.assert_close(rows, fasttl.distillation_loss(student.detach(), teacher, target, reduction="none"))


# ---- shapes and dtypes --------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sequence_logits_are_rows(request, reduction):
    student, teacher, target = inputs(request, (3, 4, 11))
    target[0, 2] = -100
    loss = fasttl.distillation_loss(student, teacher, target, temperature=2.0, reduction=reduction)
    flat = fasttl.distillation_loss(student.reshape(-1, 11), teacher.reshape(-1, 11), target.reshape(-1),
                                    temperature=2.0, reduction=reduction)
    torch.testing.assert_close(loss.reshape(-1), flat.reshape(-1), rtol=0, atol=0)
    assert loss.shape == ((3, 4) if reduction == "none" else ())
    with pytest.raises(ValueError, match=r"^target: has shape \(12,\) \(expected \(3, 4\)"):
        fasttl.distillation_loss(student, teacher, target.reshape(-1))


def test_float64_takes_the_eager_formula_and_passes_gradcheck(request):
    student, teacher, target = inputs(request, (4, 6), torch.float64)
    loss = fasttl.distillation_loss(student, teacher, target, temperature=3.0, alpha=0.4)
    assert loss.dtype == torch.float64
    ref = _reference.distillation_loss(student, teacher, target, temperature=3.0, alpha=0.4)
    assert float(loss) == float(ref)
    assert torch.autograd.gradcheck(
        lambda s: fasttl.distillation_loss(s, teacher, target, temperature=3.0, alpha=0.4, label_smoothing=0.1),
        (student.detach().requires_grad_(),))
    # A float64 teacher beside an fp32 student goes to the kernel (which computes in fp32).
    fused = fasttl.distillation_loss(student.detach().float(), teacher, target, temperature=3.0, alpha=0.4)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.double(), ref.detach(), rtol=1e-5, atol=1e-6)


# ---- label smoothing and class weights, beside cross_entropy ----------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_matches_cross_entropy(request, dtype, tol, reduction):
    student, teacher, target = inputs(request, (9, 13), dtype)
    target[3] = -100
    ours = fasttl.distillation_loss(student, teacher, target, alpha=0.0, label_smoothing=0.15, reduction=reduction)
    s64 = student.detach().double().requires_grad_()
    theirs = F.cross_entropy(s64, target, label_smoothing=0.15, reduction=reduction)
    torch.testing.assert_close(ours.double(), theirs.detach(), rtol=tol, atol=tol)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=tol, atol=tol)
    # And with the soft term, against the float64 formula.
    student.grad = None
    kw = dict(temperature=4.0, alpha=0.6, label_smoothing=0.3, reduction=reduction)
    ours = fasttl.distillation_loss(student, teacher, target, **kw)
    ref = _reference.distillation_loss(student.detach().double().requires_grad_(), teacher.double(), target, **kw)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weights_match_cross_entropy(request, reduction):
    student, teacher, target = inputs(request, (10, 5))
    target[2] = -100
    weight = torch.rand(5, generator=generator(request, "w")) + 0.1
    ours = fasttl.distillation_loss(student, teacher, target, alpha=0.0, weight=weight, reduction=reduction)
    s64 = student.detach().double().requires_grad_()
    theirs = F.cross_entropy(s64, target, weight=weight.double(), reduction=reduction)
    torch.testing.assert_close(ours.double(), theirs.detach(), rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)
    module = fasttl.nn.DistillationLoss(alpha=0.0, weight=weight, reduction=reduction)
    torch.testing.assert_close(module(student.detach(), teacher, target), ours.detach())


@pytest.mark.parametrize("call, error, message", [
    (lambda s, t, y: fasttl.distillation_loss(s, t, None, weight=torch.ones(7)), ValueError, r"^weight: class weights need"),
    (lambda s, t, y: fasttl.distillation_loss(s, t, y, weight=torch.ones(7), label_smoothing=0.1), ValueError,
     r"^weight: not supported together with label_smoothing"),
    (lambda s, t, y: fasttl.distillation_loss(s, t, y, weight=torch.ones(6)), ValueError, r"^weight: has shape \(6,\)"),
    (lambda s, t, y: fasttl.distillation_loss(s, t, y, weight=torch.ones(7, dtype=torch.long)), TypeError,
     r"^weight: got torch.int64"),
    (lambda s, t, y: fasttl.distillation_loss(s, t, y, weight=[1.0] * 7), TypeError, r"^weight: got list"),
    (lambda s, t, y: fasttl.distillation_loss(s, t, y, label_smoothing=1.5), ValueError, r"^label_smoothing: is 1.5"),
    (lambda s, t, y: fasttl.distillation_loss(s, t, y, label_smoothing=-0.1), ValueError, r"^label_smoothing"),
    (lambda s, t, y: fasttl.distillation_loss(s, t, y, temperature=1e4), ValueError, r"^temperature: is 10000.0"),
    (lambda s, t, y: fasttl.distillation_loss(s, t, y, temperature=1e20), ValueError, r"^temperature"),
    (lambda s, t, y: fasttl.distillation_loss(s, t, y, temperature=1e-3), ValueError, r"^temperature"),
    (lambda s, t, y: fasttl.distillation_loss(s, t, y.float()), TypeError, r"^target: dtype torch.float32"),
], ids=["weight-no-target", "weight-smoothing", "weight-shape", "weight-dtype", "weight-list", "smoothing-high",
        "smoothing-low", "temperature-1e4", "temperature-1e20", "temperature-1e-3", "probability-target"])
def test_what_it_does_not_take_is_refused_by_name(request, call, error, message):
    student, teacher, target = inputs(request)
    with pytest.raises(error, match=message):
        call(student, teacher, target)


# ---- numerics at the edges: a 50-digit evaluation of the formula -------------------------------
def exact_rows(student, teacher, target, temperature, alpha, label_smoothing):
    """Each row's loss with 50 significant digits (decimal), from the fp32 inputs as they are."""
    decimal.getcontext().prec = 50
    D = decimal.Decimal
    T = D(repr(float(temperature)))
    out = []
    for s_row, t_row, y in zip(student.double().tolist(), teacher.double().tolist(), target.tolist()):
        s = [D(repr(v)) for v in s_row]
        t = [D(repr(v)) for v in t_row]
        ms, mt = max(s), max(t)
        zs = sum(((v - ms) / T).exp() for v in s)
        zt = sum(((v - mt) / T).exp() for v in t)
        kl = D(0)
        for sv, tv in zip(s, t):
            log_p = (tv - mt) / T - zt.ln()
            log_q = (sv - ms) / T - zs.ln()
            kl += log_p.exp() * (log_p - log_q)
        zh = sum((v - ms).exp() for v in s)
        log_soft = [(v - ms) - zh.ln() for v in s]
        eps = D(repr(float(label_smoothing)))
        ce = -(1 - eps) * log_soft[y] - eps * sum(log_soft) / len(s)
        a = D(repr(float(alpha)))
        out.append(float(a * T * T * kl + (1 - a) * ce))
    return torch.tensor(out, dtype=torch.float64)


EDGES = [  # (logit scale, temperature, student = teacher + this noise (None: independent), label smoothing)
    (1e8, 1.0, None, 0.0), (1e8, 4.0, None, 0.1), (1e30, 2.0, None, 0.0), (1.0, 1000.0, None, 0.0),
    (3.0, 1000.0, 1e-3, 0.0), (3.0, 0.01, None, 0.0), (3.0, 4.0, 1e-6, 0.0), (3.0, 1.0, 1e-5, 0.2),
    (1e-6, 1.0, None, 0.0), (1e-30, 50.0, None, 0.0), (20.0, 4.0, 0.0, 0.0), (5.0, 300.0, 1e-4, 0.05),
]


@pytest.mark.parametrize("scale, temperature, noise, smoothing", EDGES,
                         ids=[f"x{s:g}-T{t:g}-noise{n}-eps{e:g}" for s, t, n, e in EDGES])
@pytest.mark.parametrize("classes", [1, 2, 7])
def test_each_row_is_within_1e_3_of_the_formula_at_the_edges(request, scale, temperature, noise, smoothing, classes):
    g = generator(request)
    teacher = torch.randn(6, classes, generator=g) * scale
    student = teacher + noise * scale * torch.randn(6, classes, generator=g) if noise is not None else \
        torch.randn(6, classes, generator=g) * scale
    target = torch.randint(0, classes, (6,), generator=g)
    alpha = 0.9
    loss = fasttl.distillation_loss(student, teacher, target, temperature=temperature, alpha=alpha,
                                    label_smoothing=smoothing, reduction="none")
    exact = exact_rows(student, teacher, target, temperature, alpha, smoothing)
    fits = exact.abs() < 3e38  # a loss beyond float32's range is inf (documented)
    assert torch.isinf(loss[~fits]).all()
    error = (loss.double()[fits] - exact[fits]).abs()
    assert bool((error <= 1e-3 * exact[fits].abs() + 1e-30).all()), (loss, exact)
    assert bool((loss >= 0).all())  # a KL plus a cross-entropy is never negative


@pytest.mark.parametrize("temperature, noise", [(4.0, 0.1), (4.0, 0.01), (1.0, 0.03), (2.0, None)])
def test_wide_rows_of_a_student_near_its_teacher_are_within_1e_3(request, temperature, noise):
    # The late-training case: most rows' fp32 sums are good enough and stay on the fast path; the
    # estimate of their error must hold for them.
    g = generator(request)
    teacher = torch.randn(4, 1000, generator=g) * 3
    student = teacher + noise * torch.randn(4, 1000, generator=g) if noise else torch.randn(4, 1000, generator=g)
    target = teacher.argmax(1)
    loss = fasttl.distillation_loss(student, teacher, target, temperature=temperature, alpha=0.9, reduction="none")
    exact = exact_rows(student, teacher, target, temperature, 0.9, 0.0)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-3, atol=0)


def test_the_issues_cases_are_right_now(request):
    # Logits of 1e8 gave 1.0 where the formula gives 1.60; T = 1e4 gave -0.58 (now refused); a
    # student near its teacher at T = 1000 lost every digit to cancellation.
    g = generator(request)
    for scale, temperature in ((1e8, 1.0), (1.0, 1000.0)):
        s, t = torch.randn(4, 10, generator=g) * scale, torch.randn(4, 10, generator=g) * scale
        y = torch.randint(0, 10, (4,), generator=g)
        ours = fasttl.distillation_loss(s, t, y, temperature=temperature, reduction="none")
        exact = exact_rows(s, t, y, temperature, 0.5, 0.0)
        torch.testing.assert_close(ours.double(), exact, rtol=1e-3, atol=0)


def test_the_exact_rows_keep_the_gradient_right(request):
    # Rows redone in float64 also get their gradient from there: at T = 1000 the fp32 difference
    # q - p of two near-uniform distributions would keep no digit.
    g = generator(request)
    teacher = torch.randn(3, 8, generator=g, dtype=torch.float64).float()
    student = (teacher + 0.01 * torch.randn(3, 8, generator=g)).requires_grad_()
    fasttl.distillation_loss(student, teacher, None, temperature=1000.0, reduction="sum").backward()
    ref = student.detach().double().requires_grad_()
    _reference.distillation_loss(ref, teacher.double(), None, temperature=1000.0, reduction="sum").backward()
    torch.testing.assert_close(student.grad.double(), ref.grad, rtol=1e-4, atol=1e-9)
    assert ref.grad.abs().max() > 1e-6


def test_forward_mode_ad_gets_its_tangent(request):
    import torch.autograd.forward_ad as fwAD

    student, teacher, target = inputs(request, (4, 6))
    direction = torch.randn(4, 6, generator=generator(request, "dir"))
    with fwAD.dual_level():
        dual = fwAD.make_dual(student.detach(), direction)
        ours = fwAD.unpack_dual(fasttl.distillation_loss(dual, teacher, target, alpha=0.0)).tangent
        theirs = fwAD.unpack_dual(F.cross_entropy(dual, target)).tangent
    assert ours is not None
    torch.testing.assert_close(ours, theirs)


def test_a_masked_student_logit_at_alpha_0_is_cross_entropy_not_nan(request):
    student, teacher, target = inputs(request, (3, 5))
    student = student.detach().clone()
    student[0, 2] = float("-inf")
    target[0] = 1
    for reduction in ("mean", "none"):
        ours = fasttl.distillation_loss(student, teacher, target, alpha=0.0, reduction=reduction)
        theirs = F.cross_entropy(student, target, reduction=reduction)
        torch.testing.assert_close(ours, theirs)
    # alpha = 1 with a target: the soft term alone, whatever the hard term would be
    hard_inf = student.clone()
    hard_inf[1, target[1]] = float("-inf")
    ours = fasttl.distillation_loss(hard_inf, hard_inf, target, alpha=1.0, reduction="none")
    assert torch.isfinite(ours[1:]).all()


def test_uint8_targets_as_cross_entropy_takes_them(request):
    student, teacher, target = inputs(request, (5, 7))
    ours = fasttl.distillation_loss(student, teacher, target.to(torch.uint8), alpha=0.0)
    torch.testing.assert_close(ours, F.cross_entropy(student, target.to(torch.uint8)))


@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_a_teacher_sure_of_one_class_keeps_the_students_mass_in_the_kl(request, temperature):
    # The teacher's other classes underflow to probability 0 while the student's do not: the
    # student's mass there is part of its log-partition and must not be dropped (it was: 0.0 for
    # a KL of 2.0 at teacher [2000, 0, 0], student [0, 1, 2]).
    g = generator(request)
    teacher = torch.tensor([[2000.0, 0.0, 0.0], [0.0, -900.0, 900.0], [300.0, -300.0, 0.0]])
    teacher = torch.cat([teacher, torch.randn(3, 3, generator=g) * 1000])
    student = torch.cat([torch.tensor([[0.0, 1.0, 2.0]]), torch.randn(5, 3, generator=g) * 3]).requires_grad_()
    target = torch.randint(0, 3, (6,), generator=g)
    loss = fasttl.distillation_loss(student, teacher, target, temperature=temperature, alpha=0.9, reduction="none")
    exact = exact_rows(student.detach(), teacher, target, temperature, 0.9, 0.0)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-3, atol=0)
    upstream = torch.randn(6, generator=generator(request, "up"))
    (loss * upstream).sum().backward()
    ref = student.detach().double().requires_grad_()
    rows = _reference.distillation_loss(ref, teacher.double(), target, temperature=temperature, alpha=0.9,
                                        reduction="none")
    (rows * upstream.double()).sum().backward()
    torch.testing.assert_close(student.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weights_of_either_sign_divide_as_cross_entropy(request, reduction):
    student, teacher, target = inputs(request, (9, 4))
    weight = torch.tensor([1.5, -2.0, 0.5, -0.25])
    ours = fasttl.distillation_loss(student, teacher, target, alpha=0.0, weight=weight, reduction=reduction)
    theirs = F.cross_entropy(student, target, weight=weight, reduction=reduction)
    torch.testing.assert_close(ours, theirs)
    ref = _reference.distillation_loss(student.double(), teacher.double(), target, alpha=0.0,
                                       weight=weight.double(), reduction=reduction)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("student, teacher, target, temperature, smoothing", [
    ([[2e38]], [[-2e38]], 0, 1.0, 0.0),
    ([[0.0, 1e37]], [[1e37, 0.0]], 1, 0.01, 0.0),
    ([[0.0, 1e38]], [[1e38, 0.0]], 0, 0.1, 0.0),
    ([[2e38, -2e38]], [[2e38, -2e38]], 0, 1.0, 0.1),
    ([[3e38, -3e38, 0.0]], [[-3e38, 3e38, 1.0]], 2, 4.0, 0.0),
], ids=["one-class", "T0.01-1e37", "T0.1-1e38", "smoothing-2e38", "opposite-3e38"])
def test_finite_logits_near_float32s_limit_are_right_or_inf_only_where_the_loss_is(student, teacher, target,
                                                                                     temperature, smoothing):
    # s / T and t - s overflow fp32 there: such rows are redone in float64 (they gave NaN or inf).
    s, t = torch.tensor(student), torch.tensor(teacher)
    y = torch.tensor([target])
    for alpha in (0.0, 0.5, 1.0):
        loss = fasttl.distillation_loss(s, t, y, temperature=temperature, alpha=alpha, label_smoothing=smoothing,
                                        reduction="none")
        exact = exact_rows(s, t, y, temperature, alpha, smoothing)
        if exact.abs().item() >= 3.4e38:
            assert torch.isinf(loss).all()
        else:
            torch.testing.assert_close(loss.double(), exact, rtol=1e-3, atol=1e-30)


def test_class_weights_summing_to_zero_divide_as_cross_entropy(request):
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    weight = torch.tensor([1.0, -1.0])
    ours = fasttl.distillation_loss(student, torch.zeros(2, 2), target, alpha=0.0, weight=weight)
    assert ours.item() == F.cross_entropy(student, target, weight=weight).item() == float("-inf")
    ignored = torch.tensor([-100, -100])  # no row counted: 0 with gradient 0 (documented), not NaN
    assert fasttl.distillation_loss(student, torch.zeros(2, 2), ignored, alpha=0.0, weight=weight).item() == 0.0


def test_numbers_of_numpy_are_numbers_and_tensors_are_named(request):
    import numpy as np

    student, teacher, target = inputs(request)
    ours = fasttl.distillation_loss(student, teacher, target, temperature=np.float64(2.0), alpha=np.float32(0.5),
                                    label_smoothing=np.float32(0.1))
    torch.testing.assert_close(ours, fasttl.distillation_loss(student, teacher, target, temperature=2.0, alpha=0.5,
                                                              label_smoothing=float(np.float32(0.1))))
    assert isinstance(ours, torch.Tensor)
    with pytest.raises(TypeError, match=r"^temperature: got Tensor \(expected a Python float; float\(t\) if you "):
        fasttl.distillation_loss(student, teacher, target, temperature=torch.tensor(2.0))
    with pytest.raises(TypeError, match=r"^weight: torch.float64 for torch.float32 logits"):
        fasttl.distillation_loss(student, teacher, target, weight=torch.tensor([1e300] + [1.0] * 6,
                                                                               dtype=torch.float64))
