"""What the fifteenth hostile pass of the second hardening round found: each case kept with the
fix that answers it (the block order's own cases are in test_cache_order.py)."""
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import fasttl
from conftest import cli, one_line_error, tiny_backbone
from fasttl.cache.store import CacheError
from fasttl.data import DataError

pytestmark = pytest.mark.usefixtures("private_cache")


def _list_of(tmp_path, rows, name="list.csv"):
    (tmp_path / name).write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return tmp_path / name


def _images(cat_ship, split="train"):
    return [(str(p), p.parent.name) for p in sorted((cat_ship / split).glob("*/*.jpg"))]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
def test_a_pipe_in_a_list_is_never_waited_on(cat_ship, tmp_path, capsys):
    """The training-images record hashes regular files only; a listed pipe is named by the run's
    screen, never opened for a read that waits for a writer."""
    from fasttl.transfer import trained_images

    (tmp_path / "data").mkdir()
    os.mkfifo(tmp_path / "data" / "pipe.jpg")
    rows = _images(cat_ship) + [(str(tmp_path / "data" / "pipe.jpg"), "cat")]
    source = fasttl.data.formats.open_data(str(_list_of(tmp_path / "data", rows)))
    assert trained_images._hashes_by_row(source)[-1] is None
    command = [sys.executable, "-m", "fasttl", "run", "--data", str(tmp_path / "data" / "list.csv"), "--image-size",
               "32", "--compare", "none", "--out", str(tmp_path / "run"), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FASTTL_CACHE_DIR=str(tmp_path / "cache")))
    assert done.returncode == 2 and "pipe.jpg" in one_line_error(done.stderr)


@pytest.mark.parametrize("kind", ["large_string", "dictionary", "large_dictionary"])
def test_every_text_type_of_a_parquet_list_is_measured_before_it_decodes(tmp_path, monkeypatch, kind):
    pa = pytest.importorskip("pyarrow", reason="Parquet lists need pyarrow")
    import pyarrow.parquet as pq

    from fasttl.data.formats import filelist

    monkeypatch.setattr(filelist, "MAX_LIST_TEXT", 100_000)
    n = 2000
    value = "d/" + "a" * 500 + ".jpg"
    path = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))
    label = pa.DictionaryArray.from_arrays(pa.array(np.arange(n, dtype=np.int32) % 2), pa.array(["a", "b"]))
    if kind == "large_string":
        path, label = path.cast(pa.large_string()), label.cast(pa.large_string())
    elif kind == "large_dictionary":
        path = pa.DictionaryArray.from_arrays(path.indices, path.dictionary.cast(pa.large_string()))
    pq.write_table(pa.table({"path": path, "label": label}), str(tmp_path / "bomb.parquet"), compression="zstd")
    stored = pq.read_schema(str(tmp_path / "bomb.parquet")).field("path").type
    assert pa.types.is_dictionary(stored) == (kind != "large_string")
    with pytest.raises(DataError, match="characters of paths and labels once decoded, more than the 100,000"):
        filelist.read_file_list(str(tmp_path / "bomb.parquet"))


@pytest.mark.parametrize("column,kind", [("path", "binary"), ("path", "int64"), ("label", "double"),
                                         ("label", "binary")])
def test_a_parquet_column_of_another_type_is_refused_before_it_is_read(tmp_path, monkeypatch, column, kind):
    pa = pytest.importorskip("pyarrow", reason="Parquet lists need pyarrow")
    import pyarrow.parquet as pq

    from fasttl.data.formats import filelist

    cells = {"binary": pa.array([b"a.jpg", b"b.jpg"]), "int64": pa.array([1, 2]), "double": pa.array([0.0, 1.0])}
    columns = {"path": pa.array(["a.jpg", "b.jpg"]), "label": pa.array(["x", "y"])}
    columns[column] = cells[kind]
    pq.write_table(pa.table(columns), str(tmp_path / "l.parquet"))

    def never(*args, **kwargs):
        raise AssertionError("the column was read before its type was checked")

    monkeypatch.setattr(pq, "read_table", never)
    with pytest.raises(DataError, match=f"column {column} holds {kind} values"):
        filelist.read_file_list(str(tmp_path / "l.parquet"))


def _shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_a_tar_member_larger_than_an_image_is_refused_unread(cat_ship, tmp_path, monkeypatch):
    """Its header's size is checked before any read; the record reads only a member's edges."""
    from fasttl.data import sources
    from fasttl.data.formats.webdataset import read_webdataset
    from fasttl.transfer import trained_images

    image = _images(cat_ship)[0][0]
    data = open(image, "rb").read()
    big = data + bytes(20_000)
    _shard(tmp_path / "s.tar", [("a.jpg", data), ("a.cls", b"0"), ("b.jpg", big), ("b.cls", b"1")])
    shards = read_webdataset(str(tmp_path / "s.tar"), ["x", "y"])
    reads = []

    class Counted:  # the shard as TarSource opens it, each read's size kept
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def seek(self, offset):
            return self.file.seek(offset)

        def read(self, n=-1):
            reads.append(n)
            return self.file.read(n)

    monkeypatch.setattr(sources, "open", Counted, raising=False)
    hashes = trained_images._hashes_by_row(shards)
    assert max(reads) <= trained_images.EDGE and None not in hashes
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", len(data) + 10)
    reads.clear()
    with pytest.raises(DataError, match=r"s.tar/b: 2\d,\d\d\d bytes, more than the .* an image file may have"):
        shards.read(1)
    assert reads == []
    assert shards.read(0) == data


