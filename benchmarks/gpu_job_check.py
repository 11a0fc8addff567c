"""The transfer job on a GPU (part of benchmarks/gpu_check.sh): `fasttl run --device cuda` for
every registered strategy on a small CIFAR-10 subset, checking from metrics.json that each model
trained on CUDA, then fine-tuning throughput at 224 px (bf16 params + fasttl AdamW master weights
beside fp32 params + bf16 autocast + torch.optim.AdamW(fused=True)) for a fixed number of steps.

    python benchmarks/gpu_job_check.py --data gpu_data/cifar10-small --out $OUT/job
"""
import argparse
import json
import os
import sys
import time

import torch


def run_strategies(data: str, out: str, epochs: int, device: str = "cuda", image_size: int = 128) -> bool:
    from fasttl.transfer import registry, run

    ok, rows, teacher = True, [], None
    for name in registry.names():
        strategy = registry.get(name)
        given = {"teacher": teacher, "target_data": data}
        extra = {option: given[option] for option in strategy.requires}
        if any(v is None for v in extra.values()):
            print(f"{name}: skipped, needs {extra}")
            continue
        on_gpu = device.startswith("cuda")
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        metrics = run(data=data, strategy=name, device=device, epochs=epochs, out=os.path.join(out, name),
                      overwrite=True, compare="none", progress=False, image_size=image_size, **extra)
        seconds = time.perf_counter() - started
        trained_there = [metrics["device"]] + [m["device"] for m in metrics["compare"].values()]
        ok &= all(d.split(":")[0] == device.split(":")[0] for d in trained_there)
        peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else float("nan")
        rows.append((name, metrics["accuracy"], seconds, peak, metrics["device"], metrics["precision"]))
        if strategy.can_teach and teacher is None:
            teacher = os.path.join(out, name)
    print(f"\n{'strategy':<10} {'accuracy':>9} {'wall s':>8} {'peak MiB':>9}  device   precision")
    for row in rows:
        print(f"{row[0]:<10} {row[1]:>9.4f} {row[2]:>8.1f} {row[3]:>9.0f}  {row[4]:<8} {row[5]}")
    return ok


def finetune_throughput(steps: int = 30, batch: int = 64, size: int = 224) -> dict:
    from fasttl.optim import AdamW
    from fasttl.transfer.config import RunConfig
    from fasttl.transfer.strategies.finetune import build_model

    device = torch.device("cuda")
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)
    results = {}
    for label, precision in (("fasttl AdamW, bf16 params + fp32 masters", "bf16"),
                             ("torch AdamW(fused=True), fp32 params + bf16 autocast", "fp32")):
        model, _, _ = build_model(RunConfig(precision=precision, device="cuda"), 10, device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = AdamW(params, lr=1e-4) if precision == "bf16" else torch.optim.AdamW(params, lr=1e-4, fused=True)
        model.train()
        for i in range(steps + 5):
            if i == 5:
                torch.cuda.synchronize()
                started = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "fp32"):
                loss = torch.nn.functional.cross_entropy(model(images.to(next(model.parameters()).dtype)).float(),
                                                         labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        torch.cuda.synchronize()
        results[label] = steps * batch / (time.perf_counter() - started)
    print("\nfinetune EfficientNet-Lite0, 224 px, batch 64, all stages:")
    for label, rate in results.items():
        print(f"  {label:<55} {rate:8.0f} img/s")
    return results


def lpft(data: str, out: str, device: str = "cuda", image_size: int = 224, epochs: int = 5) -> dict:
    """Issue 18: LP-FT at its defaults (bf16 params + fasttl AdamW masters on CUDA) beside its
    own probe (`linear` on the same cached features) on the carried subset: accuracy, training
    images/s (LP-FT: images trained over train_s, which includes the lr sweep and the validation
    passes), wall time and the epoch kept."""
    from fasttl.transfer import run

    rows = {}
    for label, options in (("linear", dict(strategy="linear")),
                           ("LP-FT", dict(strategy="finetune", epochs=epochs))):
        started = time.perf_counter()
        metrics = run(data=data, device=device, image_size=image_size, out=os.path.join(out, label.split()[0]),
                      overwrite=True, compare="none", progress=False, **options)
        choice = metrics["notes"].get("choice", {})
        rows[label] = {"accuracy": metrics["accuracy"], "wall_s": time.perf_counter() - started,
                       "train_images_per_s": metrics["timings"].get("train_images_per_s"),
                       "epoch_kept": choice.get("epoch_kept"), "lr_scale": choice.get("lr_scale"),
                       "precision": metrics["precision"], "device": metrics["device"]}
    print(f"\nLP-FT at {image_size} px on {data}:")
    for label, row in rows.items():
        print(f"  {label:<24} accuracy {row['accuracy']:.4f}  wall {row['wall_s']:6.1f} s  "
              f"train {row['train_images_per_s'] or 0:8.0f} img/s  epoch kept {row['epoch_kept']}  {row['precision']}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cuda; cpu runs the job part alone, as a smoke test")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--lpft", type=int, default=0, metavar="PX",
                        help="only LP-FT beside its probe at PX (224 in gpu_check.sh), into OUT/lpft.json")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU visible")
        return 2
    os.makedirs(args.out, exist_ok=True)
    if args.lpft:
        rows = lpft(os.path.abspath(args.data), os.path.abspath(args.out), args.device, args.lpft)
        with open(os.path.join(args.out, "lpft.json"), "w") as f:
            json.dump(rows, f, indent=2)
        return 0
    ok = run_strategies(os.path.abspath(args.data), os.path.abspath(args.out), args.epochs, args.device,
                        args.image_size)
    rates = finetune_throughput() if args.device.startswith("cuda") else {}
    with open(os.path.join(args.out, "job_check.json"), "w") as f:
        json.dump({"all_on_cuda": ok, "finetune_images_per_s": rates}, f, indent=2)
    print(f"every model trained on {args.device}" if ok else f"SOME MODEL DID NOT TRAIN ON {args.device}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
