"""fasttl.optim beside torch.optim where users combine them: a param changed outside the optimizer
(its fp32 master follows), torch.compile of the step (one graph, no recompiles), the op's own
checks at the native boundary."""
import zlib

import pytest
import torch

import fasttl
from conftest import devices
from fasttl import _ops


def seeded(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_model(dtype, generator):
    model = torch.nn.Sequential(torch.nn.Linear(13, 33), torch.nn.GELU(), torch.nn.Linear(33, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.to(dtype)


def set_grads(model, generator):
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int16) if t.element_size() == 2 else t.detach().view(torch.int32)


def edit(kind: str, model, generator) -> None:
    """A change to the params made outside the optimizer, as training scripts make them."""
    params = list(model.parameters())
    with torch.no_grad():
        if kind == "load_state_dict":
            other = make_model(params[0].dtype, generator)
            model.load_state_dict(other.state_dict())
        elif kind == "init":
            weight = model[0].weight
            if weight.device.type == "cpu":
                torch.nn.init.normal_(weight, std=0.02, generator=generator)
            else:  # (a CPU generator can't draw on the device: the same in-place init, drawn here)
                weight.copy_(torch.nn.init.normal_(torch.empty(weight.shape), std=0.02, generator=generator))
        elif kind == "clamp":
            for p in params:
                p.clamp_(-0.2, 0.2)  # changes only the larger elements: the others keep their master
        elif kind == "ema_swap":
            ema = [(p.float() + 0.01 * torch.randn(p.shape, generator=generator).to(p.device)).to(p.dtype)
                   for p in params]
            for p, e in zip(params, ema):
                p.copy_(e)
        else:
            raise AssertionError(kind)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["load_state_dict", "init", "clamp", "ema_swap"])
@pytest.mark.parametrize("cls", [fasttl.optim.AdamW, fasttl.optim.Adam])
def test_an_edit_outside_the_optimizer_becomes_the_master(request, dtype, kind, cls, device):
    g = seeded(request)
    model = make_model(dtype, g).to(device)
    opt = cls(model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        set_grads(model, g)
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    old_masters = [opt.state[p]["master_param"].clone() for p in model.parameters()]
    edit(kind, model, g)
    changed = [bits(p) != bits(b) for p, b in zip(model.parameters(), before)]
    assert any(c.any() for c in changed), "the edit changed nothing: the test would prove nothing"

    # The twin is the same optimizer told of the edit: its master is the edited value where the
    # param changed and the old fp32 master elsewhere. One step of each must agree bit for bit.
    twin_model = make_model(dtype, torch.Generator().manual_seed(1)).to(device)
    twin_model.load_state_dict(model.state_dict())
    twin = cls(twin_model.parameters(), lr=1e-3, weight_decay=0.01)
    twin.load_state_dict(opt.state_dict())
    for p, c, old in zip(twin_model.parameters(), changed, old_masters):
        twin.state[p]["master_param"] = torch.where(c, p.detach().float(), old)
    step_g = torch.Generator().manual_seed(7)
    set_grads(model, step_g)
    step_g.manual_seed(7)
    set_grads(twin_model, step_g)
    opt.step()
    twin.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(bits(p), bits(q))
        assert torch.equal(opt.state[p]["master_param"], twin.state[q]["master_param"])
        assert torch.equal(bits(p), bits(opt.state[p]["master_param"].to(dtype)))  # in step again


def test_a_hand_edit_survives_a_tiny_step_as_in_torch_optim(request):
    # The case: with masters that did not follow, one step at lr=1e-8 took the weights
    # back to the pre-edit masters; torch.optim.AdamW keeps the edit.
    g = seeded(request)
    model = make_model(torch.bfloat16, g)
    ref = make_model(torch.float32, g)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    opt = fasttl.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for _ in range(3):
        set_grads(model, g)
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = p.grad.float()
        opt.step()
        ref_opt.step()
    with torch.no_grad():
        for m in (model, ref):
            m[0].weight.fill_(0.5)
    for o in (opt, ref_opt):
        o.param_groups[0]["lr"] = 1e-8
    set_grads(model, g)
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.float()
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(ref[0].weight.detach(), torch.full_like(ref[0].weight, 0.5), atol=1e-6, rtol=0)
    assert torch.equal(model[0].weight.detach().float(), torch.full_like(ref[0].weight, 0.5))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masters_at_rounding_ties_and_edges_are_recognised_as_unchanged(request, device, dtype):
    # The check is on stored bits: a master halfway between two low-precision values (rounded to
    # the even one), one just inside or outside a half ulp, near the top of the range and at 0 or
    # -0, must be seen as the master of its own rounding. With lr=0 the step changes nothing, so
    # any mistaken resync shows as a changed master (-0 is left out: 0 - (-0) steps it to +0).
    g = seeded(request)
    base = (torch.rand(4096, generator=g) * 8 - 4).to(dtype).float()
    ulp = (base.to(dtype).float().abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10)).clamp_min(1e-30)
    offsets = torch.tensor([0.5, -0.5, 0.499, -0.499, 0.25, 0.0])
    masters = torch.cat([base + o * ulp for o in offsets] + [torch.tensor([0.0, 1e-30, -1e-30, 6e4, -6e4])])
    if dtype == torch.bfloat16:
        masters = torch.cat([masters, torch.tensor([3e38, -3e38, 1.5e-38])])
    p = torch.nn.Parameter(masters.to(dtype).to(device))
    opt = fasttl.optim.AdamW([p], lr=0.0, weight_decay=0.0)
    p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
    opt.step()  # makes the state; then the master and the param are set to a consistent pair
    with torch.no_grad():
        p.copy_(masters.to(dtype))
    opt.state[p]["master_param"].copy_(masters.to(device))
    assert torch.equal(bits(opt.state[p]["master_param"].to(dtype)), bits(p))
    for _ in range(2):
        p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
        opt.step()
    assert torch.equal(bits(opt.state[p]["master_param"].cpu()), bits(masters))


def test_an_unchanged_param_keeps_its_fp32_master_exactly(request):
    # Small updates accumulate in the master: a resync on every step would lose them to rounding.
    g = seeded(request)
    p = torch.nn.Parameter((torch.rand(4097, generator=g) + 1).bfloat16())  # bf16 ulp 2^-7 here
    opt = fasttl.optim.AdamW([p], lr=1e-4, weight_decay=0.0)
    start = p.detach().clone()
    for _ in range(30):
        p.grad = torch.ones_like(p)
        opt.step()
    master = opt.state[p]["master_param"]
    torch.testing.assert_close(master, start.float() - 30e-4, atol=2e-6, rtol=0)
    assert not torch.equal(p.detach(), start)  # 3e-3 of drift moved the bf16 param too


# ---- torch.compile ---------------------------------------------------------------------------
def compiled_pair(request, cls, dtypes, **options):
    g = seeded(request)
    models = [make_model(d, g) for d in dtypes]
    twins = [make_model(d, g) for d in dtypes]
    for m, t in zip(models, twins):
        t.load_state_dict(m.state_dict())
    opt = cls([{"params": m.parameters()} for m in models], **options)
    eager = cls([{"params": m.parameters()} for m in twins], **options)
    return models, twins, opt, eager


@pytest.mark.parametrize("cls", [fasttl.optim.AdamW, fasttl.optim.Adam])
def test_compiled_step_is_one_graph_without_recompiles_and_matches_eager(request, cls):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    models, twins, opt, eager = compiled_pair(request, cls, [torch.bfloat16, torch.float32], lr=1e-2,
                                              weight_decay=0.05, amsgrad=True)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter, fullgraph=True)  # fullgraph: a break is an error
    for i in range(4):
        for group in (models, twins):
            g = torch.Generator().manual_seed(i)
            for m in group:
                set_grads(m, g)
        step()
        eager.step()
    assert counter.frame_count == 1  # the state filling in at step 1 did not recompile
    for m, t in zip(models, twins):
        for p, q in zip(m.parameters(), t.parameters()):
            assert torch.equal(p, q)
    assert float(opt.state[next(models[0].parameters())]["step"]) == 4


