"""The strategy registry, after timm's model registry: each strategy is one class in its own
module under fasttl/transfer/strategies/, registered with @register, holding its defaults, help
text, display name, own options, `train` and `load`. Nothing else in fasttl names a strategy,
and no strategy imports another (tests/test_layers.py).

The registry imports no strategy: fasttl/transfer/__init__.py imports them all (the strategies
package) before any of its modules runs, so the lookups below always see every one, and the
strategies import the registry, never the other way round."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from fasttl.util.errors import OptionError


@dataclass
class Outcome:
    """One trained model's results on the evaluated split."""

    name: str
    display: str
    logits: Tensor
    labels: Tensor
    history: List[Dict[str, float]]
    timings: Dict[str, float] = field(default_factory=dict)
    weights: str = ""
    notes: Dict[str, object] = field(default_factory=dict)
    samples: Optional[List[str]] = None  # names of the evaluated images when not the test split's
    device: str = "cpu"
    precision: str = "fp32"


class TrainedModel:
    """A run's trained model, rebuilt on a device: `module` maps images preprocessed with `spec`
    (a fasttl.data.TransformSpec) to logits over `classes`."""

    def __init__(self, module: nn.Module, spec, classes: List[str], device: torch.device):
        self.module, self.spec, self.classes, self.device = module.eval(), spec, list(classes), device

    @torch.no_grad()
    def logits(self, source, progress: bool = False, split: str = "eval", batch_size: int = 128) -> Tuple[Tensor, Tensor]:
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
    def predict_logits(self, source, batch_size: Optional[int] = None, bar=None) -> Tensor:
        """float32 logits (N, classes) on the CPU of new images, as the run computed its test
        predictions, writing nothing (no feature cache): what `fasttl predict` shows. `bar`: a tqdm
        bar advanced per image."""
        from fasttl.data import ImageLoader

        dtype = next(self.module.parameters()).dtype
        outputs = []
        for images, _ in ImageLoader(source, self.spec, batch_size or 64, device=self.device, dtype=dtype):
            outputs.append(self.module(images).float().cpu())
            if bar is not None:
                bar.update(len(images))
        return torch.cat(outputs)


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


class Strategy:
    """One way of carrying a backbone's knowledge to the target task. Subclasses set the class
    attributes and implement `train` and `load`, then register with @register."""

    name: str = ""
    display: str = ""
    help: str = ""
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    distributed: bool = False   # runs under torchrun (DDP)
    can_teach: bool = False     # its run can be distill's teacher
    # Its own run options, {name: fasttl.transfer.options.option(...)}: RunConfig, the `fasttl run`
    # flags and the refusal of an option no trained strategy reads are made from them.
    options: Dict[str, object] = {}
    reads: Tuple[str, ...] = ()     # options declared elsewhere (another strategy's, or scoped) it reads too
    requires: Tuple[str, ...] = ()  # options it can't run without
    baseline: bool = False      # the from-scratch model every transfer is judged beside
    outputs: Tuple[str, ...] = ()   # the names of the models it saves: NAME.safetensors, NAME.checkpoint.pt
    training_options: Tuple[str, ...] = ("epochs", "lr", "batch_size")  # the generic ones it reads

    def reads_option(self, name: str) -> bool:
        return name in self.options or name in self.reads or name in self.requires

    def train(self, cfg, dataset, run_dir: str, device: torch.device) -> List[Outcome]:
        raise NotImplementedError(f"strategy {self.name!r} ({type(self).__name__}) defines no train()")

    def load(self, run_dir: str, device: torch.device) -> TrainedModel:
        raise NotImplementedError(f"strategy {self.name!r} ({type(self).__name__}) defines no load()")


_REGISTRY: Dict[str, Strategy] = {}


def register(cls):
    """Class decorator: makes the strategy available under cls.name."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"strategy {cls.__name__}: needs a name of its own, got {cls.name!r}")
    _REGISTRY[cls.name] = cls()
    return cls


def names() -> Tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Strategy:
    if name not in _REGISTRY:
        raise OptionError(f"strategy: unknown {name!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def baseline() -> Strategy:
    return next(s for s in _REGISTRY.values() if s.baseline)


def output_names() -> Tuple[str, ...]:
    """Every model name a registered strategy saves: what `--overwrite` may remove from a run folder."""
    return tuple(sorted({name for s in _REGISTRY.values() for name in s.outputs}))
