"""Feature caches that cannot lie and never lose a file: every file of a cache is checked against
its manifest, hostile or stale files are errors naming them, the writer lock and the temporary
files never touch a file that is not fasttl's, a finished cache is read without writing, and
unreadable images can be left out on request (``on_error="skip"``).

Each test builds a tiny cache (a one-convolution backbone over a few 16 px images) in tmp_path
and checks that nothing outside the cache folder changed."""
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch

import fasttl
import fasttl.data as D
from fasttl.cache import CacheError, CacheLockedError
from fasttl.util import files
from fasttl.cache import store
from fasttl.data.sources import ArraySource

from conftest import tiny_backbone

CLASSES = ["a", "b", "c"]


@pytest.fixture
def rng(request):
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def array_source(rng, count: int = 10) -> ArraySource:
    return ArraySource(rng.integers(0, 256, (count, 16, 16, 3), dtype=np.uint8),
                       rng.integers(0, len(CLASSES), count).astype(np.int64), list(CLASSES))


def build(source, out, backbone=None, **kw):
    kw.setdefault("shard_rows", 4)
    kw.setdefault("backend", "torch")
    return fasttl.FeatureCache.build(backbone or tiny_backbone(), source, str(out), progress=False, **kw)


def snapshot(root, exclude=()):
    """Every path under root but those under `exclude`: file bytes, link targets, kinds and modes."""
    excluded = [os.path.abspath(str(e)) for e in exclude]

    def skip(path):
        path = os.path.abspath(path)
        return any(path == e or path.startswith(e + os.sep) for e in excluded)

    state = {}
    for folder, dirs, names in os.walk(str(root)):
        for name in dirs + names:
            path = os.path.join(folder, name)
            if skip(path):
                continue
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                state[path] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    state[path] = ("file", f.read(), info.st_mode)
            else:
                state[path] = ("dir", info.st_mode)
    return state


@pytest.fixture
def outside(tmp_path):
    """A folder of precious files beside every cache; asserted unchanged after each test."""
    root = tmp_path / "outside"
    root.mkdir()
    (root / "precious.txt").write_bytes(b"precious data\n" * 10)
    caches = (tmp_path / "c", tmp_path / "fresh")
    before = snapshot(tmp_path, exclude=caches)
    yield root
    after = snapshot(tmp_path, exclude=caches)
    assert {p: before[p] for p in before if after.get(p) != before[p]} == {}, "a file outside the cache changed"
    assert sorted(set(after) - set(before)) == []


