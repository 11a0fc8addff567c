"""The twenty-seventh hostile pass (int8 runs, interrupted builds, loaded runs; 26 attempts): a
cache manifest whose engine_graph is not an object crashed an int8 run (AttributeError), and an
--out naming an existing file in a run folder was told to pass --overwrite, which was then refused
as in the run folder. Loaded int8 runs in threads pushing each other's graphs out before their
engines had them, and messages naming an engine file after its graph was pushed out:
test_int8_runs.py."""
import hashlib
import json
import os

import pytest
import torch

import fasttl
from conftest import cli, finished_run, one_line_error
from fasttl.cache.store import CacheError

pytestmark = pytest.mark.usefixtures("private_cache")

GOOD_GRAPH = {"file": "engine-0123456789abcdef-int8.onnx", "bytes": 1234, "sha256": "ab" * 32}


@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):
    return finished_run(cat_ship, tmp_path_factory, "scratch27")


def _cache_with_graph(path, graph) -> str:
    fasttl.FeatureCache.write(str(path), [torch.ones(4, 3)], torch.zeros(4, dtype=torch.long), classes=["a"],
                              dtype="fp32")
    manifest_path = os.path.join(path, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["engine_graph"] = graph
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    return manifest_path


@pytest.mark.parametrize("graph", ["x", 5, [1], True, {"sha256": 5, "file": "f", "bytes": 1},
                                   {"sha256": "ab" * 32, "file": 7, "bytes": 1}, {"sha256": "AB" * 32, "file": "f",
                                                                                "bytes": 1},
                                   {"sha256": "ab" * 31, "file": "f", "bytes": 1},
                                   {"sha256": "ab" * 32, "file": "f", "bytes": -1}, {}],
                         ids=["string", "number", "list", "bool", "sha-number", "file-number", "sha-upper",
                              "sha-short", "bytes-negative", "empty"])
def test_a_manifest_engine_graph_of_the_wrong_shape_is_named(tmp_path, graph):
    manifest_path = _cache_with_graph(tmp_path / "c", graph)
    with pytest.raises(CacheError, match=r"manifest\.json: engine_graph is neither null nor an object of the graph's "
                                         r"file, bytes and sha256 \(64 hex digits\); rebuild the cache") as refused:
        fasttl.FeatureCache.open(str(tmp_path / "c"))
    assert manifest_path in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("graph", [None, GOOD_GRAPH, dict(GOOD_GRAPH, note="a field of a later fasttl")])
def test_a_manifest_engine_graph_as_build_writes_it_opens(tmp_path, graph):
    _cache_with_graph(tmp_path / "c", graph)
    assert fasttl.FeatureCache.open(str(tmp_path / "c")).manifest.get("engine_graph") == graph


@pytest.mark.parametrize("command", ["predict", "export"])
def test_an_existing_file_in_a_run_folder_is_refused_as_in_the_run_folder_first(scratch_run, cat_ship, tmp_path,
                                                                              capsys, command):
    """Not "exists; pass --overwrite", which --overwrite then can't get past."""
    target = scratch_run / "metrics.json"
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    for overwrite in ([], ["--overwrite"]):
        words = (["predict", "--run", scratch_run, cat_ship / "test" / "cat"] if command == "predict" else
                 ["export", scratch_run])
        code, _, err = cli(capsys, *words, "--out", target, *overwrite)
        message = one_line_error(err)
        assert code == 2 and "is in the fasttl run folder" in message and "--overwrite" not in message
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before
    os.symlink(tmp_path / "elsewhere.csv", scratch_run / "link.csv")  # a link there: the run folder named first too
    try:
        code, _, err = cli(capsys, "predict", "--run", scratch_run, cat_ship / "test" / "cat", "--out",
                           scratch_run / "link.csv")
        assert code == 2 and "is in the fasttl run folder" in one_line_error(err)
    finally:
        os.remove(scratch_run / "link.csv")
    assert not (tmp_path / "elsewhere.csv").exists()
