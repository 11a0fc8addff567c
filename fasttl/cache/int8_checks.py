"""The int8 graph's checks on the images it extracts (OnnxEngine's, for int8): every image
against the input range its calibration gave the graph's first quantizer, small batches against
PyTorch fp32 together, and the messages that name the graph, the image and the fix that works."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fasttl.cache.store import CacheError
from fasttl.util.errors import OptionError

# engines.INT8_TOLERANCE holds only the first batch of each size (an fp32 reference of every batch would cost
# more than int8 saves); every batch is checked against the input range the calibration gave the
# graph's first quantizer: an image with more than this share of its values outside it (under-
# exposed scans calibrate [-1, 0], a normal photo spills half its pixels over) is clipped before the
# first layer, and its features are refused (0 on images like the calibration sample's).
INT8_OUTSIDE_SHARE = 0.01
# ... counting only values beyond the range by more than this share of its width: a sample without
# pure black or white pixels (video levels, 10 to 245) calibrates [-0.91, 0.92], and full-range
# photos, a little beyond it, come out within 0.11 of fp32 (the under-exposed case is beyond by half).
# Narrower levels are no clear case: at 30 to 225, photos 5-15% beyond were within 0.06-0.22 at 32 px
# multi-stage features (a hostile pass) and up to 0.81 at head features (this file's tests): refused.
INT8_OUTSIDE_MARGIN = 0.1
# INT8_TOLERANCE holds over a batch: one image's error is wider (at 160 px, multi: median 0.17, max
# 0.32 over 250 CIFAR-10 test photos; at 32 px, head: 4% above 0.35, up to 1.9), so a batch of fewer
# images than this is compared with fp32 together with the next ones, up to this many, once.
INT8_CHECK_ROWS = 8


class Int8Checks:
    """Mixed into OnnxEngine: uses its _run, difference, reference, shown, input_range, quantizable,
    name, engine_dir, verify_images and _small."""

    def _small_batch(self, images: Tensor) -> Tensor:
        """int8, a batch of fewer than INT8_CHECK_ROWS images (predict of a few photos): compared
        with fp32 together with the next small batches, over the first INT8_CHECK_ROWS images this
        engine extracts (fewer in all: those only by their input range)."""
        if self._small is None:
            return self._run(images)
        features, want = self._run(images), self.reference(images)
        earlier = sum(len(f) for f, _ in self._small)
        self._small.append((features, want))
        if earlier + len(images) >= INT8_CHECK_ROWS:
            got, wanted = (torch.cat(parts) for parts in zip(*self._small))
            self._small, error = None, self.difference(got, images, wanted)
            if error is not None:  # named from the first of them (row -earlier: an earlier batch's)
                plain = self._out_of_range(len(got), error)
                raise BatchError(plain.before.replace(f"on a batch of {len(got)} images",
                                                      f"on the first {len(got)} images it extracted"),
                                 plain.after, row=-earlier)
        return features

    def _refuse_outside_range(self, images: Tensor) -> None:
        """int8: the first image of the batch with more than INT8_OUTSIDE_SHARE of its values outside
        the range the graph's input quantizer holds is refused (one min/max pass over the batch
        when none is outside)."""
        if self.input_range is None or not len(images):
            return
        low, high = self.input_range
        step = INT8_OUTSIDE_MARGIN * (high - low)
        smallest, largest = torch.aminmax(images.detach())  # ~1 ms a batch of 32 at 160 px: under 2% of int8's
        if float(smallest) >= low - step and float(largest) <= high + step:
            return
        flat = images.detach().reshape(len(images), -1)
        suspects = ((flat.amin(1) < low - step) | (flat.amax(1) > high + step)).nonzero().flatten().tolist()
        for row in suspects:
            share = float(((flat[row] < low - step) | (flat[row] > high + step)).float().mean())
            if share > INT8_OUTSIDE_SHARE:
                raise self._out_of_range(len(images), f"{share:.0%} of its values outside the range "
                                         f"[{low:.2f}, {high:.2f}] its calibration images gave", row=row, one=True)

    def _out_of_range(self, count: int, error: str, row: int = 0, one: bool = False) -> "BatchError":
        """An int8 graph too far from PyTorch fp32 on real images: a graph quantized just now on
        the calibration sample, or one kept (a run's), met images outside the ranges the sample
        gave its activations; quantizing it again gives the same graph, so the fix is fp32 (or,
        for a kept graph, its owner's fix)."""
        shown, fix = self.shown()
        if self.quantizable:
            why = ("int8, with the ranges its calibration sample gave it, can't follow these images closely enough; "
                   "nothing of them was stored: pass --extract-precision fp32 (precision='fp32' from Python)")
        else:
            why = "images unlike those it was calibrated on (or a graph changed along with its record): " + \
                (fix or "pass their calibration images (calibration=(key, images)), or --extract-precision fp32")
        if one:
            return BatchError(f"engine: the int8 graph {shown} can't represent an image", f" ({error}): {why}", row)
        return BatchError(f"engine: the int8 graph {shown} is off PyTorch fp32 on a batch of {count} images",
                          f" ({error}): {why}")

    def _unusable(self, error: Optional[str]) -> Exception:
        """Why an int8 graph that must be looked up (its calibration images are not at hand) can't
        be used: none is kept, the one kept does not load, or it is too far from PyTorch on the
        data's first images."""
        if error is None and self.name is None:
            return OptionError("extract_precision: int8 needs calibration images of the data (it is for building a "
                               "cache: fasttl extract, FeatureCache.build, or a run's training images)")
        if error is None:
            return no_graph_kept(self.engine_dir)
        if self.verify_images is not None and error.startswith(("relative error", "it ran longer")):
            return self._out_of_range(len(self.verify_images), error)
        shown, fix = self.shown()
        return CacheError(f"engine: the int8 graph {shown} does not load ({error}), and it can't be quantized again "
                          "without its calibration images: "
                          + (fix or "pass calibration=(key, images), or --extract-precision fp32"))


class BatchError(CacheError):
    """An engine's check failed on a batch of images, which the caller names (extract_features
    knows the source): `naming(first image)` is the error with it."""

    def __init__(self, before: str, after: str, row: int = 0):
        super().__init__(before + after)
        self.before, self.after, self.row = before, after, row  # row: the batch's image it is about

    def naming(self, image: str, last: bool = False) -> CacheError:
        """The error with the image of batch row `row` named (a negative row: an earlier batch's);
        `last`: the group began in an earlier call (a loaded model's earlier predict), `image` ends it."""
        first = "the last: " if last else "the first " if self.before.endswith(("images", "extracted")) else ""
        return CacheError(f"{self.before} ({first}{image}){self.after}")


def no_graph_kept(engine_dir: Optional[str]) -> OptionError:
    """Another source's calibration given without its images, and its int8 graph kept nowhere."""
    where = f"in {engine_dir} or this process" if engine_dir else "in this process (no engine_dir given)"
    return OptionError(f"calibration: no int8 graph of that calibration sample is kept ({where}), and it can't be "
                       "made without the sample's images: pass calibration=(key, images) as calibration_sample "
                       "makes them, or extract in fp32")
