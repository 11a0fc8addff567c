"""The sixty-sixth hostile pass and the last read of session 32: a count given as a numpy 0-d
float array was cut to an integer (FeatureCache.loader(batch_size=np.array(3.7)) gave batches of
3), where a numpy scalar float was refused; predict --out, export --out and bench --json wrote
into a feature cache folder, which fasttl extract then refused as holding files not its own."""
import numpy as np
import pytest

import fasttl


@pytest.fixture
def small_cache(tmp_path):
    rows = np.arange(20, dtype=np.float32).reshape(5, 4)
    return fasttl.FeatureCache.write(str(tmp_path / "c"), [rows], [0, 1, 0, 1, 0], classes=["a", "b"], dtype="fp32")


# ---- last read: numpy numbers are taken as Python's, never truncated ---------------------------------------------
@pytest.mark.parametrize("given", [np.array(3.7), np.float32(2.5), np.bool_(True), np.array([3])],
                         ids=["0d-float-array", "float32", "bool_", "1d-array"])
def test_a_count_that_is_no_integer_is_refused_not_cut(small_cache, given):
    # before: np.array(3.7) became 3 (int() of a 0-d array), batches of 3 rows
    with pytest.raises(ValueError, match=r"^batch_size: expected a positive integer, got "):
        small_cache.loader(batch_size=given, shuffle=False)


@pytest.mark.parametrize("given", [np.array(2), np.int64(2), np.uint8(2)], ids=["0d-int-array", "int64", "uint8"])
def test_a_numpy_integer_count_is_taken(small_cache, given):
    sizes = [len(labels) for _, labels in small_cache.loader(batch_size=given, shuffle=False)]
    assert sizes == [2, 2, 1]


# ---- last read: predict, export and bench write no file into a feature cache folder -------------------------------
@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):
    from conftest import finished_run

    return finished_run(cat_ship, tmp_path_factory, "scratch66")


@pytest.mark.parametrize("command", ["predict", "export", "bench"])
def test_no_output_file_goes_into_a_feature_cache_folder(small_cache, scratch_run, cat_ship, capsys, command):
    import os

    from conftest import cli, one_line_error

    folder = small_cache.directory
    before = sorted(os.listdir(folder))
    target, words = {
        "predict": ("p.csv", ["predict", "--run", scratch_run, cat_ship / "test", "--no-progress", "--out"]),
        "export": ("m.onnx", ["export", scratch_run, "--out"]),
        "bench": ("b.json", ["bench", "adam", "--quick", "--json"]),
    }[command]
    option = "json" if command == "bench" else "out"
    code, _, err = cli(capsys, *words, os.path.join(folder, target))
    # before: the file was written there, and fasttl extract then refused its own cache as holding files not its own
    proof = next(name for name in before if name.startswith("features-"))
    assert code == 2 and one_line_error(err) == (
        f"fasttl: error: {option}: {os.path.join(folder, target)} is in the feature cache folder {folder} (it holds "
        f"{proof}), which only fasttl extract writes into; give --{option} a file outside it")
    assert sorted(os.listdir(folder)) == before


# ---- last read: a full-width twin of a class name is refused as a Cyrillic one is ---------------------------------
@pytest.mark.parametrize("twin", ["\uff43\uff41\uff54", "c\uff41t"], ids=["all-full-width", "one-full-width"])
def test_a_full_width_twin_of_a_name_is_refused(tmp_path, twin):
    from fasttl.data.labels import refuse_lookalikes
    from fasttl.util.errors import DataError

    # before: "cat" and "ｃａｔ" were two classes, told apart in no report
    with pytest.raises(DataError, match=r"^classes: 'cat' and .* differ only in letters drawn alike \(a Cyrillic, "
                                        r"Greek or full-width letter for a Latin one\)"):
        refuse_lookalikes(["cat", "dog", twin], "classes:")
    refuse_lookalikes(["dog", twin], "classes:")  # a name wholly its own is a name
