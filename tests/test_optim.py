"""fasttl.optim.Adam/AdamW against torch.optim.Adam/AdamW run in float64."""
import copy

import pytest
import torch

import fasttl
from conftest import devices

SIZES = [1, 300, 4097, 65537, 1_000_003]
PAIRS = {"AdamW": (fasttl.optim.AdamW, torch.optim.AdamW), "Adam": (fasttl.optim.Adam, torch.optim.Adam)}


def run_pair(name, sizes, steps, device, **options):
    """Runs fasttl (fp32) and torch (float64) on the same random inputs, rounded to fp32 once so
    both start from the same numbers; returns both param lists and a per-element allowance for
    the one ill-conditioned spot (see below)."""
    ours_cls, ref_cls = PAIRS[name]
    init = [torch.randn(n, dtype=torch.float64).float().double() for n in sizes]
    ours = [p.float().to(device).requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    opt = ours_cls(ours, **options)
    ref_opt = ref_cls(ref, **options)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=7, gamma=0.5)
    slack = [torch.zeros_like(p) for p in init]
    for step in range(steps):
        for a, b, extra in zip(ours, ref, slack):
            g = torch.randn(b.shape, dtype=torch.float64).float().double()
            if step == 0 and name == "Adam" and options.get("weight_decay"):
                # Adam's first update is lr * g' / (|g'| + eps) with g' = +-g + wd * p: where g'
                # nearly cancels, the fp32 rounding of that sum (a few ulps of |g| + wd |p|) moves
                # the update by up to lr. torch's own fp32 Adam does the same; allow it there.
                wd, eps = options["weight_decay"], options.get("eps", 1e-8)
                rounding = 4 * 2.0 ** -24 * (g.abs() + wd * b.detach().abs())
                effective = (-g if options.get("maximize") else g) + wd * b.detach()
                extra += 4 * options["lr"] * torch.clamp(rounding / (effective.abs() + eps), max=2.0)
            a.grad = g.float().to(device)
            b.grad = g
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
    return ours, ref, slack


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("options", [
    dict(lr=1e-2, weight_decay=0.0),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=3e-3, weight_decay=0.05, amsgrad=True),
    dict(lr=1e-2, weight_decay=0.01, maximize=True),
    dict(lr=1e-2, betas=(0.5, 0.9), eps=1e-6),
], ids=["plain", "decay", "amsgrad", "maximize", "betas-eps"])
def test_fp32_matches_torch_float64(device, name, options):
    ours, ref, slack = run_pair(name, SIZES, 22, device, **options)
    for a, b, extra in zip(ours, ref, slack):
        # 22 steps of lr <= 1e-2: fp32 rounding of the state stays far below 1e-5.
        error = (a.detach().cpu().double() - b.detach()).abs()
        allowed = 2e-5 + 1e-5 * b.detach().abs() + extra
        worst = int((error - allowed).argmax())
        assert bool((error <= allowed).all()), (f"element {worst}: fasttl {float(a.detach().cpu()[worst])}, "
                                                f"float64 {float(b.detach()[worst])}, allowed {float(allowed[worst])}")
        assert float(extra.mean()) < 1e-6  # the allowance stays confined to the rare cancelling spots
        assert not torch.equal(a.detach().cpu().double(), torch.zeros_like(b))


