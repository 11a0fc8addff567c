"""Training a linear or MLP head on cached features: the feature-transfer step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasttl.cache.cache import FeatureCache
from fasttl.optim import AdamW
from fasttl.util.checks import a_flag, plain_number
from fasttl.util.seeds import torch_seed

HEADS = ("linear", "mlp")


@dataclass
class HeadFit:
    """What `train_head` returns: the trained `head` and its `history`, one record per epoch."""

    head: nn.Module
    history: List[Dict[str, float]]


class Standardize(nn.Module):
    """Fixed per-feature standardization with the training set's statistics (saved with the head)."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def make_head(kind: str, feature_dim: int, num_classes: int, mean: Optional[Tensor] = None,
              std: Optional[Tensor] = None, hidden: int = 512, dropout: float = 0.2,
              feature_dropout: float = 0.3) -> nn.Sequential:
    """Standardized features into a linear layer, or an MLP. Dropout on the input features (0.3)
    regularizes the linear probe: on CIFAR-10 features it gained 0.5% on a held-out part of the
    training set, with no other setting better."""
    if kind not in HEADS:
        raise ValueError(f"head: expected one of {HEADS}, got {kind!r}")
    mean = torch.zeros(feature_dim) if mean is None else mean
    std = torch.ones(feature_dim) if std is None else std
    layers: List[nn.Module] = [Standardize(mean, std), nn.Dropout(feature_dropout)]
    if kind == "linear":
        layers.append(nn.Linear(feature_dim, num_classes))
    else:
        layers += [nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


# Up to this many bytes of fp32 features, the statistics come from one in-memory copy (as they
# always did); a larger cache is read in chunks from its maps instead (float64 sums, two passes),
# so training a head never copies the whole cache into memory.
STATISTICS_IN_MEMORY_BYTES = 256 << 20


def _streamed_statistics(cache: FeatureCache, chunk: int = 65536) -> Tuple[Tensor, Tensor]:
    n, total = len(cache), torch.zeros(cache.feature_dim, dtype=torch.float64)
    for start in range(0, n, chunk):
        total += cache.gather(torch.arange(start, min(n, start + chunk))).double().sum(0)
    mean = total / n
    squares = torch.zeros_like(mean)
    for start in range(0, n, chunk):
        squares += (cache.gather(torch.arange(start, min(n, start + chunk))).double() - mean).pow(2).sum(0)
    return mean.float(), (squares / (n - 1)).sqrt().float()


def feature_statistics(cache: FeatureCache) -> Tuple[Tensor, Tensor]:
    if len(cache) > 1 and len(cache) * cache.feature_dim * 4 > STATISTICS_IN_MEMORY_BYTES and \
            cache.device.type == "cpu":
        mean, std = _streamed_statistics(cache)
        return mean, std.clamp(min=0.1 * float(std.mean()) + 1e-6)
    features = cache.all_features().float().cpu()
    std = features.std(0) if len(features) > 1 else torch.ones(features.shape[1])
    # ReLU features that are (nearly) always 0 in training must not blow up at test time.
    return features.mean(0), std.clamp(min=0.1 * float(std.mean()) + 1e-6)


@torch.no_grad()
def predict_cache(head: nn.Module, cache: FeatureCache, device="cpu", batch_size: int = 4096) -> Tuple[Tensor, Tensor]:
    """(logits, labels) of a head over a whole cache, in order, on the CPU."""
    head.eval()
    dtype = next(head.parameters()).dtype
    logits, labels = [], []
    for features, y in cache.loader(batch_size, shuffle=False, device=device, out_dtype=dtype):
        logits.append(head(features).float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


@torch.no_grad()
def predict_views(head: nn.Module, views: List[FeatureCache], device="cpu") -> Tuple[Tensor, Tensor]:
    """Logits averaged over views of one split (the plain and, if cached, the mirrored images)."""
    outputs = [predict_cache(head, view, device) for view in views]
    return torch.stack([logits for logits, _ in outputs]).mean(0), outputs[0][1]


def head_epoch(head: nn.Module, loader, optimizer, scheduler=None) -> Dict[str, float]:
    """One epoch of cross-entropy training over (features, labels) batches."""
    from fasttl.heads.fit import EpochStats, step

    stats = EpochStats()
    for features, labels in loader:
        logits = head(features).float()
        loss = F.cross_entropy(logits, labels)
        step(loss, optimizer, scheduler)
        stats.add(loss, logits, labels)
    return stats.record()


def evaluate_head(head: nn.Module, cache: FeatureCache, device="cpu") -> Dict[str, float]:
    from fasttl.heads.fit import DivergedError, eval_record
    from fasttl.util.errors import OptionError

    try:
        logits, labels = predict_cache(head, cache, device)
    except RuntimeError as exc:  # a matmul of the wrong width
        raise OptionError(f"cache: its {cache.feature_dim} features do not fit the head ({str(exc).splitlines()[0]}); "
                          "evaluate on features of the backbone and layout the head was trained on") from None
    if logits.ndim != 2 or logits.shape[1] != len(cache.classes):
        raise OptionError(f"cache: {len(cache.classes)} classes, the head answers {tuple(logits.shape[1:])}; evaluate "
                          "on features of the classes the head was trained on")
    if not bool(torch.isfinite(logits).all()):
        raise DivergedError("head: its logits are not finite (its weights or standardization hold NaN or inf)")
    return eval_record(logits, labels)


def on_device(cache: FeatureCache, device: torch.device) -> FeatureCache:
    """The whole cache on a GPU when it fits there (gathers then run at GPU memory speed); else
    the cache stays in host memory and each batch is copied."""
    if device.type == "cuda" and cache.device != device:
        try:
            return cache.to(device)
        except RuntimeError:
            return cache
    return cache


def train_head(train: FeatureCache, *, kind: str = "linear", epochs: int = 10, batch_size: int = 256,
               lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0, device="cpu",
               eval_cache=None, progress: bool = True, checkpoint=None, resume: bool = False,
               dtype: torch.dtype = torch.float32, patience: Optional[int] = None
               ) -> HeadFit:
    """Trains a ``"linear"`` or ``"mlp"`` head on a feature cache with fasttl's AdamW and a
    one-cycle schedule on ``device`` (params in ``dtype``: bf16 gets fp32 master weights); returns
    a HeadFit: the head and one record per epoch (train loss/accuracy, eval loss/accuracy when ``eval_cache``
    is given, a cache or a list of views of one split whose logits are averaged, seconds). With
    ``checkpoint`` and ``resume`` an interrupted training continues where it stopped; with
    ``patience`` it stops that many epochs after the best eval accuracy."""
    from fasttl.heads.fit import DivergedError, eval_record, fit, one_cycle

    progress, resume = a_flag("progress", progress), a_flag("resume", resume)
    epochs, batch_size, patience, lr, weight_decay, seed = (plain_number(v) for v in (epochs, batch_size, patience, lr,
                                                                                      weight_decay, seed))
    if checkpoint is not None and not all(callable(getattr(checkpoint, m, None)) for m in ("save", "load")):
        raise TypeError(f"checkpoint: expected an object with save(state) and load() (fasttl.transfer.rundir."
                        f"Checkpoint), got {type(checkpoint).__name__}")
    device = _check_arguments(train, eval_cache, kind, epochs, batch_size, lr, weight_decay, seed, device)
    _check_training(train, dtype, patience)
    torch.manual_seed(torch_seed(seed))
    mean, std = feature_statistics(train)
    head = make_head(kind, train.feature_dim, len(train.classes), mean, std).to(device, dtype)
    optimizer = AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    loader = on_device(train, device).loader(batch_size, shuffle=True, seed=torch_seed(seed), device=device,
                                             out_dtype=dtype)
    scheduler = one_cycle(optimizer, lr, epochs * len(loader), pct_start=0.1)
    views = [] if eval_cache is None else list(eval_cache) if isinstance(eval_cache, (list, tuple)) else [eval_cache]
    views = [on_device(view, device) for view in views]

    def train_epoch(epoch: int) -> Dict[str, float]:
        loader.set_epoch(epoch)
        return head_epoch(head, loader, optimizer, scheduler)

    evaluate = (lambda: eval_record(*predict_views(head, views, device))) if views else None
    history = fit(head, optimizer, scheduler, epochs, train_epoch, evaluate, seed=seed, checkpoint=checkpoint,
                  resume=resume, progress=progress, description=f"{kind} head", patience=patience)
    if not all(bool(torch.isfinite(t).all()) for t in head.state_dict().values() if t.is_floating_point()):
        raise DivergedError(f"{kind} head: its weights are not finite after training (lr {lr} too high?); lower lr")
    return HeadFit(head, history)


def _check_arguments(train, eval_cache, kind, epochs, batch_size, lr, weight_decay, seed, device) -> torch.device:
    """train_head's arguments, each named when wrong (as `fasttl run` checks its options): an
    evaluation cache must hold the training cache's classes, in order, and its feature width."""
    from fasttl.util.checks import finite, positive_int, torch_device
    from fasttl.util.errors import OptionError

    if kind not in HEADS:
        raise OptionError(f"kind: expected one of {', '.join(HEADS)}, got {kind!r}")
    positive_int("epochs", epochs, OptionError)
    positive_int("batch_size", batch_size, OptionError)
    for name, value, zero_allowed in (("lr", lr, False), ("weight_decay", weight_decay, True)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite(value) or \
                value < 0 or (value == 0 and not zero_allowed):
            raise OptionError(f"{name}: expected a finite number {'>= 0' if zero_allowed else '> 0'}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise OptionError(f"seed: expected an integer >= 0, got {seed!r}")
    if not isinstance(train, FeatureCache):
        raise TypeError(f"train: expected a FeatureCache (FeatureCache.open(path)), got {type(train).__name__}")
    if len(train) == 0:
        raise OptionError("train: the cache holds no rows; train on a cache with images of every class")
    views = [] if eval_cache is None else list(eval_cache) if isinstance(eval_cache, (list, tuple)) else [eval_cache]
    for view in views:
        if not isinstance(view, FeatureCache):
            raise OptionError(f"eval_cache: expected a FeatureCache (or a list of views of one), got "
                              f"{type(view).__name__}")
        if list(view.classes) != list(train.classes) or view.feature_dim != train.feature_dim:
            raise OptionError(f"eval_cache: its classes {list(view.classes)[:5]} or width {view.feature_dim} "
                              f"are not the training cache's ({list(train.classes)[:5]}, {train.feature_dim}); "
                              "evaluate on features of the same classes, in the same order, from the same backbone")
        if view.made_by() != train.made_by():
            raise OptionError(f"eval_cache: made with another {train.made_differently(view)} than the training "
                              "cache; evaluate on features extracted as the training features were")
    if any(len(view) != len(views[0]) or not torch.equal(view.labels, views[0].labels) for view in views[1:]):
        raise OptionError("eval_cache: its views hold other rows or labels than its first; pass views of one split "
                          "(the plain and the mirrored features of the same images, in the same order)")
    return torch_device(device)


def _check_training(train: FeatureCache, dtype, patience) -> None:
    from fasttl.util.checks import positive_int
    from fasttl.util.errors import OptionError

    if dtype not in (torch.float32, torch.bfloat16):
        raise OptionError(f"dtype: expected torch.float32 or torch.bfloat16 (params; bf16 gets fp32 master weights), "
                          f"got {dtype!r}")
    positive_int("patience", patience, OptionError, optional=True)
