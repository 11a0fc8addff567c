"""The epoch loop every trainer in fasttl shares: seeded epochs, per-epoch evaluation, progress
bar, and a checkpoint after each epoch so an interrupted run resumes where it stopped."""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from fasttl.util.checks import finite
from fasttl.util.errors import UserError
from fasttl.util.seeds import torch_seed

Record = Dict[str, float]


class DivergedError(UserError, ValueError):
    """Training produced a non-finite loss: the weights are no longer usable."""


class EpochStats:
    """Running loss and accuracy of one training epoch."""

    def __init__(self):
        self.loss, self.correct, self.seen = 0.0, 0, 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += float(loss.detach()) * labels.numel()
        self.correct += int((logits.argmax(1) == labels).sum())
        self.seen += labels.numel()

    def record(self) -> Record:
        return {"train_loss": self.loss / max(1, self.seen), "train_accuracy": self.correct / max(1, self.seen),
                "images": self.seen}


def eval_record(logits: torch.Tensor, labels: torch.Tensor) -> Record:
    """The per-epoch evaluation every trainer reports: loss and accuracy on the held-out split."""
    import torch.nn.functional as F

    logits, labels = logits.float().cpu(), labels.cpu()
    return {"eval_loss": float(F.cross_entropy(logits, labels)),
            "eval_accuracy": float((logits.argmax(1) == labels).float().mean())}


