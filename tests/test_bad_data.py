"""Bad data never crashes fasttl, never runs code, never gives a silently wrong result: every refusal
is a one-line DataError naming the file or folder. The cases that crashed DALI (SIGSEGV in its
decoder threads when its parser rejects a file) run in a subprocess."""
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch

import fasttl.data as D
from fasttl.data import dali_pipeline
from fasttl.data.images import MAX_IMAGE_PIXELS
from conftest import DALI_REASON, backends, dali_installed

IDENTITY = D.TransformSpec(size=16, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # output = decoded pixels


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def smooth_image(rng, height, width):
    """uint8 (H, W, 3) with some structure (JPEG-friendly) and some noise."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) * 127 / (height + width)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def encode(array, fmt, **kwargs) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_16bit(array) -> bytes:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA by the channel count), which PIL cannot write."""
    height, width, channels = array.shape
    color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def set_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    data, pos = bytearray(jpeg), 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    data[pos + 5:pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_chunk_offset(png: bytes, kind: bytes) -> int:
    return png.index(kind) - 4


def corrupt_files(rng):
    """name -> bytes of every corrupt-file case (each once crashed, or was refused without the
    file's name, or decoded differently on the two backends)."""
    photo = encode(smooth_image(rng, 96, 96), "JPEG", quality=90)
    png = encode(smooth_image(rng, 40, 40), "PNG")
    idat = png_chunk_offset(png, b"IDAT")
    idat_length = struct.unpack(">I", png[idat:idat + 4])[0]
    bad_crc = bytearray(png)
    bad_crc[idat + 8 + idat_length] ^= 0xFF  # the CRC field only: the pixel data is intact
    garbled = bytearray(png)
    garbled[idat + 8 + idat_length // 2] ^= 0xFF  # the compressed data
    huge_png = bytearray(png)
    huge_png[16:24] = struct.pack(">II", 100_000, 100_000)
    huge_png[29:33] = struct.pack(">I", zlib.crc32(bytes(huge_png[12:29])))  # a valid header CRC
    return {
        "truncated.jpg": photo[:len(photo) // 2],
        "truncated_header.jpg": photo[:200],
        "garbage_after_header.jpg": photo[:20] + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "exif_too_short.jpg": photo[:2] + b"\xff\xe1\x00\x06Exif\x00\x00" + photo[2:],  # PIL decodes it
        "truncated.png": png[:idat + 8 + idat_length // 2],
        "bad_crc.png": bytes(bad_crc),
        "garbled.png": bytes(garbled),
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n" * 20,
        "gif.jpg": encode(smooth_image(rng, 16, 16), "GIF"),
        "huge_header.jpg": set_jpeg_size(photo, 60_000, 60_000),
        "huge_header.png": bytes(huge_png),
    }


def make_dataset(root, rng, per_class=12):
    """root/<class>/ with real JPEG and PNG files, 3 classes: 36 images, so one batch of 32 holds
    good files around the bad one (the DALI crash needed a batch of several samples)."""
    for name in ("bird", "cat", "ship"):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            fmt, ext = ("PNG", "png") if i % 4 == 3 else ("JPEG", "jpg")
            with open(os.path.join(root, name, f"{i:02d}.{ext}"), "wb") as f:
                f.write(encode(smooth_image(rng, 32, 40), fmt))


def snapshot(root):
    """{relative path: (size, mtime_ns, sha256)} of everything under root."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            digest = ""
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            state[os.path.relpath(path, root)] = (info.st_size if digest else 0, info.st_mtime_ns, digest)
    return state


# Runs every corrupt case through both backends and screen(); a crash shows as the exit code.
CHILD = textwrap.dedent("""
    import json, sys
    import fasttl.data as D
    cases, backends = json.load(open(sys.argv[1])), sys.argv[2].split(",")
    spec = D.TransformSpec(size=16, mean=(0.5,) * 3, std=(0.25,) * 3)

    def outcome(call):
        try:
            return {"type": "ok", "rows": call()}
        except Exception as exc:
            return {"type": type(exc).__name__, "message": str(exc)}

    results = {}
    for name, root, bad in cases:
        source = D.scan_class_folder(root)
        result = results[name] = {}
        for backend in backends:
            print(name, backend, file=sys.stderr, flush=True)
            loader = D.ImageLoader(source, spec, 32, backend=backend)
            # Twice: the first error must leave the loader usable and name the file again.
            result[backend] = [outcome(lambda: sum(len(y) for _, y in loader)) for _ in range(2)]
        result["screen_fail"] = outcome(lambda: len(D.screen(source, "fail")))
        kept = D.screen(source, "skip")
        result["screen_skip"] = {"rows": len(kept), "skipped": [p for p, _ in kept.skipped],
                                 "bad_left": bad in kept.files}
        if backends:  # the screened source goes through the default backend without a problem
            result["after_skip"] = outcome(lambda: sum(len(y) for _, y in D.ImageLoader(kept, spec, 32)))
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def corrupt_case_results(tmp_path_factory):
    """(cases, results) of one child process running every corrupt case on every backend."""
    rng = np.random.default_rng(zlib.crc32(b"tests/test_bad_data.py::corrupt_case_results"))
    base = tmp_path_factory.mktemp("corrupt")
    good = str(base / "good")
    make_dataset(good, rng)
    cases = []
    for name, data in corrupt_files(rng).items():
        root = str(base / name.replace(".", "_"))
        shutil.copytree(good, root)
        bad = os.path.join(root, "ship", "zz_" + name)  # last: DALI's crash needed it in a short last batch
        with open(bad, "wb") as f:
            f.write(data)
        cases.append((name, root, bad))
    spec_file, work = base / "cases.json", base / "cwd"
    spec_file.write_text(json.dumps(cases))
    work.mkdir()
    before = snapshot(str(base))
    names = ["torch"] + (["dali"] if dali_installed() else [])
    env = dict(os.environ, HOME=str(work), FASTTL_DEBUG="")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(spec_file), ",".join(names)], cwd=str(work),
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"exit code {proc.returncode}; last case: {proc.stderr.strip().splitlines()[-3:]}"
    after = snapshot(str(base))
    assert after == before, "the run changed files: " + str(sorted(set(after.items()) ^ set(before.items()))[:5])
    return {name: bad for name, _, bad in cases}, json.loads(proc.stdout.strip().splitlines()[-1])


CORRUPT_NAMES = sorted(corrupt_files(np.random.default_rng(zlib.crc32(b"CORRUPT_NAMES"))))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", CORRUPT_NAMES)
def test_corrupt_file_is_a_one_line_error_naming_it(corrupt_case_results, name, backend):
    bad_paths, results = corrupt_case_results
    for attempt in results[name][backend]:
        assert attempt["type"] == "DataError", attempt
        assert bad_paths[name] in attempt["message"] and "\n" not in attempt["message"], attempt


@pytest.mark.parametrize("name", CORRUPT_NAMES)
def test_screen_names_or_skips_exactly_the_corrupt_file(corrupt_case_results, name):
    bad_paths, results = corrupt_case_results
    result = results[name]
    assert result["screen_fail"]["type"] == "DataError" and bad_paths[name] in result["screen_fail"]["message"]
    assert "\n" not in result["screen_fail"]["message"]
    assert result["screen_skip"] == {"rows": 36, "skipped": [bad_paths[name]], "bad_left": False}
    assert result["after_skip"] == {"type": "ok", "rows": 36}


def test_zeroed_jpeg_data_decodes_the_same_on_both_backends(tmp_path, rng):
    """A JPEG whose entropy-coded data is partly zeroed stays structurally valid: libjpeg-turbo
    decodes it with a warning in PIL and DALI alike, and neither reports an error. Both backends
    must then give the same pixels."""
    photo = bytearray(encode(smooth_image(rng, 64, 64), "JPEG", quality=95))
    sos = photo.index(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", photo[sos + 2:sos + 4])[0]
    middle = start + (len(photo) - start) // 3
    photo[middle:len(photo) - 2] = bytes(len(photo) - 2 - middle)
    path = tmp_path / "zeroed.jpg"
    path.write_bytes(bytes(photo))
    source = D.file_list([(str(path), 0)])
    spec = D.TransformSpec(size=64, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)
    outputs = [torch.cat([x for x, _ in D.ImageLoader(source, spec, 1, backend=b)])
               for b in ["torch"] + (["dali"] if dali_installed() else [])]
    assert all((out - outputs[0]).abs().max() <= 1.0 for out in outputs)


# -- image modes and EXIF orientation: both backends against a numpy reference -----------------------

def mode_cases(rng):
    """name -> (file bytes, reference uint8 (16, 16, 3), tolerance in grey levels)."""
    from PIL import Image

    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    gray = rgb[:, :, 0]
    cases = {
        "rgb.png": (encode(rgb, "PNG"), rgb, 0),
        "rgba.png": (encode(np.dstack([rgb, gray]), "PNG"), rgb, 0),  # alpha dropped, not composited
        "gray.png": (encode(gray, "PNG"), np.dstack([gray] * 3), 0),
        "gray_alpha.png": (encode(Image.frombytes("LA", (16, 16), np.dstack([gray, rgb[:, :, 1]]).tobytes()), "PNG"),
                           np.dstack([gray] * 3), 0),
        "bilevel.png": (encode(Image.fromarray(gray > 127), "PNG"), np.dstack([(gray > 127) * 255] * 3), 0),
    }
    palette_image = Image.fromarray(rgb).quantize(16)
    palette = np.asarray(palette_image.getpalette(), dtype=np.uint8).reshape(-1, 3)
    reference = palette[np.asarray(palette_image)]
    cases["palette.png"] = (encode(palette_image, "PNG"), reference, 0)
    cases["palette_transparency.png"] = (encode(palette_image, "PNG", transparency=bytes(range(0, 256, 16))),
                                         reference, 0)
    gray16 = rng.integers(0, 65536, (16, 16, 1), dtype=np.uint16)
    cases["gray16.png"] = (png_16bit(gray16), np.repeat(np.rint(gray16 / 257), 3, 2), 0)
    rgb16 = rng.integers(0, 65536, (16, 16, 3), dtype=np.uint16)
    cases["rgb16.png"] = (png_16bit(rgb16), np.rint(rgb16 / 257), 1)  # PIL keeps the high byte: <= 1 off
    rgba16 = rng.integers(0, 65536, (16, 16, 4), dtype=np.uint16)
    cases["rgba16.png"] = (png_16bit(rgba16), np.rint(rgba16[:, :, :3] / 257), 1)
    # Lossy JPEGs of a smooth image: the reference is the array encoded, with JPEG's error.
    photo = smooth_image(rng, 16, 16)
    cases["rgb.jpg"] = (encode(photo, "JPEG", quality=100, subsampling=0), photo, 8)
    cases["gray.jpg"] = (encode(photo[:, :, 0], "JPEG", quality=100), np.dstack([photo[:, :, 0]] * 3), 8)
    cmyk = np.dstack([255 - photo, np.full((16, 16), 40, np.uint8)])
    cmyk_rgb = np.rint((255 - cmyk[:, :, :3].astype(float)) * (255 - cmyk[:, :, 3:].astype(float)) / 255)
    cases["cmyk.jpg"] = (encode(Image.frombytes("CMYK", (16, 16), cmyk.tobytes()), "JPEG", quality=100), cmyk_rgb, 8)
    # EXIF orientation, honoured: the pixels as shown upright. Orientation -> numpy of the stored array.
    upright = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
               5: lambda a: a.transpose(1, 0, 2),
               6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a)}
    for orientation, turn in upright.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        cases[f"exif{orientation}.png"] = (encode(rgb, "PNG", exif=exif.tobytes()), turn(rgb), 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    cases["exif6.jpg"] = (encode(photo, "JPEG", quality=100, subsampling=0, exif=exif.tobytes()),
                          np.rot90(photo, -1), 8)
    return cases


@pytest.mark.parametrize("backend", backends())
def test_image_modes_decode_to_the_same_pixels(tmp_path, rng, backend):
    cases = mode_cases(rng)
    paths = []
    for name, (data, _, _) in cases.items():
        paths.append(str(tmp_path / name))
        with open(paths[-1], "wb") as f:
            f.write(data)
    source = D.file_list([(p, 0) for p in paths])
    decoded = torch.cat([x for x, _ in D.ImageLoader(source, IDENTITY, len(paths), backend=backend)])
    for (name, (_, reference, tolerance)), image in zip(cases.items(), decoded):
        error = np.abs(image.permute(1, 2, 0).numpy() - np.asarray(reference, dtype=np.float32))
        if name.endswith(".jpg"):  # lossy: JPEG's own error, on average; orientation and color conversion right
            assert error.mean() <= 3.0, (name, float(error.mean()))
        else:  # lossless: exact, or within 1/255 where PIL keeps the high byte of 16-bit samples
            assert error.max() <= tolerance, (name, float(error.max()))


@pytest.mark.skipif(not dali_installed(), reason=DALI_REASON)
def test_image_modes_agree_between_backends_within_one_level(tmp_path, rng):
    cases = mode_cases(rng)
    for name, (data, _, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    source = D.file_list([(str(tmp_path / name), 0) for name in cases])
    dali, torch_images = (torch.cat([x for x, _ in D.ImageLoader(source, IDENTITY, len(cases), backend=b)])
                          for b in ("dali", "torch"))
    for name, a, b in zip(cases, dali, torch_images):
        assert (a - b).abs().max() <= 1.0, (name, float((a - b).abs().max()))


# -- screen(): the on-error policy ------------------------------------------------------------------------

def test_screen_policy(tmp_path, rng):
    make_dataset(str(tmp_path / "ds"), rng, per_class=4)
    (tmp_path / "ds" / "cat" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    (tmp_path / "ds" / "ship" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    source = D.scan_class_folder(str(tmp_path / "ds"))
    before = snapshot(str(tmp_path))
    with pytest.raises(D.DataError, match=r"cat/bad\.jpg: cannot be read") as info:
        D.screen(source)  # "fail" is the default, and names the first bad file in order
    assert "\n" not in str(info.value) and "on_error='skip'" in str(info.value)
    kept = D.screen(source, "skip", num_threads=2)
    assert sorted(p for p, _ in kept.skipped) == sorted(str(tmp_path / "ds" / c / f) for c, f in
                                                        (("cat", "bad.jpg"), ("ship", "bad.png")))
    assert len(kept) == len(source) - 2 and kept.classes == source.classes and all(r for _, r in kept.skipped)
    assert D.screen(kept, "fail") is kept and source.verify(skip_corrupt=True).skipped == kept.skipped
    assert snapshot(str(tmp_path)) == before  # nothing moved or deleted
    arrays = D.ArraySource(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]), ["a", "b"])
    assert D.screen(arrays, "skip") is arrays
    with pytest.raises(ValueError, match="on_error"):
        D.screen(source, "ignore")


def test_screen_refuses_to_drop_a_whole_class(tmp_path, rng):
    make_dataset(str(tmp_path / "ds"), rng, per_class=2)
    for path in (tmp_path / "ds" / "ship").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(D.DataError, match="every image of class ship"):
        D.screen(D.scan_class_folder(str(tmp_path / "ds")), "skip")


def test_dali_error_without_a_file_name_is_traced_from_the_undelivered_files(tmp_path, rng):
    make_dataset(str(tmp_path / "ds"), rng, per_class=4)
    source = D.scan_class_folder(str(tmp_path / "ds"))
    delivered, pending = source.files[2], source.files[9]
    for path in (delivered, pending):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    loader = D.ImageLoader(source, IDENTITY, 4, backend="torch")
    # Samples 0..7 came out of DALI already: the culprit is among those in flight.
    in_flight = dali_pipeline.SampleBatches(source, list(range(len(source))), 4)
    in_flight.in_flight = list(range(8, len(source)))
    error = loader._explain_dali_error(RuntimeError("Error in thread 0: decoders.image failed"), in_flight)
    assert isinstance(error, D.DataError) and pending in str(error) and delivered not in str(error)


def test_dali_out_of_memory_names_the_images_in_flight_and_says_memory_ran_out(tmp_path, rng):
    make_dataset(str(tmp_path / "ds"), rng, per_class=4)
    source = D.scan_class_folder(str(tmp_path / "ds"))
    loader = D.ImageLoader(source, IDENTITY, 4, backend="torch")
    in_flight = dali_pipeline.SampleBatches(source, list(range(len(source))), 4)
    in_flight.in_flight = [5, 6, 7]
    error = loader._explain_dali_error(RuntimeError("Critical error in pipeline:\nstd::bad_alloc"), in_flight)
    assert isinstance(error, D.DataError)
    assert str(error).startswith(f"{source.files[5]} or one of 2 images beside it: decoding ran out of memory")


def test_torch_worker_errors_stay_one_line(tmp_path, rng):
    make_dataset(str(tmp_path / "ds"), rng, per_class=12)
    (tmp_path / "ds" / "bird" / "05.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(40))
    source = D.scan_class_folder(str(tmp_path / "ds"))
    loader = D.ImageLoader(source, IDENTITY, 2, backend="torch", num_threads=2)  # 36 >= 8 * 2: worker processes
    with pytest.raises(D.DataError) as info:
        sum(len(y) for _, y in loader)
    assert "bird/05.jpg" in str(info.value) and "\n" not in str(info.value)


# -- class folders and file lists ---------------------------------------------------------------------

def test_hidden_and_non_image_entries_are_listed_not_read(tmp_path, rng):
    root = tmp_path / "ds"
    make_dataset(str(root), rng, per_class=2)
    (root / ".ipynb_checkpoints" / "x").mkdir(parents=True)
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "cat" / "notes.txt").write_text("a note")
    (root / "cat" / "more").mkdir()
    (root / "README.md").write_text("about")
    os.mkfifo(root / "bird" / "pipe.jpg")  # opening it would block: never opened
    os.symlink(root / "missing.jpg", root / "bird" / "dangling.jpg")
    shutil.copy(root / "cat" / "00.jpg", tmp_path / "kept-elsewhere.jpg")
    os.symlink(tmp_path / "kept-elsewhere.jpg", root / "ship" / "linked.jpg")  # followed (one of the data's own
    # images linked under a second class is refused: test_bad_surfaces_seventh_pass)
    source = D.scan_class_folder(str(root))
    assert source.classes == ["bird", "cat", "ship"]
    assert str(root / "ship" / "linked.jpg") in source.files and len(source) == 7
    ignored = {os.path.relpath(p, root): reason for p, reason in source.ignored}
    assert set(ignored) == {".ipynb_checkpoints", "cat/.DS_Store", "cat/Thumbs.db", "cat/notes.txt", "cat/more",
                            "README.md", "bird/pipe.jpg", "bird/dangling.jpg"}
    assert ignored[".ipynb_checkpoints"] == "hidden" and ignored["bird/dangling.jpg"] == "broken symbolic link"
    assert ignored["bird/pipe.jpg"] == "not a regular file"
    assert D.screen(source, "fail") is source  # the listed entries are not part of the source


def test_split_root_lists_what_it_does_not_use(tmp_path, rng):
    for split in ("train", "test", "val"):
        make_dataset(str(tmp_path / "ds" / split), rng, per_class=1)
    (tmp_path / "ds" / ".cache").mkdir()
    train, test = D.class_folder_splits(str(tmp_path / "ds"))
    assert train.classes == test.classes and len(train) == len(test) == 3
    assert train.ignored == [(str(tmp_path / "ds" / ".cache"), "hidden"), (str(tmp_path / "ds" / "val"), "not train/ or test/")]


@pytest.mark.parametrize("layout, match", [
    ({"only": 2}, "only 1 class folder"),
    ({".hidden": 2, "only": 2}, "only 1 class folder"),
    ({"train/a": 1, "train/b": 1}, "has train/ but no test/"),
    ({"a": 0, "b": 1}, "holds no .jpg/.jpeg/.png images"),
    ({}, "no class folders"),
])
def test_folder_layout_errors(tmp_path, rng, layout, match):
    root = tmp_path / "ds"
    root.mkdir()
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            (root / folder / f"{i}.png").write_bytes(encode(smooth_image(rng, 8, 8), "PNG"))
    with pytest.raises(D.DataError, match=match) as info:
        D.class_folder_splits(str(root))
    assert str(root) in str(info.value) and "\n" not in str(info.value)


def test_missing_folder_or_file_instead_of_folder(tmp_path):
    for call in (D.scan_class_folder, D.class_folder_splits):
        with pytest.raises(D.DataError, match="does not exist") as info:
            call(str(tmp_path / "nowhere"))
        assert str(tmp_path / "nowhere") in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(D.DataError, match="is a file, not a folder"):
        D.class_folder_splits(str(tmp_path / "file"))


def test_file_list_names_a_missing_non_image_or_badly_labelled_file(tmp_path, rng):
    good = tmp_path / "good.png"
    good.write_bytes(encode(smooth_image(rng, 8, 8), "PNG"))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "text.jpg").write_text("x" * 100)
    (tmp_path / "folder.jpg").mkdir()
    cases = [((tmp_path / "missing.jpg", 0), "no such file"), ((tmp_path / "notes.txt", 0), "not a .jpg"),
             ((tmp_path / "text.jpg", 0), "not a JPEG or PNG"), ((tmp_path / "folder.jpg", 0), "not a regular file"),
             ((good, -1), "non-negative integer"), ((good, 1.5), "non-negative integer"), ((good, 2), "out of range")]
    for (path, label), match in cases:
        with pytest.raises(D.DataError, match=match) as info:
            D.file_list([(str(good), 0), (str(path), label)], classes=["a", "b"])
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(D.DataError, match="empty"):
        D.file_list([])
    assert D.file_list([(str(good), 1)], classes=["a", "b"]).labels == [1]


def test_header_limits(tmp_path, rng):
    photo = encode(smooth_image(rng, 16, 16), "JPEG")
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    (tmp_path / "big.jpg").write_bytes(set_jpeg_size(photo, side, side))
    assert "more than the limit" in D.header_problem(str(tmp_path / "big.jpg"))
    (tmp_path / "ok.jpg").write_bytes(photo)
    assert D.header_problem(str(tmp_path / "ok.jpg")) is None and D.check_image(str(tmp_path / "ok.jpg")) is None


# -- CIFAR pickles: data, never code --------------------------------------------------------------------

class Py2Pickler(pickle._Pickler):
    """What Python 2's cPickle wrote for the official CIFAR batches (protocol 2): str and bytes as
    BINSTRING, numpy's reconstructor under its numpy 1 name numpy.core.multiarray."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string
    dispatch[type] = save_global


def write_cifar(root, rng, dump, per_batch=3):
    os.makedirs(root)
    images = {}
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(index * per_batch + i) % 10 for i in range(per_batch)]  # every class has a training image
        images[name] = (data, labels)
        with open(os.path.join(root, name), "wb") as f:
            dump({"batch_label": f"{name} of 5", "labels": labels, "data": data,
                  "filenames": [f"{i}.png" for i in range(per_batch)]}, f)
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return images


@pytest.mark.parametrize("style", ["python2", "protocol2", "protocol2_bytes_keys", "protocol5"])
def test_genuine_cifar_pickles_load(tmp_path, rng, style):
    def dump(obj, f):
        if style == "python2":
            Py2Pickler(f, protocol=2).dump(obj)
        elif style == "protocol2_bytes_keys":
            pickle.dump({k.encode(): ([v.encode() for v in x] if k == "label_names" else x) for k, x in obj.items()},
                        f, protocol=2)
        else:
            pickle.dump(obj, f, protocol=2 if style == "protocol2" else 5)

    root = str(tmp_path / "cifar-10-batches-py")
    images = write_cifar(root, rng, dump)
    train, test = D.load_cifar_pickles(root, train=True), D.load_cifar_pickles(root, train=False)
    assert train.classes == [f"class{i}" for i in range(10)] and len(train) == 15 and len(test) == 3
    data, labels = images["data_batch_2"]
    expected = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(train.images[3:6], expected) and train.labels[3:6].tolist() == labels
    assert np.array_equal(test.images, images["test_batch"][0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


class _Payload:
    """Unpickling it runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def numpy_runstring_payload(marker) -> bytes:
    """A pickle naming a numpy function that executes a string (a classic numpy gadget)."""
    code = f"open({str(marker)!r}, 'w').write('ran')".encode()
    return (b"\x80\x02cnumpy.testing._private.utils\nrunstring\nX" + struct.pack("<I", len(code)) + code
            + b"}\x86R.")


@pytest.mark.parametrize("target", ["data_batch_1", "batches.meta", "test_batch"])
@pytest.mark.parametrize("payload", ["reduce", "numpy_gadget", "codec", "inside_dict"])
def test_malicious_cifar_pickle_is_refused_and_never_run(tmp_path, rng, target, payload):
    root = str(tmp_path / "cifar-10-batches-py")
    write_cifar(root, rng, lambda obj, f: pickle.dump(obj, f, protocol=2))
    marker = tmp_path / "marker"
    if payload == "reduce":
        data = pickle.dumps(_Payload(marker), protocol=2)
    elif payload == "numpy_gadget":
        data = numpy_runstring_payload(marker)
    elif payload == "codec":  # _codecs.encode is allowed for latin1 only
        data = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    else:
        data = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Payload(marker)]}, protocol=2)
    path = os.path.join(root, target)
    with open(path, "wb") as f:
        f.write(data)
    before = snapshot(str(tmp_path))
    with pytest.raises(D.DataError) as info:
        D.load_cifar_pickles(root, train=target != "test_batch")
    assert path in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists() and snapshot(str(tmp_path)) == before


def test_the_payload_would_run_under_plain_pickle(tmp_path):
    """The refusal above is meaningful: plain pickle.load runs this payload (in a child process)."""
    marker = tmp_path / "marker"
    (tmp_path / "evil").write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(tmp_path / 'evil')!r}, 'rb'))"],
                   check=True, timeout=60)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("change, match", [
    (lambda b: b.update(data=b["data"].astype(np.int64)), "uint8 array"),
    (lambda b: b.update(data=b["data"][:, :100]), "uint8 array"),
    (lambda b: b.update(labels=b["labels"][:-1]), "must be 3 integers"),
    (lambda b: b.update(labels=[0, 1, 10]), "outside 0..9"),
    (lambda b: b.update(labels=[0, 1, -1]), "outside 0..9"),
])
def test_cifar_batch_with_wrong_contents_is_named(tmp_path, rng, change, match):
    root = str(tmp_path / "cifar-10-batches-py")
    write_cifar(root, rng, lambda obj, f: pickle.dump(obj, f, protocol=2))
    path = os.path.join(root, "test_batch")
    with open(path, "rb") as f:
        batch = pickle.load(f)  # written by this test: trusted
    change(batch)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(D.DataError, match=match) as info:
        D.load_cifar_pickles(root, train=False)
    assert path in str(info.value)
