"""`distill`: the small CNN at the data's native resolution learns from a teacher run's softened
outputs through fasttl's fused distillation loss. The teacher is any finished run whose strategy
can teach, rebuilt through the registry; its logits on the training images are computed once."""
from __future__ import annotations

import os
import time
from typing import List

import torch
from torch import Tensor

from fasttl.files import write_atomic
from fasttl.errors import OptionError
from fasttl.transfer import registry
from fasttl.transfer.registry import Outcome, Strategy, TrainedModel, register
from fasttl.transfer.rundir import read_config
from fasttl.transfer.strategies.scratch import labels_of, load_cnn, train_cnn

TEACHER_LOGITS = "teacher_logits.safetensors"


def teacher_model(teacher_dir: str, classes: List[str], device: torch.device) -> TrainedModel:
    """The teacher run's model, rebuilt by its own strategy."""
    config = read_config(teacher_dir)
    strategy = registry.get(config["strategy"])
    if not strategy.can_teach:
        teachers = ", ".join(n for n in registry.names() if registry.get(n).can_teach)
        raise OptionError(f"teacher: {teacher_dir} is a {config['strategy']!r} run; a teacher must be a {teachers} run")
    if list(config.get("classes", [])) != list(classes):
        raise OptionError(f"teacher: {teacher_dir} was trained for classes {config.get('classes')}, "
                          f"but the data has {list(classes)}")
    return strategy.load(teacher_dir, device)


def _saved_logits(path: str, teacher: str, rows: int):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as saved:
            if (saved.metadata() or {}).get("teacher") == teacher:
                logits = saved.get_tensor("logits")
                if logits.dim() == 2 and logits.shape[0] == rows:
                    return logits
    except Exception:  # a damaged file is recomputed, never trusted
        pass
    return None


@torch.no_grad()
def teacher_logits_for(teacher_dir: str, ds, cfg, run_dir: str, device: torch.device) -> Tensor:
    """The teacher's logits on every training image, kept in the run directory (safetensors:
    tensors and a string of metadata, nothing that could run code on load)."""
    from safetensors.torch import save

    path = os.path.join(run_dir, TEACHER_LOGITS)
    teacher = os.path.abspath(teacher_dir)
    if os.path.isfile(path):
        logits = _saved_logits(path, teacher, len(ds.train))
        if logits is not None:
            return logits
    logits, _ = teacher_model(teacher_dir, ds.classes, device).logits(ds.train, progress=cfg.progress,
                                                                            split="train")
    write_atomic(path, save({"logits": logits.float().contiguous()}, metadata={"teacher": teacher}))
    return logits


@register
class Distill(Strategy):
    name = "distill"
    display = "distill (student with teacher)"
    help = "the small CNN at native resolution from a teacher run's softened outputs (--teacher RUN_DIR)"
    requires = ("teacher",)
    epochs, lr, batch_size = 15, 3e-3, 64
    outputs = ("distill",)

    def train(self, cfg, ds, run_dir, device) -> List[Outcome]:
        started = time.perf_counter()
        logits = teacher_logits_for(cfg.teacher, ds, cfg, run_dir, device)
        teacher_s = time.perf_counter() - started
        outcome = train_cnn(cfg, ds, run_dir, self.name, self.display, device, teacher_logits=logits)
        outcome.timings["teacher_logits_s"] = teacher_s
        teacher_accuracy = float((logits.argmax(1) == labels_of(ds.train, logits.device)).float().mean())
        outcome.notes.update(teacher=os.path.abspath(cfg.teacher), teacher_train_accuracy=teacher_accuracy,
                             temperature=cfg.temperature, alpha=cfg.alpha)
        return [outcome]

    def load(self, run_dir, device) -> TrainedModel:
        return load_cnn(run_dir, self.name, device)