@pytest.mark.parametrize("name", list(PAIRS))
def test_small_mlp_trains_like_torch(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 33), torch.nn.GELU(), torch.nn.Linear(33, 5))
    ref_model = copy.deepcopy(model).double()
    ours_cls, ref_cls = PAIRS[name]
    opt = ours_cls(model.parameters(), lr=5e-3, weight_decay=0.02)
    ref_opt = ref_cls(ref_model.parameters(), lr=5e-3, weight_decay=0.02)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    for _ in range(25):
        for m, o, inp in ((model, opt, x), (ref_model, ref_opt, x.double())):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(inp), y).backward()
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a.detach().double(), b.detach(), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_dtype", ["param", "fp32"])
def test_low_precision_params_track_an_fp32_master(device, dtype, grad_dtype):
    sizes = [1, 300, 4097, 65537]
    init = [torch.randn(n) for n in sizes]
    params = [p.to(dtype).to(device).requires_grad_() for p in init]
    if grad_dtype == "fp32":
        if not hasattr(params[0], "grad_dtype"):
            pytest.skip("this torch refuses an fp32 .grad on a low-precision param (grad_dtype came in torch 2.10)")
        for p in params:
            p.grad_dtype = None  # torch >= 2.10 otherwise insists that grads match the param dtype
    ref = [p.to(dtype).float().clone().requires_grad_() for p in init]  # same start as the master
    opt = fasttl.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref, lr=3e-4, weight_decay=0.01)
    start = [p.detach().clone() for p in params]
    direction = [torch.randn(n).sign() for n in sizes]
    for _ in range(21):
        for a, b, d in zip(params, ref, direction):
            # A steady direction plus noise, in the dtype a bf16/fp16 backward would give.
            g = (d * (1 + 0.3 * torch.randn(b.shape))).to(dtype)
            a.grad = g.to(device) if grad_dtype == "param" else g.float().to(device)
            b.grad = g.float()
        opt.step()
        ref_opt.step()
    for a, b, s in zip(params, ref, start):
        master = opt.state[a]["master_param"]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master.cpu(), b.detach(), atol=1e-6, rtol=1e-5)
        # The param is the master rounded to nearest even, bit for bit.
        assert torch.equal(a.detach(), master.to(dtype))
        assert opt.state[a]["exp_avg"].dtype == torch.float32
        # Each 3e-4 step is below half a bf16 ulp for weights above 0.08 in size: a bf16-only
        # update would lose it; the master accumulates 21 of them and the param moves.
        if a.numel() >= 300:
            assert (a.detach() != s).float().mean() > 0.5


def test_bf16_without_master_loses_updates_that_the_master_keeps():
    init = torch.randn(4097).to(torch.bfloat16)
    with_master = init.clone().requires_grad_()
    without = init.clone().requires_grad_()
    opts = [fasttl.optim.AdamW([with_master], lr=1e-5), fasttl.optim.AdamW([without], lr=1e-5, master_weights=False)]
    for _ in range(30):
        g = torch.randn(4097).to(torch.bfloat16)
        with_master.grad, without.grad = g.clone(), g.clone()
        for o in opts:
            o.step()
    assert "master_param" not in opts[1].state[without]
    moved_with = (with_master.detach() != init).float().mean()
    moved_without = (without.detach() != init).float().mean()
    assert moved_with > moved_without


