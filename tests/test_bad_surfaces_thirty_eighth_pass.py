"""The thirty-eighth hostile pass (33 attempts, 31 held; pass 37's fixes held, and duplicate or odd
orientation entries, an IFD after a gap, a looping next-IFD pointer, unsorted tags and EXIF after
SOF0 decoded alike): a PNG text chunk keyed "exif", which PIL reads as the image's EXIF (a turn on
the PyTorch path only), and side_by_side of a join of joins taking one model twice."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch

import fasttl
from fasttl.cache.cache import CacheError
from fasttl.data.images import header_problem
from test_bad_surfaces_thirty_sixth_pass import SIX, _tiff


def _png_with(path, kind: bytes, body: bytes, after_data: bool = False) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    at = data.index(b"IEND" if after_data else b"IDAT") - 4
    path.write_bytes(data[:at] + chunk + data[at:])
    return str(path)


@pytest.mark.parametrize("kind", [b"tEXt", b"zTXt", b"iTXt"])
@pytest.mark.parametrize("after_data", [False, True])
def test_a_png_text_chunk_keyed_exif_is_refused(tmp_path, kind, after_data):
    path = _png_with(tmp_path / "x.png", kind, b"exif\0" + _tiff("<", [SIX]), after_data)
    assert "chunk keyed 'exif'" in (header_problem(path) or "")
    assert header_problem(_png_with(tmp_path / "y.png", kind, b"Comment\0exif data", after_data)) is None


def test_side_by_side_flattens_a_join_of_joins(tmp_path):
    labels, rows = torch.tensor([0, 1] * 3), torch.ones(6, 4)

    def written(name):
        return fasttl.FeatureCache.write(str(tmp_path / name), [rows], labels, classes=["a", "b"],
                                         fingerprint={"model": name})

    m1, m2, m3 = written("m1"), written("m2"), written("m3")
    joined = fasttl.FeatureCache.side_by_side([fasttl.FeatureCache.side_by_side([m1, m2]), m3])
    assert joined.fingerprint["backbone"]["name"] == "m1+m2+m3" and joined.feature_dim == 12
    with pytest.raises(CacheError, match="one backbone's features twice"):
        fasttl.FeatureCache.side_by_side([joined, m1])
    assert fasttl.FeatureCache.side_by_side([joined, written("m4")]).feature_dim == 16
