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
    # Fresh random inputs per test, reproducible from the test's name.
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))

import os

CIFAR10 = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10"))
DALI_REASON = "NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)"


def dali_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("nvidia.dali") is not None


def backends():
    """torch always; DALI as a parameter that skips with a reason where it is not installed."""
    return ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_installed(), reason=DALI_REASON))]


@pytest.fixture(scope="session")
def cifar10_root():
    if not os.path.isdir(os.path.join(CIFAR10, "train")):
        pytest.skip(f"CIFAR-10 JPEG folders not found at {CIFAR10} (../shared/data/cifar10)")
    return CIFAR10


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
