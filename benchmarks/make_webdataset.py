"""Writes CIFAR-10 JPEG class folders as WebDataset shards: each sample KEY.jpg (the JPEG's bytes,
unchanged) beside KEY.cls (the class index as text), in the folder scan's order, so a cache built
from the shards equals the cache built from the folders row for row.

    python benchmarks/make_webdataset.py ../shared/data/cifar10/train /tmp/cifar10-wds --per-shard 10000
    fasttl extract --data '/tmp/cifar10-wds/train-{000000..000004}.tar' --classes /tmp/cifar10-wds/classes.txt ...
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile
from typing import List, Optional

from fasttl.data import scan_class_folder


def write_shards(folder: str, out: str, per_shard: int = 10000, prefix: str = "train",
                 limit: Optional[int] = None) -> List[str]:
    """The shard paths written (out/<prefix>-000000.tar, ...) and out/classes.txt."""
    source = scan_class_folder(folder)
    if limit is not None:
        source = source.subset(range(min(limit, len(source))))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("\n".join(source.classes) + "\n")
    paths = []
    for shard, start in enumerate(range(0, len(source), per_shard)):
        path = os.path.join(out, f"{prefix}-{shard:06d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(len(source), start + per_shard)):
                key = f"{i:08d}"
                for name, data in ((f"{key}.jpg", open(source.files[i], "rb").read()),
                                   (f"{key}.cls", str(source.labels[i]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


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
