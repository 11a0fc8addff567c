"""Mixed-precision fused Adam and AdamW: bf16/fp16 params with fp32 master weights and fp32
moments, updated in one fused pass per (device, dtype) group."""
from __future__ import annotations

import math
import numbers
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from fasttl import _op_checks, _ops

_FP32_STATE = ("master_param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _number(value):
    """A Python or numpy real number, or a one-element tensor, as a float; None for anything else
    (torch.optim takes all of them)."""
    if isinstance(value, Tensor):
        return float(value) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int of 400 digits: beyond a double, as inf is
            return math.inf if value > 0 else -math.inf
    return None


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"lr: a tensor lr must hold one value (0-dim), got shape {tuple(lr.shape)}")
    lr_value = _number(lr)
    if lr_value is None:
        raise TypeError(f"lr: expected a float or a 0-dim tensor, got {type(lr).__name__}")
    if not 0.0 <= lr_value <= FLOAT32_MAX:  # an infinite lr (or one float32 rounds to inf) gives NaN params
        raise ValueError(f"lr: expected a finite number >= 0 (within float32's range), got {lr_value}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        value = _number(beta)
        if value is None or not 0.0 <= value < 1.0:
            raise ValueError(f"betas[{i}]: expected a number in [0, 1), got {beta!r}")
    value = _number(eps)
    if value is None or not value >= 0.0:
        raise ValueError(f"eps: expected >= 0, got {eps!r}")
    value = _number(weight_decay)
    if value is None or not value >= 0.0 or math.isinf(value):
        raise ValueError(f"weight_decay: expected a finite number >= 0, got {weight_decay!r}")


def _set_number(name: str, value) -> float:
    """A param group's value as the step reads it: a number, as torch.optim's arithmetic takes;
    text such as "0.1", which float() would quietly read, raises as torch.optim does."""
    if isinstance(value, numbers.Real) or isinstance(value, Tensor) and value.numel() == 1:
        return float(value)
    raise TypeError(f"{name}: a param group's {name} must be a number, got {type(value).__name__} {value!r} (set "
                    "after the optimizer was made?)")


def _group_values(group: dict, read_lr: bool) -> tuple:
    """(lr, beta1, beta2, eps, weight_decay) of a param group, checked at each step as the
    constructor checks them, before any state moves: a script or scheduler may set them after
    construction (an lr of 1e39 or a beta of 1 make every parameter NaN; torch.optim raises on
    them, and on a third beta). `read_lr` False: lr is a tensor (read on the device), 0.0 here."""
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r:.80} (set after the optimizer was "
                         "made?)")
    values = [_set_number(name, value) for name, value in (
        ("lr", group["lr"] if read_lr else 0.0), ("betas[0]", betas[0]), ("betas[1]", betas[1]), ("eps", group["eps"]),
        ("weight_decay", group["weight_decay"]))]
    _check_hyperparameters(values[0], values[1:3], values[3], values[4])
    return tuple(values)


