"""Input pipelines on real CIFAR-10 JPEGs: DALI (CPU) and the PyTorch fallback."""
import os
import pickle

import numpy as np
import pytest
import torch

import fasttl.data as D
from fasttl.backbones import Preprocessing
from conftest import backends, dali_installed, DALI_REASON

PRE = Preprocessing(input_size=64, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))


def collect(loader):
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def test_class_folder_scan_labels_sorted_classes(small_image_folder):
    source = D.scan_class_folder(str(small_image_folder))
    assert source.classes == ["bird", "cat", "ship"]
    assert len(source) == 18 and source.labels == [0] * 6 + [1] * 6 + [2] * 6
    assert all(f.endswith(".jpg") for f in source.files)


def test_splits_from_train_and_test_folders(cifar10_root):
    train, test = D.class_folder_splits(cifar10_root)
    # the CIFAR-10 mini folders: 100 training and 50 test images of each of the 10 classes
    assert len(train) == 1000 and len(test) == 500 and train.classes == test.classes and len(train.classes) == 10
    assert train.labels == sorted(train.labels) and set(test.labels) == set(range(10))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_eval_yields_every_sample_once_with_partial_last_batch(small_image_folder, backend, batch_size):
    source = D.scan_class_folder(str(small_image_folder))
    loader = D.make_loader(source, PRE, batch_size, backend=backend)
    sizes = [len(y) for _, y in loader]
    assert sum(sizes) == 18 and len(sizes) == len(loader) and all(s == batch_size for s in sizes[:-1])
    images, labels = collect(loader)  # a second epoch gives the same again
    assert images.shape == (18, 3, 64, 64) and images.dtype == torch.float32
    assert labels.tolist() == source.labels


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("num_shards", [2, 3])
def test_shards_are_disjoint_and_cover_every_sample(small_image_folder, backend, num_shards):
    source = D.scan_class_folder(str(small_image_folder))
    everything, _ = collect(D.make_loader(source, PRE, 5, backend=backend))
    for shard in range(num_shards):
        # As DistributedSampler cuts an unshuffled epoch: every num_shards-th sample from the shard's id.
        images, _ = collect(D.make_loader(source, PRE, 5, backend=backend, shard_id=shard, num_shards=num_shards))
        torch.testing.assert_close(images, everything[shard::num_shards])


@pytest.mark.parametrize("backend", backends())
def test_train_mode_is_seeded_and_augments(small_image_folder, backend):
    source = D.scan_class_folder(str(small_image_folder))
    a, ya = collect(D.make_loader(source, PRE, 6, train=True, seed=7, backend=backend))
    b, yb = collect(D.make_loader(source, PRE, 6, train=True, seed=7, backend=backend))
    c, _ = collect(D.make_loader(source, PRE, 6, train=True, seed=8, backend=backend))
    eval_images, eval_labels = collect(D.make_loader(source, PRE, 6, backend=backend))
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)
    assert sorted(ya.tolist()) == sorted(eval_labels.tolist())
    assert not torch.equal(a, eval_images)


@pytest.mark.skipif(not dali_installed(), reason=DALI_REASON)
@pytest.mark.parametrize("size", [64, 128])
def test_dali_and_torch_fallback_agree(cifar10_root, size):
    _, test = D.class_folder_splits(cifar10_root)
    source = test.subset(range(0, 500, 12))  # 42 images, every class
    pre = Preprocessing(input_size=size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    dali_images, dali_labels = collect(D.make_loader(source, pre, 16, backend="dali"))
    torch_images, torch_labels = collect(D.make_loader(source, pre, 16, backend="torch"))
    assert torch.equal(dali_labels, torch_labels)
    difference = (dali_images - torch_images).abs()
    # Measured on these images: max 0.0039, mean 0.0019 (about half a grey level at std 128/255):
    # both decode with libjpeg-turbo and resize bilinearly on pixel centers. Bounded at 4x that.
    assert difference.max() < 0.016 and difference.mean() < 0.008, (difference.max(), difference.mean())


def test_bfloat16_output(small_image_folder):
    source = D.scan_class_folder(str(small_image_folder))
    images, _ = collect(D.make_loader(source, PRE, 8, backend="torch", dtype=torch.bfloat16))
    assert images.dtype == torch.bfloat16


def write_cifar_pickles(root, cifar10_root, per_batch=4):
    """A real cifar-10-batches-py folder made from real CIFAR-10 JPEGs (decoded)."""
    from PIL import Image

    os.makedirs(root)
    classes = sorted(os.listdir(os.path.join(cifar10_root, "test")))
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    counter = 0
    for name in names:
        data, labels = [], []
        for _ in range(per_batch):
            label = counter % 10
            path = os.path.join(cifar10_root, "test", classes[label], f"{counter:04d}.jpg")
            data.append(np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1).reshape(-1))
            labels.append(label)
            counter += 1
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({b"data": np.stack(data), b"labels": labels}, f)
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes]}, f)
    return classes


