import os
import zlib

import pytest
import torch

# Modules whose tests train, install or benchmark whole runs (about 340 of the suite's 600 s on 2
# cores): marked slow, so `make check` (pytest -m "not slow") is the quick tier of the edit loop.
SLOW_MODULES = ("test_install", "test_transfer", "test_distill_cross_fit", "test_distill_teacher", "test_bench",
                "test_cache_at_scale", "test_readme")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


CUDA_REASON = "no CUDA GPU visible (the CUDA kernels are compiled, but only a GPU machine runs them)"


def devices():
    """CPU always; CUDA as a parameter that skips with a reason where no GPU is visible."""
    return [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)),
    ]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, reproducible from the test's name (crc32: hash() of a str is
    # salted per process, so a failure would not come back on the next run).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))

@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory):
    # Caches' verification records (fasttl.cache.format.state_dir) stay inside the test session.
    os.environ["FASTTL_STATE_DIR"] = str(tmp_path_factory.mktemp("fasttl-state"))

DALI_REASON = "NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)"


def dali_installed() -> bool:
    from fasttl.data.dali_pipeline import dali_available

    return dali_available()


def backends():
    """torch always; DALI as a parameter that skips with a reason where it is not installed."""
    return ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_installed(), reason=DALI_REASON))]


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory):
    """CIFAR-10 JPEG class folders, root/{train,test}/<class>/NNNN.jpg: the mini set shipped in the
    package (the first 100 training and 50 test files of each class of ../shared/data/cifar10,
    byte for byte), so the suite needs nothing beside the repository."""
    from fasttl.data import extract_cifar10_mini

    return extract_cifar10_mini(str(tmp_path_factory.mktemp("cifar10-mini")))


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Feature caches of this test in its own temporary folder (no reuse across tests)."""
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "feature-cache"))


def cifar_subset(cifar10_root: str, root, classes, train: int, test: int):
    """root/{train,test}/<class>/<i>.jpg: the first `train` and `test` real CIFAR-10 JPEGs of each class."""
    import shutil

    for split, count in (("train", train), ("test", test)):
        for name in classes:
            os.makedirs(root / split / name)
            for i in range(count):
                shutil.copy(os.path.join(cifar10_root, split, name, f"{i:04d}.jpg"), root / split / name / f"{i}.jpg")
    return root


@pytest.fixture
def small_image_folder(tmp_path, cifar10_root):
    """root/<class>/*.jpg with 6 real CIFAR-10 test images in each of 3 classes."""
    import shutil

    root = tmp_path / "images"
    for name in ("bird", "cat", "ship"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            shutil.copy(os.path.join(cifar10_root, "test", name, f"{i:04d}.jpg"), root / name / f"{i}.jpg")
    return root


THREE_CLASSES = ["cat", "ship", "truck"]


@pytest.fixture(scope="session")
def three_classes(tmp_path_factory, cifar10_root):
    """root/{train,test}/<class>/ with 10 training and 4 test CIFAR-10 JPEGs of THREE_CLASSES
    (shared by the modules that train every strategy on it; read it, never write into it)."""
    return cifar_subset(cifar10_root, tmp_path_factory.mktemp("three-classes") / "three", THREE_CLASSES, 10, 4)


@pytest.fixture(scope="session")
def lite0():
    """EfficientNet-Lite0 with its ImageNet weights (never trained by a test: it stays frozen)."""
    from fasttl import backbones

    return backbones.create("efficientnet_lite0")


@pytest.fixture
def small_source(small_image_folder):
    """small_image_folder as a fasttl image source."""
    from fasttl import data

    return data.scan_class_folder(str(small_image_folder))


def tiny_backbone(seed: int = 0):
    """A one-convolution backbone (8 features at 16 px) with seeded weights: fast stand-in for a real one."""
    from torch import nn

    from fasttl.backbones.base import CustomBackbone, Preprocessing

    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, 8, 3, stride=2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.2)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
    return CustomBackbone(nn.Sequential(conv, nn.ReLU()), 8,
                          Preprocessing(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), min_input_size=8), name="tiny")


def cli(capsys, *words):
    """(exit code, stdout, stderr) of `fasttl WORDS...` run in this process."""
    from fasttl.cli import main

    code = main([str(w) for w in words])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    """The only line of `err`, asserted to be one `fasttl: error: ...` line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fasttl: error: "), err
    return lines[0]


TINY_CIFAR_CLASSES = ["airplane", "automobile", "frog", "ship"]


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory, cifar10_root):
    """4 CIFAR-10 classes, 12 training and 4 test images each: distillation's teacher and student data."""
    return cifar_subset(cifar10_root, tmp_path_factory.mktemp("tiny") / "cifar4", TINY_CIFAR_CLASSES, 12, 4)


@pytest.fixture(scope="module")
def linear_teacher(tiny_cifar, tmp_path_factory):
    """A finished `linear` run on tiny_cifar (32 px), to be distill's --teacher."""
    from fasttl.transfer.job import run

    out = tmp_path_factory.mktemp("teacher") / "linear"
    with pytest.MonkeyPatch.context() as patch:  # a module fixture runs before each test's private cache
        patch.setenv("FASTTL_CACHE_DIR", str(tmp_path_factory.mktemp("teacher-cache")))
        run(data=str(tiny_cifar), strategy="linear", out=str(out), image_size=32, progress=False, seed=0)
    return out


@pytest.fixture(scope="module")
def cat_ship(tmp_path_factory, cifar10_root):
    """train/ (6 per class) and test/ (3 per class) of real CIFAR-10 cats and ships."""
    return cifar_subset(cifar10_root, tmp_path_factory.mktemp("cat-ship") / "two", ["cat", "ship"], 6, 3)


def one_epoch_run(data, out, **kw):
    """`run` options for the quickest scratch run on `data` into `out`, overridden by `kw`."""
    return dict(dict(data=str(data), out=str(out), strategy="scratch", epochs=1, image_size=32, progress=False,
                     compare="none"), **kw)


def finished_run(data, tmp_path_factory, name: str, **kw):
    """A finished run (one_epoch_run's, overridden by `kw`) in a folder of its own, its feature cache
    in another: what a module-scoped fixture shares among the tests that only read it."""
    from fasttl.transfer.job import run

    out = tmp_path_factory.mktemp(name) / "run"
    with pytest.MonkeyPatch.context() as patch:  # a module fixture runs before each test's private cache
        patch.setenv("FASTTL_CACHE_DIR", str(tmp_path_factory.mktemp(f"{name}-cache")))
        run(**one_epoch_run(data, out, **kw))
    return out


def run_with_config_edit(run_dir, dest, field, value):
    """A copy of the run folder `run_dir` at `dest` whose config.json holds `value` at `field`."""
    import json
    import shutil

    shutil.copytree(run_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config[field] = value
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def vouched_config_edit(run_dir, dest, edit):
    """A copy of `run_dir` at `dest` whose config.json is `edit`ed (a function of the dict), the
    marker's hash rewritten to match: a file fasttl did not write but whose marker vouches for it
    (the README: the marker is a record, not a signature)."""
    import hashlib
    import json
    import shutil

    shutil.copytree(run_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    edit(config)
    data = json.dumps(config, indent=2).encode()
    (dest / "config.json").write_bytes(data)
    marker = json.loads((dest / ".fasttl-run").read_text())
    marker["config_sha256"] = hashlib.sha256(data).hexdigest()
    (dest / ".fasttl-run").write_text(json.dumps(marker))
    return dest


def image_list(data, folder, split: str = "train"):
    """`folder`/list.csv naming copies of the class-folder images of data/`split` (path,label
    rows, names CLASS-FILE); returns the rows written, header first."""
    import shutil

    folder.mkdir()
    rows = ["path,label"]
    for label in sorted(os.listdir(data / split)):
        for name in sorted(os.listdir(data / split / label)):
            shutil.copy(data / split / label / name, folder / f"{label}-{name}")
            rows.append(f"{label}-{name},{label}")
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    return rows


def darken(plain, root, keep_normal=()):
    """`plain`'s images (root/{train,test}/<class>/*.jpg) as PNGs under `root`, pixels x 0.05
    (under-exposed scans), except the classes of the test split named in keep_normal."""
    import numpy as np
    from PIL import Image

    for path in sorted(plain.rglob("*.jpg")):
        relative = path.relative_to(plain)
        factor = 1.0 if relative.parts[0] == "test" and relative.parts[1] in keep_normal else 0.05
        out = root / relative.with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) * factor
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out)
    return root


@pytest.fixture
def fresh_engines(tmp_path, monkeypatch):
    """This test's own feature caches, and no graph exported or adopted in this process."""
    from fasttl.cache import engines

    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "feature-cache"))
    monkeypatch.setattr(engines, "_EXPORTED", {})
    monkeypatch.setattr(engines, "_ADOPTED", {})


def link_in_the_way(path, kind: str):
    """At `path`: a link to nothing ("dangling"), a link loop ("loop") or a plain file ("file")."""
    import os

    if kind == "dangling":
        os.symlink(path.parent / "nowhere", path)
    elif kind == "loop":
        os.symlink(path.parent / "other", path)
        os.symlink(path, path.parent / "other")
    else:
        path.write_bytes(b"mine")
    return path


class LoopbackServer:
    """An HTTP server on 127.0.0.1 (a free port) answering with `handler` (a
    BaseHTTPRequestHandler class) on a thread of its own: download code is tested against it."""

    def __init__(self, handler):
        import http.server
        import threading

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
