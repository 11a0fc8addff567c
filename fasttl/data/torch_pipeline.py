"""The PyTorch fallback pipeline: PIL decode, then the same resize, crop, flip and normalize as the
DALI pipeline, so either backend feeds a backbone the same images (within interpolation error)."""
from __future__ import annotations

import functools
import math
from typing import Tuple

import numpy as np
import torch

from fasttl.data.images import bytes_problem, header_problem, skip_hint, unreadable
from fasttl.util.errors import DataError
from fasttl.data.spec import TransformSpec


# EXIF orientation tag values 2..8 and the PIL transpose that makes the pixels upright.
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                7: "TRANSVERSE", 8: "ROTATE_90"}


def _orientation(img) -> int:
    """The EXIF orientation of a JPEG (APP1) or PNG (eXIf chunk), 1 when absent or unreadable, as
    DALI's decoder reads it (a malformed EXIF block is ignored, not an error)."""
    raw = img.info.get("exif")
    if not raw:
        return 1
    try:
        from PIL import Image

        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(0x0112, 1)
        return value if value in _ORIENTATION else 1
    except Exception:
        return 1


def to_rgb_uint8(img) -> np.ndarray:
    """RGB uint8 (H, W, 3) from a loaded PIL image of any JPEG/PNG mode, as DALI decodes it:
    16-bit samples scaled by 255/65535 and rounded, alpha dropped (not composited), palette
    looked up, grayscale repeated, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        gray = np.rint(np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns on a direct P -> RGB with transparency; same RGB
    if img.mode != "RGB":
        img = img.convert("RGBA" if img.mode in ("RGBA", "LA", "PA") else "RGB")
    return np.array(np.asarray(img, dtype=np.uint8)[:, :, :3], order="C")  # a writable copy


def decode(path: str, data: bytes = None) -> torch.Tensor:
    """RGB uint8 (H, W, 3) from a JPEG/PNG, turned upright by its EXIF orientation (as DALI does);
    an unreadable file is an error naming it. `data`: the image's bytes, when they come from
    somewhere else than the file `path` (a WebDataset member; `path` names it)."""
    import io

    from PIL import Image

    problem = header_problem(path) if data is None else bytes_problem(data)  # the same refusals as before DALI
    if problem is not None:
        raise DataError(f"{unreadable(path, problem)}; {skip_hint(problem)}")
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            img.load()
            orientation = _orientation(img)
            if orientation != 1:
                img = img.transpose(getattr(Image.Transpose, _ORIENTATION[orientation]))
            return torch.from_numpy(to_rgb_uint8(img))
    except Exception as exc:
        raise DataError(f"{path}: cannot be decoded ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                        f"{skip_hint()}") from None


@functools.lru_cache(maxsize=256)
def _resampling(in_size: int, out_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input indices, weights), each (out_size, taps), of DALI's linear resize with antialiasing
    along one axis, reproduced so that both backends give the same pixels: a triangle filter of
    half-width in/out when shrinking (1 when enlarging) centred on each output pixel, sampled at
    the ceil of its left edge, the taps past the image clamped to its edge pixel (DALI's border;
    PIL's and torch's drop them instead), then normalized. float32 arithmetic, as DALI's."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    half_width = max(f32(0.5), scale if out_size < in_size else f32(1.0))
    taps = int(math.ceil(2 * half_width))
    x = np.arange(out_size, dtype=f32)
    left = x * scale + (f32(0.5) * scale - f32(0.5) - half_width)  # where the filter starts
    first = np.ceil(left).astype(np.int64)
    offset = (first - left).astype(f32)[:, None] + np.arange(taps, dtype=f32)[None, :]
    weights = np.maximum(f32(0), f32(1) - np.abs(offset / half_width - f32(1))).astype(f32)
    sums = weights.sum(axis=1, keepdims=True, dtype=f32)
    weights = np.where(sums > 0, weights / np.where(sums > 0, sums, f32(1)), weights)
    indices = np.clip(first[:, None] + np.arange(taps)[None, :], 0, in_size - 1)
    return torch.from_numpy(indices), torch.from_numpy(weights.astype(f32))


@functools.lru_cache(maxsize=256)
def _dense_resampling(in_size: int, out_size: int) -> torch.Tensor:
    """_resampling as an (out_size, in_size) matrix (taps clamped to the same pixel added up)."""
    indices, weights = _resampling(in_size, out_size)
    return torch.zeros(out_size, in_size).scatter_add_(1, indices, weights)


def _resample_rows(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """(in_size, K) float -> (out_size, K): each output row the weighted sum of its input rows.
    Small sizes (CIFAR's 32 px to a backbone's 160) as one dense matmul, 2x the gather's speed
    there; large ones gather their few taps per row."""
    if x.shape[0] * out_size <= 65536:
        return _dense_resampling(x.shape[0], out_size) @ x
    indices, weights = _resampling(x.shape[0], out_size)
    gathered = x.index_select(0, indices.reshape(-1)).view(*indices.shape, x.shape[1])
    return torch.bmm(weights.unsqueeze(1), gathered).squeeze(1)


def _resize(hwc: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W, C) -> (height, width, C): linear resize with antialiasing, float out, as the DALI
    pipeline's (rounding the resized pixels to uint8 moves EfficientNet-Lite features by ~3%).
    Rows first, then columns, each pass a batched matmul over contiguous rows. An image already of
    that size is returned as it is."""
    h, w, c = hwc.shape
    if (h, w) == (height, width):
        return hwc
    hwc = hwc.float()
    if h != height:
        hwc = _resample_rows(hwc.reshape(h, w * c), height).view(height, w, c)
    if w != width:
        columns = hwc.transpose(0, 1).reshape(w, height * c)
        hwc = _resample_rows(columns, width).view(width, height, c).transpose(0, 1)
    return hwc


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Tuple[float, float] = (0.08, 1.0),
                            ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering `scale` of the area at an aspect ratio in `ratio`
    (log-uniform), as torchvision's RandomResizedCrop; falls back to the center crop."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize(hwc_uint8: torch.Tensor, spec: TransformSpec, rng: np.random.Generator = None) -> torch.Tensor:
    """uint8 (H, W, 3) -> (3, size, size) on the 0..255 scale: the geometry of `spec` (random
    resized crop and flip for training, else resize of the shorter side and center crop, mirrored
    if asked); float32 where it was resized, uint8 where no resize was needed (a quarter of the
    bytes for the workers to send)."""
    h, w = hwc_uint8.shape[:2]
    size = spec.size
    if spec.train:
        top, left, ch, cw = random_resized_crop_box(h, w, rng)
        out = _resize(hwc_uint8[top:top + ch, left:left + cw], size, size)
        if rng.random() < 0.5:
            out = out.flip(1)
    else:
        shorter = spec.resize_shorter
        if h <= w:
            nh, nw = shorter, max(shorter, int(round(w * shorter / h)))
        else:
            nh, nw = max(shorter, int(round(h * shorter / w))), shorter
        out = _resize(hwc_uint8, nh, nw)
        # DALI's crop_pos 0.5 rounds an odd margin's half up (26.5 -> 27): a pixel of shift moves features.
        top, left = (nh - size + 1) // 2, (nw - size + 1) // 2
        out = out[top:top + size, left:left + size]
        if spec.mirror:
            out = out.flip(1)
    return out.permute(2, 0, 1).contiguous()


