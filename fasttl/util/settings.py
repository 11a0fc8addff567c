"""Every FASTTL_* environment variable fasttl reads at run time, with its default: the one place
that names them. (Build-time variables, FASTTL_CUDA and the like, belong to the build: see the
README's "Build options".) Each is read when used, never at import, so a test or a script that
sets one later is heard."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Setting:
    name: str
    default: Optional[str]
    help: str

    def raw(self) -> Optional[str]:
        """The value as set, or None when unset. Empty or blank counts as unset: `export
        FASTTL_X=$UNSET` (or `" $UNSET"`) in a job script must not make a path of the current folder."""
        value = os.environ.get(self.name)
        return value if value and value.strip() else None

    def value(self) -> Optional[str]:
        """The value as set, else the default."""
        return self.raw() or self.default

    def path(self) -> str:
        """The value as a folder path (~ expanded; a ~user that names no user is refused, never
        taken as a folder named "~user" in the current one)."""
        path = os.path.expanduser(self.value())
        if path.startswith("~"):
            from fasttl.util.errors import OptionError

            raise OptionError(f"{self.name}={self.value()}: {path.split(os.sep, 1)[0]} names no user's home folder; "
                              "give an absolute path")
        return path

    def is_set(self) -> bool:
        return self.raw() is not None


DATA = Setting("FASTTL_DATA", os.path.join("~", ".cache", "fasttl", "data"),
               "where `fasttl data fetch` and --download keep data sets (cifar10)")
CACHE_DIR = Setting("FASTTL_CACHE_DIR", os.path.join("~", ".cache", "fasttl", "features"),
                    "where `fasttl run` keeps its feature caches, to reuse them")
STATE_DIR = Setting("FASTTL_STATE_DIR", os.path.join("~", ".cache", "fasttl", "state"),
                    "where fasttl records which caches it has verified in full")
# PIL's own decompression-bomb limit (about 9459 x 9459 pixels), beyond any photo a data set holds.
MAX_IMAGE_PIXELS = Setting("FASTTL_MAX_IMAGE_PIXELS", "89478485",
                           "the most pixels an image's header may declare; a larger image is refused unread")
BENCH_DATA = Setting("FASTTL_BENCH_DATA", None, "the image folder `fasttl bench` reads (default: CIFAR-10 "
                     "of ../shared/data)")
DEBUG = Setting("FASTTL_DEBUG", "0", "1: the CLI shows a traceback beside its one-line error")

SETTINGS = (DATA, CACHE_DIR, STATE_DIR, MAX_IMAGE_PIXELS, BENCH_DATA, DEBUG)
