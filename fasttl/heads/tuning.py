"""Heads tuned on a validation split carved from the training features, then refit on train +
validation: the exact L2 path for `linear` (fasttl.heads.solver), the weight decay and epoch
count by early stopping for `mlp`. The test split is never seen here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from fasttl.heads import solver
from fasttl.cache.cache import FeatureCache
from fasttl.heads.train import make_head, on_device, predict_views, train_head
from fasttl.data.splits import VALIDATION_FRACTION, validation_split

# Weight decays the MLP head tries (AdamW, decoupled); each run stops early on validation.
MLP_WEIGHT_DECAYS = (1e-4, 1e-2, 1e-1)
MLP_PATIENCE = 3
# L-BFGS iterations of a linear head solved from zero (fit_linear); it stops sooner at tolerance.
COLD_START_ITERATIONS = 1000


@dataclass
class TunedHead:
    """A head and how it was made: `head` (refit on every training row), `records` (the L2 path's
    points, the MLP's validation curves, or the solver's record of an untuned fit), `choice` (the
    settings chosen and their validation scores); for the linear probe also `train_part`, the
    chosen head fit on the train part alone (LP-FT fine-tunes from it)."""

    head: nn.Module
    records: List[Dict]
    choice: Dict
    train_part: Optional[nn.Module] = None


def split_views(views: Sequence[FeatureCache], seed: int, mirrored_validation: Optional[FeatureCache] = None
                ) -> Tuple[List[FeatureCache], List[FeatureCache], dict]:
    """The views of a training split cut into (train, validation) views by one stratified,
    seeded split of the samples: a sample's plain and mirrored rows fall on the same side.
    `mirrored_validation` (--mirror-views test: only the validation images are extracted
    mirrored, at the rows `validation_split` picks) joins the validation views, so validation
    scores average the two views as the test split's do."""
    train_rows, val_rows = validation_split(views[0].labels, seed)
    info = {"fraction": VALIDATION_FRACTION, "train_images": len(train_rows), "validation_images": len(val_rows),
            "seed": seed, "views": len(views)}
    if not val_rows:  # every class has one image: nothing can be held out, and nothing is tuned
        info["note"] = "no class has two images: no validation split, default settings"
        return [v.subset(train_rows) for v in views], [], info
    val_views = [v.subset(val_rows) for v in views]
    if mirrored_validation is not None and len(views) == 1:
        if len(mirrored_validation) != len(val_rows):
            raise ValueError(f"mirrored validation view: {len(mirrored_validation)} rows for {len(val_rows)} "
                             "validation images")
        val_views.append(mirrored_validation)
        info["views"] = 2
    return [v.subset(train_rows) for v in views], val_views, info


def _rows(views: Sequence[FeatureCache], device) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.cat([v.all_features().to(device) for v in views]),
            torch.cat([v.labels.to(device) for v in views]))


def tune_linear(views: Sequence[FeatureCache], *, seed: int = 0, device="cpu", progress: bool = True,
                mirrored_validation: Optional[FeatureCache] = None) -> TunedHead:
    """The linear head: L2 strength chosen on validation along the regularization path (the
    records: its points), then solved again on all training rows from the chosen solution; its
    `train_part`, the chosen solution on the train part alone (its own scaling; its validation
    accuracy is choice["val_accuracy"]), is what LP-FT fine-tunes from, with the validation part
    held out for early stopping. `mirrored_validation`: see split_views."""
    device = torch.device(device)
    train_views, val_views, info = split_views(views, seed, mirrored_validation)
    widths = (views[0].fingerprint.get("layout") or {}).get("channels") or [views[0].feature_dim]
    if not val_views:
        return _untuned_linear(views, info, device)
    x, y = _rows(train_views, device)
    mean, std = solver.block_scaling(x, widths)
    x = (x - mean) / std
    val = [(v.all_features().to(device) - mean) / std for v in val_views]
    num_classes = len(views[0].classes)
    weight_decay, path, solution = solver.fit_path(x, y, val, val_views[0].labels.to(device), num_classes,
                                                   progress=progress)
    del x, val
    train_part = make_head("linear", solution[0].shape[1], num_classes, mean.cpu(), std.cpu())
    with torch.no_grad():
        train_part[-1].weight.copy_(solution[0])
        train_part[-1].bias.copy_(solution[1])
    x, y = _rows(views, device)
    mean, std = solver.block_scaling(x, widths)
    weight, bias, refit = solver.solve((x - mean) / std, y, num_classes, weight_decay, init=solution)
    head = make_head("linear", x.shape[1], num_classes, mean.cpu(), std.cpu())
    with torch.no_grad():
        head[-1].weight.copy_(weight)
        head[-1].bias.copy_(bias)
    chosen = next(p for p in path if p["weight_decay"] == weight_decay)
    choice = dict(validation=info, weight_decay=weight_decay, val_accuracy=chosen["val_accuracy"],
                  val_loss=chosen["val_loss"], solver="L-BFGS, full batch", refit_seconds=refit["seconds"],
                  refit_on="train + validation")
    return TunedHead(head.to(device), path, choice, train_part=train_part.to(device))


