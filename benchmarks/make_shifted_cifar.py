"""Writes a domain-shifted copy of CIFAR-10 test images (grayscale + Gaussian blur) as class
folders: the unlabeled target domain of `fasttl run --strategy dann`. The labels are only the
folder names, used for evaluation, never for training.

    python benchmarks/make_shifted_cifar.py --src ../shared/data/cifar10/test --out ~/.cache/fasttl/data/cifar10-shifted
"""
import argparse
import os

from PIL import Image, ImageFilter


def shift(image: Image.Image, blur: float) -> Image.Image:
    return image.convert("L").filter(ImageFilter.GaussianBlur(blur)).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="class folders to shift (e.g. .../cifar10/test)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-class", type=int, default=None, help="only the first N images of each class")
    parser.add_argument("--blur", type=float, default=1.0, help="Gaussian blur radius in pixels")
    args = parser.parse_args()
    count = 0
    for name in sorted(os.listdir(args.src)):
        folder = os.path.join(args.src, name)
        if not os.path.isdir(folder):
            continue
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        for image_name in sorted(os.listdir(folder))[:args.per_class]:
            with Image.open(os.path.join(folder, image_name)) as image:
                shift(image, args.blur).save(os.path.join(args.out, name, image_name), quality=95)
            count += 1
    print(f"wrote {count} shifted images to {args.out}")


if __name__ == "__main__":
    main()
