"""Which files a run trained on, recorded in its folder: one 64-bit hash per training image of
where it is on disk (device, inode and tar member, sources.disk_keys). A test split checked
against the record finds the run's training images under any name, a hard link, a moved or
renamed data folder, or moved from train/ into test/ after the run, where the run's data as it
is now no longer shows them."""
from __future__ import annotations

import hashlib
import json
from typing import Optional, Set

import numpy as np

from fasttl.data.sources import disk_keys
from fasttl.transfer.rundir import read_recorded, write_recorded

TRAINED_IMAGES = "trained-images.bin"
_MAX_BYTES = 8 * 100_000_000  # 100 million images


def key_hash(key) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(list(key)).encode()).digest()[:8], "little", signed=True)


def hashes(source) -> Set[int]:
    """The hashes of the disk keys of `source`'s images (none for decoded arrays or missing files)."""
    return {key_hash(key) for key in disk_keys(source) if key is not None}


def record(run_dir: str, train) -> None:
    """Writes the record of `train`'s images into the run folder (its SHA-256 in the marker)."""
    write_recorded(run_dir, TRAINED_IMAGES, np.array(sorted(hashes(train)), dtype="<i8").tobytes())


def recorded(run_dir: str) -> Optional[Set[int]]:
    """The run's record, or None when it has none (an older run, an edited file)."""
    data = read_recorded(run_dir, TRAINED_IMAGES, _MAX_BYTES)
    if data is None or len(data) % 8:
        return None
    return set(np.frombuffer(data, dtype="<i8").tolist())


def shared_images(test, trained: Set[int]) -> list:
    """The names of `test`'s images whose disk key is in `trained`."""
    return [test.name_of(i) for i, key in enumerate(disk_keys(test)) if key is not None and key_hash(key) in trained]
