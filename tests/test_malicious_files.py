"""Files are data, never code: a pickle whose loading would run a command is written in place of
every kind of file fasttl reads (run checkpoints, teacher logits, backbone weights, feature cache
arrays, CIFAR batches). Each read is refused with an error naming the file, in a subprocess, and
the marker file the payload would create never appears."""
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch


class Payload:
    """Unpickles to a call that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(path, marker, kind="pickle"):
    if kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"data": Payload(marker), "labels": [0]}, f, protocol=2)
    elif kind == "torch":
        torch.save({"state": Payload(marker)}, path)
    elif kind == "npy":
        np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)


def attempt(code: str, cwd) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter: a crash or a code execution can't touch pytest."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_refused(result, marker, *names):
    assert not os.path.exists(marker), "the payload ran"
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout.strip().splitlines()[-1]
    assert message.startswith("refused:"), result.stdout
    for name in names:
        assert name in message, (name, message)
    assert "weights_only set to False" not in result.stdout + result.stderr  # never advice to load it unsafely


@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_backbone_weights_file(tmp_path, kind):
    weights, marker = tmp_path / "weights.pth", tmp_path / "marker"
    write_payload(weights, marker, kind)
    result = attempt(f"""
        import fasttl.backbones as B
        try:
            B.create("resnet18", weights={str(weights)!r})
        except Exception as exc:
            print("refused:", type(exc).__name__, exc)
        """, tmp_path)
    assert_refused(result, marker, "weights.pth")


@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_run_checkpoint(tmp_path, kind):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"strategy": "scratch", "run_key": "k"}))
    write_payload(run_dir / "scratch.checkpoint.pt", marker, kind)
    result = attempt(f"""
        from fasttl.transfer.rundir import Checkpoint
        try:
            Checkpoint({str(run_dir)!r}, "scratch").load()
        except Exception as exc:
            print("refused:", type(exc).__name__, exc)
        """, tmp_path)
    assert_refused(result, marker, "scratch.checkpoint.pt", "not a fasttl checkpoint")


def test_teacher_logits_are_never_unpickled(tmp_path):
    from fasttl.transfer.strategies.distill import _saved_logits

    path, marker = tmp_path / "teacher_logits.safetensors", tmp_path / "marker"
    write_payload(path, marker, "pickle")
    assert _saved_logits(str(path), "teacher", ["teacher"], 10, 4) is None  # a damaged file is recomputed
    assert not marker.exists()


@pytest.mark.parametrize("target", ["labels", "shard"])
def test_feature_cache_arrays(tmp_path, target):
    import fasttl
    from fasttl.backbones import CustomBackbone, Preprocessing
    from fasttl.data import ArraySource

    backbone = CustomBackbone(torch.nn.Conv2d(3, 4, 3), 4, Preprocessing(8, (0.5,) * 3, (0.25,) * 3, min_input_size=8),
                              name="tiny")
    rng = np.random.default_rng(0)
    source = ArraySource(rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8), np.array([0, 1] * 3), ["a", "b"])
    cache = fasttl.FeatureCache.build(backbone, source, str(tmp_path / "cache"), progress=False, backend="torch")
    manifest = cache.manifest
    name = manifest["files"]["labels"]["file"] if target == "labels" else manifest["shards"][0]["features"]["file"]
    marker = tmp_path / "marker"
    write_payload(tmp_path / "cache" / name, marker, "npy")
    result = attempt(f"""
        import fasttl
        try:
            fasttl.FeatureCache.open({str(tmp_path / "cache")!r})
        except Exception as exc:
            print("refused:", type(exc).__name__, exc)
        """, tmp_path)
    assert_refused(result, marker, name)


@pytest.mark.parametrize("name", ["data_batch_1", "batches.meta", "test_batch"])
def test_cifar_batches(tmp_path, name):
    root, marker = tmp_path / "cifar-10-batches-py", tmp_path / "marker"
    root.mkdir()
    genuine = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / batch, "wb") as f:
            pickle.dump(genuine, f, protocol=2)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a", b"b"]}, f, protocol=2)
    write_payload(root / name, marker, "pickle")
    split = "False" if name == "test_batch" else "True"
    result = attempt(f"""
        from fasttl.data import load_cifar_pickles
        try:
            load_cifar_pickles({str(root)!r}, train={split})
        except Exception as exc:
            print("refused:", type(exc).__name__, exc)
        """, tmp_path)
    assert_refused(result, marker, name)
