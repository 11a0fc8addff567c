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


def _cmd_bench(args: argparse.Namespace) -> int:
    from fasttl.bench import runner

    runner.run(args.names, device=args.device, quick=args.quick, json_path=args.json, plot_path=args.plot)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasttl", description="Fast transfer learning from pretrained backbones.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="show versions, native build, CUDA architectures, GPU, OpenMP and DALI")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("extract", help="precompute a frozen backbone's features into a cache (torchrun-aware)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (default efficientnet_lite0)")
    p.add_argument("--weights", metavar="FILE", help="state dict file for the backbone")
    p.add_argument("--data", required=True, metavar="DIR", help="class folders (DIR/train and DIR/test used when present)")
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory (one sub-folder per split)")
    p.add_argument("--image-size", type=int, metavar="N", help="input size in pixels (default: the backbone's)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32", "int8"], help="cache dtype")
    p.add_argument("--batch-size", type=int, default=64, metavar="N")
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
    p.add_argument("names", nargs="+", metavar="NAME", help="distill, or all")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    p.add_argument("--json", metavar="FILE", help="write machine-readable results here")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the speedups here")
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
