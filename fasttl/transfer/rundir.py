"""The run directory: config.json, metrics.json, weights (safetensors) and the resumable checkpoint."""
from __future__ import annotations

import io
import json
import os
from typing import Dict, Optional

import torch
from torch import nn

from fasttl.cache.store import read_json, write_atomic, write_json_atomic

CONFIG = "config.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
CHECKPOINT = "checkpoint.pt"


def write_predictions(run_dir: str, logits: torch.Tensor, labels: torch.Tensor, classes, samples) -> str:
    """predictions.csv: per evaluated image its name, true class, predicted class and the
    predicted class's probability, for error analysis beside the confusion matrix."""
    import csv

    probabilities = torch.softmax(logits.float(), dim=1)
    confidence, predicted = probabilities.max(1)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sample", "label", "predicted", "confidence"])
    for sample, label, guess, p in zip(samples, labels.tolist(), predicted.tolist(), confidence.tolist()):
        writer.writerow([sample, classes[label], classes[guess], f"{p:.4f}"])
    path = os.path.join(run_dir, PREDICTIONS)
    write_atomic(path, buffer.getvalue().encode())
    return path


def weights_file(name: str) -> str:
    return f"{name}.safetensors"


def save_weights(run_dir: str, name: str, module: nn.Module) -> str:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    path = os.path.join(run_dir, weights_file(name))
    write_atomic(path, save(state))
    return path


def load_weights(run_dir: str, name: str, module: nn.Module) -> nn.Module:
    from safetensors.torch import load_file

    path = os.path.join(run_dir, weights_file(name))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no trained weights in this run directory")
    module.load_state_dict(load_file(path))
    return module


class Checkpoint:
    """Per-epoch training state of one model of a run, saved atomically, so Ctrl-C (or a kill)
    leaves a run that `--resume` continues."""

    def __init__(self, run_dir: str, name: str):
        self.path = os.path.join(run_dir, f"{name}.{CHECKPOINT}")

    def save(self, state: Dict[str, object]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(self.path, buffer.getvalue())

    def load(self) -> Optional[Dict[str, object]]:
        if not os.path.isfile(self.path):
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)

    def remove(self) -> None:
        if os.path.isfile(self.path):
            os.remove(self.path)


def write_config(run_dir: str, config: Dict[str, object]) -> None:
    write_json_atomic(os.path.join(run_dir, CONFIG), config)


def read_config(run_dir: str) -> Dict[str, object]:
    config = read_json(os.path.join(run_dir, CONFIG))
    if config is None:
        raise FileNotFoundError(f"{run_dir}: no {CONFIG}; not a fasttl run directory")
    return config


def write_metrics(run_dir: str, metrics: Dict[str, object]) -> None:
    write_json_atomic(os.path.join(run_dir, METRICS), metrics)
