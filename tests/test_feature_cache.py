"""FeatureCache on real images and the real EfficientNet-Lite0: build, open, resume, locking,
fingerprints, corruption and torchrun."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import fasttl
import fasttl.data as D
from fasttl.cache import CacheError, CacheLockedError
from fasttl.heads import train_head
from fasttl.cache.store import WriterLock

SIZE = 64


def build(lite0, small_source, out, **kw):
    kw.setdefault("image_size", SIZE)
    kw.setdefault("shard_rows", 5)
    kw.setdefault("batch_size", 4)
    kw.setdefault("backend", "torch")
    return fasttl.FeatureCache.build(lite0, small_source, str(out), progress=False, **kw)


def test_build_and_open_hold_the_backbone_features(lite0, small_source, tmp_path):
    cache = build(lite0, small_source, tmp_path / "c", dtype="fp32")
    reopened = fasttl.FeatureCache.open(str(tmp_path / "c"))
    assert len(reopened) == 18 and reopened.feature_dim == 1280 and reopened.classes == ["bird", "cat", "ship"]
    assert reopened.labels.tolist() == small_source.labels
    assert reopened.samples[0] == os.path.join("bird", "0.jpg")
    assert torch.equal(cache.features, reopened.features)
    # The same images through the backbone directly.
    images = torch.cat([x for x, _ in D.make_loader(small_source, lite0.preprocessing, 6, image_size=SIZE,
                                                      backend="torch")])
    with torch.no_grad():
        expected = lite0.eval().forward_pooled(images)
    torch.testing.assert_close(reopened.features, expected, atol=1e-4, rtol=1e-4)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    fp = manifest["fingerprint"]
    assert fp["backbone"]["name"] == "efficientnet_lite0" and len(fp["backbone"]["weights_sha256"]) == 64
    assert fp["preprocessing"]["size"] == SIZE and fp["dtype"] == "fp32" and fp["feature_dim"] == 1280
    assert fp["dataset"]["count"] == 18 and len(manifest["shards"]) == 4
    assert all(len(s["features"]["sha256"]) == 64 for s in manifest["shards"])


@pytest.mark.parametrize("dtype, tolerance", [("fp16", 2e-3), ("bf16", 1e-2), ("int8", None)])
def test_cache_dtypes_against_fp32(lite0, small_source, tmp_path, dtype, tolerance):
    exact = build(lite0, small_source, tmp_path / "fp32", dtype="fp32").features
    cache = build(lite0, small_source, tmp_path / dtype, dtype=dtype)
    stored = cache.all_features()
    if dtype == "int8":
        assert cache.features.dtype == torch.int8 and cache.scales.shape == (18,)
        bound = exact.abs().amax(1, keepdim=True) / 254 + 1e-5
        assert ((stored - exact).abs() <= bound).all()
    else:
        torch.testing.assert_close(stored, exact, rtol=tolerance, atol=1e-4)


def test_loader_covers_every_row_once_per_epoch(lite0, small_source, tmp_path):
    cache = build(lite0, small_source, tmp_path / "c")
    loader = cache.loader(batch_size=4, shuffle=True, seed=3)
    assert len(loader) == 5
    orders = []
    for _ in range(2):
        rows = []
        for features, labels in loader:
            assert features.dtype == torch.float32 and features.shape[1] == 1280
            # identify each row by matching it in the cache
            matches = (cache.all_features()[None] == features[:, None]).all(-1).float().argmax(1)
            rows += matches.tolist()
            assert labels.tolist() == cache.labels[matches].tolist()
        assert sorted(rows) == list(range(18))
        orders.append(rows)
    assert orders[0] != orders[1]
    again = [int(i) for f, _ in cache.loader(batch_size=4, shuffle=True, seed=3)
             for i in (cache.all_features()[None] == f[:, None]).all(-1).float().argmax(1)]
    assert again == orders[0]
    bf16 = next(iter(cache.loader(batch_size=4, out_dtype=torch.bfloat16)))[0]
    assert bf16.dtype == torch.bfloat16


def test_a_finished_cache_is_reused_and_a_different_request_refused(lite0, small_source, tmp_path):
    build(lite0, small_source, tmp_path / "c")
    mtime = os.path.getmtime(tmp_path / "c" / "manifest.json")
    again = build(lite0, small_source, tmp_path / "c")
    assert len(again) == 18 and os.path.getmtime(tmp_path / "c" / "manifest.json") == mtime
    with pytest.raises(CacheError, match="size"):
        build(lite0, small_source, tmp_path / "c", image_size=96)
    with pytest.raises(CacheError, match="dtype"):
        build(lite0, small_source, tmp_path / "c", dtype="int8")
    rebuilt = build(lite0, small_source, tmp_path / "c", image_size=96, overwrite=True)
    assert rebuilt.fingerprint["preprocessing"]["size"] == 96
    wanted = dict(rebuilt.fingerprint, dtype="bf16")
    with pytest.raises(CacheError, match="dtype"):
        fasttl.FeatureCache.open(str(tmp_path / "c"), expect_fingerprint=wanted)


def test_truncated_or_corrupt_shard_is_detected_on_open(lite0, small_source, tmp_path):
    cache = build(lite0, small_source, tmp_path / "c")
    name = cache.manifest["shards"][1]["features"]["file"]
    assert name == f"features-{fasttl.cache.store.fingerprint_key(cache.fingerprint)}-00001.npy"
    shard = tmp_path / "c" / name
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CacheError, match=f"{name}.*truncated"):
        fasttl.FeatureCache.open(str(tmp_path / "c"))
    corrupted = bytearray(data)
    corrupted[-7] ^= 0xFF
    shard.write_bytes(bytes(corrupted))
    with pytest.raises(CacheError, match=f"{name}.*checksum"):
        fasttl.FeatureCache.open(str(tmp_path / "c"))
    with pytest.raises(CacheError, match="no manifest.json"):
        fasttl.FeatureCache.open(str(tmp_path))


def test_a_second_writer_is_refused_at_once(lite0, small_source, tmp_path):
    os.makedirs(tmp_path / "c")
    with WriterLock(str(tmp_path / "c")):
        started = time.perf_counter()
        with pytest.raises(CacheLockedError, match="being written by pid"):
            build(lite0, small_source, tmp_path / "c")
        assert time.perf_counter() - started < 30
    assert len(build(lite0, small_source, tmp_path / "c")) == 18  # free again afterwards


def _extract_command(data, out, extra=()):
    return [sys.executable, "-m", "fasttl", "extract", "--data", str(data), "--out", str(out), "--image-size",
            str(SIZE), "--shard-rows", "10", "--batch-size", "2", "--backend", "torch", "--no-progress", *extra]


def _single_thread_env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _files(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))
            if not name.startswith(".")}


@pytest.fixture
def medium_dataset(tmp_path, cifar10_root):
    """train/ and test/ class folders, 4 classes x 30 / 3 real CIFAR-10 images."""
    root = tmp_path / "ds"
    for split, count in (("train", 30), ("test", 3)):
        for name in ("airplane", "cat", "frog", "truck"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                shutil.copy(os.path.join(cifar10_root, split, name, f"{i:04d}.jpg"), root / split / name / f"{i}.jpg")
    return root


def test_resume_after_kill_9_is_byte_identical(medium_dataset, tmp_path):
    env = _single_thread_env()
    reference = tmp_path / "reference"
    subprocess.run(_extract_command(medium_dataset, reference), check=True, env=env, timeout=600, capture_output=True)
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_extract_command(medium_dataset, interrupted), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    def first_shard():
        names = os.listdir(interrupted / "train") if (interrupted / "train").is_dir() else []
        return [n for n in names if n.startswith("features-") and n.endswith("-00000.npy")]

    deadline = time.time() + 300
    while not first_shard() and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first_shard()
    assert not (interrupted / "train" / "manifest.json").exists(), "the build finished before it could be killed"
    result = subprocess.run(_extract_command(medium_dataset, interrupted), env=env, timeout=600, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "reused" in result.stdout and " 0 reused" not in result.stdout.split("\n")[0]
    for split in ("train", "test"):
        assert _files(interrupted / split) == _files(reference / split), split


@pytest.mark.slow
def test_torchrun_two_processes_gloo_equals_single_process(medium_dataset, tmp_path):
    env = _single_thread_env()
    single = tmp_path / "single"
    subprocess.run(_extract_command(medium_dataset, single), check=True, env=env, timeout=600, capture_output=True)
    multi = tmp_path / "multi"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m",
               "fasttl", *_extract_command(medium_dataset, multi)[3:]]
    result = subprocess.run(command, env=env, timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 120 images" in result.stdout
    for split in ("train", "test"):
        assert _files(multi / split) == _files(single / split), split


def test_extract_cli_summary_and_head_training(medium_dataset, tmp_path):
    out = tmp_path / "cache"
    result = subprocess.run(_extract_command(medium_dataset, out, ["--dtype", "int8"]), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "train: 120 images in" in result.stdout and "images/s" in result.stdout and "MiB written" in result.stdout
    train = fasttl.FeatureCache.open(str(out / "train"))
    test = fasttl.FeatureCache.open(str(out / "test"))
    history = train_head(train, epochs=15, batch_size=16, lr=3e-3, eval_cache=test, progress=False).history
    assert len(history) == 15 and history[-1]["train_accuracy"] > 0.9
    assert history[-1]["eval_accuracy"] > 0.4  # 4 classes: chance is 0.25


def test_last_build_says_where_and_whether_it_was_reused(lite0, small_source, tmp_path):
    # The docstring promises `directory` and `reused`: a second build of the same cache reuses it.
    import numpy as np

    out = tmp_path / "cache"
    first = build(lite0, small_source, out)
    again = build(lite0, small_source, out)
    assert first.last_build["directory"] == str(out) and first.last_build["reused"] is False
    assert first.last_build["images"] == 18
    assert again.last_build["directory"] == str(out) and again.last_build["reused"] is True
    assert again.last_build["images"] == 0
    mine = str(tmp_path / "mine")
    written = fasttl.FeatureCache.write(mine, [np.ones((3, 4), np.float32)], [0, 1, 0], classes=["a", "b"])
    assert written.last_build["directory"] == mine and written.last_build["reused"] is False
    assert fasttl.FeatureCache.open(str(out)).last_build == {}