def test_compiled_step_with_inductor_matches_eager(request):
    torch._dynamo.reset()
    models, twins, opt, eager = compiled_pair(request, fasttl.optim.AdamW, [torch.bfloat16], lr=torch.tensor(1e-2),
                                              weight_decay=0.01)
    step = torch.compile(opt.step, fullgraph=True)
    for i in range(3):
        for group in (models, twins):
            set_grads(group[0], torch.Generator().manual_seed(i))
        step()
        eager.step()
    for p, q in zip(models[0].parameters(), twins[0].parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], eager.state[q]["master_param"])


def test_compiled_step_takes_grad_scaler_flags(request):
    # GradScaler hands grad_scale and found_inf as attributes; a flagged step is skipped on the
    # device, with no host read to break the graph on.
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    models, twins, opt, eager = compiled_pair(request, fasttl.optim.AdamW, [torch.bfloat16], lr=1e-2)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    for i, flag in enumerate([0.0, 1.0, 0.0]):
        for o, group in ((opt, models), (eager, twins)):
            set_grads(group[0], torch.Generator().manual_seed(i))
            for p in group[0].parameters():
                p.grad.mul_(8)
            o.grad_scale, o.found_inf = torch.tensor(8.0), torch.tensor(flag)
        step()
        eager.step()
    assert counter.frame_count == 1
    for p, q in zip(models[0].parameters(), twins[0].parameters()):
        assert torch.equal(p, q)
        assert float(opt.state[p]["step"]) == 2  # the flagged step was not counted


