"""The sixty-sixth hostile pass and the last read of session 32: a count given as a numpy 0-d
float array was cut to an integer (FeatureCache.loader(batch_size=np.array(3.7)) gave batches of
3), where a numpy scalar float was refused."""
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
