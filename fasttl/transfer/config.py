"""The options of a transfer run, their defaults per strategy, and their checks."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from fasttl import backbones

STRATEGIES = ("linear", "mlp", "finetune", "distill", "dann", "scratch")
_EPOCHS = {"linear": 10, "mlp": 10, "finetune": 3, "distill": 15, "dann": 15, "scratch": 15}
_LR = {"linear": 3e-3, "mlp": 1e-3, "finetune": 1e-3, "distill": 3e-3, "dann": 1e-3, "scratch": 3e-3}
_BATCH = {"linear": 256, "mlp": 256, "finetune": 32, "distill": 64, "dann": 256, "scratch": 64}


@dataclass
class RunConfig:
    data: Optional[str] = None          # None or "digits": the embedded default; "cifar10"; or a folder
    backbone: str = backbones.DEFAULT
    weights: Optional[str] = None
    strategy: str = "linear"
    image_size: Optional[int] = None    # backbone input size; default 64 for digits, else 128
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    device: str = "cpu"
    seed: int = 0
    out: Optional[str] = None
    compare: Optional[str] = None       # "scratch": train the from-scratch baseline beside
    teacher: Optional[str] = None       # distill: the teacher's run directory
    target_data: Optional[str] = None   # dann: the unlabeled target domain (class folders; labels only for eval)
    train_per_class: Optional[int] = None
    test_per_class: Optional[int] = None
    finetune_stages: Optional[int] = None  # finetune: unfreeze the top k stages (default all)
    precision: str = "auto"             # finetune: bf16 params + fp32 masters on cuda, fp32 on cpu
    cache_dtype: str = "fp16"
    mirror_views: bool = False          # linear/mlp: also cache mirrored images; train on both views, average at test
    temperature: float = 4.0
    alpha: float = 0.9
    resume: bool = False
    progress: bool = True

    def resolved(self, native_size: int) -> "RunConfig":
        """Fills the per-strategy defaults and checks every option."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: unknown {self.strategy!r}; choose from {STRATEGIES}")
        if self.backbone not in backbones.available():
            raise ValueError(f"backbone: unknown {self.backbone!r}; choose from {backbones.available()}")
        if self.compare not in (None, "scratch"):
            raise ValueError(f"compare: only 'scratch' is supported, got {self.compare!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision: expected auto, fp32 or bf16, got {self.precision!r}")
        if self.strategy == "distill" and not self.teacher:
            raise ValueError("teacher: --strategy distill needs --teacher RUN_DIR (a linear, mlp or finetune run)")
        if self.strategy == "dann" and not self.target_data:
            raise ValueError("target_data: --strategy dann needs --target-data DIR (the unlabeled target domain)")
        out = dataclasses.replace(self)
        out.epochs = self.epochs if self.epochs is not None else _EPOCHS[self.strategy]
        out.lr = self.lr if self.lr is not None else _LR[self.strategy]
        out.batch_size = self.batch_size if self.batch_size is not None else _BATCH[self.strategy]
        out.image_size = self.image_size if self.image_size is not None else (64 if native_size <= 16 else 128)
        for name in ("epochs", "batch_size", "image_size"):
            value = getattr(out, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not out.lr > 0:
            raise ValueError(f"lr: expected > 0, got {out.lr!r}")
        if out.precision == "auto":
            out.precision = "bf16" if str(out.device).startswith("cuda") else "fp32"
        return out

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