# ---- the op at the native boundary -----------------------------------------------------------
def adam_args(n=3, dtype=torch.bfloat16, amsgrad=True, master=True):
    params = [torch.randn(5, 7).to(dtype) for _ in range(n)]
    fp32 = lambda: [torch.rand(5, 7) for _ in range(n)]  # noqa: E731
    return dict(params=params, grads=[torch.randn(5, 7).to(dtype) for _ in range(n)],
                masters=[p.float() for p in params] if master else [], exp_avgs=fp32(), exp_avg_sqs=fp32(),
                max_exp_avg_sqs=fp32() if amsgrad else [], steps=[torch.ones(()) for _ in range(n)], lr=1e-3,
                lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled_weight_decay=True,
                amsgrad=amsgrad, maximize=False, grad_scale=None, found_inf=None)


def test_adam_op_passes_opcheck():
    torch.library.opcheck(_ops.adam_step, tuple(adam_args().values()))
    torch.library.opcheck(_ops.adam_step, tuple(adam_args(dtype=torch.float32, amsgrad=False, master=False).values()))


@pytest.mark.parametrize("change, message", [
    (lambda a: a["grads"].pop(), r"^grads: has 2 tensors \(expected 3, one per param\)"),
    (lambda a: a["masters"].__setitem__(1, torch.zeros(7, 5)), r"^masters\[1\]: has shape \(7, 5\)"),
    (lambda a: a["exp_avgs"].__setitem__(2, torch.zeros(7, 5).t()), r"^exp_avgs\[2\]: has shape \(5, 7\), strides"),
    (lambda a: a["exp_avg_sqs"].__setitem__(0, torch.zeros(5, 7, dtype=torch.float64)),
     r"^exp_avg_sqs\[0\]: dtype torch.float64 is not supported"),
    (lambda a: a["params"].__setitem__(1, torch.zeros(5, 7)), r"^params\[1\]: dtype torch.float32"),
    (lambda a: a["grads"].__setitem__(0, torch.zeros(5, 7, dtype=torch.float16)), r"^grads\[0\]: dtype"),
    (lambda a: a["steps"].__setitem__(0, torch.ones(2)), r"^steps\[0\]: has shape \(2,\)"),
    (lambda a: a.update(found_inf=torch.zeros((), dtype=torch.float16)), r"^found_inf: dtype"),
    (lambda a: a.update(amsgrad=False), r"^max_exp_avg_sqs: given without amsgrad"),
], ids=["lengths", "shape", "strides", "state-dtype", "param-dtype", "grad-dtype", "step", "flag", "amsgrad"])
def test_adam_op_refuses_what_the_kernel_would_misread(change, message):
    args = adam_args()
    change(args)
    before = [p.clone() for p in args["params"]]
    with pytest.raises((TypeError, ValueError), match=message):
        _ops.adam_step(**args)
    for p, b in zip(args["params"], before):
        assert torch.equal(p, b)


def test_a_float_lr_changed_by_a_scheduler_compiles_once_more_as_in_torch(request):
    # torch.optim recompiles once and then takes the float lr as a symbolic input; a custom op's
    # float argument would be specialized at every change (the recompile limit after 8 steps).
    from torch._dynamo.testing import CompileCounter

    counts = {}
    for cls in (torch.optim.AdamW, fasttl.optim.AdamW):
        torch._dynamo.reset()
        g = seeded(request)
        model = make_model(torch.float32, g)
        twin = make_model(torch.float32, g)
        twin.load_state_dict(model.state_dict())
        opt, eager = cls(model.parameters(), lr=0.01), cls(twin.parameters(), lr=0.01)
        schedulers = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.9) for o in (opt, eager)]
        counter = CompileCounter()
        step = torch.compile(opt.step, backend=counter)
        for i in range(10):
            for m in (model, twin):
                set_grads(m, torch.Generator().manual_seed(i))
            step()
            eager.step()
            for s in schedulers:
                s.step()
        counts[cls] = counter.frame_count
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # inductor reorders fp32 math
    assert counts[fasttl.optim.AdamW] <= counts[torch.optim.AdamW] <= 2, counts


def test_torch_optims_arguments_are_taken():
    params = [torch.nn.Parameter(torch.randn(5, 3))]
    import numpy as np

    fasttl.optim.AdamW(params, 1e-3, (0.9, 0.99), 1e-8, 0.01, True)  # amsgrad, positional as in torch
    fasttl.optim.AdamW(params, lr=np.float32(1e-3), betas=(torch.tensor(0.9), torch.tensor(0.999)),
                       weight_decay=torch.tensor(0.01))
    # torch.optim.Adam(decoupled_weight_decay=True) is AdamW: the same steps
    a = [torch.nn.Parameter(p.detach().clone()) for p in params]
    b = [torch.nn.Parameter(p.detach().clone()) for p in params]
    adam = fasttl.optim.Adam(a, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
    adamw = fasttl.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(_))
        a[0].grad, b[0].grad = grad.clone(), grad.clone()
        adam.step()
        adamw.step()
    assert torch.equal(a[0], b[0])
