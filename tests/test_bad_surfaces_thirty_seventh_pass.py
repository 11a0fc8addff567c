"""The thirty-seventh hostile pass (30 attempts, 22 held; pass 36's fixes held, and camera-like EXIF in
both byte orders passed and decoded alike): an EXIF block whose TIFF magic is swapped (MM*\\0, II\\0*),
which PIL reads and DALI drops; a 2.7 KB archive of 400 chained extended headers (a RecursionError
traceback); a GNU sparse member of a million extension blocks (27 s a 1.5 MB archive); a valid TIFF
type 13 (IFD) entry refused as unknown; side_by_side joining {"model": "m1"} and {"backbone": "m1 "}."""
import gzip
import struct
import tarfile

import pytest
import torch

import fasttl
from fasttl.cache.cache import CacheError
from fasttl.data import archive
from fasttl.data.images import header_problem
from fasttl.util.errors import DataError
from test_bad_surfaces_thirty_fifth_pass import _jpeg, _png
from test_bad_surfaces_thirty_sixth_pass import SIX, _entry, _tiff

FOLDER = "cifar-10-batches-py"


@pytest.mark.parametrize("magic", [b"MM*\0", b"II\0*", b"II+\0", b"MM\0+"])
@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_a_swapped_or_bigtiff_magic_is_refused(tmp_path, magic, kind):
    block = magic + _tiff("<", [SIX])[4:]
    path = _jpeg(tmp_path / "x.jpg", block) if kind == "jpeg" else _png(tmp_path / "x.png", [block])
    assert header_problem(path) is not None


@pytest.mark.parametrize("order", ["<", ">"])
def test_an_ifd_typed_pointer_is_a_known_type(tmp_path, order):
    pointer = _entry(order, 0x8769, 13, 1, struct.pack(order + "I", 0))  # the Exif IFD pointer typed IFD (13)
    six = _entry(order, 0x0112, 3, 1, struct.pack(order + "HH", 6, 0))
    assert header_problem(_jpeg(tmp_path / "x.jpg", _tiff(order, [six, pointer]))) is None


def _header(name: str, size: int, kind: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.USTAR_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _archive(path, between: bytes) -> str:
    """The data set's files, then `between` (extra headers and members), as a tar.gz."""
    with gzip.open(path, "wb") as out:
        for name in ("batches.meta", "test_batch"):
            out.write(_header(f"{FOLDER}/{name}", 3, tarfile.REGTYPE) + _padded(b"abc"))
        out.write(between + b"\0" * 1024)
    return str(path)


def _extract(tmp_path, path):
    dest = tmp_path / "dest"
    dest.mkdir()
    try:
        archive.extract(path, FOLDER, str(dest), source="http://127.0.0.1/x.tar.gz")
    finally:
        assert list(dest.iterdir()) == []


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE])
def test_a_chain_of_extended_headers_is_one_line(tmp_path, kind):
    body = _padded((f"{FOLDER}/" + "a" * 200).encode() + b"\0") if kind == tarfile.GNUTYPE_LONGNAME else \
        _padded(b"30 comment=" + b"x" * 18 + b"\n")
    chain = b"".join(_header("././@LongLink", len(body.rstrip(b"\0")) + (kind == tarfile.GNUTYPE_LONGNAME), kind)
                     + body for _ in range(400))
    path = _archive(tmp_path / "chain.tar.gz", chain + _header(f"{FOLDER}/x", 0, tarfile.REGTYPE))
    with pytest.raises(DataError, match="more than 8 extended headers in a row before one member"):
        _extract(tmp_path, path)


def test_a_sparse_member_is_refused_before_its_map_is_read(tmp_path):
    info = tarfile.TarInfo(f"{FOLDER}/sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[482] = 1  # isextended: extension blocks follow, here 100,000 of them
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    extension = b"\0" * 504 + b"\1" + b"\0" * 7
    path = _archive(tmp_path / "sparse.tar.gz", bytes(block) + extension * 100_000)
    with pytest.raises(DataError, match="sparse file member"):
        _extract(tmp_path, path)


def test_a_data_set_archive_still_extracts(tmp_path):
    path = _archive(tmp_path / "fine.tar.gz", _header(f"{FOLDER}/data_batch_1", 3, tarfile.REGTYPE) +
                    _padded(b"xyz"))
    dest = tmp_path / "dest"
    dest.mkdir()
    target = archive.extract(path, FOLDER, str(dest), required=("batches.meta", "data_batch_1"))
    assert (dest / FOLDER / "data_batch_1").read_bytes() == b"xyz" and target == str(dest / FOLDER)


@pytest.mark.parametrize("other", [{"backbone": "m1"}, {"model": "m1 "}, {"model": " m1", "backbone": "m2"}])
def test_side_by_side_knows_one_model_by_its_name(tmp_path, other):
    labels, rows = torch.tensor([0, 1] * 3), torch.ones(6, 4)
    first = fasttl.FeatureCache.write(str(tmp_path / "a"), [rows], labels, classes=["a", "b"],
                                      fingerprint={"model": "m1"})
    second = fasttl.FeatureCache.write(str(tmp_path / "b"), [rows], labels, classes=["a", "b"], fingerprint=other)
    with pytest.raises(CacheError, match="one backbone's features twice"):
        fasttl.FeatureCache.side_by_side([first, second])
