import os
import zlib

import pytest
import torch

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
