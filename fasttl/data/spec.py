"""The preprocessing both pipelines apply, in one place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


# The largest image side fasttl resizes to: a bigger one is a typo (its activations outgrow memory).
MAX_IMAGE_SIZE = 1024


def check_image_size(name: str, value, error=ValueError) -> int:
    """`value` when it is an image side fasttl handles (1 to MAX_IMAGE_SIZE pixels); else `error`."""
    from fasttl.util.checks import positive_int

    value = positive_int(name, value, error)
    if value > MAX_IMAGE_SIZE:
        raise error(f"{name}: {value} px is more than fasttl handles ({MAX_IMAGE_SIZE})")
    return value


@dataclass(frozen=True)
class TransformSpec:
    size: int                          # output side, pixels
    mean: Tuple[float, float, float]   # per channel, on the 0..1 scale
    std: Tuple[float, float, float]
    crop_fraction: float = 1.0         # eval: resize shorter side to size / crop_fraction, center crop
    train: bool = False                # random resized crop + horizontal flip instead
    seed: int = 0
    mirror: bool = False               # eval: the horizontally mirrored view (a second view for feature caches)

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