def fit_linear(views: Sequence[FeatureCache], weight_decay: float, device="cpu") -> TunedHead:
    """The linear head at a given L2 strength on every row of `views`, nothing tuned (cross-fitting
    refits a tuned run's head this way); its one record is the solver's."""
    device = torch.device(device)
    widths = (views[0].fingerprint.get("layout") or {}).get("channels") or [views[0].feature_dim]
    x, y = _rows(views, device)
    mean, std = solver.block_scaling(x, widths)
    # From zero, L-BFGS needs more iterations than a point of the path (which starts from the last
    # point's solution): on 8,000 CIFAR-10 images 100 left the logits 0.16 from the optimum on average.
    weight, bias, record = solver.solve((x - mean) / std, y, len(views[0].classes), weight_decay,
                                        max_iter=COLD_START_ITERATIONS)
    head = make_head("linear", x.shape[1], len(views[0].classes), mean.cpu(), std.cpu())
    with torch.no_grad():
        head[-1].weight.copy_(weight)
        head[-1].bias.copy_(bias)
    return TunedHead(head.to(device), [record], dict(weight_decay=weight_decay, solver="L-BFGS, full batch"))


def _untuned_linear(views, info, device) -> TunedHead:
    """One image per class: the default strength on all rows (nothing to validate on)."""
    fitted = fit_linear(views, solver.DEFAULT_WEIGHT_DECAY, device)
    choice = dict(validation=info, weight_decay=solver.DEFAULT_WEIGHT_DECAY, solver="L-BFGS, full batch",
                  refit_on="train (no validation split)")
    return TunedHead(fitted.head, fitted.records, choice, train_part=fitted.head)


def tune_mlp(views: Sequence[FeatureCache], *, epochs: int, batch_size: int, lr: float, seed: int = 0, device="cpu",
             dtype: torch.dtype = torch.float32, progress: bool = True, checkpoint=None,
             resume: bool = False, mirrored_validation: Optional[FeatureCache] = None) -> TunedHead:
    """The MLP head: for each weight decay, training on the train part with the validation
    accuracy read after every epoch (stopping MLP_PATIENCE epochs after the best); the best
    (weight decay, epoch count) is then trained again on train + validation; the records are the
    validation curves. `mirrored_validation`: see split_views."""
    train_views, val_views, info = split_views(views, seed, mirrored_validation)
    if not val_views:  # one image per class: the first weight decay for the given epochs
        everything = FeatureCache.concat(list(views)) if len(views) > 1 else views[0]
        fit = train_head(everything, kind="mlp", epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=MLP_WEIGHT_DECAYS[0], seed=seed, device=device, progress=progress,
                         dtype=dtype, checkpoint=checkpoint, resume=resume)
        return TunedHead(fit.head, fit.history, dict(validation=info, weight_decay=MLP_WEIGHT_DECAYS[0], epochs=epochs,
                                             refit_on="train (no validation split)"))
    train = FeatureCache.concat(train_views) if len(train_views) > 1 else train_views[0]
    curves, best = [], None
    for weight_decay in MLP_WEIGHT_DECAYS:
        history = train_head(train, kind="mlp", epochs=epochs, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, seed=seed, device=device, eval_cache=val_views,
                             progress=progress, dtype=dtype, patience=MLP_PATIENCE).history
        for record in history:
            record = {("val_" + k[5:] if k.startswith("eval_") else k): v for k, v in record.items()}
            curves.append(dict(record, weight_decay=weight_decay))
            score = (record["val_accuracy"], -record["val_loss"])
            if best is None or score > best[0]:
                best = (score, weight_decay, record["epoch"])
    _, weight_decay, best_epochs = best
    everything = FeatureCache.concat(list(views)) if len(views) > 1 else views[0]
    head = train_head(everything, kind="mlp", epochs=best_epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, seed=seed, device=device, progress=progress, dtype=dtype,
                      checkpoint=checkpoint, resume=resume).head
    choice = dict(validation=info, weight_decay=weight_decay, epochs=best_epochs, val_accuracy=best[0][0],
                  val_loss=-best[0][1], refit_on="train + validation")
    return TunedHead(head, curves, choice)


def predict_split(head: nn.Module, views: Sequence[FeatureCache], device="cpu"):
    """(logits averaged over the views, labels) of a split: the one evaluation on test."""
    return predict_views(head, [on_device(v, torch.device(device)) for v in views], device)
