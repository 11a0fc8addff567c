"""Copies a small CIFAR-10 subset (default 200 train / 100 test images per class, about 7 MB)
from ../shared/data/cifar10 into gpu_data/cifar10-small, a git-ignored folder that the device
tool carries to a GPU machine for benchmarks/gpu_check.sh.

    python benchmarks/make_gpu_subset.py [--train 200] [--test 100]
"""
import argparse
import os
import shutil

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.path.join(ROOT, "..", "shared", "data", "cifar10"))
    parser.add_argument("--out", default=os.path.join(ROOT, "gpu_data", "cifar10-small"))
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=100)
    args = parser.parse_args()
    for split, count in (("train", args.train), ("test", args.test)):
        for name in sorted(os.listdir(os.path.join(args.source, split))):
            folder = os.path.join(args.out, split, name)
            os.makedirs(folder, exist_ok=True)
            for image in sorted(os.listdir(os.path.join(args.source, split, name)))[:count]:
                shutil.copy(os.path.join(args.source, split, name, image), os.path.join(folder, image))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
