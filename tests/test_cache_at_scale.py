"""Feature precomputation at scale: caches that stay memory-mapped on disk (the loader over the maps
equals gathering in RAM), FeatureCache.write, checksums verified once and recorded, file lists
(CSV/TSV/Parquet) and WebDataset shards equal to class folders row for row, skip-and-report
keeping rows aligned, and a two-"node" torchrun build equal to one process.

Image tests use a one-convolution backbone over small real CIFAR-10 JPEGs (fast); the torchrun
test runs the real `fasttl extract`."""
import csv
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile

import pytest
import torch

import fasttl
import fasttl.data as D
from fasttl.cache import CacheError, format as cache_format
from fasttl.cache.kernels import ShardTable, gather
from fasttl.data.formats.filelist import read_file_list
from fasttl.data.formats.webdataset import read_webdataset
from fasttl.util.errors import DataError
from fasttl.extract import format_summary

from conftest import CUDA_REASON, backends, tiny_backbone


def build(source, out, **kw):
    kw.setdefault("shard_rows", 5)
    kw.setdefault("backend", "torch")
    return fasttl.FeatureCache.build(tiny_backbone(), source, str(out), progress=False, **kw)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# -- FeatureCache.write and the memory-mapped reader -------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
def test_write_round_trips_and_opens_as_memory_maps(tmp_path, dtype):
    x = torch.randn(1003, 37) * 3
    labels = torch.randint(0, 4, (1003,))
    chunks = [x[:1].numpy(), x[1:400], x[400:400].double(), x[400:].to(torch.float16)]  # any sizes, types
    ids = [f"shard-{i // 100}/{i}" for i in range(1003)]
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), chunks, labels, classes=list("abcd"), dtype=dtype,
                                      sample_ids=ids, fingerprint={"model": "mine", "version": 3}, shard_rows=128)
    assert cache.last_build["rows"] == 1003 and cache.last_build["shards"] == 8
    reopened = fasttl.FeatureCache.open(str(tmp_path / "c"))
    assert len(reopened) == 1003 and reopened.feature_dim == 37 and reopened.classes == list("abcd")
    assert torch.equal(reopened.labels, labels) and reopened.samples == ids
    assert reopened.fingerprint["user"] == {"model": "mine", "version": 3} and reopened.fingerprint["dtype"] == dtype
    # Every shard is a map of its file, not a copy: the tensor's memory is inside a file mapping.
    assert len(reopened.shards) == 8 and all(isinstance(s, torch.Tensor) for s in reopened.shards)
    maps = open("/proc/self/maps").read()
    name = reopened.manifest["shards"][3]["features"]["file"]
    assert name in maps
    given = torch.cat([x[:400], x[400:].half().float()])  # what the chunks held
    stored = reopened.all_features()
    if dtype == "int8":
        assert ((stored - given).abs() <= given.abs().amax(1, keepdim=True) / 254 + 1e-5).all()
    else:
        expected = given.to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]).float()
        torch.testing.assert_close(stored, expected, rtol=0, atol=0)
    # The same rows as writing the whole array at once (chunking does not change a bit).
    whole = fasttl.FeatureCache.write(str(tmp_path / "whole"), [given], labels, classes=list("abcd"), dtype=dtype,
                                      shard_rows=1003)
    torch.testing.assert_close(whole.all_features(), stored, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_loader_over_maps_equals_gathering_in_ram(tmp_path, dtype):
    x = torch.randn(777, 24)
    labels = torch.randint(0, 3, (777,))
    mapped = fasttl.FeatureCache.write(str(tmp_path / "c"), [x], labels, classes=["a", "b", "c"], dtype=dtype,
                                       shard_rows=100)
    in_ram = mapped.to("cpu")
    assert len(in_ram.shards) == 1 and len(mapped.shards) == 8
    for shuffle, out_dtype in ((True, torch.float32), (False, torch.bfloat16), (True, torch.bfloat16)):
        got = list(mapped.loader(64, shuffle=shuffle, seed=5, out_dtype=out_dtype))
        want = list(in_ram.loader(64, shuffle=shuffle, seed=5, out_dtype=out_dtype))
        assert len(got) == len(want) == 13
        for (f, y), (g, z) in zip(got, want):
            assert torch.equal(f, g) and torch.equal(y, z) and f.dtype == out_dtype
    indices = torch.randint(0, 777, (300,))
    assert torch.equal(mapped.gather(indices), in_ram.gather(indices))
    assert torch.equal(mapped.gather(indices), gather(in_ram.features, indices, in_ram.scales))
    with pytest.raises(ValueError, match="777"):
        mapped.gather(torch.tensor([0, 777]))
    with pytest.raises(ValueError, match="-1"):
        mapped.gather(torch.tensor([-1]))
    # Subsets and concatenations (head tuning) come out in memory and hold the same rows.
    rows = [5, 700, 3, 3, 450]
    subset = mapped.subset(rows)
    assert torch.equal(subset.all_features(), in_ram.all_features()[rows])
    assert subset.labels.tolist() == labels[rows].tolist() and subset.samples == [str(r) for r in rows]
    both = fasttl.FeatureCache.concat([mapped, subset])
    assert len(both) == 782 and torch.equal(both.all_features()[777:], subset.all_features())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_loader_from_maps_to_cuda_goes_through_pinned_staging(tmp_path):
    x, labels = torch.randn(1000, 40), torch.randint(0, 3, (1000,))
    mapped = fasttl.FeatureCache.write(str(tmp_path / "c"), [x], labels, classes=["a", "b", "c"], shard_rows=96)
    in_ram = mapped.to("cpu")
    kept = list(mapped.loader(64, shuffle=True, seed=2, device="cuda"))  # batches held while later ones stage
    want = list(in_ram.loader(64, shuffle=True, seed=2))
    assert len(kept) == len(want) == 16
    for (f, y), (g, z) in zip(kept, want):
        assert f.is_cuda and y.is_cuda and torch.equal(f.cpu(), g) and torch.equal(y.cpu(), z)
    on_gpu = mapped.to("cuda")
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.all_features().cpu(), in_ram.all_features())