def normalize(images: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    """(N, 3, size, size) or (3, size, size) on the 0..255 scale -> normalized float32, one pass
    per batch."""
    mean = torch.tensor(spec.mean_255).view(3, 1, 1)
    std = torch.tensor(spec.std_255).view(3, 1, 1)
    return (images.float() - mean) / std


def transform(hwc_uint8: torch.Tensor, spec: TransformSpec, rng: np.random.Generator = None) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalized float32 (3, size, size): crop_resize, then normalize."""
    return normalize(crop_resize(hwc_uint8, spec, rng), spec)


class Collate:
    """A batch of (image, label) samples -> (normalized float32 images (N, 3, size, size), labels):
    stacked and normalized in the worker that decoded them, so that the loading process's torch
    threads (spinning OpenMP threads that take CPU from the workers) do nothing per batch."""

    def __init__(self, spec: TransformSpec):
        self.spec = spec

    def __call__(self, samples):
        images = [image for image, _ in samples]
        stacked = torch.stack(images if all(i.dtype == torch.uint8 for i in images) else [i.float() for i in images])
        return normalize(stacked, self.spec), torch.tensor([label for _, label in samples])


class TorchImageDataset(torch.utils.data.Dataset):
    """Samples of a source as (3, size, size) 0..255 pixels after the geometry of `spec`
    (normalized per batch by the loader). A key is an index, or (index, seed): the augmentation of
    a training sample is seeded per (seed, index), and the loader hands each epoch's seed with the
    indices, so persistent workers need no new dataset per epoch and a run repeats exactly."""

    def __init__(self, source, spec: TransformSpec):
        self.source = source
        self.spec = spec

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, self.spec.seed)
        if self.source.encoded:
            path, member = self.source.where(index)
            # an image file is decoded from its path (its header checked before it is read in full)
            image = decode(path) if member is None else decode(self.source.name_of(index), self.source.read(index))
        else:
            image = torch.from_numpy(np.ascontiguousarray(self.source.images[index]))
        label = int(self.source.labels[index])
        rng = np.random.default_rng([seed, index]) if self.spec.train else None
        return crop_resize(image, self.spec, rng), label
