"""CIFAR-10 mini, shipped in the package: what it holds, that it is the real data byte for byte,
and that writing it out as folders is safe to repeat."""
import hashlib
import os

import numpy as np
import pytest

from fasttl.data import cifar10_mini, class_folder_splits, extract_cifar10_mini
from fasttl.data import mini

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10"))


def test_mini_holds_100_train_and_50_test_images_per_class():
    train, test = cifar10_mini()
    assert train.images.shape == (1000, 32, 32, 3) and test.images.shape == (500, 32, 32, 3)
    assert train.images.dtype == np.uint8 and train.classes == mini.CLASSES
    assert np.bincount(train.labels).tolist() == [100] * 10 and np.bincount(test.labels).tolist() == [50] * 10
    assert train.images.std() > 30  # real photographs, not a constant


def test_folders_hold_the_same_images_as_the_arrays(tmp_path):
    from PIL import Image

    root = extract_cifar10_mini(str(tmp_path / "mini"))
    train, test = class_folder_splits(root)
    arrays, _ = cifar10_mini()
    assert len(train) == 1000 and len(test) == 500 and train.classes == mini.CLASSES
    for i in (0, 101, 999):
        assert np.array_equal(np.asarray(Image.open(train.files[i]).convert("RGB")), arrays.images[i])
        assert train.labels[i] == arrays.labels[i]


def test_extracting_twice_rewrites_nothing_and_repairs_a_changed_file(tmp_path):
    root = extract_cifar10_mini(str(tmp_path / "mini"))
    path = os.path.join(root, "test", "cat", "0007.jpg")
    before = os.stat(path).st_mtime_ns
    extract_cifar10_mini(root)
    assert os.stat(path).st_mtime_ns == before
    with open(path, "wb") as f:
        f.write(b"changed")
    extract_cifar10_mini(root)
    assert open(path, "rb").read()[:3] == b"\xff\xd8\xff"


def test_a_damaged_package_file_is_refused(tmp_path, monkeypatch):
    from fasttl.data import DataError

    damaged = tmp_path / "cifar10_mini.tar"
    data = bytearray(open(mini.TAR, "rb").read())
    data[5000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(mini, "TAR", str(damaged))
    with pytest.raises(DataError, match="checksum mismatch.*reinstall fasttl"):
        cifar10_mini()


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "train")),
                    reason="../shared/data/cifar10 not here: the byte-for-byte comparison needs the full set")
def test_mini_is_the_first_files_of_the_full_set_byte_for_byte(tmp_path):
    root = extract_cifar10_mini(str(tmp_path / "mini"))
    for split, count in (("train", 100), ("test", 50)):
        for name in mini.CLASSES:
            expected = sorted(os.listdir(os.path.join(SHARED, split, name)))[:count]
            assert sorted(os.listdir(os.path.join(root, split, name))) == expected
            for file in expected:
                digest = [hashlib.sha256(open(os.path.join(base, split, name, file), "rb").read()).digest()
                          for base in (root, SHARED)]
                assert digest[0] == digest[1], (split, name, file)