def test_nothing_writes_into_the_maps(tmp_path):
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [torch.randn(300, 16)], torch.randint(0, 2, (300,)),
                                      classes=["a", "b"], shard_rows=64)
    before = {name: sha(tmp_path / "c" / name) for name in os.listdir(tmp_path / "c") if not name.startswith(".")}
    for _ in cache.loader(50, shuffle=True):
        pass
    cache.subset(range(0, 300, 7)), cache.all_features(), cache.features, cache.to("cpu")
    # Even a write by mistake lands in a private copy-on-write page, never in the file, never a fault.
    cache.shards[0][0, 0] = 1234.0
    cache.labels[0] = 1
    after = {name: sha(tmp_path / "c" / name) for name in before}
    assert after == before
    assert float(fasttl.FeatureCache.open(str(tmp_path / "c")).shards[0][0, 0]) != 1234.0


def test_opening_costs_no_anonymous_memory(tmp_path):
    """The rows stay in the page cache (file-backed), not in the process's own memory."""
    from fasttl.bench.cache_scale import rss_anon_bytes

    rows = 200_000
    fasttl.FeatureCache.write(str(tmp_path / "c"), (torch.randn(50_000, 64) for _ in range(4)),
                              torch.zeros(rows, dtype=torch.int64), classes=["a", "b"], shard_rows=16384)
    before = rss_anon_bytes()
    cache = fasttl.FeatureCache.open(str(tmp_path / "c"))
    assert len(cache) == rows and cache.nbytes() == rows * 64 * 2  # 25.6 MB of rows
    assert rss_anon_bytes() - before < 4 * 2**20


