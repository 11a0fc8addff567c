"""Heads tuned on a validation split carved from the training features, then refit on train +
validation: the exact L2 path for `linear` (fasttl.heads.solver; with few images, cross-validated
beside shrinkage LDA, fasttl.heads.shrinkage), the weight decay and epoch count by early stopping
for `mlp`. The test split is never seen here."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fasttl.heads import imbalance, parts, shrinkage, solver
from fasttl.cache.cache import FeatureCache
from fasttl.heads.train import make_head, on_device, predict_views, train_head
from fasttl.data.splits import VALIDATION_FRACTION, stratified_folds, validation_split

# Weight decays the MLP head tries (AdamW, decoupled); each run stops early on validation.
MLP_WEIGHT_DECAYS = (1e-4, 1e-2, 1e-1)
MLP_PATIENCE = 3
# L-BFGS iterations of a linear head solved from zero (fit_linear); it stops sooner at tolerance.
COLD_START_ITERATIONS = 1000
# Below this many training images in the smallest class, the linear head's setting (and logit
# adjustment) is chosen by stratified K-fold cross-validation on every training image, among the L2
# strengths and shrinkage LDA, instead of on one 10% split, whose few images make the choice noise:
# on images never drawn it chose as well or better at every size measured, 10 to 200 a class
# (benchmarks/RESULTS.md, "Few images"; with the L2 strengths alone, only below 30).
CROSS_VALIDATION_BELOW = 201
CROSS_VALIDATION_FOLDS = 5


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
    # cross-validated heads: the chosen setting's out-of-fold logits of every training image, as scored
    out_of_fold: Optional[torch.Tensor] = None


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
                mirrored_validation: Optional[FeatureCache] = None,
                cross_validate_below: Optional[int] = None) -> TunedHead:
    """The linear head: L2 strength chosen on validation along the regularization path (the
    records: its points), then solved again on all training rows from the chosen solution; its
    `train_part`, the chosen solution on the train part alone (its own scaling; its validation
    accuracy is choice["val_accuracy"]), is what LP-FT fine-tunes from, with the validation part
    held out for early stopping. `mirrored_validation`: see split_views. Data whose smallest class
    has fewer than `cross_validate_below` images (default CROSS_VALIDATION_BELOW) is cross-validated
    instead of split."""
    device = torch.device(device)
    train_views, val_views, info = split_views(views, seed, mirrored_validation)
    widths = (views[0].fingerprint.get("layout") or {}).get("channels") or [views[0].feature_dim]
    if not val_views:
        return _untuned_linear(views, info, device)
    below = CROSS_VALIDATION_BELOW if cross_validate_below is None else cross_validate_below
    if _smallest_class(views[0].labels) < below:
        return _cross_validated_linear(views, train_views, val_views, info, seed, device)
    x, y = _rows(train_views, device)
    mean, std = solver.block_scaling(x, widths)
    x = (x - mean) / std
    val = [(v.all_features().to(device) - mean) / std for v in val_views]
    num_classes = len(views[0].classes)
    long_tailed = imbalance.imbalance_ratio(views[0].labels, num_classes) >= imbalance.IMBALANCE_RATIO
    weight_decay, path, solution = solver.fit_path(x, y, val, val_views[0].labels.to(device), num_classes,
                                                   progress=progress,
                                                   prior=imbalance.log_prior(y, num_classes) if long_tailed else None)
    chosen = next(p for p in path if p["weight_decay"] == weight_decay)
    tau = chosen.get("logit_adjustment", 0.0)
    train_part = make_head("linear", solution[0].shape[1], num_classes, mean.cpu(), std.cpu())
    with torch.no_grad():
        train_part[-1].weight.copy_(solution[0])
        train_part[-1].bias.copy_(solution[1])
    imbalance.adjust_bias(train_part, tau, imbalance.log_prior(y, num_classes))
    del x, val
    x, y = _rows(views, device)
    mean, std = solver.block_scaling(x, widths)
    weight, bias, refit = solver.solve((x - mean) / std, y, num_classes, weight_decay, init=solution)
    head = make_head("linear", x.shape[1], num_classes, mean.cpu(), std.cpu())
    with torch.no_grad():
        head[-1].weight.copy_(weight)
        head[-1].bias.copy_(bias)
    imbalance.adjust_bias(head, tau, imbalance.log_prior(y, num_classes))
    choice = dict(validation=info, weight_decay=weight_decay, val_accuracy=chosen["val_accuracy"],
                  val_loss=chosen["val_loss"], solver=solver.SOLVER, refit_seconds=refit["seconds"],
                  refit_on="train + validation")
    if long_tailed:  # the adjusted train part's own scores: what LP-FT's first evaluation sees
        choice.update(class_imbalance=imbalance.imbalance_ratio(views[0].labels, num_classes), logit_adjustment=tau,
                      val_balanced_accuracy=chosen["val_balanced_accuracy"],
                      **_scores_on(train_part.to(device), val_views, device))
    return TunedHead(head.to(device), path, choice, train_part=train_part.to(device))


def _scores_on(head: nn.Module, val_views: Sequence[FeatureCache], device) -> Dict[str, float]:
    """The validation accuracy and loss of `head` as LP-FT's first evaluation measures them."""
    logits, labels = predict_views(head.eval(), list(val_views), device)
    return {"val_accuracy": float((logits.argmax(1) == labels).float().mean()),
            "val_loss": float(F.cross_entropy(logits.float(), labels))}


