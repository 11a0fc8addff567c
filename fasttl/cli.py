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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasttl", description="Fast transfer learning from pretrained backbones.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="show versions, native build, CUDA architectures, GPU, OpenMP and DALI")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)

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