def step(loss: torch.Tensor, optimizer, scheduler=None) -> None:
    """Backward and one optimizer (and scheduler) step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def last_step_lr(optimizer) -> Callable[[], float]:
    """A function giving the learning rate the optimizer's last step used (its first group's), what
    an epoch's record shows: read after the epoch, the lr is the schedule one step on, which after
    the last epoch is past the schedule's end (OneCycleLR's cosine turns back up there)."""
    used = {}
    optimizer.register_step_post_hook(lambda opt, args, kwargs: used.__setitem__("lr", opt.param_groups[0]["lr"]))
    return lambda: float(used.get("lr", optimizer.param_groups[0]["lr"]))


def nonfinite_weight(module: nn.Module) -> Optional[str]:
    """The name of the first float weight of `module` (as loaded, in its own dtype) that holds NaN
    or inf, else None."""
    for name, tensor in module.state_dict().items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def fit(model: nn.Module, optimizer, scheduler, epochs: int, train_epoch: Callable[[int], Record],
        evaluate: Optional[Callable[[], Record]] = None, *, seed: int = 0, checkpoint=None, resume: bool = False,
        progress: bool = True, description: str = "train", extra_state: Optional[nn.Module] = None,
        patience: Optional[int] = None, start: Optional[dict] = None) -> List[Record]:
    """Runs epochs [start, epochs): `train_epoch(epoch)` returns the epoch's train loss/accuracy
    (and "images"), `evaluate()` the eval loss/accuracy. Each epoch starts from a seed derived
    from (seed, epoch), so a resumed run repeats an uninterrupted one. `checkpoint` (an object
    with save/load) receives model, optimizer, scheduler and history after every epoch.
    `patience`: stop `patience` epochs after the best eval accuracy (early stopping on a
    validation split; the caller keeps or retrains the best epoch). `start`: a state to go on
    from, as a checkpoint holds it (LP-FT's sweep winner after its first epoch), in place of
    resuming from `checkpoint`."""
    history: List[Record] = []
    first = 0
    if start is None and resume and checkpoint is not None:
        start = checkpoint.load()
    if start is not None:
        path = checkpoint.path if checkpoint is not None else "the state to start from"
        history, first = _restore(start, path, epochs, model, optimizer, scheduler, extra_state)
    bar = None
    if progress and first < epochs:
        from tqdm import tqdm

        bar = tqdm(total=epochs, initial=first, unit="epoch", desc=description, dynamic_ncols=True)
    used = last_step_lr(optimizer)
    for epoch in range(first, epochs):
        torch.manual_seed(torch_seed(seed * 1_000_003 + epoch))
        model.train()
        started = time.perf_counter()
        record: Record = {"epoch": epoch + 1}
        record.update(train_epoch(epoch))
        record["seconds"] = time.perf_counter() - started
        record["lr"] = used()
        if "images" in record:
            record["images_per_s"] = record["images"] / max(record["seconds"], 1e-9)
        _check_finite(record, "train_loss", epoch, description, optimizer)
        if evaluate is not None:
            model.eval()
            record.update(evaluate())
            _check_finite(record, "eval_loss", epoch, description, optimizer)
        history.append(record)
        if checkpoint is not None:
            checkpoint.save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": None if scheduler is None else scheduler.state_dict(),
                             "extra": None if extra_state is None else extra_state.state_dict(),
                             "history": history})
        if bar is not None:
            bar.set_postfix({k.replace("_accuracy", "_acc"): f"{v:.3f}" for k, v in record.items()
                             if k.endswith(("loss", "accuracy"))})
            bar.update(1)
        if patience is not None and evaluate is not None and _epochs_since_best(history) >= patience:
            break
    if bar is not None:
        bar.close()
    return history


class CheckpointError(UserError, ValueError):
    """A checkpoint of this run whose content is not what fasttl saves: resuming from it would
    crash or train from damaged state."""


def _restore(state: dict, path: str, epochs: int, model: nn.Module, optimizer, scheduler,
             extra_state: Optional[nn.Module]) -> Tuple[List[Record], int]:
    """Loads a checkpoint's state into the run's objects after checking it is what `fit` saved:
    the epoch reached (1..epochs), one history record of finite numbers per epoch, state dicts
    that load; else a CheckpointError (DivergedError for NaN weights) naming the file."""
    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {why} (a damaged checkpoint); delete it, or run again with --overwrite")

    epoch, history = state.get("epoch"), state.get("history")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= epochs:
        raise damaged(f"its epoch is {epoch!r}, not one of this run's 1..{epochs}")
    if not isinstance(history, list) or len(history) != epoch:
        raise damaged(f"its history is not one record for each of its {epoch} epochs")
    for number, record in enumerate(history, 1):
        if not isinstance(record, dict) or record.get("epoch") != number or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and finite(v) for v in record.values()):
            raise damaged(f"its history record {number} is not that epoch's numbers")
    parts = [("model", model), ("optimizer", optimizer), ("scheduler", scheduler), ("extra", extra_state)]
    for key, target in parts:
        if target is None or (key in ("scheduler", "extra") and state.get(key) is None):
            continue
        fresh = _settings(key, target)
        try:
            target.load_state_dict(state[key])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            first = " ".join(str(exc).split())[:200]
            raise damaged(f"its {key} state does not load ({type(exc).__name__}: {first})") from None
        changed = _changed_setting(key, fresh, _settings(key, target), target)
        if changed:
            raise damaged(f"its {key} state holds {changed}, not this run's")
        if key == "model":
            bad = nonfinite_weight(model)  # a damaged checkpoint must not end as NaN weights
            if bad is not None:
                raise DivergedError(f"{path}: '{bad}' holds NaN or infinite weights (a damaged checkpoint); delete "
                                    "it, or run again with --overwrite")
    return [dict(record) for record in history], epoch


# What an optimizer or a schedule changes as it runs: a checkpoint may hold any value of these, and
# only these; every other setting must be the one this run made (a schedule of another length, an
# edited annealing function or weight decay would train another run silently).
_PROGRESS = {"optimizer": ("lr", "betas", "params"),
             "scheduler": ("last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial")}
# An optimizer group's settings compared (torch's implementation flags, foreach, fused, capturable
# or differentiable, are the loading optimizer's own, whatever a checkpoint says).
_GROUP_SETTINGS = ("weight_decay", "eps", "amsgrad", "maximize", "decoupled_weight_decay", "initial_lr", "max_lr",
                   "min_lr", "max_momentum", "base_momentum")


def _settings(key: str, target) -> Optional[dict]:
    """The settings of an optimizer (per group) or a schedule, progress left out; None for others."""
    import copy

    if key not in _PROGRESS:
        return None
    state = target.state_dict()
    if key == "optimizer":
        return {"groups": [{k: copy.deepcopy(v) for k, v in group.items() if k in _GROUP_SETTINGS}
                           for group in state["param_groups"]]}
    return {k: copy.deepcopy(v) for k, v in state.items() if k not in _PROGRESS[key]}


def _changed_setting(key: str, fresh: Optional[dict], loaded: Optional[dict], target) -> Optional[str]:
    """What the loaded state changed of the run's own settings, or None; the progress too where it
    is bounded (a schedule's step within its length, a learning rate within the schedule's peak)."""
    if fresh is None:
        return None
    if loaded != fresh:
        name = next((k for k in sorted(set(fresh) | set(loaded)) if fresh.get(k) != loaded.get(k)), "?")
        if name == "groups":
            group = next(i for i, (a, b) in enumerate(zip(fresh["groups"], loaded["groups"])) if a != b)
            name = next(k for k in sorted(set(fresh["groups"][group]) | set(loaded["groups"][group]))
                        if fresh["groups"][group].get(k) != loaded["groups"][group].get(k))
        return f"another {name}"
    if key == "scheduler":
        state = target.state_dict()
        total = state.get("total_steps")
        if not isinstance(state.get("last_epoch"), int) or state["last_epoch"] < -1 or \
                (total is not None and state["last_epoch"] > total):
            return f"a step {state.get('last_epoch')!r} outside its schedule"
    if key == "optimizer":
        for group in target.param_groups:
            peak = max(float(group.get(k) or 0.0) for k in ("initial_lr", "max_lr")) or None
            lr = group["lr"]  # a checkpoint's int of 400 digits is no float: not finite
            if not finite(lr if isinstance(lr, int) else float(lr)) or (peak is not None and lr > peak * (1 + 1e-6)):
                return f"a learning rate {group['lr']!r} above the schedule's peak"
    return None


def _epochs_since_best(history: List[Record]) -> int:
    accuracies = [record["eval_accuracy"] for record in history]
    return len(accuracies) - 1 - accuracies.index(max(accuracies))


def _check_finite(record: Record, key: str, epoch: int, description: str, optimizer) -> None:
    """Stops a diverged run before its NaN weights are checkpointed or reported."""
    value = record.get(key)
    if value is not None and not math.isfinite(value):
        lr = max(float(g["lr"]) for g in optimizer.param_groups)
        raise DivergedError(f"{description}: training diverged in epoch {epoch + 1} ({key} is {value}, lr {lr:g}); "
                            "run again with a smaller --lr (or, if it diverged at once, look for NaN or "
                            "infinite values in the inputs)")


def one_cycle(optimizer, max_lr: float, total_steps: int, pct_start: float):
    """torch's OneCycleLR (warmup, then cosine annealing) for any number of steps. OneCycleLR
    divides by zero when a phase has no length (10 steps at pct_start 0.1: a 200-image dataset
    at batch 256 for 10 epochs), so each phase gets at least two steps; under four steps in all
    the learning rate stays at max_lr."""
    total_steps = max(1, int(total_steps))
    if total_steps < 4:
        for group in optimizer.param_groups:
            group["lr"] = max_lr
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    warmup = min(max(pct_start * total_steps, 2.0), total_steps - 2.0)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                               pct_start=warmup / total_steps)


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int):
    """Linear warmup to each group's lr, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
