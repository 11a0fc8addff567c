"""The int8 graph's checks (OnnxEngine's, for int8), in two kinds that never mix:

* the graph, on fixed real images (its check images: the first INT8_CHECK_ROWS of the calibration
  sample it was quantized on, kept in a run's folder beside the graph; the data's first images
  only where neither is at hand), when it is loaded and at every new batch size: a graph that
  answers zeros, noise or another image's features fails there, whatever images come later;
* each image, against the input range its calibration gave the graph's first quantizer: an image
  far outside is refused, named.

No image is compared with fp32 one by one or with its neighbours: one image's int8 error is wider
than a batch's (benchmarks/int8_per_image.py: at 160 px, multi-stage features, median 0.17, max
0.32 over 250 CIFAR-10 test photos; at 32 px, head features, 4% above 0.35, up to 1.9), and a
check on the images at hand made whether a photo was refused depend on the batch it fell in."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fasttl.cache.store import CacheError
from fasttl.util.errors import OptionError

# An image with more than this share of its values outside the range the calibration gave the
# graph's first quantizer (under-exposed scans calibrate [-1, 0], a normal photo spills half its
# pixels over) is clipped before the first layer, and its features are refused.
INT8_OUTSIDE_SHARE = 0.01
# ... counting only values beyond the range by more than this share of its width: gross clipping
# only. A sample without pure black or white pixels (video levels, 10 to 245) calibrates
# [-0.91, 0.92], and full-range photos, a little beyond it, come out within 0.11 of fp32; at levels
# 30 to 225 photos are beyond by up to 15%, within 0.06 to 0.22 at multi-stage features and up to
# 0.81 at head features, as far as photos inside the range get at those settings (up to 1.9);
# the under-exposed case, the one this check is for, is beyond by half or more.
INT8_OUTSIDE_MARGIN = 0.25
# The graph's check images: engines.INT8_TOLERANCE holds over a batch of this many.
INT8_CHECK_ROWS = 8


class Int8Checks:
    """Mixed into OnnxEngine: uses its beside_reference, difference, shown, input_range, quantizable,
    name, engine_dir, check_images, check_origin and checks_on_data (the check images are the
    data's first: a refusal names the first)."""

    def check_batch_size(self, size: int) -> None:
        """The graph on its check images in batches of `size` (tiled to whole batches), its error
        over each check image once, as at the size it was verified at: a graph right only at that
        size fails here, before it extracts anything, and a sound one gets the same answer at
        every size (a tile counted twice would move the error with the size)."""
        check = self.check_images
        rows = size * -(-len(check) // size)  # whole batches of `size` covering every check image
        tiled = check.repeat(-(-rows // len(check)), 1, 1, 1)[:rows]
        got, want, stopped = self.beside_reference(tiled, batch=size)
        error = stopped or self.difference(got[:len(check)], check, want[:len(check)])
        if error is not None:
            raise self.graph_off(f"{error}, at batch size {size}")

    def refuse_outside_range(self, images: Tensor) -> None:
        """The first image of the batch with more than INT8_OUTSIDE_SHARE of its values beyond the
        range the graph's input quantizer holds is refused (one min/max pass over the batch when
        none is outside)."""
        if self.input_range is None or not len(images):
            return
        low, high = self.input_range
        step = INT8_OUTSIDE_MARGIN * (high - low)
        flat = images.detach().reshape(len(images), -1)
        smallest, largest = torch.aminmax(flat)  # ~1 ms a batch of 32 at 160 px: under 2% of int8's
        if float(smallest) >= low - step and float(largest) <= high + step:
            return
        outside = (flat < low - step) | (flat > high + step)
        for row in outside.any(1).nonzero().flatten().tolist():
            share = float(outside[row].float().mean())
            if share > INT8_OUTSIDE_SHARE:
                raise BatchError(f"engine: the int8 graph {self.shown()[0]} can't represent an image",
                                 f" ({share:.0%} of its values beyond the range [{low:.2f}, {high:.2f}] its "
                                 f"calibration images gave by over {INT8_OUTSIDE_MARGIN:.0%} of its width): "
                                 f"{self._why(image=True)}", row, per_image=True)

    def graph_off(self, error: str) -> CacheError:
        """The graph too far from PyTorch fp32 on its check images; a BatchError (the caller names
        the first image) when they are the data's."""
        before = f"engine: the int8 graph {self.shown()[0]} is off PyTorch fp32 on {self.check_origin}"
        if self.checks_on_data:
            return BatchError(before, f" ({error}): {self._why()}")
        return CacheError(f"{before} ({error}): {self._why()}")

    def _why(self, image: bool = False) -> str:
        """What went wrong and the fix that works: a graph quantized just now can't follow the images
        (quantizing again gives the same graph: the fix is fp32); a run's graph was shown images
        unlike its training images (its owner's fix) or, off on its own check images, is not what
        the run made; a graph looked up met images unlike its calibration sample."""
        fix = self._adopted().fix
        if self.quantizable:
            return ("int8, with the ranges its calibration sample gave it, can't follow these images closely enough; "
                    "nothing of them was stored: pass --extract-precision fp32 (precision='fp32' from Python; "
                    "`fasttl extract` into a folder holding this graph's other splits: with --overwrite too)")
        if fix is not None and image:
            return "images unlike those it was calibrated on: " + fix
        if fix is not None:
            return ("the graph or its check images are not what the run made (changed along with its record?), or "
                    "this CPU's int8 kernels follow it less closely than the training machine's: train the run again "
                    "(with --extract-precision fp32 if int8 is refused there too)")
        return ("images unlike those it was calibrated on (or a graph changed along with its record): pass their "
                "calibration images (calibration=(key, images)), or --extract-precision fp32")

    def unusable(self, mismatch: Optional[str], failure: Optional[str]) -> Exception:
        """Why an int8 graph that must be looked up (its calibration images are not at hand) can't
        be used: none is kept, the one kept does not load, or it is too far from PyTorch on its
        check images."""
        if mismatch is None and failure is None and self.name is None:
            return OptionError("extract_precision: int8 needs calibration images of the data (it is for building a "
                               "cache: fasttl extract, FeatureCache.build, or a run's training images)")
        if mismatch is not None:
            return self.graph_off(mismatch)
        if failure is None:
            return no_graph_kept(self.engine_dir)
        shown, fix = self.shown()
        return CacheError(f"engine: the int8 graph {shown} does not load ({failure}), and it can't be quantized again "
                          "without its calibration images: " + ("train the run again" if fix else
                                                                 "pass calibration=(key, images), or "
                                                                 "--extract-precision fp32"))


class BatchError(CacheError):
    """An engine's check failed on an image of a batch, which the caller names (extract_features
    knows the source): `naming(image of batch row `row`)` is the error with it."""

    def __init__(self, before: str, after: str, row: int = 0, per_image: bool = False):
        super().__init__(before + after)
        # per_image: the image itself is refused (its values beyond the graph's range), not the graph
        self.before, self.after, self.row, self.per_image = before, after, row, per_image

    def naming(self, image: str) -> CacheError:
        first = "the first: " if self.before.endswith("data") else ""
        return CacheError(f"{self.before} ({first}{image}){self.after}")


def no_graph_kept(engine_dir: Optional[str]) -> OptionError:
    """Another source's calibration given without its images, and its int8 graph kept nowhere."""
    where = f"in {engine_dir} or this process" if engine_dir else "in this process (no engine_dir given)"
    return OptionError(f"calibration: no int8 graph of that calibration sample is kept ({where}), and it can't be "
                       "made without the sample's images: pass calibration=(key, images) as calibration_sample "
                       "makes them, or extract in fp32")