class _FusedAdamBase(torch.optim.Optimizer):
    """Shared machinery of :class:`Adam` and :class:`AdamW`; see AdamW for the details."""

    _decoupled_weight_decay = True
    # torch.amp.GradScaler then hands this optimizer `grad_scale` and `found_inf`, and the kernel
    # unscales the grads and skips an inf/nan step itself (no separate unscale pass).
    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, master_weights: Optional[bool] = None,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False):
        # torch.optim's keywords, so switching is a one-word change: fasttl is always one fused pass
        # (foreach and fused change nothing); differentiable asks for what it does not do. A CUDA
        # step never syncs with the host (step counts, a tensor lr and GradScaler's flags stay on
        # the device), so capturable=True only adds torch's rule that the params be on CUDA.
        if differentiable:
            raise ValueError("differentiable: fasttl's fused step is not differentiable; use torch.optim.AdamW "
                             "for higher-order optimization")
        _check_hyperparameters(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad),
                        maximize=bool(maximize), master_weights=master_weights, capturable=bool(capturable))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()  # a refused group is not kept half-added
            raise

    @staticmethod
    def _check_group(group: dict) -> None:
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        first = {}
        for index, p in enumerate(group["params"]):
            if first.setdefault(id(p), index) != index:  # torch.optim steps it twice in turn; one fused step can't
                raise ValueError(f"params[{index}]: the same tensor as params[{first[id(p)]}]; list each parameter "
                                 "once")
            if p.is_complex():
                raise TypeError(f"params[{index}]: complex parameters are not supported (dtype {p.dtype})")
            if p.dtype not in _op_checks.PARAM_DTYPES:
                raise TypeError(f"params[{index}]: expected float32, bfloat16 or float16, got {p.dtype}")
            if not _op_checks.is_dense(p):
                raise ValueError(f"params[{index}]: expected a contiguous or channels_last parameter "
                                 "(call .contiguous() on it)")
            if group.get("capturable"):
                _check_capturable(p.device, f"params[{index}]")

    @staticmethod
    def _uses_master(group: dict, p: Tensor) -> bool:
        # fp32 params are their own master; None means on for bf16/fp16.
        return p.dtype != torch.float32 and group["master_weights"] is not False

    def _init_state(self, group: dict, p: Tensor) -> Dict[str, Tensor]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            # State, masters and grads share the param's memory layout, so one flat index fits them all.
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if self._uses_master(group, p) and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True, memory_format=torch.preserve_format)
        return state

    def _init_group(self, group: dict, params: List[Tensor], grads: List[Tensor], masters: List[Optional[Tensor]],
                    exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor],
                    steps: List[Tensor]) -> bool:
        """Fills the lists with every param of `group` that has a grad and its state (created at
        its first step). Named and shaped as torch.optim's: torch.compile runs this method
        eagerly instead of tracing it, so a compiled step is one graph that does not recompile
        as the state fills in."""
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("fasttl.optim: sparse gradients are not supported; use torch.optim.SparseAdam")
            if p.grad.dtype not in (p.dtype, torch.float32):
                raise TypeError(f"grad of a {p.dtype} param: expected {p.dtype} or float32, got {p.grad.dtype}")
            state = self._init_state(group, p)
            # A param re-laid since (model.to(memory_format=...)): its state follows, as in torch.optim.
            self._restore_layout(state, p)
            params.append(p)
            grads.append(_like_param(p.grad, p))
            masters.append(state.get("master_param"))
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        return False

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step over every param that has a grad."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], [], []
            self._init_group(group, params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            buckets: Dict[Tuple, List[int]] = {}
            for i, p in enumerate(params):
                buckets.setdefault((p.device, p.dtype, grads[i].dtype, masters[i] is not None), []).append(i)
            for (device, _, _, has_master), members in buckets.items():
                pick = lambda values: [values[i] for i in members] if values else []  # noqa: E731
                self._step_bucket(group, device, pick(params), pick(grads), pick(masters) if has_master else [],
                                  pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs), pick(steps),
                                  grad_scale, found_inf)
        return loss

    def _step_bucket(self, group: dict, device: torch.device, params, grads, masters, exp_avgs, exp_avg_sqs,
                     max_exp_avg_sqs, steps, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        if group.get("capturable") and not torch.compiler.is_compiling():
            # torch.compile marks every group capturable while it traces (CPU ones too), and
            # torch.optim skips this check there as well.
            _check_capturable(device, "params")
        scale = None if grad_scale is None else torch.as_tensor(grad_scale, dtype=torch.float32).to(device)
        # GradScaler sums the per-device flags for optimizers that take found_inf: any nonzero
        # means "skip". The kernel reads the flag itself and the step count goes back by exactly
        # one with a tensor op: no host read on any device, and nothing for torch.compile to break on.
        inf = None if found_inf is None else (found_inf.to(device=device) != 0).to(torch.float32).reshape(())
        lr = group["lr"]
        # (compiling: a float lr is a symbolic input, read as a tensor below; float() would specialize it)
        lr_value, beta1, beta2, eps, weight_decay = _group_values(
            group, read_lr=not isinstance(lr, Tensor) and not torch.compiler.is_compiling())
        torch._foreach_add_(steps, 1)
        if isinstance(lr, Tensor):
            lr_tensor = lr.detach().to(device=device, dtype=torch.float32).reshape(())
        elif torch.compiler.is_compiling():
            # A float lr that a scheduler changes becomes a symbolic input after one recompile (as in
            # torch.optim); a float argument of a custom op would be specialized at every change.
            lr_tensor = torch.ones((), dtype=torch.float32, device=device) * lr
        else:
            lr_tensor = None
        _ops.adam_step(params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                       0.0 if lr_tensor is not None else lr_value, lr_tensor, beta1, beta2, eps, weight_decay,
                       self._decoupled_weight_decay,
                       bool(group["amsgrad"]), bool(group["maximize"]), scale, inf)
        if inf is not None:
            torch._foreach_sub_(steps, [inf] * len(steps))

    def _restore_layout(self, state: Dict[str, Tensor], p: Tensor) -> None:
        for key in _FP32_STATE:
            if key in state:
                state[key] = _like_param(state[key], p)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state dict of this optimizer, or of torch.optim.Adam/AdamW for fp32 params.

        The state is checked against these params before anything is loaded (a mismatch raises
        ValueError/TypeError and leaves the optimizer as it was). torch.optim.Optimizer.load_state_dict
        casts floating state to each param's dtype, which would round fp32 master weights and
        moments to bf16; they are restored exactly here, so a reloaded run continues bit for bit."""
        self._check_loadable(state_dict)
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        exact = {
            i: {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in saved_state[i].items()
                if k in _FP32_STATE or k == "step"}
            for i in saved_ids if i in saved_state
        }
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)  # a torch.optim dict has no master_weights
        groups_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for saved_id, p in zip(saved_ids, params):
            if not exact.get(saved_id):
                continue
            state = self.state[p]
            for key, value in exact[saved_id].items():
                if key in _FP32_STATE:
                    state[key] = value.to(device=p.device, dtype=torch.float32)
                else:  # step: a 0-dim fp32 tensor on the param's device, also when saved as a number
                    state[key] = torch.as_tensor(value).to(device=p.device, dtype=torch.float32).reshape(())
            self._restore_layout(state, p)
            self._init_state(groups_of[id(p)], p)

    def _check_loadable(self, state_dict: dict) -> None:
        """Refuses a state that does not fit these params. The kernel walks every state tensor as
        p.numel() fp32 values, so one of another size would be read and written out of bounds."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("state_dict: lacks 'state' or 'param_groups' (expected an optimizer state dict)")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_state, dict) or not isinstance(saved_groups, (list, tuple)) or \
                not all(isinstance(g, dict) and "params" in g for g in saved_groups):
            raise ValueError("state_dict: malformed 'state' or 'param_groups' (expected a dict and a list of "
                             "groups with 'params')")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict: has {len(saved_groups)} param groups (expected {len(self.param_groups)})")
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param_groups[{g}]: has {len(saved['params'])} params "
                                 f"(expected {len(group['params'])})")
            merged = {**self.defaults, **saved}
            try:
                _check_hyperparameters(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
            except (TypeError, ValueError) as error:
                raise type(error)(f"param_groups[{g}].{error}") from None
            for i, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
                _check_param_state(f"param_groups[{g}].params[{i}]", saved_state.get(saved_id, {}), p)


def _check_param_state(where: str, state, p: Tensor) -> None:
    """One param's saved state: step, exp_avg, exp_avg_sq (and optional max_exp_avg_sq,
    master_param) as real floating tensors of the param's shape, step one finite count >= 0."""
    if not isinstance(state, dict):
        raise TypeError(f"{where}: state is a {type(state).__name__} (expected a dict)")
    if not state:
        return  # never stepped: initialized at the first step
    for key in ("step", "exp_avg", "exp_avg_sq"):
        if key not in state:
            raise ValueError(f"{where}: state lacks '{key}' (expected step, exp_avg and exp_avg_sq)")
    _check_step(f"{where}['step']", state["step"])
    for key in _FP32_STATE:
        if key not in state:
            continue
        value = state[key]
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{where}['{key}']: got {getattr(value, 'dtype', type(value).__name__)} "
                            "(expected a floating-point tensor)")
        if value.shape != p.shape:
            raise ValueError(f"{where}['{key}']: has shape {tuple(value.shape)} "
                             f"(expected the param's shape {tuple(p.shape)})")
        if value.device.type == "meta":
            raise ValueError(f"{where}['{key}']: is on the meta device (expected a tensor with data)")
        # One pass over the state at load time: a NaN here would turn every param NaN at the next step;
        # checked as the fp32 state holds it (a float64 1e300 loads as inf).
        if not bool(torch.isfinite(value.to(torch.float32)).all()):
            raise ValueError(f"{where}['{key}']: holds NaN or infinite values, or values beyond float32's range "
                             "(expected finite optimizer state)")
        if key in ("exp_avg_sq", "max_exp_avg_sq") and bool((value < 0).any()):
            raise ValueError(f"{where}['{key}']: holds negative values (a second moment is >= 0)")


