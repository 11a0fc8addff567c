"""A run's trained model as its strategy's `load` rebuilds it, and what the rest of fasttl asks of
it: logits for predict, eval and export, and, for a distillation teacher, each view's logits,
its cached features and a cross-fitting refit (the teacher's part of the interface: a strategy
that can't teach keeps the defaults)."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn


class TrainedModel:
    """A run's trained model, rebuilt on a device: `module` maps images preprocessed with `spec`
    (a fasttl.data.TransformSpec) to logits over `classes`."""

    def __init__(self, module: nn.Module, spec, classes: List[str], device: torch.device):
        self.module, self.spec, self.classes, self.device = module.eval(), spec, list(classes), device

    @torch.no_grad()
    def logits(self, source, progress: bool = False, split: str = "eval",
               batch_size: int = 128) -> Tuple[Tensor, Tensor]:
        """(logits, labels) on every sample of `source`, in order, on the CPU. `split` names the
        source for models that cache features ("train" reuses a training run's cache)."""
        from fasttl.data import ImageLoader

        dtype = next(self.module.parameters()).dtype
        outputs, labels = [], []
        for images, y in ImageLoader(source, self.spec, batch_size, device=self.device, dtype=dtype):
            outputs.append(self.module(images).float().cpu())
            labels.append(y.cpu())
        return torch.cat(outputs), torch.cat(labels)

    prediction_views = 1  # passes over the images `predict_logits` makes (a progress bar's total)

    @torch.no_grad()
    def predict_logits(self, source, batch_size: Optional[int] = None, bar=None,
                       refused: Optional[dict] = None) -> Tensor:
        """float32 logits (N, classes) on the CPU of new images, as the run computed its test
        predictions, writing nothing (no feature cache): what `fasttl predict` shows. `bar`: a tqdm
        bar advanced per image. `refused`: images the model refuses for themselves go there
        (row -> message) instead of an error (an int8 feature model's; none here)."""
        from fasttl.data import ImageLoader

        dtype = next(self.module.parameters()).dtype
        outputs = []
        for images, _ in ImageLoader(source, self.spec, batch_size or 64, device=self.device, dtype=dtype):
            outputs.append(self.module(images).float().cpu())
            if bar is not None:
                bar.update(len(images))
        return torch.cat(outputs)

    # ---- what distill asks of a teacher (a model that can't teach keeps these defaults) ----------
    @torch.no_grad()
    def view_logits(self, source, mirror: bool, progress: bool = False, split: str = "eval",
                    batch_size: int = 128) -> Tensor:
        """Logits (on the CPU) of one view of every sample of `source`: the images as they are
        (`mirror` False) or horizontally mirrored. A distillation teacher gives them per view, so
        that the student's soft targets are those of the very image it is shown."""
        import dataclasses

        from fasttl.data import ImageLoader

        spec = dataclasses.replace(self.spec, mirror=bool(mirror))
        dtype = next(self.module.parameters()).dtype
        return torch.cat([self.module(images).float().cpu()
                          for images, _ in ImageLoader(source, spec, batch_size, device=self.device, dtype=dtype)])

    def cross_fitter(self) -> Optional[Callable[..., Tensor]]:
        """For distill's --teacher-logits cross-fitted: fit(source, seed, progress, split) giving
        (2, N, C) logits per view (plain, mirrored) of `source`, the teacher's training images,
        each from a model refit without that image's fold (fasttl.transfer.cross_fit); None for a
        model that can't be refit cheaply (only feature-transfer heads can). Making it checks the
        settings the refits need, so every teacher is checked before any of them runs."""
        return None

    def view_features(self, source, mirror: bool, progress: bool = False, split: str = "eval"):
        """The features a --distill-features student matches, (N, D) on the CPU, one view; None
        for a model without cached features (only feature-transfer runs have them)."""
        return None
