"""The nineteenth hostile pass (on the eighteenth's fixes): an int8 graph refuses every image it
can't represent, in any batch (not only the first of each size), caches joined side by side keep
every part's calibration, torchrun's MASTER_PORT and MASTER_ADDR and a WORLD_SIZE below 1 are
one line, a link in place of a run's marker is named a link, and a damaged CIFAR batch names the
folder to remove (fetch finds it complete while its files are there)."""
import os
import pickle

import pytest
import torch

from conftest import cifar_subset, cli, darken, one_line_error, tiny_backbone

import fasttl
from fasttl.cache import engines

pytestmark = pytest.mark.skipif(not engines.onnxruntime_available(),
                                reason="onnxruntime is not installed (pip install onnx onnxruntime)")


def test_a_normal_photo_after_a_dark_one_is_refused_as_alone(tmp_path, cifar10_root, capsys, fresh_engines,
                                                             monkeypatch):
    """One image a batch: the first batch of size 1 was checked against fp32, the next never was,
    and the photo refused alone was predicted after a dark image."""
    plain = cifar_subset(cifar10_root, tmp_path / "plain", ["cat", "ship", "truck"], 10, 2)
    dark = darken(plain, tmp_path / "dark")
    run = tmp_path / "run"
    assert cli(capsys, "run", "--data", dark, "--image-size", "32", "--extract-precision", "int8", "--compare",
               "none", "--out", run, "--no-progress")[0] == 0
    monkeypatch.setattr(engines, "_EXPORTED", {})
    photo = plain / "test" / "ship" / "0.jpg"
    code, out, err = cli(capsys, "predict", "--run", run, "--batch-size", "1", "--no-progress",
                         dark / "test" / "cat" / "0.png", photo)
    line = one_line_error(err)
    assert code == 2 and out == "" and str(photo) in line and "beyond the range" in line
    assert "--extract-precision fp32" in line