def test_checksums_are_verified_once_then_recorded(tmp_path, monkeypatch):
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [torch.randn(50, 8)], torch.zeros(50, dtype=torch.int64),
                                      classes=["a", "b"], shard_rows=16)
    hashed = []
    real = cache_format._sha256_open
    monkeypatch.setattr(cache_format, "_sha256_open", lambda f: hashed.append(f.name) or real(f))
    fasttl.FeatureCache.open(str(tmp_path / "c"))
    assert hashed == []  # the writer recorded what it hashed as it wrote
    fasttl.FeatureCache.open(str(tmp_path / "c"), verify="full")
    assert len(hashed) == 6  # 4 shards, the labels and the sample ids
    # A byte changed in place, its mtime set back: the ctime still moved, so the file is hashed again.
    shard = tmp_path / "c" / cache.manifest["shards"][2]["features"]["file"]
    info = os.stat(shard)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(info.st_atime_ns, info.st_mtime_ns))
    hashed.clear()
    with pytest.raises(CacheError, match=f"{shard.name}.*checksum"):
        fasttl.FeatureCache.open(str(tmp_path / "c"))
    assert len(hashed) == 1
    assert len(fasttl.FeatureCache.open(str(tmp_path / "c"), verify=False)) == 50  # sizes and headers only
    with pytest.raises(ValueError, match="verify"):
        fasttl.FeatureCache.open(str(tmp_path / "c"), verify="sometimes")


def test_write_refuses_what_does_not_fit(tmp_path):
    write = fasttl.FeatureCache.write
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match="labels: 9 labels for 10 rows"):
        write(str(tmp_path / "a"), [x], y[:9], classes=["a", "b"])
    with pytest.raises(ValueError, match="chunk 1 has 5 columns"):
        write(str(tmp_path / "b"), [x, torch.randn(2, 5)], torch.zeros(12, dtype=torch.int64), classes=["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        write(str(tmp_path / "c"), [x.masked_fill(x > 1, float("nan"))], y, classes=["a", "b"])
    with pytest.raises(ValueError, match="label 2, outside the 2 classes"):
        write(str(tmp_path / "d"), [x], y + 2, classes=["a", "b"])
    with pytest.raises(ValueError, match="classes"):
        write(str(tmp_path / "e"), [x], y, classes="ab")
    with pytest.raises(ValueError, match="sample_ids: 3 ids"):
        write(str(tmp_path / "f"), [x], y, classes=["a", "b"], sample_ids=["1", "2", "3"])
    with pytest.raises(ValueError, match="fingerprint: not JSON"):
        write(str(tmp_path / "g"), [x], y, classes=["a", "b"], fingerprint={"f": object()})
    for name in "abcdefg":  # no manifest was left behind by a refused write
        assert not (tmp_path / name / "manifest.json").exists()
    write(str(tmp_path / "h"), [x], y, classes=["a", "b"])
    with pytest.raises(CacheError, match="already holds a cache"):
        write(str(tmp_path / "h"), [x], y, classes=["a", "b"])
    (tmp_path / "h" / "mine.txt").write_text("keep")
    again = write(str(tmp_path / "h"), [x * 2], y, classes=["a", "b"], overwrite=True)
    torch.testing.assert_close(again.all_features(), (x * 2).half().float())
    assert (tmp_path / "h" / "mine.txt").read_text() == "keep"
    assert sorted(n for n in os.listdir(tmp_path / "h") if n.startswith("features-")) == \
        sorted(s["features"]["file"] for s in again.manifest["shards"])


def test_written_cache_trains_a_head(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=generator) * 3
    labels = torch.randint(0, 3, (600,), generator=generator)
    x = centers[labels] + torch.randn(600, 16, generator=generator)
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), x.split(97), labels, classes=["a", "b", "c"],
                                      shard_rows=128)
    fit = fasttl.heads.train_head(cache, epochs=5, batch_size=32, lr=1e-2, progress=False)
    history = fit.history
    assert isinstance(fit.head, torch.nn.Sequential) and fit.head[-1].out_features == 3
    assert history[-1]["train_accuracy"] > 0.9


