"""The strategy registry, after timm's model registry: each strategy is one class in its own
module under fasttl/transfer/strategies/, registered with @register, holding its defaults, help
text, display name, own options, `train` and `load`. Nothing else in fasttl names a strategy,
and no strategy imports another (tests/test_layers.py).

The registry imports no strategy: fasttl/transfer/__init__.py imports them all (the strategies
package) before any of its modules runs, so the lookups below always see every one, and the
strategies import the registry, never the other way round."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fasttl.util.errors import OptionError

if TYPE_CHECKING:  # what `load` returns; nothing here uses it
    from fasttl.transfer.trained import TrainedModel


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
    joins_backbones = False         # trains on pooled features alone: takes a concatenation "a+b" as --backbone
    requires: Tuple[str, ...] = ()  # options it can't run without
    baseline: bool = False      # the from-scratch model every transfer is judged beside
    outputs: Tuple[str, ...] = ()   # the names of the models it saves: NAME.safetensors, NAME.checkpoint.pt
    training_options: Tuple[str, ...] = ("epochs", "lr", "batch_size", "precision")  # the generic ones it reads

    def preflight(self, cfg) -> None:
        """Checks what the options need beyond each one's own check (a backbone's stage count, a
        teacher's strategy), before any data is read or the run folder is made."""

    def check_data(self, cfg, dataset) -> None:
        """Checks what the options need of the data read (a teacher never trained on its test
        images), before the run folder is made: a refusal leaves nothing behind to --resume."""

    def inputs_identity(self, cfg) -> Dict[str, object]:
        """What its checkpoints depend on beyond the options and --data (a teacher's weights, the
        target domain's images), as run_identity records it: --resume refuses when it changed."""
        return {}

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
