"""pytest-benchmark suite: decode + resize + normalize of CIFAR-10 JPEGs, DALI vs the PyTorch fallback."""
import os

import pytest

from fasttl.data import ImageLoader, TransformSpec, class_folder_splits, dali_available

CIFAR10 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")


@pytest.mark.skipif(not os.path.isdir(os.path.join(CIFAR10, "test")), reason="../shared/data/cifar10 not found")
@pytest.mark.parametrize("backend", [pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="NVIDIA DALI is not installed")), "torch"])
def test_decode_resize_normalize(benchmark, quick, backend):
    _, test = class_folder_splits(CIFAR10)
    source = test.subset(range(0, 10000, 40 if quick else 5))
    spec = TransformSpec(128, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    loader = ImageLoader(source, spec, 64, backend=backend, num_threads=2)

    def epoch():
        return sum(images.shape[0] for images, _ in loader)

    assert benchmark.pedantic(epoch, rounds=2 if quick else 5, warmup_rounds=1) == len(source)