def _smallest_class(labels: torch.Tensor) -> int:
    counts = torch.bincount(labels.long().cpu())
    return int(counts[counts > 0].min())


def _out_of_fold_logits(views: Sequence[FeatureCache], widths, seed: int,
                        device) -> Dict[Tuple[str, float], torch.Tensor]:
    """Each setting's logits of every training image from the fold model that did not see it
    (every setting in every fold, so that each has every image): the settings are
    ("weight_decay", strength) along the whole L2 path and ("shrinkage", s) of shrinkage LDA."""
    labels = views[0].labels
    num_classes, rows = len(views[0].classes), len(labels)
    # With a class of one image, the fold holding it out fits LDA without that class: its logit
    # there is a constant, not a score to compare with the L2 path's (round-robin folds give every
    # other fold's training part each class of two images or more).
    offers_lda = _smallest_class(labels) >= 2
    pooled: Dict[Tuple[str, float], torch.Tensor] = {}
    for held in stratified_folds(labels, CROSS_VALIDATION_FOLDS, seed):
        if not held:
            continue
        kept = sorted(set(range(rows)) - set(held))
        x, y = _rows([v.subset(kept) for v in views], device)
        mean, std = solver.block_scaling(x, widths)
        x = (x - mean) / std
        val = [(v.subset(held).all_features().to(device) - mean) / std for v in views]
        fold_logits: Dict[float, torch.Tensor] = {}
        solver.fit_path(x, y, val, labels[held].to(device), num_classes,
                        patience=len(solver.WEIGHT_DECAYS), val_logits=fold_logits)
        settings = {("weight_decay", strength): logits for strength, logits in fold_logits.items()}
        if offers_lda:
            for strength, (weight, bias) in zip(shrinkage.SHRINKAGES,
                                                shrinkage.fit_path(x, y, num_classes, shrinkage.SHRINKAGES)):
                settings[("shrinkage", strength)] = solver.view_logits(weight, bias, val)
        for setting, logits in settings.items():
            pooled.setdefault(setting, torch.empty(rows, num_classes, device=device))[held] = logits
    return pooled


