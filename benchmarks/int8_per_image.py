"""One image's int8 error against a batch's: the norm error of ONNX Runtime's int8 features
against PyTorch fp32 (fasttl.cache.engines.norm_error), per image and per batch of 32, over CIFAR-10
test photos, with the graph calibrated on a seeded sample of training images as a run's is. What
fasttl's checks rest on (fasttl/cache/int8_checks.py): INT8_TOLERANCE holds over a batch of the
graph's check images, one image is off by more, so no image is compared with fp32 alone.

    python benchmarks/int8_per_image.py --data ../shared/data/cifar10 [--images 250]

Prints one line per setting (image size, features)."""
import argparse


def measure(data: str, images: int, settings=((160, 4), (128, 4), (32, 0))):
    import torch

    import fasttl
    import fasttl.data as D
    from fasttl.cache import engines
    from fasttl.cache.extraction import calibration_sample, extraction_engine

    train, test = D.class_folder_splits(data)
    backbone = fasttl.backbones.create("efficientnet_lite0")
    lines = []
    for size, taps in settings:
        spec = D.TransformSpec.for_backbone(backbone.preprocessing, size=size)
        sample = calibration_sample(train.subset(list(range(0, len(train), max(1, len(train) // 1000)))), spec)
        engine = extraction_engine(backbone, torch.device("cpu"), "onnxruntime", "int8", taps, size,
                                   calibration=sample)
        source = test.subset(list(range(0, len(test), max(1, len(test) // images)))[:images])
        per_image, per_batch = [], []
        for pixels, _ in D.ImageLoader(source, spec, 32, backend="torch"):
            got = torch.from_numpy(engine.session.run(None, {"images": pixels.numpy()})[0])
            want = engines.pooled_reference(engine.model, taps, pixels)
            per_image += [engines.norm_error(g[None], w[None]) for g, w in zip(got, want)]
            per_batch.append(engines.norm_error(got, want))
        e = torch.tensor(per_image)
        lines.append(f"{size} px, {'multi' if taps else 'head'}: {len(e)} images, median {float(e.median()):.3f}, "
                     f"95th percentile {float(e.quantile(0.95)):.3f}, largest {float(e.max()):.3f}, share above "
                     f"{engines.INT8_TOLERANCE} {float((e > engines.INT8_TOLERANCE).float().mean()):.3f}; largest "
                     f"batch of 32 {max(per_batch):.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=250)
    args = parser.parse_args()
    for line in measure(args.data, args.images):
        print(line)


if __name__ == "__main__":
    main()
