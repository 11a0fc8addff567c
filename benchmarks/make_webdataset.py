"""Writes CIFAR-10 JPEG class folders as WebDataset shards: each sample KEY.jpg (the JPEG's bytes,
unchanged) beside KEY.cls (the class index as text), in the folder scan's order, so a cache built
from the shards equals the cache built from the folders row for row.

    python benchmarks/make_webdataset.py ../shared/data/cifar10/train /tmp/cifar10-wds --per-shard 10000
    fasttl extract --data '/tmp/cifar10-wds/train-{000000..000004}.tar' --classes /tmp/cifar10-wds/classes.txt ...
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from fasttl.data import scan_class_folder
from fasttl.data.formats.webdataset import write_webdataset


def write_shards(folder: str, out: str, per_shard: int = 10000, prefix: str = "train",
                 limit: Optional[int] = None) -> List[str]:
    """The shard paths written (out/<prefix>-000000.tar, ...) and out/classes.txt
    (fasttl.data.formats.webdataset.write_webdataset)."""
    source = scan_class_folder(folder)
    if limit is not None:
        source = source.subset(range(min(limit, len(source))))
    return write_webdataset(source, out, per_shard, prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="class folders, FOLDER/<class>/*.jpg")
    parser.add_argument("out", help="where the shards and classes.txt go")
    parser.add_argument("--per-shard", type=int, default=10000, help="samples per tar (default 10000)")
    parser.add_argument("--prefix", default="train", help="shard name prefix (default train)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    args = parser.parse_args()
    paths = write_shards(args.folder, args.out, args.per_shard, args.prefix, args.limit)
    last = len(paths) - 1
    print(f"wrote {len(paths)} shards: {os.path.join(args.out, args.prefix)}-{{000000..{last:06d}}}.tar")


if __name__ == "__main__":
    main()