def rehash(directory, name):
    """Updates every manifest entry naming `name` to the file's current size and SHA-256, as a
    writer that knows the format would: what then catches a bad file is the content check."""
    path = os.path.join(str(directory), "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    data = open(os.path.join(str(directory), name), "rb").read()

    def visit(node):
        if isinstance(node, dict):
            if node.get("file") == name:
                node["bytes"], node["sha256"] = len(data), hashlib.sha256(data).hexdigest()
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def shard_names(directory):
    with open(os.path.join(str(directory), "manifest.json")) as f:
        return [s["features"]["file"] for s in json.load(f)["shards"]]


def open_error(directory) -> str:
    with pytest.raises(CacheError) as info:
        fasttl.FeatureCache.open(str(directory))
    return str(info.value)


class Payload:
    """Unpickling it would create the file named in its argument."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- 1. every file is checked against the manifest ------------------------------------------------------


def test_the_manifest_lists_every_file_with_size_and_checksum(rng, tmp_path, outside):
    build(array_source(rng), tmp_path / "c", dtype="int8")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    listed = {manifest["files"]["labels"]["file"], manifest["files"]["samples"]["file"]}
    for shard in manifest["shards"]:
        listed |= {shard["features"]["file"], shard["scales"]["file"]}
    on_disk = {n for n in os.listdir(tmp_path / "c") if not n.startswith(".") and n != "manifest.json"}
    assert listed == on_disk
    for entry in [manifest["files"]["labels"], manifest["files"]["samples"]] + \
            [s[k] for s in manifest["shards"] for k in ("features", "scales")]:
        data = (tmp_path / "c" / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["skipped"] == []


@pytest.mark.parametrize("verify", [True, False])
def test_a_flipped_byte_in_labels_is_an_error_naming_the_file(rng, tmp_path, outside, verify):
    build(array_source(rng), tmp_path / "c")
    labels = tmp_path / "c" / "labels.npy"
    data = bytearray(labels.read_bytes())
    data[-8] ^= 1  # the low byte of the last label: another class, same size
    labels.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="labels.npy.*checksum"):
        fasttl.FeatureCache.open(str(tmp_path / "c"), verify=verify)


@pytest.mark.parametrize("verify", [True, False])
def test_a_changed_sample_id_is_an_error_naming_the_file(rng, tmp_path, outside, verify):
    build(array_source(rng), tmp_path / "c")
    samples = tmp_path / "c" / "samples.json"
    data = samples.read_bytes()
    assert b'"arrays:1"' in data
    samples.write_bytes(data.replace(b'"arrays:1"', b'"arrays:9"', 1))
    with pytest.raises(CacheError, match="samples.json.*checksum"):
        fasttl.FeatureCache.open(str(tmp_path / "c"), verify=verify)


def test_a_truncated_labels_file_is_an_error_naming_it(rng, tmp_path, outside):
    build(array_source(rng), tmp_path / "c")
    labels = tmp_path / "c" / "labels.npy"
    labels.write_bytes(labels.read_bytes()[:-8])
    assert "labels.npy" in open_error(tmp_path / "c")


@pytest.mark.parametrize("case", ["float64", "2d", "out_of_range", "negative", "too_short", "fortran"])
def test_a_bad_labels_array_is_an_error_even_with_a_matching_checksum(rng, tmp_path, outside, case):
    build(array_source(rng), tmp_path / "c")
    labels = np.load(tmp_path / "c" / "labels.npy")
    bad = {"float64": labels.astype(np.float64),
           "2d": np.stack([labels, labels], 1),
           "out_of_range": np.where(np.arange(len(labels)) == 3, len(CLASSES), labels),
           "negative": np.where(np.arange(len(labels)) == 3, -1, labels),
           "too_short": labels[:-1],
           "fortran": np.asfortranarray(np.stack([labels, labels], 1))}[case]
    (tmp_path / "c" / "labels.npy").write_bytes(npy(bad))
    rehash(tmp_path / "c", "labels.npy")
    assert "labels.npy" in open_error(tmp_path / "c")


def test_a_fifo_in_place_of_labels_is_an_error_not_a_hang(rng, tmp_path, outside):
    build(array_source(rng), tmp_path / "c")
    os.remove(tmp_path / "c" / "labels.npy")
    os.mkfifo(tmp_path / "c" / "labels.npy")
    assert "labels.npy: not a regular file" in open_error(tmp_path / "c")


def test_a_pickled_labels_file_is_never_unpickled(rng, tmp_path, outside):
    build(array_source(rng), tmp_path / "c")
    marker = tmp_path / "c" / "unpickled"
    (tmp_path / "c" / "labels.npy").write_bytes(npy(np.array([Payload(str(marker))] * 10, dtype=object)))
    rehash(tmp_path / "c", "labels.npy")
    assert "labels.npy" in open_error(tmp_path / "c")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"not json", b'{"x": 1}', b'["arrays:0"]', json.dumps(list(range(10))).encode()])
def test_bad_samples_content_is_an_error_even_with_a_matching_checksum(rng, tmp_path, outside, content):
    build(array_source(rng), tmp_path / "c")
    (tmp_path / "c" / "samples.json").write_bytes(content)
    rehash(tmp_path / "c", "samples.json")
    assert "samples.json" in open_error(tmp_path / "c")


@pytest.mark.parametrize("case", ["float64", "wrong_rows", "wrong_dim", "object"])
def test_a_bad_shard_is_an_error_even_with_a_matching_checksum(rng, tmp_path, outside, case):
    build(array_source(rng), tmp_path / "c", dtype="fp32")
    name = shard_names(tmp_path / "c")[1]
    features = np.load(tmp_path / "c" / name)
    bad = {"float64": features.astype(np.float64),
           "wrong_rows": features[:-1],
           "wrong_dim": features[:, :-1],
           "object": np.array([Payload(str(tmp_path / "c" / "unpickled"))] * 4, dtype=object)}[case]
    (tmp_path / "c" / name).write_bytes(npy(bad))
    rehash(tmp_path / "c", name)
    assert name in open_error(tmp_path / "c")
    assert not (tmp_path / "c" / "unpickled").exists()


# -- 6. the manifest itself --------------------------------------------------------------------------------


def _edit_manifest(directory, edit):
    path = os.path.join(str(directory), "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("case", ["not_json", "list", "no_fingerprint", "count_str", "shards_dict", "rows_bad",
                                  "bytes_str", "dtype_unknown", "entry_missing", "files_missing", "duplicate_file",
                                  "sha_not_hex", "old_format", "count_differs", "skipped_bad"])
def test_a_malformed_manifest_is_an_error_naming_it(rng, tmp_path, outside, case):
    source = array_source(rng)
    build(source, tmp_path / "c")
    path = tmp_path / "c" / "manifest.json"
    if case == "not_json":
        path.write_bytes(path.read_bytes()[:-20])
    elif case == "list":
        path.write_text("[1, 2]")
    else:
        def edit(m):
            if case == "no_fingerprint":
                del m["fingerprint"]
            elif case == "count_str":
                m["count"] = "10"
            elif case == "shards_dict":
                m["shards"] = {"0": m["shards"][0]}
            elif case == "rows_bad":
                m["shards"][1]["rows"] = [3, 8]
            elif case == "bytes_str":
                m["shards"][0]["features"]["bytes"] = str(m["shards"][0]["features"]["bytes"])
            elif case == "dtype_unknown":
                m["fingerprint"]["dtype"] = "fp8"
            elif case == "entry_missing":
                del m["shards"][2]["features"]
            elif case == "files_missing":
                del m["files"]
            elif case == "duplicate_file":
                m["shards"][1]["features"] = dict(m["shards"][0]["features"])
            elif case == "sha_not_hex":
                m["shards"][0]["features"]["sha256"] = "z" * 64
            elif case == "old_format":
                m["fingerprint"]["format"] = 1
            elif case == "count_differs":
                m["count"] = 9
            elif case == "skipped_bad":
                m["skipped"] = [["x.jpg", "bad"]]
        _edit_manifest(tmp_path / "c", edit)
    for verify in (True, False):
        with pytest.raises(CacheError, match="manifest.json"):
            fasttl.FeatureCache.open(str(tmp_path / "c"), verify=verify)
    # The build path refuses it too (a cache it cannot read is not silently replaced)...
    with pytest.raises(CacheError, match="manifest.json"):
        build(source, tmp_path / "c")
    # ...and overwrite=True rebuilds it.
    assert len(build(source, tmp_path / "c", overwrite=True)) == 10


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder", "hidden", "empty"])
def test_a_shard_name_outside_the_folder_is_refused(rng, tmp_path, outside, where):
    build(array_source(rng), tmp_path / "c")
    name = shard_names(tmp_path / "c")[0]
    # A copy outside with the same bytes: a manifest must not reach it even when its checksum matches.
    (tmp_path / "fresh").mkdir()
    copy = tmp_path / "fresh" / name
    copy.write_bytes((tmp_path / "c" / name).read_bytes())
    (tmp_path / "c" / "sub").mkdir()
    (tmp_path / "c" / "sub" / name).write_bytes(copy.read_bytes())
    (tmp_path / "c" / ".hidden.npy").write_bytes(copy.read_bytes())
    target = {"parent": os.path.join("..", "fresh", name), "absolute": str(copy),
              "subfolder": os.path.join("sub", name), "hidden": ".hidden.npy", "empty": ""}[where]

    def edit(m):
        m["shards"][0]["features"]["file"] = target

    _edit_manifest(tmp_path / "c", edit)
    with pytest.raises(CacheError, match="manifest.json.*not a plain file name"):
        fasttl.FeatureCache.open(str(tmp_path / "c"))


def test_a_shard_that_is_a_symlink_is_refused(rng, tmp_path, outside):
    build(array_source(rng), tmp_path / "c")
    name = shard_names(tmp_path / "c")[0]
    (tmp_path / "fresh").mkdir()
    copy = tmp_path / "fresh" / "copy.npy"
    copy.write_bytes((tmp_path / "c" / name).read_bytes())
    os.remove(tmp_path / "c" / name)
    os.symlink(copy, tmp_path / "c" / name)
    assert "symbolic link" in open_error(tmp_path / "c")


def test_error_messages_say_how_to_rebuild(rng, tmp_path, outside):
    build(array_source(rng), tmp_path / "c")
    name = shard_names(tmp_path / "c")[0]
    data = bytearray((tmp_path / "c" / name).read_bytes())
    data[-3] ^= 0x10
    (tmp_path / "c" / name).write_bytes(bytes(data))
    message = open_error(tmp_path / "c")
    assert name in message and "overwrite=True" in message and "--overwrite" in message
    with pytest.raises(CacheError) as info:
        build(array_source(rng), tmp_path / "c", dtype="fp32")
    assert "overwrite=True" in str(info.value) and "--overwrite" in str(info.value)


# -- 2. stale shards are never adopted for other settings ------------------------------------------------------


@pytest.mark.parametrize("change", ["image_size", "weights", "dtype"])
def test_shards_left_without_a_manifest_are_not_adopted_for_other_settings(rng, tmp_path, outside, change):
    source = array_source(rng)
    build(source, tmp_path / "c", image_size=16, dtype="fp32")
    for name in ("manifest.json", "build.json"):
        if (tmp_path / "c" / name).exists():
            os.remove(tmp_path / "c" / name)
    other = {"image_size": dict(image_size=24, dtype="fp32"), "weights": dict(image_size=16, dtype="fp32",
                                                                              backbone=tiny_backbone(seed=1)),
             "dtype": dict(image_size=16, dtype="fp16")}[change]
    stale = build(source, tmp_path / "c", **other)
    fresh = build(source, tmp_path / "fresh", **other)
    assert stale.features.dtype == fresh.features.dtype
    assert torch.equal(stale.features, fresh.features)
    assert torch.equal(fasttl.FeatureCache.open(str(tmp_path / "c")).features, fresh.features)


def test_a_bad_leftover_shard_of_the_same_settings_is_rebuilt(rng, tmp_path, outside):
    source = array_source(rng)
    build(source, tmp_path / "c", dtype="fp32")
    first = shard_names(tmp_path / "c")[0]
    os.remove(tmp_path / "c" / "manifest.json")
    (tmp_path / "c" / first).write_bytes(npy(np.zeros((3, 8), np.float32)))  # wrong rows
    resumed = build(source, tmp_path / "c", dtype="fp32")
    fresh = build(source, tmp_path / "fresh", dtype="fp32")
    assert torch.equal(resumed.features, fresh.features)
    assert resumed.last_build["shards_built"] == 1 and resumed.last_build["shards_reused"] == 2


def test_an_unfinished_build_for_other_settings_is_replaced_without_mixing(rng, tmp_path, outside):
    # Shards carry their fingerprint's key in their names: another build's shards are never adopted,
    # and replacing its build record loses no finished work.
    source = array_source(rng)
    build(source, tmp_path / "c", dtype="fp32")
    os.remove(tmp_path / "c" / "manifest.json")  # an fp32 build interrupted before its manifest
    other = build(source, tmp_path / "c", dtype="fp16")
    assert other.last_build["shards_built"] == 3 and other.last_build["shards_reused"] == 0
    assert torch.equal(other.features, build(source, tmp_path / "fresh", dtype="fp16").features)


def test_an_interrupted_build_with_the_same_settings_still_resumes(rng, tmp_path, outside):
    source = array_source(rng)
    build(source, tmp_path / "c")
    os.remove(tmp_path / "c" / "manifest.json")
    again = build(source, tmp_path / "c")
    assert again.last_build["shards_built"] == 0 and again.last_build["shards_reused"] == 3


# -- 3. the writer lock and temporary files ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "user_file", "directory", "fifo"])
def test_a_lock_that_is_not_fasttls_is_refused_and_left_untouched(rng, tmp_path, outside, kind):
    (tmp_path / "c").mkdir()
    lock = tmp_path / "c" / ".lock"
    target = outside / "precious.txt"
    if kind == "symlink":
        os.symlink(target, lock)
    elif kind == "hardlink":
        os.link(target, lock)
    elif kind == "user_file":
        lock.write_text("my own notes, not a lock\n")
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    before = snapshot(tmp_path / "c")
    with pytest.raises(CacheError, match=r"\.lock"):
        build(array_source(rng), tmp_path / "c")
    assert snapshot(tmp_path / "c") == before
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_a_lock_left_by_a_finished_writer_is_reused(rng, tmp_path, outside):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".lock").write_text("pid 12345")
    assert len(build(array_source(rng), tmp_path / "c")) == 10
    with store.WriterLock(str(tmp_path / "c")):
        with pytest.raises(CacheLockedError, match="being written by pid"):
            build(array_source(rng), tmp_path / "c", overwrite=True)


def test_user_files_in_the_cache_folder_survive_builds_and_overwrite(rng, tmp_path, outside):
    # Files put beside a cache fasttl built survive its rebuilds (a folder of only the user's files is
    # refused from the start: test_bad_surfaces_eleventh_pass.py).
    folder = tmp_path / "c"
    build(array_source(rng), folder)
    user = {"notes.tmp.txt": b"notes", "features-notes.txt": b"mine", "scales-old.csv": b"1,2",
            "labels.npy.tmp.77": b"keep", "features-00000.npy.bak": b"backup"}
    for name, data in user.items():
        (folder / name).write_bytes(data)
    (folder / "features-old").mkdir()
    (folder / "features-old" / "inside.txt").write_bytes(b"inside")
    build(array_source(rng), folder, image_size=24, overwrite=True)
    for name, data in user.items():
        assert (folder / name).read_bytes() == data, name
    assert (folder / "features-old" / "inside.txt").read_bytes() == b"inside"


def test_fasttl_temporaries_are_named_as_fasttls_and_cleaned(rng, tmp_path, outside):
    folder = tmp_path / "c"
    folder.mkdir()
    stale = folder / f"{store.TEMP_PREFIX}99999-x-features.npy"
    stale.write_bytes(b"half written")
    build(array_source(rng), folder)
    assert not stale.exists()
    assert [n for n in os.listdir(folder) if n.startswith(store.TEMP_PREFIX)] == []
    # write_atomic replaces a symlink at the final name, never writing through it.
    os.symlink(outside / "precious.txt", tmp_path / "c" / "link.txt")
    files.write_atomic(str(tmp_path / "c" / "link.txt"), b"new")
    assert not os.path.islink(tmp_path / "c" / "link.txt") and (tmp_path / "c" / "link.txt").read_bytes() == b"new"
    files.write_json_atomic(str(tmp_path / "c" / "x.json"), {"a": 1})
    assert files.read_json(str(tmp_path / "c" / "x.json")) == {"a": 1}
    assert files.read_json(str(tmp_path / "c" / "missing.json")) is None
    assert [n for n in os.listdir(folder) if n.startswith(store.TEMP_PREFIX)] == []
    with pytest.raises(ValueError):  # JSON stays strict: NaN is refused, never written
        files.write_json_atomic(str(tmp_path / "c" / "nan.json"), {"a": float("nan")})
    assert not (tmp_path / "c" / "nan.json").exists()
    os.mkfifo(tmp_path / "c" / "fifo.json")
    with pytest.raises(ValueError, match="not a plain file"):  # a FIFO is never opened for a blocking read
        files.read_json(str(tmp_path / "c" / "fifo.json"))


def test_labels_written_through_a_symlink_never_reach_its_target(rng, tmp_path, outside):
    (tmp_path / "c").mkdir()
    os.symlink(outside / "precious.txt", tmp_path / "c" / "labels.npy")
    os.symlink(outside / "precious.txt", tmp_path / "c" / "build.json")
    with pytest.raises(CacheError, match="build.json"):
        build(array_source(rng), tmp_path / "c")
    os.remove(tmp_path / "c" / "build.json")
    with pytest.raises(CacheError, match=r"holds files that are not a fasttl cache's \(labels.npy\)"):
        build(array_source(rng), tmp_path / "c")  # a labels.npy of the user's (here a link) is not replaced
    os.remove(tmp_path / "c" / "labels.npy")  # (the outside fixture checks precious.txt is unchanged)
    assert len(build(array_source(rng), tmp_path / "c")) == 10


# -- 4. a finished cache is used read-only ----------------------------------------------------------------------


def test_a_finished_cache_is_reused_without_writing(rng, tmp_path, outside, monkeypatch):
    source = array_source(rng)
    build(source, tmp_path / "c")
    os.remove(tmp_path / "c" / ".lock")
    before = snapshot(tmp_path / "c")
    writes = []
    real_open, real_builtin_open = os.open, open

    def no_write_open(path, flags, *args, **kw):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            writes.append(path)
            raise PermissionError(13, "read-only storage", path)
        return real_open(path, flags, *args, **kw)

    def no_write_builtin_open(path, mode="r", *args, **kw):
        if any(c in mode for c in "wax+"):
            writes.append(path)
            raise PermissionError(13, "read-only storage", path)
        return real_builtin_open(path, mode, *args, **kw)

    def refuse(*args, **kw):
        writes.append(args)
        raise PermissionError(13, "read-only storage")

    mode = os.stat(tmp_path / "c").st_mode
    os.chmod(tmp_path / "c", 0o555)
    try:
        monkeypatch.setattr(os, "open", no_write_open)
        monkeypatch.setattr("builtins.open", no_write_builtin_open)
        for name in ("replace", "rename", "remove", "unlink", "mkdir", "rmdir"):
            monkeypatch.setattr(os, name, refuse)
        cache = build(source, tmp_path / "c")
        monkeypatch.undo()
    finally:
        os.chmod(tmp_path / "c", stat.S_IMODE(mode))
    assert writes == [] and len(cache) == 10
    assert not (tmp_path / "c" / ".lock").exists()
    assert snapshot(tmp_path / "c") == before
    assert cache.last_build["images"] == 0 and cache.last_build["shards_reused"] == 3


# -- 5. on_error -----------------------------------------------------------------------------------------------


@pytest.fixture
def folder_with_a_bad_image(tmp_path, rng):
    from PIL import Image

    root = tmp_path / "images"
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    (root / "b" / "broken.jpg").write_bytes(buffer.getvalue()[:40])  # a JPEG header, then nothing
    return root


def test_on_error_skip_leaves_bad_images_out_and_records_them(folder_with_a_bad_image, tmp_path, outside, monkeypatch):
    from fasttl.extract import format_summary

    source = D.scan_class_folder(str(folder_with_a_bad_image))
    assert len(source) == 10
    cache = build(source, tmp_path / "c", on_error="skip")
    assert len(cache) == 9 and "b/broken.jpg" not in cache.samples
    assert cache.last_build["skipped"] == 1
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["path"] for s in manifest["skipped"]] == [os.path.join("b", "broken.jpg")]
    assert manifest["skipped"][0]["reason"]
    line = format_summary({"train": dict(cache.last_build, rows=len(cache), directory=cache.directory)})[0]
    assert "1 skipped" in line
    # Reused as it is (no second decode of every file), and the summary still tells.
    monkeypatch.setattr(D.sources, "check_image", lambda path: pytest.fail(f"{path} screened again"))
    again = build(source, tmp_path / "c", on_error="skip")
    assert again.last_build["images"] == 0 and again.last_build["skipped"] == 1
    line = format_summary({"train": dict(again.last_build, rows=len(again), directory=again.directory)})[0]
    assert "already cached" in line and "1 skipped" in line
    assert fasttl.FeatureCache.open(str(tmp_path / "c")).manifest["skipped"] == manifest["skipped"]


def test_on_error_fail_is_the_default_and_writes_no_manifest(folder_with_a_bad_image, tmp_path, outside):
    source = D.scan_class_folder(str(folder_with_a_bad_image))
    with pytest.raises(D.DataError, match="broken.jpg"):
        build(source, tmp_path / "c")
    assert not (tmp_path / "c" / "manifest.json").exists()
    with pytest.raises(ValueError, match="on_error"):
        build(source, tmp_path / "c", on_error="ignore")


def test_on_error_skip_on_a_clean_source_matches_the_default(rng, tmp_path, outside):
    source = array_source(rng)
    skip = build(source, tmp_path / "c", on_error="skip")
    plain = build(source, tmp_path / "c")  # same fingerprint: reused
    assert plain.last_build["images"] == 0 and torch.equal(skip.features, plain.features)
    assert skip.last_build["skipped"] == 0


def test_extract_passes_on_error(folder_with_a_bad_image, tmp_path, outside, monkeypatch):
    import fasttl.extract as E

    monkeypatch.setattr(E.backbones, "create", lambda name, weights=None: tiny_backbone())
    summaries = E.extract("tiny", str(folder_with_a_bad_image), str(tmp_path / "c"), shard_rows=4, backend="torch",
                          progress=False, on_error="skip")
    assert summaries["all"]["rows"] == 9 and summaries["all"]["skipped"] == 1
    assert "1 skipped" in E.format_summary(summaries)[0]


# -- hostile files in a separate process (a crash must not take the test run down) ------------------------------


def test_hostile_files_are_errors_in_a_fresh_process(rng, tmp_path, outside):
    cases = {}

    def make(case, name_of, content):
        folder = tmp_path / "c" / case
        build(array_source(rng), folder, dtype="fp32")
        name = name_of(folder)
        (folder / name).write_bytes(content)
        rehash(folder, name)
        cases[case] = (str(folder), name)

    header = np.lib.format.header_data_from_array_1_0(np.zeros(10, np.int64))
    huge = io.BytesIO()
    np.lib.format.write_array_header_1_0(huge, dict(header, shape=(1 << 40,)))
    make("labels_huge_shape", lambda f: "labels.npy", huge.getvalue() + b"\0" * 80)
    make("labels_pickle", lambda f: "labels.npy",
         npy(np.array([Payload(str(tmp_path / "c" / "unpickled"))] * 10, dtype=object)))
    shard_header = io.BytesIO()
    np.lib.format.write_array_header_1_0(shard_header, dict(
        np.lib.format.header_data_from_array_1_0(np.zeros((4, 8), np.float32)), shape=(1 << 40, 8)))
    make("shard_huge_shape", lambda f: shard_names(f)[0], shard_header.getvalue() + b"\0" * 128)
    make("shard_garbage", lambda f: shard_names(f)[1], bytes(rng.integers(0, 256, 300, dtype=np.uint8)))
    make("samples_deep", lambda f: "samples.json", b"[" * 100000 + b"]" * 100000)
    script = textwrap.dedent("""
        import json, sys
        import fasttl
        results = {}
        for case, (folder, name) in json.loads(sys.argv[1]).items():
            try:
                fasttl.FeatureCache.open(folder)
                results[case] = ["no error", ""]
            except Exception as exc:
                results[case] = [type(exc).__name__, str(exc)]
        print(json.dumps(results))
    """)
    result = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for case, (folder, name) in cases.items():
        kind, message = results[case]
        assert kind == "CacheError" and name in message, (case, kind, message)
    assert not (tmp_path / "c" / "unpickled").exists()


def test_write_atomic_leaves_nothing_behind_when_it_fails(tmp_path, outside, monkeypatch):
    folder = tmp_path / "c"
    folder.mkdir()

    def fail(fd):
        raise OSError(5, "simulated I/O error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="simulated"):
        files.write_atomic(str(folder / "file.bin"), b"data")
    monkeypatch.undo()
    assert os.listdir(folder) == []
    assert files.write_atomic.__annotations__ == {"path": "str", "data": "bytes", "replace": "bool", "return": "None"}


def test_a_cache_reused_for_the_same_files_in_another_order_is_read_in_the_sources_order(
        small_source, private_cache):
    # A cache is keyed by its sorted sample list, so two file lists naming the same images in other
    # orders share it; rows must still follow each source's order (labels, validation rows,
    # predictions.csv and teacher logits index the source).
    from fasttl.transfer.caching import Extraction, cached_features

    extraction = Extraction(16, "fp16", "head", "torch", "fp32")
    backbone = tiny_backbone()
    order = list(reversed(range(len(small_source))))
    shuffled = small_source.subset(order)
    first = cached_features(backbone, small_source, "train", extraction, progress=False)
    second = cached_features(backbone, shuffled, "train", extraction, progress=False)
    assert second.directory == first.directory and second.last_build.get("images", 0) == 0  # reused, not rebuilt
    assert second.samples == shuffled.sample_ids() != first.samples
    assert second.labels.tolist() == shuffled.labels != first.labels.tolist()
    torch.testing.assert_close(second.all_features(), first.all_features()[order], rtol=0, atol=0)


@pytest.mark.parametrize("mine", [("labels.npy",), ("samples.json", "labels.npy"), ("manifest.json",)])
def test_a_build_never_replaces_a_users_file_under_a_cache_name(rng, tmp_path, outside, mine):
    # In a folder fasttl never made (no record, no shards of its own), labels.npy or manifest.json
    # are the user's: refused with and without overwrite, nothing written.
    folder = tmp_path / "c"
    folder.mkdir()
    for name in mine:
        (folder / name).write_bytes(b"the user's own " + name.encode())
    for overwrite in (False, True):
        refused = rf"holds files that are not a fasttl cache's \({', '.join(sorted(mine))}\)"
        with pytest.raises(CacheError, match=refused):
            build(array_source(rng), folder, overwrite=overwrite)
        assert sorted(os.listdir(folder)) == sorted(mine)
        for name in mine:
            assert (folder / name).read_bytes() == b"the user's own " + name.encode()