def test_a_test_split_whose_later_batch_the_graph_cant_follow_is_refused(tmp_path, cifar10_root, capsys, fresh_engines):
    """Trained on dark images; the test split is 32 dark cats, then 32 normal ships and trucks (two
    batches of 32): the second batch was never checked and the run scored it."""
    plain = cifar_subset(cifar10_root, tmp_path / "plain", ["cat", "ship", "truck"], 10, 0)
    for name, count in (("cat", 32), ("ship", 16), ("truck", 16)):
        (plain / "test" / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            os.link(os.path.join(cifar10_root, "test", name, f"{i:04d}.jpg"), plain / "test" / name / f"{i}.jpg")
    data = darken(plain, tmp_path / "late", keep_normal=("ship", "truck"))
    code, _, err = cli(capsys, "run", "--data", data, "--image-size", "32", "--extract-precision", "int8",
                       "--mirror-views", "none", "--compare", "none", "--out", tmp_path / "run", "--no-progress")
    line = one_line_error(err)
    assert code == 2 and str(data / "test" / "ship" / "0.png") in line and "beyond the range" in line


def test_the_input_range_is_the_calibrations_and_a_share_outside_it_is_refused(lite0):
    """input_range against the calibration images' own range (widened to 0, within one step); an
    image with more than INT8_OUTSIDE_SHARE of its values outside is refused naming its row, one
    with fewer is not."""
    from fasttl.cache import quantize

    generator = torch.Generator().manual_seed(7)
    calibration = -torch.rand(8, 3, 32, 32, generator=generator) * 0.9 - 0.05  # values in [-0.95, -0.05]
    engine = engines.create("onnxruntime", "int8", lite0.for_extraction(), 0, torch.device("cpu"), 32,
                            calibration_images=calibration)
    low, high = engine.input_range
    step = (high - low) / 255
    assert abs(low - float(calibration.min())) <= step and high == pytest.approx(0.0, abs=step)  # 0 always held
    assert quantize.input_range(engines.export_onnx(lite0.for_extraction(), 0, 32)) is None  # fp32: no quantizer
    images = calibration[:3].clone()
    flat = images[2].view(-1)
    flat[: int(0.005 * flat.numel())] = 0.8  # 0.5% outside: kept
    engine(images)
    flat[: int(0.05 * flat.numel())] = 0.8  # 5% outside: refused, naming that image's row
    with pytest.raises(engines.BatchError, match=r"can't represent an image \(5% of its values beyond") as caught:
        engine(images)
    assert caught.value.row == 2


def test_caches_joined_side_by_side_keep_every_parts_calibration(lite0, small_source, tmp_path, fresh_engines):
    from fasttl.cache.extraction import calibration_sample
    from fasttl.cache.store import CacheError
    from fasttl.data import TransformSpec
    from fasttl.heads import train_head
    from fasttl.util.errors import OptionError

    from fasttl.backbones.base import CustomBackbone, Preprocessing

    tiny = tiny_backbone()  # with Lite0's normalization: parts of one feature space see the same pixels
    other = CustomBackbone(tiny.features, 8,
                           Preprocessing(16, lite0.preprocessing.mean, lite0.preprocessing.std, min_input_size=8),
                           name="tiny")
    kw = dict(image_size=32, precision="int8", progress=False, backend="torch", engine_dir=str(tmp_path))
    train, test = small_source.subset(range(0, 18, 2)), small_source.subset(range(1, 18, 2))
    samples = {b.name: calibration_sample(train, TransformSpec.for_backbone(b.preprocessing, size=32))
               for b in (lite0, other)}
    build = fasttl.FeatureCache.build
    train_joined = fasttl.FeatureCache.side_by_side([build(b, train, str(tmp_path / f"tr-{b.name}"), **kw)
                                                     for b in (lite0, other)])
    right = fasttl.FeatureCache.side_by_side([build(b, test, str(tmp_path / f"te-{b.name}"),
                                                    calibration=samples[b.name], **kw) for b in (lite0, other)])
    assert right.made_by() == train_joined.made_by()
    wrong = fasttl.FeatureCache.side_by_side([
        build(lite0, test, str(tmp_path / "te-l0"), calibration=samples[lite0.name], **kw),
        build(other, test, str(tmp_path / "te-self"), **kw)])  # the second part calibrated on the test images
    with pytest.raises(OptionError, match="int8 calibration sample"):
        train_head(train_joined, eval_cache=wrong, epochs=1, progress=False)
    with pytest.raises(CacheError, match="int8 calibration sample"):
        fasttl.FeatureCache.concat([right, wrong])


@pytest.mark.parametrize("variables, message", [
    ({"MASTER_PORT": "abc"}, "MASTER_PORT: expected a port number 1 to 65535, got 'abc'"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT: expected a port number 1 to 65535, got '99999'"),
    ({"MASTER_ADDR": "no-such-host.invalid"}, "MASTER_ADDR: 'no-such-host.invalid' does not resolve"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE: expected 1 or more processes, got '0'"),
    ({"WORLD_SIZE": "-2"}, "WORLD_SIZE: expected 1 or more processes, got '-2'"),
    # the twentieth pass: str.isdigit takes '\u00b2', which int() refuses; RANK against a WORLD_SIZE of 1
    ({"MASTER_PORT": "\u00b2"}, "MASTER_PORT: expected a port number 1 to 65535, got '\u00b2'"),
    ({"RANK": "\u00b2"}, "RANK: expected a number, got '\u00b2'"),
    ({"LOCAL_RANK": "\u00b2"}, "LOCAL_RANK: expected a number, got '\u00b2'"),
    ({"WORLD_SIZE": "1", "RANK": "1"}, "RANK='1' with WORLD_SIZE=1: a single process is rank 0"),
    ({"WORLD_SIZE": "1", "RANK": "x"}, "RANK='x' with WORLD_SIZE=1: a single process is rank 0")])
def test_torchrun_variables_torch_would_trace_back_on_are_one_line(variables, message, cat_ship, tmp_path,
                                                                   monkeypatch, capsys):
    for name, value in dict({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": "29561"}, **variables).items():
        monkeypatch.setenv(name, value)
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", tmp_path / "x", "--image-size", "32",
                       "--no-progress")
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "x").exists()


def test_a_link_in_place_of_a_runs_marker_is_named_a_link(three_classes, tmp_path, capsys, fresh_engines):
    run = tmp_path / "run"
    assert cli(capsys, "run", "--data", three_classes, "--image-size", "32", "--compare", "none", "--out", run,
               "--no-progress")[0] == 0
    os.rename(run / ".fasttl-run", tmp_path / "marker.json")
    os.symlink(tmp_path / "marker.json", run / ".fasttl-run")
    code, _, err = cli(capsys, "predict", "--run", run, sorted((three_classes / "test" / "cat").iterdir())[0])
    line = one_line_error(err)
    assert code != 0 and f"{run / '.fasttl-run'}: a link" in line and "--overwrite" in line


def test_a_damaged_cifar_batch_names_the_folder_to_remove(tmp_path):
    from fasttl.data import load_cifar_pickles
    from fasttl.util.errors import DataError

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a", b"b"]}, f, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(b"")  # a copy cut short by a full disk
    with pytest.raises(DataError, match=rf"remove {root} and download the batches again \(`fasttl data fetch cifar10`"):
        load_cifar_pickles(str(root), True)