def _cross_validated_linear(views: Sequence[FeatureCache], train_views, val_views, info: dict, seed: int,
                            device) -> TunedHead:
    """The linear head with its setting (an L2 strength, or shrinkage LDA at a shrinkage: whichever
    scores best) chosen on out-of-fold logits of every training image
    (scored on the training views; a --mirror-views test run's mirrored validation images cover
    one split only and are not used here); `train_part` is the chosen strength fit on the train
    part of the run's validation split, which LP-FT still holds out for early stopping; the
    choice's val_accuracy and val_loss are that head's on the split (cv_accuracy, cv_loss: the
    pooled out-of-fold scores the strength was chosen by). Features of several backbones side by
    side get one such head per backbone, averaged (_averaged_parts)."""
    layouts = parts.part_layouts(views[0])
    if len(layouts) > 1:
        return _averaged_parts(views, train_views, val_views, info, seed, device, [name for name, _ in layouts])
    labels = views[0].labels.to(device)
    num_classes = len(views[0].classes)
    widths = (views[0].fingerprint.get("layout") or {}).get("channels") or [views[0].feature_dim]
    long_tailed = imbalance.imbalance_ratio(labels, num_classes) >= imbalance.IMBALANCE_RATIO
    prior = imbalance.log_prior(labels, num_classes)
    records, best, best_logits = [], None, None
    for (setting, strength), logits in _out_of_fold_logits(views, widths, seed, device).items():
        calibration = {}
        if setting == "shrinkage":  # LDA's logits grow with the width: scored (and shipped) at their temperature
            calibration["temperature"] = shrinkage.temperature(logits, labels)
            logits = logits / calibration["temperature"]
        record = {setting: strength, **calibration,
                  "val_accuracy": float((logits.argmax(1) == labels).float().mean()),
                  "val_loss": float(F.cross_entropy(logits, labels)), "folds": CROSS_VALIDATION_FOLDS}
        score = (record["val_accuracy"], -record["val_loss"])
        if long_tailed:
            record.update(imbalance.best_adjustment(logits, labels, prior, num_classes))
            score = (record["val_balanced_accuracy"], -record["val_balanced_loss"])
        records.append(record)
        if best is None or score > best[0]:
            best, best_logits = (score, record), logits
    chosen = best[1]
    tau = chosen.get("logit_adjustment", 0.0)
    setting = {key: chosen[key] for key in (*SETTINGS, "temperature") if key in chosen}
    head = fit_setting(views, setting, device).head
    train_part = fit_setting(train_views, setting, device).head
    imbalance.adjust_bias(head, tau, prior)
    imbalance.adjust_bias(train_part, tau, imbalance.log_prior(train_views[0].labels, num_classes))
    choice = dict(validation=dict(info, folds=CROSS_VALIDATION_FOLDS, cross_validated_images=len(labels)),
                  **setting, **_scores_on(train_part, val_views, device),
                  cv_accuracy=chosen["val_accuracy"], cv_loss=chosen["val_loss"],
                  solver=shrinkage.SOLVER if "shrinkage" in setting else solver.SOLVER,
                  refit_on="train + validation", cross_validation=f"{CROSS_VALIDATION_FOLDS}-fold, stratified")
    if long_tailed:
        choice.update(class_imbalance=imbalance.imbalance_ratio(labels, num_classes), logit_adjustment=tau,
                      val_balanced_accuracy=chosen["val_balanced_accuracy"])
    return TunedHead(head, records, choice, train_part=train_part,
                     out_of_fold=best_logits - tau * prior.to(best_logits.device))


def _averaged_parts(views, train_views, val_views, info: dict, seed: int, device, names: List[str]) -> TunedHead:
    """One cross-validated linear head per backbone of features side by side (each its own setting
    chosen on its own out-of-fold logits), averaged into one head (fasttl.heads.parts); the
    choice's cv_accuracy and cv_loss are the average's, from the parts' out-of-fold logits."""
    tuned = [_cross_validated_linear(*part, info, seed, device) for part in
             zip(parts.split_views(views), parts.split_views(train_views), parts.split_views(val_views))]
    labels = views[0].labels.to(device)
    logits = torch.stack([F.log_softmax(t.out_of_fold, 1) for t in tuned]).mean(0)
    train_part = parts.average([t.train_part for t in tuned])
    kept = (*SETTINGS, "temperature", "logit_adjustment", "cv_accuracy", "cv_loss", "val_balanced_accuracy")
    choice = dict(validation=tuned[0].choice["validation"], solver=parts.AVERAGED_SOLVER,
                  parts=[dict(backbone=name, solver=t.choice["solver"], **{k: t.choice[k] for k in kept
                                                                            if k in t.choice})
                         for name, t in zip(names, tuned)],
                  **_scores_on(train_part, val_views, device),
                  cv_accuracy=float((logits.argmax(1) == labels).float().mean()),
                  cv_loss=float(F.nll_loss(logits, labels)), refit_on="train + validation",
                  cross_validation=tuned[0].choice["cross_validation"])
    if "class_imbalance" in tuned[0].choice:
        choice.update(class_imbalance=tuned[0].choice["class_imbalance"],
                      val_balanced_accuracy=imbalance.balanced_scores(logits, labels, len(views[0].classes))[
                          "val_balanced_accuracy"])
    records = [dict(record, part=name) for name, t in zip(names, tuned) for record in t.records]
    return TunedHead(parts.average([t.head for t in tuned]), records, choice, train_part=train_part,
                     out_of_fold=logits)


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
    return TunedHead(head.to(device), [record], dict(weight_decay=weight_decay, solver=solver.SOLVER))


