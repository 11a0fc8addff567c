"""The `fasttl` command line: one subcommand per job."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from fasttl import info

    report = info.collect()
    print(json.dumps(report, indent=2) if args.json else info.format_report(report))
    return 0


def _per_class_pair(text: str):
    try:
        train, test = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,TEST images per class (two integers), got {text!r}")
    if train < 1 or test < 1:
        raise argparse.ArgumentTypeError(f"expected positive counts, got {text!r}")
    return train, test


def _cmd_bench(args: argparse.Namespace) -> int:
    from fasttl.bench import runner

    runner.run(args.names, device=args.device, quick=args.quick, json_path=args.json, plot_path=args.plot,
               e2e_subset=args.e2e_subset)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fasttl.predict import format_predictions, predict

    print(format_predictions(args.images, predict(args.images, args.backbone, args.weights, args.top)))
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from fasttl.extract import extract, format_summary

    summaries = extract(args.backbone, args.data, args.out, weights=args.weights, image_size=args.image_size,
                        dtype=args.dtype, batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
                        shard_rows=args.shard_rows, backend=args.backend, progress=not args.no_progress)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("\n".join(format_summary(summaries)))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from fasttl.transfer.job import run

    # Options left unset stay out, so the job's own defaults apply (the embedded default's
    # from-scratch baseline among them).
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "no_progress") and v is not None}
    options["progress"] = not args.no_progress
    try:
        run(print_summary=True, **options)
    except KeyboardInterrupt:
        print("\ninterrupted: the finished epochs are saved; run the same command with --resume to continue",
              file=sys.stderr)
        return 130
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fasttl.transfer.evaluate import evaluate_run

    metrics = evaluate_run(args.run_dir, args.data, progress=not args.no_progress)
    print(f"accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['macro_f1']:.4f}  loss {metrics['loss']:.4f}  "
          f"({metrics['samples']} images of {metrics['data']}); written to {args.run_dir}/eval_metrics.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasttl", description="Fast transfer learning from pretrained backbones.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="show versions, native build, CUDA architectures, GPU, OpenMP and DALI")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)

    from fasttl.transfer.config import STRATEGIES

    p = sub.add_parser("run", help="transfer an ImageNet backbone to a target task (the main job)",
                       description="With no arguments: the embedded default (scikit-learn digits, linear, beside "
                                   "a from-scratch CNN), offline, in under two minutes on 2 CPU cores.")
    p.add_argument("--data", help="'digits' (embedded default), 'cifar10' ($FASTTL_DATA), or a class-folder DIR")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", metavar="FILE", help="backbone state dict file")
    p.add_argument("--strategy", default="linear", choices=STRATEGIES)
    p.add_argument("--image-size", type=int, metavar="N", help="backbone input size (default 64 for digits, else 128)")
    p.add_argument("--epochs", type=int, metavar="N")
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--lr", type=float, metavar="X")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/<data>-<strategy>)")
    p.add_argument("--compare", choices=["scratch"], help="train the from-scratch baseline beside")
    p.add_argument("--teacher", metavar="RUN_DIR", help="distill: the teacher run (linear, mlp or finetune)")
    p.add_argument("--target-data", metavar="DIR", help="dann: the unlabeled target domain (class folders)")
    p.add_argument("--train-per-class", type=int, metavar="N", help="use N training images per class (seeded)")
    p.add_argument("--test-per-class", type=int, metavar="N", help="use N test images per class (seeded)")
    p.add_argument("--finetune-stages", type=int, metavar="K", help="finetune: unfreeze the top K stages (default all)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="finetune: bf16 params with fp32 master weights (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--temperature", type=float, default=4.0, help="distill: softening temperature")
    p.add_argument("--alpha", type=float, default=0.9, help="distill: weight of the soft term")
    p.add_argument("--cache-dtype", default="fp16", choices=["fp16", "bf16", "fp32", "int8"])
    p.add_argument("--mirror-views", action="store_true",
                   help="linear/mlp: also cache the mirrored images; train on both views, average them at test")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished epoch")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("eval", help="re-evaluate a saved run on data")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", help="data to evaluate on (default: the run's own)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("extract", help="precompute a frozen backbone's features into a cache (torchrun-aware)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (default efficientnet_lite0)")
    p.add_argument("--weights", metavar="FILE", help="state dict file for the backbone")
    p.add_argument("--data", required=True, metavar="DIR", help="class folders (DIR/train and DIR/test used when present)")
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory (one sub-folder per split)")
    p.add_argument("--image-size", type=int, metavar="N", help="input size in pixels (default: the backbone's)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32", "int8"], help="cache dtype")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per backbone call (default 32 on CPU, 128 on GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--shard-rows", type=int, default=4096, metavar="N", help="rows per shard file (default 4096)")
    p.add_argument("--backend", default="auto", choices=["auto", "dali", "torch"], help="input pipeline")
    p.add_argument("--overwrite", action="store_true", help="rebuild a cache built for something else")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("predict", help="top-5 ImageNet classes of images (checks that a backbone's weights loaded)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (default efficientnet_lite0)")
    p.add_argument("--weights", metavar="FILE", help="state dict file, for backbones whose weights no package ships")
    p.add_argument("--top", type=int, default=5, help="how many classes to show (default 5)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("bench", help="time fasttl beside the PyTorch ways of doing the same")
    p.add_argument("names", nargs="+", metavar="NAME", choices=["distill", "adam", "cache", "data", "e2e", "all"],
                   help="distill, adam, cache, data, e2e, or all")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    p.add_argument("--json", metavar="FILE", help="write machine-readable results here")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the speedups here")
    p.add_argument("--e2e-subset", type=_per_class_pair, metavar="TRAIN,TEST",
                   help="e2e: CIFAR-10 images per class for training and test (default 500,100)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