def _check_step(where: str, step) -> None:
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.dtype == torch.bool or step.is_complex() or step.device.type == "meta":
            raise ValueError(f"{where}: got a {step.dtype} tensor of shape {tuple(step.shape)} on {step.device} "
                             "(expected one real step count)")
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or not (_op_checks.finite(step) and step >= 0):
        raise ValueError(f"{where}: is {step!r} (expected a finite step count >= 0)")


def _check_capturable(device: torch.device, where: str) -> None:
    # torch.optim refuses the same (an assertion in its step): a CUDA graph captures CUDA work only.
    if device.type != "cuda":
        raise ValueError(f"capturable: {where} on {device} (CUDA-graph capture needs CUDA params, as in "
                         "torch.optim; pass capturable=False)")


def _like_param(t: Tensor, p: Tensor) -> Tensor:
    """`t` with the param's strides (a copy only when they differ)."""
    if t.stride() == p.stride():
        return t
    out = torch.empty_like(p, dtype=t.dtype, memory_format=torch.preserve_format)
    return out.copy_(t)


class AdamW(_FusedAdamBase):
    r"""AdamW (Loshchilov and Hutter 2019) with fp32 master weights, fused on CPU and CUDA.

    For each param with grad ``g`` (divided by the GradScaler's scale, negated when
    ``maximize``), fp32 master weight ``w`` and fp32 moments ``m``, ``v``, at step ``t``::

        w = w - lr * weight_decay * w
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2            (amsgrad: v_max = max(v_max, v), used below)
        w = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
        param = round_to_nearest_even(w)             (bf16/fp16 params)

    * fp32 params: the same results as ``torch.optim.AdamW`` within fp32 rounding.
    * bf16/fp16 params: an fp32 master copy per param (``master_weights=None`` turns it on for
      them; ``False`` updates the low-precision param directly), fp32 moments. One pass reads the
      grad (param dtype or fp32), master, m, v and writes master, m, v and the rounded param, so
      small updates are not lost to bf16 rounding.
    * One native call per (device, dtype) group and step: OpenMP over chunks of all tensors on
      the CPU, a multi-tensor-apply launch on CUDA.
    * ``torch.amp.GradScaler`` works with it: the kernel unscales the grads and skips the whole
      step when an inf/nan was found (on CUDA without a host sync).
    * torch.optim's ``foreach`` and ``fused`` keywords are accepted and change nothing (the step
      is always one fused pass); ``differentiable=True`` is refused.
    * No host sync on CUDA: step counts stay on the device, a tensor ``lr`` on the GPU is read by
      the kernel, and GradScaler's skip is decided on the device. ``capturable=True`` (CUDA params
      only, as in torch.optim) lets the step be captured in a CUDA graph; give ``lr`` as a CUDA
      tensor there if a scheduler is to change it between replays.

    Example::

        model = MyNet().to(torch.bfloat16)
        opt = fasttl.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        scaler = torch.amp.GradScaler("cuda")
        scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
    """

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, master_weights: Optional[bool] = None,
                 **torch_options):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad=amsgrad, maximize=maximize,
                         master_weights=master_weights, **torch_options)


class Adam(_FusedAdamBase):
    """Adam with L2 weight decay (added to the gradient, as ``torch.optim.Adam``), otherwise
    exactly :class:`AdamW`: fp32 master weights for bf16/fp16 params, fused, GradScaler aware."""

    _decoupled_weight_decay = False

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad: bool = False, *, maximize: bool = False, master_weights: Optional[bool] = None,
                 decoupled_weight_decay: bool = False, **torch_options):
        # torch.optim.Adam's keyword: decoupled_weight_decay=True is AdamW
        self._decoupled_weight_decay = bool(decoupled_weight_decay)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad=amsgrad, maximize=maximize,
                         master_weights=master_weights, **torch_options)