def test_the_engine_graph_never_goes_among_the_other_split_or_above_it(cat_ship, tmp_path):
    """data/test/<class> and data/ itself hold the data set's images too (train/'s root is data/train)."""
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    train, _ = fasttl.data.class_folder_splits(str(data))
    for engine_dir in (data / "test" / "cat", data, data / "engines"):
        with pytest.raises(CacheError, match="engine_dir: .* is inside the data folder"):
            fasttl.FeatureCache.build(tiny_backbone(), train, str(tmp_path / "c"), progress=False,
                                      engine="onnxruntime", engine_dir=str(engine_dir))
    assert not [p for p in data.rglob("engine-*")] and not (tmp_path / "c").exists()


def test_bench_plots_are_known_by_their_metadata_field_only():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fasttl.bench.runner import PLOT_TITLE, _plot_of_bench

    fig = plt.figure()
    for kind in ("png", "pdf", "svg"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=kind, metadata={"Title": PLOT_TITLE})
        assert _plot_of_bench(f"p.{kind}", buffer.getvalue())
        other = io.BytesIO()
        fig.savefig(other, format=kind, metadata={"Title": "my figure"})
        assert not _plot_of_bench(f"p.{kind}", other.getvalue() + PLOT_TITLE.encode())
    plt.close(fig)
    slide = f'<svg xmlns="http://www.w3.org/2000/svg"><text>Figure 3: {PLOT_TITLE}</text></svg>'.encode()
    assert not _plot_of_bench("slides.svg", slide)
    assert not _plot_of_bench("notes.txt", PLOT_TITLE.encode())


def test_writes_never_go_among_the_images_a_list_names_from_afar(cat_ship, tmp_path, monkeypatch, capsys):
    """A list elsewhere naming images by absolute path: the feature cache and an extract's cache
    folder are refused among those images, before anything is written (a run folder may lie there:
    scans pass over it)."""
    images = tmp_path / "images"
    shutil.copytree(cat_ship / "train", images)
    lists = tmp_path / "lists"
    lists.mkdir()
    listed = _list_of(lists, [(str(p), p.parent.name) for p in sorted(images.glob("*/*.jpg"))])
    code, _, err = cli(capsys, "extract", "--data", listed, "--out", images / "cat" / "x", "--image-size", "32",
                       "--no-progress")
    assert code == 2 and "the cache folder --out" in one_line_error(err)
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(images / "ship" / "cache"))
    code, _, err = cli(capsys, "run", "--data", listed, "--image-size", "32", "--compare", "none", "--out",
                       tmp_path / "run", "--no-progress")
    assert code == 2 and "FASTTL_CACHE_DIR" in one_line_error(err)
    assert sorted(p.name for p in images.rglob("*") if p.is_dir()) == ["cat", "ship"]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("words", [["--help"], ["run", "--help"], ["bench", "--help"], ["data", "fetch", "--help"]])
def test_help_into_a_full_disk_is_one_line(words):
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "fasttl", *words], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["fasttl: error: standard output: no space left on the device (free "
                                                "some, or write elsewhere); nothing half-written was kept"]


@pytest.mark.parametrize("row", ["{p},\n", "{p}\x01,cat\n", "{p},ca\u200bt\n"])
def test_a_long_path_is_cut_in_every_list_message(tmp_path, row):
    """An empty label, a control character in the path, an invisible one in the label."""
    from fasttl.data.formats.filelist import read_file_list

    (tmp_path / "l.csv").write_text("path,label\n" + row.format(p="d/" + "a" * 100_000 + ".jpg") + "x.jpg,dog\n")
    with pytest.raises(DataError) as refused:
        read_file_list(str(tmp_path / "l.csv"))
    assert len(str(refused.value)) < 800 and re.search(r"\(100,0\d\d characters\)", str(refused.value))


def test_out_holding_the_cache_folder_names_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = cli(capsys, "run", "--image-size", "32", "--compare", "none", "--out", tmp_path / "cache",
                       "--no-progress")
    line = one_line_error(err)
    assert code == 2 and line.startswith(f"fasttl: error: out: {tmp_path / 'cache'} holds FASTTL_CACHE_DIR=")
    assert "give the run another --out" in line and "run folder" not in line