def fit_shrinkage(views: Sequence[FeatureCache], strength: float, device="cpu", temperature: float = 1.0) -> TunedHead:
    """The linear head as shrinkage LDA (fasttl.heads.shrinkage) at `strength` on every row of
    `views`, its logits divided by `temperature`, nothing tuned; its one record says what was fit."""
    device = torch.device(device)
    widths = (views[0].fingerprint.get("layout") or {}).get("channels") or [views[0].feature_dim]
    x, y = _rows(views, device)
    mean, std = solver.block_scaling(x, widths)
    started = time.perf_counter()
    weight, bias = shrinkage.fit((x - mean) / std, y, len(views[0].classes), strength)
    head = make_head("linear", x.shape[1], len(views[0].classes), mean.cpu(), std.cpu())
    with torch.no_grad():
        head[-1].weight.copy_(weight / temperature)
        head[-1].bias.copy_(bias / temperature)
    record = {"shrinkage": strength, "temperature": temperature, "seconds": time.perf_counter() - started}
    return TunedHead(head.to(device), [record], dict(shrinkage=strength, temperature=temperature,
                                                     solver=shrinkage.SOLVER))


# What a linear head's fit is set by, and the function that fits it at that setting.
SETTINGS = {"weight_decay": fit_linear, "shrinkage": fit_shrinkage}


def fit_setting(views: Sequence[FeatureCache], setting: Dict[str, float], device="cpu") -> TunedHead:
    """The linear head at `setting`, {"weight_decay": w} or {"shrinkage": s, "temperature": t}
    (the temperature optional), on every row of `views`; {"parts": [setting, ...]}: one head per
    backbone of features side by side, each at its setting, averaged."""
    if "parts" in setting:
        split = parts.split_views(views)
        if len(split) != len(setting["parts"]):
            raise ValueError(f"setting: {len(setting['parts'])} backbones' settings for features of {len(split)}")
        fitted = [fit_setting(part, one, device) for part, one in zip(split, setting["parts"])]
        return TunedHead(parts.average([f.head for f in fitted]), [r for f in fitted for r in f.records],
                         dict(solver=parts.AVERAGED_SOLVER, parts=[f.choice for f in fitted]))
    extra = {key: value for key, value in setting.items() if key not in SETTINGS}
    (key, value), = ((k, v) for k, v in setting.items() if k in SETTINGS)
    return SETTINGS[key](views, value, device, **extra)


def _untuned_linear(views, info, device) -> TunedHead:
    """One image per class: the default strength on all rows (nothing to validate on)."""
    fitted = fit_linear(views, solver.DEFAULT_WEIGHT_DECAY, device)
    choice = dict(validation=info, weight_decay=solver.DEFAULT_WEIGHT_DECAY, solver=solver.SOLVER,
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
    num_classes = len(views[0].classes)
    if imbalance.imbalance_ratio(views[0].labels, num_classes) >= imbalance.IMBALANCE_RATIO:
        part = train_head(train, kind="mlp", epochs=best_epochs, batch_size=batch_size, lr=lr,
                          weight_decay=weight_decay, seed=seed, device=device, progress=False, dtype=dtype).head
        choice.update(_post_hoc_adjustment(head, part, train, val_views, views, device))
    return TunedHead(head, curves, choice)


def _post_hoc_adjustment(head: nn.Module, part: nn.Module, train: FeatureCache, val_views, views, device) -> Dict:
    """Logit adjustment after training (Menon et al.'s post-hoc form) for a head the L2 path does
    not solve: tau chosen on the validation logits of `part` (the chosen settings trained on the
    train part, with its prior), then folded into `head` with the prior of every training row."""
    num_classes = len(train.classes)
    logits, labels = predict_views(part, [on_device(v, torch.device(device)) for v in val_views], device)
    chosen = imbalance.best_adjustment(logits, labels.to(logits.device),
                                       imbalance.log_prior(train.labels, num_classes), num_classes)
    everything = torch.cat([v.labels for v in views])
    imbalance.adjust_bias(head, chosen["logit_adjustment"], imbalance.log_prior(everything, num_classes))
    return dict(chosen, class_imbalance=imbalance.imbalance_ratio(views[0].labels, num_classes))


def predict_split(head: nn.Module, views: Sequence[FeatureCache], device="cpu"):
    """(logits averaged over the views, labels) of a split: the one evaluation on test."""
    return predict_views(head, [on_device(v, torch.device(device)) for v in views], device)