def test_head_statistics_of_a_large_cache_are_read_in_chunks(tmp_path, monkeypatch):
    from fasttl.heads import train as heads

    x = torch.randn(2000, 30) * torch.rand(30) * 5 + torch.randn(30)
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [x], torch.zeros(2000, dtype=torch.int64),
                                      classes=["a", "b"], dtype="fp32", shard_rows=300)
    exact = heads.feature_statistics(cache)  # small: from one copy in memory
    monkeypatch.setattr(heads, "STATISTICS_IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(fasttl.FeatureCache, "all_features", lambda *a, **k: pytest.fail("copied the whole cache"))
    streamed = heads.feature_statistics(cache)
    torch.testing.assert_close(streamed[0], exact[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(streamed[1], exact[1], rtol=1e-5, atol=1e-6)


def test_shard_table_checks_its_shards():
    with pytest.raises(ValueError, match="shard 1 has 6 rows"):
        ShardTable([torch.zeros(5, 3), torch.zeros(6, 3), torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="shard 1"):
        ShardTable([torch.zeros(4, 3), torch.zeros(4, 2)])
    with pytest.raises(ValueError, match="scales"):
        ShardTable([torch.zeros(4, 3, dtype=torch.int8)])
    table = ShardTable([torch.arange(12.).view(4, 3), torch.arange(12., 18.).view(2, 3)])
    out = torch.full((3, 3), float("nan"))
    table.gather(torch.tensor([5, 0, 3]), out=out)
    assert out.tolist() == [[15., 16., 17.], [0., 1., 2.], [9., 10., 11.]]
    grouped = table.gather(torch.tensor([5, 0, 3]), method="grouped")
    assert torch.equal(grouped, out)


# -- file lists and WebDataset shards ----------------------------------------------------------------------

def write_list(folder, source, name="list.csv", delimiter=","):
    with open(folder / name, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["path", "label", "note"])
        for path, label in zip(source.files, source.labels):
            writer.writerow([os.path.relpath(path, folder), source.classes[label], "x"])
    return folder / name


def write_tars(out, source, per_shard=7, extra=()):
    """WebDataset shards of a FileSource in its order; `extra`: (name, bytes) added to the last tar."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(source), per_shard)):
        path = os.path.join(out, f"train-{shard:06d}.tar")
        with tarfile.open(path, "w") as tar:
            members = [(f"{i:05d}.jpg", open(source.files[i], "rb").read()) for i in
                       range(start, min(len(source), start + per_shard))]
            members = [m for i, (name, data) in enumerate(members)
                       for m in ((name, data), (name.replace(".jpg", ".cls"), str(source.labels[start + i]).encode()))]
            if start + per_shard >= len(source):
                members += list(extra)
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return os.path.join(out, f"train-{{000000..{len(paths) - 1:06d}}}.tar")


@pytest.mark.parametrize("backend", backends())
def test_list_webdataset_and_class_folder_caches_are_equal(small_image_folder, tmp_path, backend):
    folders = D.scan_class_folder(str(small_image_folder))
    listed = read_file_list(str(write_list(small_image_folder, folders)))
    assert listed.files == folders.files and listed.labels == folders.labels and listed.classes == folders.classes
    assert listed.sample_ids() == folders.sample_ids()
    (tmp_path / "classes.txt").write_text("\n".join(folders.classes) + "\n")
    pattern = write_tars(tmp_path / "wds", folders)
    shards = read_webdataset(pattern, D.labels.read_classes_file(str(tmp_path / "classes.txt")))
    assert len(shards) == 18 and shards.labels == folders.labels and shards.classes == folders.classes
    assert shards.sample_ids()[:2] == ["train-000000.tar/00000", "train-000000.tar/00001"]
    caches = {name: build(source, tmp_path / "caches" / name, backend=backend)
              for name, source in (("folders", folders), ("list", listed), ("wds", shards))}
    for name in ("list", "wds"):
        assert torch.equal(caches[name].features, caches["folders"].features), name
        assert torch.equal(caches[name].labels, caches["folders"].labels), name
    assert caches["list"].samples == caches["folders"].samples  # both relative to the same folder
    assert caches["wds"].samples == shards.sample_ids()
    # TSV, and integer labels with a classes file, give the same list.
    tsv = write_list(small_image_folder, folders, "list.tsv", "\t")
    assert read_file_list(str(tsv)).files == folders.files
    assert read_webdataset(pattern).classes == ["0", "1", "2"]


def test_file_list_and_webdataset_refusals(small_image_folder, tmp_path):
    (tmp_path / "nolabel.csv").write_text("path,class\na.jpg,1\n")
    with pytest.raises(DataError, match="no label column"):
        read_file_list(str(tmp_path / "nolabel.csv"))
    (tmp_path / "blank.csv").write_text("path,label\na.jpg,cat\nb.jpg, \n")
    with pytest.raises(DataError, match=r"blank\.csv row 2 \(b\.jpg\) has an empty label"):
        read_file_list(str(tmp_path / "blank.csv"))
    (tmp_path / "one.csv").write_text("path,label\na.jpg,cat\nb.jpg,cat\n")
    with pytest.raises(DataError, match="only 1 class"):
        read_file_list(str(tmp_path / "one.csv"))
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "bad.csv").write_text("path,label\na.jpg,cat\nb.jpg,bird\n")
    with pytest.raises(DataError, match="label 'bird' is not one of the 2 classes of the classes file$"):
        read_file_list(str(tmp_path / "bad.csv"), ["cat", "dog"])
    with pytest.raises(DataError, match="does not exist"):
        read_file_list(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="does not exist"):
        read_webdataset(str(tmp_path / "none-{000000..000001}.tar"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(DataError, match="not a readable tar"):
        read_webdataset(str(tmp_path / "junk.tar"))
    assert D.formats.webdataset.expand_braces("s-{08..10}-{a,b}.tar") == ["s-08-a.tar", "s-08-b.tar", "s-09-a.tar",
                                                              "s-09-b.tar", "s-10-a.tar", "s-10-b.tar"]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "list.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match="needs pyarrow"):
            read_file_list(str(tmp_path / "list.parquet"))


def test_a_parquet_list_equals_the_csv_list_and_bad_parquet_is_named(small_image_folder, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow; the test extra has it)")
    import pyarrow.parquet as pq

    folders = D.scan_class_folder(str(small_image_folder))
    from_csv = read_file_list(str(write_list(small_image_folder, folders)))
    paths = [os.path.relpath(p, small_image_folder) for p in folders.files]
    pq.write_table(pa.table({"path": paths, "label": [folders.classes[i] for i in folders.labels],
                             "note": ["x"] * len(paths)}), small_image_folder / "list.parquet")
    from_parquet = read_file_list(str(small_image_folder / "list.parquet"))
    assert from_parquet.files == from_csv.files == folders.files
    assert from_parquet.labels == from_csv.labels and from_parquet.classes == from_csv.classes
    assert from_parquet.sample_ids() == from_csv.sample_ids()
    # integer labels with a classes list, as a WebDataset's .cls files hold them: said so (labels_kind)
    pq.write_table(pa.table({"path": paths, "label": list(folders.labels)}), small_image_folder / "ints.parquet")
    assert read_file_list(str(small_image_folder / "ints.parquet"), folders.classes, "indices").labels == folders.labels
    with pytest.raises(DataError, match=r"label '0' is not one of the 3 classes of the classes file \(to give labels as "
                                         r"indices into it, pass --labels indices\)"):
        read_file_list(str(small_image_folder / "ints.parquet"), folders.classes)
    # what bad Parquet gets: one DataError naming the file
    (tmp_path / "cut.parquet").write_bytes((small_image_folder / "list.parquet").read_bytes()[:100])
    with pytest.raises(DataError, match=r"cut\.parquet is not a readable Parquet file"):
        read_file_list(str(tmp_path / "cut.parquet"))
    pq.write_table(pa.table({"file": paths, "label": list(folders.labels)}), tmp_path / "nopath.parquet")
    with pytest.raises(DataError, match=r"nopath\.parquet has no path column"):
        read_file_list(str(tmp_path / "nopath.parquet"))
    pq.write_table(pa.table({"path": paths, "label": [folders.classes[i].encode() for i in folders.labels]}),
                   tmp_path / "binary.parquet")
    with pytest.raises(DataError, match=r"binary\.parquet column label holds binary values; expected string or int"):
        read_file_list(str(tmp_path / "binary.parquet"))
    pq.write_table(pa.table({"path": paths, "label": [float(i) for i in folders.labels]}), tmp_path / "float.parquet")
    with pytest.raises(DataError, match=r"float\.parquet column label holds double values"):
        read_file_list(str(tmp_path / "float.parquet"))
    pq.write_table(pa.table({"path": [paths[0], None], "label": ["bird", "cat"]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null\.parquet row 2 has an empty path"):
        read_file_list(str(tmp_path / "null.parquet"))
    pq.write_table(pa.table({"path": paths[:2], "label": ["bird", None]}), tmp_path / "nolabel.parquet")
    with pytest.raises(DataError, match=r"nolabel\.parquet row 2 \(.*\) has an empty label"):
        read_file_list(str(tmp_path / "nolabel.parquet"))


def test_hostile_lists_are_refused_naming_the_row_or_read_as_meant(small_image_folder, tmp_path):
    folders = D.scan_class_folder(str(small_image_folder))
    rows = [(os.path.relpath(p, small_image_folder), folders.classes[i]) for p, i in zip(folders.files, folders.labels)]

    def write(name, lines, header="path,label", encoding="utf-8"):
        (small_image_folder / name).write_bytes((header + "\n" + "\n".join(lines) + "\n").encode(encoding))
        return str(small_image_folder / name)

    # Excel's "CSV UTF-8" starts with a byte-order mark: read as the same list
    bom = write("bom.csv", [f"{p},{c}" for p, c in rows], encoding="utf-8-sig")
    assert read_file_list(bom).files == folders.files and read_file_list(bom).classes == folders.classes
    (tmp_path / "classes.txt").write_bytes("\ufeff".encode() + "\n".join(folders.classes).encode() + b"\n")
    assert D.labels.read_classes_file(str(tmp_path / "classes.txt")) == folders.classes
    # a path listed twice (with any labels), a label with a newline, a huge or non-ASCII index
    with pytest.raises(DataError, match=r"twice.*rows 1 and 3"):
        read_file_list(write("dup.csv", [f"{rows[0][0]},cat", f"{rows[1][0]},bird", f"{rows[0][0]},ship"]))
    with pytest.raises(DataError, match=r"row 2 .* control character"):
        read_file_list(write("nl.csv", [f"{rows[0][0]},cat", f'{rows[1][0]},"bi\nrd"']))
    with pytest.raises(DataError, match=r"integer label 99999999999 implies .* classes"):
        read_file_list(write("huge.csv", [f"{rows[0][0]},0", f"{rows[1][0]},99999999999"]))
    superscript = read_file_list(write("sup.csv", [f"{rows[0][0]},0", f"{rows[1][0]},1", f"{rows[2][0]},\u00b2"]))
    assert superscript.classes == ["0", "1", "\u00b2"]  # not an index: every label is then a name
    with pytest.raises(DataError, match=r"names 100,000,000 shards"):
        D.formats.webdataset.expand_braces("s-{0..9999}{0..9999}.tar")


def test_hostile_shards_are_refused_or_skipped_with_the_reason(small_image_folder, tmp_path):
    folders = D.scan_class_folder(str(small_image_folder))
    image = open(folders.files[0], "rb").read()
    pattern = write_tars(tmp_path / "wds", folders, per_shard=18,
                         extra=[("00000.png", image), ("huge.jpg", image), ("huge.cls", b"99999999999")])
    # huge's class is no index into the 3 classes: a label error, as a file list's
    with pytest.raises(DataError, match=r"train-000000.tar/huge.cls: class '99999999999' is not an index into the 3 "
                                        r"classes of the classes file"):
        read_webdataset(pattern, folders.classes)
    with pytest.raises(DataError, match=r"integer label 99999999999 implies"):
        read_webdataset(pattern)  # without class names, the index would make the classes
    pattern = write_tars(tmp_path / "wds2", folders, per_shard=18, extra=[("00000.png", image)])
    shards = read_webdataset(pattern, folders.classes)
    # 00000 has two images: neither is trusted
    assert dict(shards.skipped) == {"train-000000.tar/00000": "the key names two images or two classes in this shard"}
    assert len(shards) == 17 and shards.labels == folders.labels[1:]
    for label in (b"cat", b"-1", b"7" * 65):
        pattern = write_tars(tmp_path / f"wds-{len(label)}", folders, per_shard=18, extra=[("bad.jpg", image),
                                                                                         ("bad.cls", label)])
        with pytest.raises(DataError, match=r"train-000000.tar/bad.cls: class .* is not an index into the classes"):
            read_webdataset(pattern)
    # a shard cut between members reads without error in tarfile: fasttl names it
    data = (tmp_path / "wds" / "train-000000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:512 * 20])
    with pytest.raises(DataError, match=r"cut\.tar ends without tar's end-of-archive blocks"):
        read_webdataset(str(cut))


def test_extract_cli_reads_a_list_and_reports_a_bad_classes_option(small_image_folder, tmp_path):
    folders = D.scan_class_folder(str(small_image_folder))
    listed = write_list(small_image_folder, folders)
    result = subprocess.run([sys.executable, "-m", "fasttl", "extract", "--data", str(small_image_folder),
                             "--classes", str(listed), "--out", str(tmp_path / "o"), "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "classes: --classes names the classes of a file list" in result.stderr


# -- skip and report -----------------------------------------------------------------------------------------

def test_skip_and_report_keeps_rows_and_labels_aligned(small_image_folder, tmp_path):
    folders = D.scan_class_folder(str(small_image_folder))
    # A list naming a missing file and a corrupt one; shards with a corrupt image and a sample without a class.
    (small_image_folder / "cat" / "broken.jpg").write_bytes(open(folders.files[7], "rb").read()[:300])
    with open(write_list(small_image_folder, folders), "a") as f:
        f.write("cat/broken.jpg,cat,x\nship/gone.jpg,ship,x\n")
    listed = read_file_list(str(small_image_folder / "list.csv"))
    broken = D.scan_class_folder(str(small_image_folder))
    pattern = write_tars(tmp_path / "wds", folders, extra=[("zz.jpg", b"\xff\xd8\xff\xe0garbage"), ("zz.cls", b"1"),
                                                           ("nolabel.jpg", open(folders.files[0], "rb").read())])
    shards = read_webdataset(pattern)
    clean = build(folders, tmp_path / "clean")
    for name, source, expect in (("list", listed, {"cat/broken.jpg", "ship/gone.jpg"}),
                                 ("folders", broken, {"cat/broken.jpg"}),
                                 ("wds", shards, {"train-000002.tar/zz", "train-000002.tar/nolabel"})):
        cache = build(source, tmp_path / "caches" / name, on_error="skip")
        skipped = cache.manifest["skipped"]
        assert {s["path"] for s in skipped} == expect, name
        assert all(s["reason"] for s in skipped)
        assert cache.last_build["skipped"] == len(expect)
        line = format_summary({"all": dict(cache.last_build, rows=len(cache), directory=cache.directory)})[0]
        assert f"{len(expect)} skipped" in line
        # Rows, labels and sample ids stay aligned: the 18 good images, in order, with their labels.
        assert len(cache) == 18 and torch.equal(cache.labels, clean.labels), name
        assert torch.equal(cache.features, clean.features), name
        if name != "wds":
            assert cache.samples == clean.samples
        again = build(source, tmp_path / "caches" / name, on_error="skip")  # found finished: nothing decoded again
        assert again.last_build["images"] == 0 and again.last_build["skipped"] == len(expect)
    with pytest.raises(DataError, match="broken.jpg"):
        build(listed, tmp_path / "fail")


# -- multi-node torchrun -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_torchrun_build_equals_one_process(small_image_folder, tmp_path):
    """Two torchrun invocations (one process each) rendezvous on 127.0.0.1 as two nodes over one
    shared folder: the cache is byte-identical to a one-process build at the same thread count."""
    folders = D.scan_class_folder(str(small_image_folder))
    listed = write_list(small_image_folder, folders)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--data", str(listed), "--image-size", "32", "--shard-rows", "4", "--batch-size", "4", "--backend",
              "torch", "--no-progress"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "fasttl", "extract", "--out", str(single), *common], check=True, env=env,
                   timeout=600, capture_output=True)
    multi, port = tmp_path / "multi", _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=fasttl-test", "-m", "fasttl", "extract", "--out", str(multi), *common],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "all: 18 images" in outputs[0][0] + outputs[1][0]
    names = sorted(n for n in os.listdir(single / "all") if not n.startswith("."))
    assert names == sorted(n for n in os.listdir(multi / "all") if not n.startswith("."))
    for name in names:
        assert (multi / "all" / name).read_bytes() == (single / "all" / name).read_bytes(), name
    # A rerun after losing one node's shard redoes only that shard.
    manifest = json.loads((multi / "all" / "manifest.json").read_text())
    os.remove(multi / "all" / "manifest.json")
    os.remove(multi / "all" / manifest["shards"][1]["features"]["file"])
    again = subprocess.run([sys.executable, "-m", "fasttl", "extract", "--out", str(multi), *common], env=env,
                           timeout=600, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "1 shards built, 4 reused" in again.stdout
    for name in names:
        assert (multi / "all" / name).read_bytes() == (single / "all" / name).read_bytes(), name


@pytest.mark.slow
def test_bench_cache_scale_quick_reports_every_measure(tmp_path, cifar10_root):
    env = dict(os.environ, FASTTL_BENCH_DATA=cifar10_root, OMP_NUM_THREADS="1")
    before = set(os.listdir("/tmp"))
    result = subprocess.run([sys.executable, "-m", "fasttl", "bench", "cache", "--scale", "--quick", "--json",
                             str(tmp_path / "scale.json")], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads((tmp_path / "scale.json").read_text())["results"][0]
    assert bench["mode"] == "scale" and [p["rows"] for p in bench["probes"]] == [20_000, 2_000]
    for probe in bench["probes"]:
        assert probe["open_s"] > 0 and probe["epoch_gbps"] > 0 and probe["copy_gbps"] > 0
        assert 0 <= probe["rss_anon_after_open_mb"] <= probe["rss_anon_epoch_peak_mb"]
        from fasttl.bench.cache_scale import COMPETITORS, LOADERS

        assert set(probe["beside"]) == set(COMPETITORS)
        for epochs in (probe["epochs"], *(b["epochs"] for b in probe["beside"].values())):  # idle and beside each
            assert set(epochs) == set(LOADERS) and all(e["epoch_gbps"] > 0 for e in epochs.values())
            assert len(epochs["rows, every thread"]["gather_threads"]) == 1  # pinned: one count timed
        assert probe["epoch_s"] > 0 and all(b["copy_gbps"] > 0 for b in probe["beside"].values())
        for epoch in probe["epochs"].values():  # the median of the epochs after the first, within their range
            low, high = epoch["epoch_gbps_range"]
            assert low <= epoch["epoch_gbps"] <= high
    cases = [r["case"] for r in bench["rows"]]
    # 2 sizes x 2 loaders x idle and beside each competitor
    assert sum("epoch throughput, shuffle=" in c for c in cases) == 2 * len(LOADERS) * (1 + len(COMPETITORS))
    from fasttl.bench import cache as bench_cache

    assert len(bench_cache.speedups(bench)) == 2 * len(LOADERS)
    assert bench["extraction_formats"]["equal"] is True
    assert not [n for n in set(os.listdir("/tmp")) - before if n.startswith(("fasttl-scale-", "fasttl-wds-"))]


def test_skipping_every_image_of_a_class_in_shards_is_refused_naming_it(small_image_folder, tmp_path):
    import shutil

    data = tmp_path / "bad-ship"
    shutil.copytree(small_image_folder, data)
    for path in (data / "ship").iterdir():
        path.write_bytes(b"\xff\xd8 not a jpeg")
    folders = D.scan_class_folder(str(data))
    shards = read_webdataset(write_tars(tmp_path / "wds", folders), folders.classes)
    with pytest.raises(DataError, match=r"every image of class ship is unreadable"):
        D.screen(shards, "skip")


def test_run_refuses_a_classes_file_for_class_folders_and_extract_a_file_as_out(small_image_folder, tmp_path,
                                                                                 capsys):
    from conftest import cli, one_line_error

    (tmp_path / "classes.txt").write_text("x\ny\nz\n")
    code, _, err = cli(capsys, "run", "--data", small_image_folder, "--classes-file", tmp_path / "classes.txt",
                       "--out", tmp_path / "run", "--image-size", "32", "--no-progress")
    assert code == 2 and "--classes-file names the classes of a file list" in one_line_error(err)
    assert not (tmp_path / "run").exists()
    victim = tmp_path / "victim.csv"
    victim.write_text("keep me\n")
    code, _, err = cli(capsys, "extract", "--data", small_image_folder, "--out", victim, "--image-size", "32",
                       "--no-progress")
    assert code == 2 and "out: " in one_line_error(err) and "is a file, not a folder; give a folder" in err
    assert victim.read_text() == "keep me\n"
