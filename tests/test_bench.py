"""`fasttl bench`: every benchmark runs in its smoke mode and writes its table, JSON and plot;
the e2e accuracy comparison is paired on the same images."""
import importlib
import json
import math
import os
import subprocess
import sys

import pytest

from fasttl.bench import runner
from fasttl.bench.e2e import paired_difference


def test_bench_all_quick_writes_tables_json_and_plot(tmp_path, cifar10_root):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    env = {"FASTTL_BENCH_DATA": cifar10_root, "FASTTL_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "fasttl", "bench", "all", "--quick", "--json", str(out_json),
                             "--plot", str(out_png)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    for name in runner.BENCHMARKS:
        assert f"## {name}" in result.stdout
    payload = json.loads(out_json.read_text())
    assert payload["quick"] is True and payload["machine"]["cores"] >= 1
    results = {r["name"]: r for r in payload["results"]}
    assert set(results) == set(runner.BENCHMARKS)
    for r in results.values():
        assert r["rows"] and r["table"].count("\n") >= 2
        bars = importlib.import_module(runner.BENCHMARKS[r["name"]]).speedups(r)  # each plot panel has bars
        assert bars and all(math.isfinite(ratio) and ratio > 0 for _, ratio in bars), r["name"]
    e2e = results["e2e"]
    recipe, ours = e2e["rows"]
    assert recipe["seconds"] > 0 and ours["seconds"] > 0
    assert e2e["speedup"] == pytest.approx(recipe["seconds"] / ours["seconds"])
    test_images = 10 * e2e["subset"]["test_per_class"]
    paired = e2e["paired"]
    # The paired counts agree with the two accuracies.
    assert paired["difference"] == pytest.approx(ours["accuracy"] - recipe["accuracy"], abs=1e-6)  # fp32 metrics
    assert paired["only_fasttl_right"] + paired["only_recipe_right"] <= test_images
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert runner._earlier_output(str(out_png), "plot") and runner._earlier_output(str(out_json), "json")
    extract = results["extract"]  # each engine beside the machine's measured ceiling
    assert extract["peaks"]["fp32_gflops"] > 0
    for row in extract["rows"]:
        assert row["gflops"] == pytest.approx(2 * row["gmacs_per_image"] * row["images_per_s"])
        assert row["fraction_of_fp32_peak"] == pytest.approx(row["gflops"] / extract["peaks"]["fp32_gflops"])
    assert "GFLOP/s (of fp32 peak" in extract["table"]
    int8 = [r for r in extract["rows"] if r["precision"] == "int8"]
    assert int8 and all(r["engine"] == "onnxruntime" and 0 < r["relative_error"] < 1 for r in int8)
    for row in int8:  # int8 arithmetic against the int8 GEMM rate, where torch measured one
        peak = extract["peaks"]["int8_gops"]
        assert row["fraction_of_int8_peak"] == (pytest.approx(row["gflops"] / peak) if peak else None)


def test_paired_difference_counts_disagreements():
    ours = [True, True, False, True, False, True]
    recipe = [True, False, False, False, True, True]
    paired = paired_difference(ours, recipe)
    assert paired["only_fasttl_right"] == 2 and paired["only_recipe_right"] == 1
    assert paired["difference"] == pytest.approx(1 / 6)
    # Variance of the mean of per-image differences (+1, -1, 0): (3 - 1/6) / 36.
    assert paired["standard_error"] == pytest.approx(((2 + 1) - 1 / 6) ** 0.5 / 6)
    same = paired_difference([True, False], [True, False])
    assert same == {"difference": 0.0, "standard_error": 0.0, "only_fasttl_right": 0, "only_recipe_right": 0}


@pytest.mark.parametrize("value", ["100", "a,b", "0,10", "10,-1"])
def test_bench_e2e_subset_option_rejects_bad_values(value):
    result = subprocess.run([sys.executable, "-m", "fasttl", "bench", "e2e", "--e2e-subset", value],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--e2e-subset" in result.stderr


def test_macs_per_image_counts_convolutions_and_linear_layers_as_written_by_hand():
    from torch import nn

    from fasttl.bench.ceiling import macs_per_image

    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1),             # 8 x 9 x 9 outputs, 27 MACs each
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise: 9 MACs each
                          nn.Conv2d(8, 16, 1),                                  # pointwise: 8 MACs each
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    expected = 8 * 81 * 27 + 8 * 81 * 9 + 16 * 81 * 8 + 5 * 16
    assert macs_per_image(model, 17) == expected
    assert macs_per_image(model, 17) == expected  # the hooks are gone: counted once, not twice


def test_the_default_backbones_cost_is_what_its_architecture_says():
    from fasttl import backbones
    from fasttl.bench.ceiling import macs_per_image

    # EfficientNet-Lite0 is about 0.39 GMACs at 224 px (its paper and timm's count); the cost grows
    # with the image area (224 and 448 px divide by every stride: 4 times the area, 4 times the work,
    # but for the classifier's 1.28 M).
    model = backbones.create("efficientnet_lite0", pretrained=False).eval()
    at_224 = macs_per_image(model, 224)
    assert 0.35e9 < at_224 < 0.43e9
    assert macs_per_image(model, 448) - 1280 * 1000 == pytest.approx(4 * (at_224 - 1280 * 1000), rel=1e-6)


def test_machine_peaks_are_measured_rates():
    from fasttl.bench.ceiling import machine_peaks

    peaks = machine_peaks("cpu", size=256)
    assert peaks["fp32_gflops"] > 0.1 and math.isfinite(peaks["fp32_gflops"])
    assert peaks["int8_gops"] is None or peaks["int8_gops"] > 0.1