def test_grad_scaler_inf_step_is_skipped_and_scale_backs_off():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    opt = fasttl.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(16, 8).to(torch.bfloat16)

    def step(poison):
        opt.zero_grad()
        scaler.scale(model(x).float().pow(2).mean()).backward()
        if poison:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    step(poison=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: v.clone() for k, v in opt.state[model.weight].items()}
    scale_before = scaler.get_scale()
    step(poison=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in opt.state[model.weight].items():
        assert torch.equal(v, state_before[k]), k
    assert scaler.get_scale() == scale_before * 0.5
    step(poison=False)
    assert not torch.equal(model.weight, before["weight"])


def test_grad_scaler_unscales_inside_the_kernel():
    torch.manual_seed(1)
    init = torch.randn(300)
    a = init.clone().requires_grad_()
    b = init.clone().requires_grad_()
    opt_a = fasttl.optim.AdamW([a], lr=1e-2, weight_decay=0.1)
    opt_b = fasttl.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    g = torch.randn(300)
    a.grad = g * 1024.0
    opt_a.grad_scale, opt_a.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    opt_a.step()
    b.grad = g
    opt_b.step()
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trip_continues_bit_exactly(dtype, amsgrad):
    torch.manual_seed(2)
    init = [torch.randn(n).to(dtype) for n in (300, 4097)]
    grads = [[torch.randn(p.shape).to(dtype) for p in init] for _ in range(10)]

    def make(params):
        return fasttl.optim.AdamW(params, lr=1e-3, weight_decay=0.01, amsgrad=amsgrad)

    straight = [p.clone().requires_grad_() for p in init]
    opt = make(straight)
    for gs in grads:
        for p, g in zip(straight, gs):
            p.grad = g.clone()
        opt.step()

    first = [p.clone().requires_grad_() for p in init]
    opt1 = make(first)
    for gs in grads[:5]:
        for p, g in zip(first, gs):
            p.grad = g.clone()
        opt1.step()
    saved = copy.deepcopy(opt1.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    if dtype != torch.float32:
        assert opt2.state[resumed[0]]["master_param"].dtype == torch.float32
        assert opt2.state[resumed[0]]["exp_avg"].dtype == torch.float32
    for gs in grads[5:]:
        for p, g in zip(resumed, gs):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    for a, b in zip(straight, resumed):
        for key in opt.state[a]:
            assert torch.equal(opt.state[a][key], opt2.state[b][key]), key


def test_torch_adamw_state_dict_loads_for_fp32_params():
    torch.manual_seed(3)
    init = torch.randn(4097)
    grads = [torch.randn(4097) for _ in range(10)]
    ref = init.clone().requires_grad_()
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for g in grads[:5]:
        ref.grad = g.clone()
        ref_opt.step()
    ours = ref.detach().clone().requires_grad_()
    opt = fasttl.optim.AdamW([ours], lr=1e-2, weight_decay=0.1)
    opt.load_state_dict(ref_opt.state_dict())
    for g in grads[5:]:
        ref.grad = g.clone()
        ours.grad = g.clone()
        ref_opt.step()
        opt.step()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_param_groups_tensor_lr_hooks_zero_grad_and_params_without_grad():
    a = torch.randn(10, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    frozen = torch.randn(5, requires_grad=True)
    opt = fasttl.optim.AdamW([{"params": [a], "lr": torch.tensor(0.1)}, {"params": [b, frozen], "lr": 0.0}])
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    a0, b0, f0 = a.detach().clone(), b.detach().clone(), frozen.detach().clone()
    a.grad, b.grad = torch.randn(10), torch.randn(20)
    opt.step()
    assert calls == ["pre", "post"]
    assert not torch.equal(a, a0)
    assert torch.equal(b, b0 * (1 - 0.0))  # lr 0: no move
    assert torch.equal(frozen, f0) and frozen not in opt.state
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_closure_is_called_and_its_loss_returned():
    w = torch.randn(3, requires_grad=True)
    opt = fasttl.optim.Adam([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0 and opt.state[w]["step"].item() == 1


@pytest.mark.parametrize("make, error, match", [
    (lambda p: fasttl.optim.AdamW([p], lr=-1.0), ValueError, "lr"),
    (lambda p: fasttl.optim.AdamW([p], lr=torch.ones(2)), ValueError, "lr"),
    (lambda p: fasttl.optim.AdamW([p], betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    (lambda p: fasttl.optim.AdamW([p], betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    (lambda p: fasttl.optim.AdamW([p], eps=-1e-8), ValueError, "eps"),
    (lambda p: fasttl.optim.AdamW([p], weight_decay=-1), ValueError, "weight_decay"),
    (lambda p: fasttl.optim.AdamW([torch.zeros(3, dtype=torch.complex64, requires_grad=True)]), TypeError, "complex"),
    (lambda p: fasttl.optim.AdamW([torch.zeros(3, dtype=torch.float64, requires_grad=True)]), TypeError, "float64"),
])
def test_bad_arguments_name_what_is_wrong(make, error, match):
    with pytest.raises(error, match=match):
        make(torch.zeros(3, requires_grad=True))


def test_sparse_grad_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = fasttl.optim.AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible (needs params on two devices)")
def test_params_on_two_devices_are_grouped_per_device():
    a = torch.randn(100, requires_grad=True)
    b = torch.randn(100, device="cuda", requires_grad=True)
    ref = [a.detach().clone().requires_grad_(), b.detach().cpu().clone().requires_grad_()]
    opt = fasttl.optim.AdamW([a, b], lr=1e-2)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    for _ in range(5):
        g1, g2 = torch.randn(100), torch.randn(100)
        a.grad, b.grad = g1, g2.cuda()
        ref[0].grad, ref[1].grad = g1, g2
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(a, ref[0])
    torch.testing.assert_close(b.cpu(), ref[1], atol=1e-6, rtol=1e-6)


def test_channels_last_params_match_torch():
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    ref = torch.nn.Conv2d(3, 8, 3)
    ref.load_state_dict(conv.state_dict())
    assert not conv.weight.is_contiguous()
    opt = fasttl.optim.AdamW(conv.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x = torch.randn(4, 3, 9, 9)
    for _ in range(5):
        for model, o, inp in ((conv, opt, x.contiguous(memory_format=torch.channels_last)), (ref, ref_opt, x)):
            o.zero_grad()
            model(inp).square().mean().backward()
            o.step()
    torch.testing.assert_close(conv.weight, ref.weight, atol=1e-6, rtol=1e-5)
    assert opt.state[conv.weight]["exp_avg"].stride() == conv.weight.stride()


# ---- load_state_dict checks a state against the params before any of it is loaded ------------------
def _stepped(make, params, steps=2):
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt


def _fasttl_dict(shapes, dtype=torch.float32, **options):
    params = [torch.randn(s).to(dtype).requires_grad_() for s in shapes]
    return _stepped(lambda ps: fasttl.optim.AdamW(ps, lr=1e-2, **options), params).state_dict()


def _torch_dict(shapes):
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    return _stepped(lambda ps: torch.optim.AdamW(ps, lr=1e-2), params).state_dict()


def _edited(state_dict, key, value):
    state_dict = copy.deepcopy(state_dict)
    if value is None:
        del state_dict["state"][0][key]
    else:
        state_dict["state"][0][key] = value
    return state_dict


# Each case: (the saved state dict, the shapes and dtype of the params it is loaded into), the
# error, and what the message must name. Those with larger params overran the state before.
LOAD_BAD = {
    "fasttl_dict_smaller_params": (lambda: _fasttl_dict([(4,), (3,)]), [(100_000,), (300_000,)], torch.float32,
                                   ValueError, (r"param_groups\[0\]\.params\[0\]\['exp_avg'\]: has shape \(4,\) "
                                                r"\(expected the param's shape \(100000,\)\)")),
    "torch_dict_smaller_params": (lambda: _torch_dict([(5,), (3,)]), [(5,), (300_000,)], torch.float32,
                                  ValueError, r"params\[1\]\['exp_avg'\]: has shape \(3,\) .*\(300000,\)"),
    "bf16_master_smaller": (lambda: _fasttl_dict([(4,)], torch.bfloat16), [(200_000,)], torch.bfloat16,
                            ValueError, r"params\[0\]\['master_param'\]: has shape \(4,\)"),
    "same_numel_other_shape": (lambda: _fasttl_dict([(4, 6)]), [(6, 4)], torch.float32,
                               ValueError, r"\['exp_avg'\]: has shape \(4, 6\) .*\(6, 4\)"),
    "exp_avg_int64": (lambda: _edited(_fasttl_dict([(5,)]), "exp_avg", torch.zeros(5, dtype=torch.long)), [(5,)],
                      torch.float32, TypeError, r"params\[0\]\['exp_avg'\]: got torch.int64"),
    "exp_avg_sq_missing": (lambda: _edited(_fasttl_dict([(5,)]), "exp_avg_sq", None), [(5,)], torch.float32,
                           ValueError, r"params\[0\]: state lacks 'exp_avg_sq'"),
    "exp_avg_on_meta": (lambda: _edited(_fasttl_dict([(5,)]), "exp_avg", torch.zeros(5, device="meta")), [(5,)],
                        torch.float32, ValueError, r"\['exp_avg'\]: is on the meta device"),
    "step_negative": (lambda: _edited(_fasttl_dict([(5,)]), "step", torch.tensor(-1.0)), [(5,)], torch.float32,
                      ValueError, r"\['step'\]: is -1.0"),
    "step_nan": (lambda: _edited(_fasttl_dict([(5,)]), "step", float("nan")), [(5,)], torch.float32,
                 ValueError, r"\['step'\]: is nan"),
    "step_a_vector": (lambda: _edited(_fasttl_dict([(5,)]), "step", torch.ones(2)), [(5,)], torch.float32,
                      ValueError, r"\['step'\]: got a torch.float32 tensor of shape \(2,\)"),
    "exp_avg_nan": (lambda: _edited(_fasttl_dict([(5,)]), "exp_avg", torch.tensor([0.1, float("nan"), 0, 0, 0])),
                    [(5,)], torch.float32, ValueError, r"\['exp_avg'\]: holds NaN or infinite values"),
    "exp_avg_sq_negative": (lambda: _edited(_fasttl_dict([(5,)]), "exp_avg_sq", torch.tensor([0.1, -1.0, 0, 0, 0])),
                            [(5,)], torch.float32, ValueError, r"\['exp_avg_sq'\]: holds negative values"),
    "fewer_params": (lambda: _fasttl_dict([(5,)]), [(5,), (5,)], torch.float32,
                     ValueError, r"param_groups\[0\]: has 1 params \(expected 2\)"),
    "bad_saved_lr": (lambda: {**_fasttl_dict([(5,)]), "param_groups": [{**_fasttl_dict([(5,)])["param_groups"][0],
                                                                        "lr": -1.0}]},
                     [(5,)], torch.float32, ValueError, r"param_groups\[0\]\.lr: "),
}


@pytest.mark.parametrize("case", list(LOAD_BAD))
def test_load_state_dict_refuses_a_state_that_does_not_fit_and_changes_nothing(case):
    make_dict, shapes, dtype, error, match = LOAD_BAD[case]
    saved = make_dict()
    params = [torch.randn(s).to(dtype).requires_grad_() for s in shapes]
    opt = _stepped(lambda ps: fasttl.optim.AdamW(ps, lr=3e-3), params, steps=1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, state in before["state"].items():
        assert all(torch.equal(value, after["state"][index][key]) for key, value in state.items())


def test_load_state_dict_checks_each_group_not_only_the_total():
    saved_params = [torch.randn(5, requires_grad=True) for _ in range(3)]
    saved = _stepped(lambda ps: fasttl.optim.AdamW([{"params": ps[:1]}, {"params": ps[1:]}]), saved_params)
    params = [torch.randn(5, requires_grad=True) for _ in range(3)]
    opt = fasttl.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]: has 1 params \(expected 2\)"):
        opt.load_state_dict(saved.state_dict())
    assert not opt.state


def test_load_state_dict_takes_a_step_saved_as_a_number():
    saved = _fasttl_dict([(5,)])
    init = torch.randn(5)
    as_tensor = fasttl.optim.AdamW([init.clone().requires_grad_()])
    as_number = fasttl.optim.AdamW([init.clone().requires_grad_()])
    as_tensor.load_state_dict(copy.deepcopy(saved))
    as_number.load_state_dict(_edited(saved, "step", int(saved["state"][0]["step"])))
    grad = torch.randn(5)
    for opt in (as_tensor, as_number):
        opt.param_groups[0]["params"][0].grad = grad.clone()
        opt.step()
    assert torch.equal(as_tensor.param_groups[0]["params"][0], as_number.param_groups[0]["params"][0])
    assert as_number.state[as_number.param_groups[0]["params"][0]]["step"].dtype == torch.float32


def test_torch_adamw_state_dict_loads_for_bf16_params():
    # A torch.optim dict has no master_weights: the group takes this optimizer's default.
    saved = _torch_dict([(300,)])
    param = torch.randn(300).bfloat16().requires_grad_()
    opt = fasttl.optim.AdamW([param], lr=1e-2)
    opt.load_state_dict(saved)
    param.grad = torch.randn_like(param)
    opt.step()
    state = opt.state[param]
    assert opt.param_groups[0]["master_weights"] is None and state["master_param"].dtype == torch.float32
    # The loaded fp32 moment carried on: m = beta1 * m_saved + (1 - beta1) * g.
    expected = 0.9 * saved["state"][0]["exp_avg"] + 0.1 * param.grad.float()
    torch.testing.assert_close(state["exp_avg"], expected, rtol=1e-6, atol=1e-7)
    assert float(state["step"]) == 3.0


def test_torch_optim_keywords_switch_with_one_word():
    params = [torch.nn.Parameter(torch.randn(5))]
    for options in ({"foreach": True}, {"fused": True}, {"foreach": False, "fused": None}, {"capturable": False}):
        fasttl.optim.AdamW(params, lr=1e-3, **options)
        fasttl.optim.Adam(params, lr=1e-3, **options)
    with pytest.raises(ValueError, match="differentiable: "):
        fasttl.optim.AdamW(params, differentiable=True)
    with pytest.raises(ValueError, match="capturable: "):
        fasttl.optim.Adam(params, capturable=True)
    with pytest.raises(TypeError):
        fasttl.optim.AdamW(params, momentum=0.9)  # not an Adam keyword at all


def test_found_inf_above_one_skips_exactly_one_step():
    # GradScaler sums found_inf over devices; any nonzero count is one skipped step, never two.
    p = torch.nn.Parameter(torch.randn(8))
    opt = fasttl.optim.AdamW([p], lr=1e-2)
    p.grad = torch.randn(8)
    opt.step()
    before = p.detach().clone()
    step = float(opt.state[p]["step"])
    opt.found_inf, opt.grad_scale = torch.tensor(2.0), torch.tensor(1.0)
    p.grad = torch.randn(8)
    opt.step()
    assert torch.equal(p.detach(), before) and float(opt.state[p]["step"]) == step