@pytest.mark.parametrize("backend", backends())
def test_cifar_pickles_through_external_source(tmp_path, cifar10_root, backend):
    root = str(tmp_path / "cifar-10-batches-py")
    classes = write_cifar_pickles(root, cifar10_root)
    train = D.load_cifar_pickles(root, train=True)
    test = D.load_cifar_pickles(root, train=False)
    assert len(train) == 20 and len(test) == 4 and train.classes == classes
    assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == np.uint8
    images, labels = collect(D.make_loader(train, PRE, 6, backend=backend))
    assert images.shape == (20, 3, 64, 64) and labels.tolist() == train.labels.tolist()
    shard_sizes = [len(collect(D.make_loader(train, PRE, 6, backend=backend, shard_id=s, num_shards=3))[1])
                   for s in range(3)]
    assert shard_sizes == [7, 7, 7]  # as DistributedSampler: padded to 21 with the first sample again
    shard_sizes = [len(collect(D.make_loader(train, PRE, 6, backend=backend, shard_id=s, num_shards=3,
                                             drop_last=True))[1]) for s in range(3)]
    assert shard_sizes == [6, 6, 6]  # cut to 18, and no partial batch


@pytest.mark.parametrize("backend", backends())
def test_explicit_file_list(small_image_folder, backend):
    files = sorted(str(p) for p in small_image_folder.rglob("*.jpg"))[:5]
    source = D.file_list([(f, i % 2) for i, f in enumerate(files)], classes=["even", "odd"])
    _, labels = collect(D.make_loader(source, PRE, 2, backend=backend))
    assert labels.tolist() == [0, 1, 0, 1, 0]


def test_corrupt_image_is_named_or_skipped_with_a_report(small_image_folder):
    bad = small_image_folder / "cat" / "broken.jpg"
    good = (small_image_folder / "cat" / "0.jpg").read_bytes()
    bad.write_bytes(good[:200])  # a valid JPEG header, truncated data
    source = D.scan_class_folder(str(small_image_folder))
    with pytest.raises(D.DataError, match="broken.jpg"):
        source.verify()
    verified = source.verify(skip_corrupt=True)
    assert len(verified) == len(source) - 1 and [p for p, _ in verified.skipped] == [str(bad)]
    with pytest.raises(D.DataError, match="broken.jpg"):
        collect(D.make_loader(source, PRE, 4, backend="torch"))


@pytest.mark.skipif(not dali_installed(), reason=DALI_REASON)
def test_corrupt_image_under_dali_is_named(small_image_folder):
    (small_image_folder / "bird" / "broken.jpg").write_bytes((small_image_folder / "bird" / "0.jpg").read_bytes()[:200])
    source = D.scan_class_folder(str(small_image_folder))
    with pytest.raises(D.DataError, match="broken.jpg"):
        collect(D.make_loader(source, PRE, 4, backend="dali"))


@pytest.mark.parametrize("backend", backends())
def test_not_an_image_empty_class_and_no_class_folders_are_errors(tmp_path, small_image_folder, backend):
    # A scan lists files without reading them (so screen(on_error="skip") can leave a bad one out);
    # the loaders and screen name it.
    (small_image_folder / "cat" / "notes.jpg").write_text("not an image")
    source = D.scan_class_folder(str(small_image_folder))
    with pytest.raises(D.DataError, match="notes.jpg"):
        collect(D.make_loader(source, PRE, 4, backend=backend))
    with pytest.raises(D.DataError, match="notes.jpg"):
        D.screen(source)
    (small_image_folder / "cat" / "notes.jpg").unlink()
    (small_image_folder / "dog").mkdir()
    with pytest.raises(D.DataError, match="dog"):
        D.scan_class_folder(str(small_image_folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="no class folders"):
        D.scan_class_folder(str(tmp_path / "empty"))


def test_test_split_with_other_classes_is_an_error(tmp_path, small_image_folder):
    import shutil

    shutil.copytree(small_image_folder, tmp_path / "ds" / "train")
    shutil.copytree(small_image_folder, tmp_path / "ds" / "test")
    shutil.rmtree(tmp_path / "ds" / "test" / "ship")
    with pytest.raises(D.DataError, match=r"test has classes the training split has not \(none\) and lacks some it "
                                          r"has \('ship'\)$"):
        D.class_folder_splits(str(tmp_path / "ds"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="opencv"), "backend"), (dict(batch_size=0), "batch_size"),
    (dict(shard_id=2, num_shards=2), "shard_id"), (dict(dtype=torch.float16), "dtype"),
])
def test_loader_argument_errors(small_image_folder, kwargs, match):
    source = D.scan_class_folder(str(small_image_folder))
    spec = D.TransformSpec.for_backbone(PRE)
    batch_size = kwargs.pop("batch_size", 4)
    with pytest.raises(ValueError, match=match):
        D.ImageLoader(source, spec, batch_size, **kwargs)


@pytest.mark.parametrize("backend", backends())
def test_mirror_view_is_the_flipped_eval_image(small_image_folder, backend):
    source = D.scan_class_folder(str(small_image_folder))
    plain, _ = collect(D.ImageLoader(source, D.TransformSpec.for_backbone(PRE), 6, backend=backend))
    mirrored, _ = collect(D.ImageLoader(source, D.TransformSpec.for_backbone(PRE, mirror=True), 6, backend=backend))
    torch.testing.assert_close(mirrored, plain.flip(-1))
