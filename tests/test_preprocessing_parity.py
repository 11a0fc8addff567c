"""One preprocessing: the DALI and PyTorch loaders, the feature cache builder and a run's model
give the same pixels and features, on photos of any size (not only CIFAR's 32 px)."""
import os
import shutil
import zlib

import pytest
import torch

import fasttl
import fasttl.data as D
from fasttl.backbones import Preprocessing
from conftest import dali_installed, DALI_REASON

needs_dali = pytest.mark.skipif(not dali_installed(), reason=DALI_REASON)
SIZES = [(500, 333), (333, 500), (640, 480), (97, 203), (32, 32), (161, 160)]


@pytest.fixture
def photos(tmp_path, cifar10_root):
    """Real CIFAR-10 test images re-encoded at the sizes above (down- and up-scaled on the way to a
    backbone's input, odd margins for the center crop), in two class folders."""
    from PIL import Image

    _, test = D.class_folder_splits(cifar10_root)
    for k, (w, h) in enumerate(SIZES * 2):
        folder = tmp_path / "photos" / ("a" if k % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.open(test.files[k * 37]).convert("RGB").resize((w, h), Image.LANCZOS)
        image.save(folder / f"{k}.jpg", quality=90)
    return D.scan_class_folder(str(tmp_path / "photos"))


def images(source, pre, backend, **kwargs):
    return torch.cat([x for x, _ in D.make_loader(source, pre, 5, backend=backend, **kwargs)])


@needs_dali
@pytest.mark.parametrize("pre", [Preprocessing(input_size=160, mean=(0.5,) * 3, std=(0.25,) * 3),
                                 Preprocessing(input_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                               crop_fraction=0.875),
                                 Preprocessing(input_size=57, mean=(0.5,) * 3, std=(0.25,) * 3, crop_fraction=0.9)],
                         ids=["160", "224-crop0.875", "57-odd"])
@pytest.mark.parametrize("mirror", [False, True])
def test_dali_and_torch_give_the_same_pixels(photos, pre, mirror):
    from fasttl.data.spec import TransformSpec

    spec = TransformSpec.for_backbone(pre, mirror=mirror)
    dali = torch.cat([x for x, _ in D.ImageLoader(photos, spec, 5, backend="dali")])
    torch_ = torch.cat([x for x, _ in D.ImageLoader(photos, spec, 5, backend="torch")])
    # Before: DALI rounded its resize to uint8, filtered the image border otherwise and rounded an odd
    # crop margin the other way: up to 30 grey levels apart, features 0.7-3.5% apart.
    levels = (dali - torch_).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255
    assert float(levels.max()) < 1e-3, float(levels.max())


@needs_dali
def test_a_cache_built_on_either_backend_holds_the_same_features(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTL_STATE_DIR", str(tmp_path / "state"))
    backbone = fasttl.backbones.create("efficientnet_lite0").freeze()
    caches = [fasttl.FeatureCache.build(backbone, photos, str(tmp_path / backend), image_size=96, backend=backend,
                                        dtype="fp32", engine="torch", progress=False)
              for backend in ("dali", "torch")]
    a, b = (c.all_features().float() for c in caches)
    rows = (a - b).norm(dim=1) / b.norm(dim=1)
    assert float(rows.median()) <= 0.005 and float(rows.max()) < 1e-4, rows


def test_model_refuses_another_input_size_by_name(tmp_path, cifar10_root, monkeypatch):
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    for name in ("cat", "ship"):
        os.makedirs(data / name)
        for i in range(4):
            src = os.path.join(cifar10_root, "test", name, f"{i:04d}.jpg")
            shutil.copy(src, data / name / f"{i}.jpg")
    fasttl.transfer.run(data=str(data), strategy="scratch", epochs=1, out=str(tmp_path / "run"), compare="none",
                        progress=False)
    model = fasttl.load_run(str(tmp_path / "run"))
    size = model.input_spec.size  # the small CNN's: the data's own 32 px
    g = torch.Generator().manual_seed(zlib.crc32(b"refuses"))
    right = torch.rand(2, 3, size, size, generator=g)
    assert model.model(right).shape == (2, 2)
    # A global-pool CNN would answer 64 px images too, differently from predict: refused instead.
    with pytest.raises(ValueError, match=rf"^images: got shape \(2, 3, 64, 64\), expected \(N, 3, {size}, {size}\)"):
        model.model(torch.rand(2, 3, 64, 64, generator=g))
    with pytest.raises(TypeError, match=r"^images: dtype torch.uint8"):
        model.model((right * 255).to(torch.uint8))
