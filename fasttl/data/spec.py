"""The preprocessing both pipelines apply, in one place."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Tuple

from fasttl.util.checks import MAX_IMAGE_SIZE, check_image_size, finite  # noqa: F401 (where the data layer names them)

MAX_RESIZE = 2 * MAX_IMAGE_SIZE  # the most pixels an eval image's shorter side is resized to before its center crop


@dataclass(frozen=True)
class TransformSpec:
    size: int                          # output side, pixels
    mean: Tuple[float, float, float]   # per channel, on the 0..1 scale
    std: Tuple[float, float, float]
    crop_fraction: float = 1.0         # eval: resize shorter side to size / crop_fraction, center crop
    train: bool = False                # random resized crop + horizontal flip instead
    seed: int = 0
    mirror: bool = False               # eval: the horizontally mirrored view (a second view for feature caches)

    def __post_init__(self):
        """Each value checked and made plain (a numpy number as Python's): a size of -5 or 0, a std
        of 0 or NaN, would otherwise give wrong images silently on one backend and a traceback on
        the other."""
        from fasttl.util.checks import a_flag, plain_number

        set_plain = object.__setattr__  # (a frozen dataclass)
        set_plain(self, "size", check_image_size("size", plain_number(self.size)))
        for name in ("mean", "std"):
            values = getattr(self, name)
            if isinstance(values, (set, frozenset)):  # (its order, so which channel is which, follows their hashes)
                raise ValueError(f"{name}: expected 3 numbers in channel order (R, G, B), got a "
                                 f"{type(values).__name__}, which has no order; pass a tuple or a list")
            values = None if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__") else \
                [plain_number(v) for v in values]
            if values is None or len(values) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and finite(v) for v in values) \
                    or name == "std" and min(values) <= 0:
                raise ValueError(f"{name}: expected 3 finite numbers{' > 0' if name == 'std' else ''} (one a channel, "
                                 f"on the 0..1 scale), got {getattr(self, name)!r:.80}")
            set_plain(self, name, tuple(float(v) for v in values))
        self._check_float32_pixels()
        crop = plain_number(self.crop_fraction)
        if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
            raise ValueError(f"crop_fraction: expected a number in (0, 1] (the center crop's share of the resized "
                             f"image), got {self.crop_fraction!r:.80}")
        if self.size / crop > MAX_RESIZE:  # (the image is resized to this before its crop: 1e-9 asks 119 GiB)
            raise ValueError(f"crop_fraction: {crop!r} resizes each image to {self.size / crop:,.0f} px before its "
                             f"{self.size} px center crop, more than fasttl handles ({MAX_RESIZE}); expected at least "
                             f"{self.size / MAX_RESIZE:.4g}")
        set_plain(self, "crop_fraction", float(crop))
        set_plain(self, "train", a_flag("train", self.train))
        set_plain(self, "mirror", a_flag("mirror", self.mirror))
        seed = plain_number(self.seed)  # (any size: the loader derives each epoch's as seed * 1,000,003 + epoch)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}")
        set_plain(self, "seed", seed)

    def _check_float32_pixels(self) -> None:
        """mean and std as the pipelines use them, in float32 on the 0..255 scale: a std of 1e-300
        is 0 there, and a mean of 1e300 inf, which make every pixel inf; a std of 1e39, inf, makes
        every pixel 0."""
        import numpy as np

        with np.errstate(all="ignore"):
            mean, std = np.float32(self.mean_255), np.float32(self.std_255)
            ends = (np.float32([[0.0], [255.0]]) - mean) / std
        if not (np.isfinite(ends).all() and np.isfinite(mean).all() and np.isfinite(std).all()):  # (std inf: all 0)
            raise ValueError(f"std, mean: {self.std} and {self.mean} normalize pixels to values float32 can't hold "
                             "(inf; or 0, with a std float32 holds as inf); give them on the 0..1 scale, as "
                             "ImageNet's std (0.229, 0.224, 0.225) and mean (0.485, 0.456, 0.406)")

    @property
    def resize_shorter(self) -> int:
        return max(self.size, int(round(self.size / self.crop_fraction)))

    @property
    def mean_255(self):
        return [255.0 * m for m in self.mean]

    @property
    def std_255(self):
        return [255.0 * s for s in self.std]

    @classmethod
    def for_backbone(cls, preprocessing, train: bool = False, seed: int = 0, size: int = None,
                     mirror: bool = False) -> "TransformSpec":
        p = preprocessing if size is None else preprocessing.with_size(size)
        return cls(p.input_size, tuple(p.mean), tuple(p.std), p.crop_fraction, train, seed, mirror)

    def as_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "crop_fraction": self.crop_fraction,
                "train": self.train, "mirror": self.mirror}
