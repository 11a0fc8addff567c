"""The `fasttl` command line: one subcommand per job."""
from __future__ import annotations

import argparse
import json
import sys

from fasttl.util import settings
from fasttl.util.signals import ending_signals_raised, exit_code
from fasttl.cli_errors import (OS_ERRORS, escape_unshowable_text, flush_stdout, one_line, os_error_line, peer_stopped,
                               quiet_stdout, say_error, summary_of, user_error_types)


def _cmd_info(args: argparse.Namespace) -> int:
    from fasttl import info

    report = info.collect()
    _say(json.dumps(report, indent=2) if args.json else info.format_report(report))
    return 0


def _per_class_pair(text: str):
    try:
        train, test = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,TEST images per class (two integers), got {text!r}")
    if train < 1 or test < 1:
        raise argparse.ArgumentTypeError(f"expected positive counts, got {text!r}")
    return train, test


class _BenchHelp(argparse.Action):
    """`fasttl bench [NAME...] --help`: the usage, then what each named benchmark (or every one)
    measures, from its module's docstring."""

    def __call__(self, parser, namespace, values, option_string=None):
        import importlib
        import textwrap

        from fasttl.bench.runner import BENCHMARKS

        names = [n for n in (getattr(namespace, "names", None) or []) if n in BENCHMARKS] or list(BENCHMARKS)
        parser.print_help()
        for name in names:
            doc = importlib.import_module(BENCHMARKS[name]).__doc__ or ""
            print(f"\n{name}:\n" + textwrap.indent(textwrap.dedent(doc).strip(), "  "))
        parser.exit()


def _cmd_bench(args: argparse.Namespace) -> int:
    from fasttl.bench import runner

    runner.run(args.names, device=args.device, quick=args.quick, json_path=args.json, plot_path=args.plot,
               e2e_subset=args.e2e_subset, scale=args.scale)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fasttl.util.errors import OptionError
    from fasttl.predict import (format_predictions, image_files, predict, predict_run, say_passed_over,
                                show_run_predictions)

    if args.run is None:  # the backbone's ImageNet classes
        from fasttl.data.sources import ON_ERROR

        unused = [flag for flag, value in (("--out", args.out), ("--batch-size", args.batch_size),
                                           ("--overwrite", args.overwrite or None),
                                           ("--device", None if args.device == "cpu" else args.device),
                                           ("--on-error", None if args.on_error == ON_ERROR[0] else args.on_error))
                  if value is not None]
        if unused:
            raise OptionError(f"run: {unused[0]} needs --run RUN (a trained run); without it predict shows the "
                              "backbone's ImageNet classes")
        from fasttl.backbones import DEFAULT

        if args.top_k is not None and not 1 <= args.top_k <= 1000:
            raise OptionError(f"top_k: expected 1..1000 ImageNet classes, got {args.top_k}")
        images, ignored = image_files(args.images)  # folders walked for their images, as with --run
        _say(format_predictions(images, predict(images, args.backbone or DEFAULT, args.weights, args.top_k or 5)))
        say_passed_over(ignored)
        return 0
    if args.weights is not None or args.backbone is not None:
        raise OptionError("run: --run predicts with the run's own model; drop --backbone and --weights")
    result = predict_run(args.run, args.images, out=args.out, top_k=1 if args.top_k is None else args.top_k,
                         device=args.device, batch_size=args.batch_size, on_error=args.on_error,
                         overwrite=args.overwrite, progress=not args.no_progress)
    return show_run_predictions(result)


def _cmd_export(args: argparse.Namespace) -> int:
    from fasttl.export import VerificationError, export_onnx, run_instructions

    try:
        result = export_onnx(args.run_dir, args.out, image_size=args.image_size, opset=args.opset,
                             overwrite=args.overwrite)
    except VerificationError as exc:
        print(f"fasttl: error: {one_line(exc)}", file=sys.stderr)
        return 1
    with summary_of(result["out"], "the model was"):  # the model file is written by now
        _say(f"wrote {result['out']} ({result['bytes'] / 1e6:.1f} MB, opset {result['opset']}, "
             f"{len(result['classes'])} classes, input {result['image_size']} x {result['image_size']})")
        print(f"verified with ONNX Runtime on {result['images']} real images: max abs logit difference from torch "
              f"{result['max_abs_diff']:.2e}")
    from fasttl.transfer.rundir import read_config

    if read_config(args.run_dir).get("extract_precision") == "int8":  # said, never silent
        print("fasttl: note: the run extracted its features through its int8 graph (extract-int8.onnx); this "
              "export runs the fp32 backbone, so a few predictions can differ from the run's (fasttl predict --run "
              "repeats the run's own)", file=sys.stderr)
    _say("\n".join(run_instructions(result)))
    return 0


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from fasttl.cache.folder import refuse_inside
    from fasttl.data.fetch import default_dest, fetch
    from fasttl.util import settings
    from fasttl.util.files import absolute

    if args.dest is not None and str(args.dest).strip() or args.dest is None:  # (an empty --dest: fetch says so)
        option = "dest" if args.dest is not None else settings.DATA.name  # extract would refuse its cache
        refuse_inside(option, absolute(args.dest if args.dest is not None else default_dest()), flag=(
            "" if args.dest is not None else option))
    fetch(args.name, url=args.url, sha256=args.sha256, dest=args.dest, progress=not args.no_progress,
          deadline_s=args.deadline, min_rate=args.min_rate)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from fasttl.extract import extract, format_summary, say_passed_over
    from fasttl.util import distributed
    from fasttl.util.files import absolute

    summaries = extract(args.backbone, args.data, args.out, weights=args.weights, image_size=args.image_size,
                        dtype=args.dtype, batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
                        shard_rows=args.shard_rows, backend=args.backend, progress=not args.no_progress,
                        on_error=args.on_error, features=args.features, engine=args.engine,
                        precision=args.extract_precision, classes=args.classes, labels=args.labels)
    if distributed.rank_and_world()[0] == 0:
        say_passed_over(summaries)
        with summary_of(absolute(args.out), "the features were"):  # the cache is written by now
            _say("\n".join(format_summary(summaries)))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _add_extraction_options(parser: argparse.ArgumentParser) -> None:
    """--features, --engine, --extract-precision of `fasttl extract`: the choices and help of the
    run options of the same names (the default features here: the backbone's own, head)."""
    from fasttl.transfer.config import option_metadata

    for name, default in (("features", "head"), ("engine", "auto"), ("extract_precision", "auto")):
        metadata = option_metadata(name)
        choices = metadata["choices"]() if callable(metadata["choices"]) else metadata["choices"]
        parser.add_argument("--" + name.replace("_", "-"), default=default, choices=choices,
                            help=f"{metadata['help']} (default {default})")


def _run_summary(text: str, run_dir: str) -> None:
    from fasttl.util.files import absolute

    with summary_of(absolute(run_dir), "the run was"):  # a full stdout: the run is written by now
        print(text)


def _cmd_run(args: argparse.Namespace) -> int:
    from fasttl.transfer.job import run

    # Options left unset stay out, so the job's own defaults apply (the embedded default's
    # from-scratch baseline among them).
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "no_progress") and v is not None}
    options["progress"] = not args.no_progress
    try:
        run(print_summary=_run_summary, **options)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (util.signals)
        if options.get("budget") is not None:  # a plan is made again from the start (transfer.budget)
            print("\ninterrupted: a planned run (--budget) does not resume; run the same command again with "
                  "--overwrite", file=sys.stderr)
        else:
            print("\ninterrupted: where epochs finished, the same command with --resume continues from the last "
                  "one; else run it again with --overwrite", file=sys.stderr)
        return exit_code(exc)
    return 0


def _say(text: str, file=None) -> None:
    """print() for lines that carry names fasttl did not make (paths, class names, URLs): escape
    sequences in them are shown escaped, never run by the terminal."""
    from fasttl.util.outputs import terminal_lines

    print(terminal_lines(text), file=file)


def _cmd_eval(args: argparse.Namespace) -> int:
    from fasttl.transfer.evaluate import evaluate_run

    metrics = evaluate_run(args.run_dir, args.data, progress=not args.no_progress, device=args.device,
                           on_error=args.on_error)
    from fasttl.util.outputs import passed_over, skipped_line, terminal_text as shown  # (a line break never starts one)

    if metrics["ignored"]:  # data went unread, as `fasttl run` says
        print(passed_over([(e["path"], e["reason"]) for e in metrics["ignored"]]), file=sys.stderr)
    if metrics["skipped"]:  # (the run's --on-error skip, or this one's: the images scored are fewer than given)
        print(skipped_line([(e["file"], e["reason"]) for e in metrics["skipped"]]), file=sys.stderr)
    where = (f"written to {shown(metrics['written'])}" if metrics["written"] else
             f"not saved ({shown(metrics['not_written'])}): these numbers are the result")
    with summary_of(metrics["written"], "the metrics were"):  # the metrics file is written by now
        _say(f"accuracy {metrics['accuracy']:.4f}  balanced {metrics['balanced_accuracy']:.4f}  "
             f"macro F1 {metrics['macro_f1']:.4f}  loss {metrics['loss']:.4f}  "
             f"({metrics['samples']} images of {shown(metrics['data'])}"
             f"{': its seeded 20% test split' if metrics['test_split'] == 'carved' else ''}); {where}")
    return 0


def _add_on_error(parser: argparse.ArgumentParser, where: str, prefix: str = "") -> None:
    """--on-error of a command that reads images; `where`: where the skipped ones are listed."""
    from fasttl.data.sources import ON_ERROR

    parser.add_argument("--on-error", default=ON_ERROR[0], choices=ON_ERROR,
                        help=f"{prefix}an unreadable image: fail (default, names it) or skip (left out, {where})")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field. Every default is None, so options left unset stay out and
    RunConfig's own defaults (and the strategy's) apply; --help shows them."""
    from fasttl.transfer.config import options

    for name, default, meta in options():
        if not meta["cli"]:
            continue
        flag = "--" + name.replace("_", "-")
        if meta["kind"] is bool:
            parser.add_argument(flag, action="store_true", default=None, help=meta["help"])
            continue
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        shown = "" if default is None else f" (default {default})"
        optional = {"nargs": "?", "const": meta["const"]} if meta.get("const") is not None else {}
        if meta.get("repeat"):
            optional = {"action": "append"}
        parser.add_argument(flag, type=meta["kind"], choices=choices, metavar=meta["metavar"], default=None,
                            help=meta["help"] + shown, **optional)


# Arguments that name a file or folder (by their metavar): an empty one is refused, not read as
# the current folder or as "not given" (`--out "$DIR"` with DIR unset).
PATH_METAVARS = ("DATA", "DIR", "FILE", "FILE.csv", "FILE.onnx", "FILE.png", "PATH", "RUN", "RUN_DIR")


class _Parser(argparse.ArgumentParser):
    """argparse with git's one-line errors: `fasttl: error: ...`, exit 2."""

    def error(self, message):
        self.exit(2, f"fasttl: error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(namespace, action.dest, None) if action.metavar in PATH_METAVARS else None
            if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, list) else [value])):
                name = action.option_strings[-1] if action.option_strings else action.metavar
                self.error(f"{action.dest}: an empty or blank path given as {name} (an unset variable?); give it a path"
                           + (", or leave it out" if action.option_strings and not action.required else ""))
        return namespace, extras

    def _print_message(self, message, file=None):
        """argparse's, without its silence on OSError: help into a full disk is said (main())."""
        if message:
            (file or sys.stderr).write(message)


def _add_info_command(sub) -> None:
    p = sub.add_parser("info", help="show versions, native build, CUDA architectures, GPU, OpenMP and DALI")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)


def _add_run_command(sub) -> None:
    from fasttl.transfer import registry

    strategies = "\n".join(f"  {name:<10} {registry.get(name).help}" for name in registry.names())
    p = sub.add_parser("run", help="transfer an ImageNet backbone to a target task (the main job)",
                       description="With no arguments: the embedded default (ImageNet EfficientNet-Lite0 to "
                                   "CIFAR-10 mini by feature transfer, beside a from-scratch CNN), offline, in under "
                                   "a minute on 2 CPU cores.",
                       epilog=f"strategies:\n{strategies}", formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)


def _add_eval_command(sub) -> None:
    p = sub.add_parser("eval", help="re-evaluate a saved run on data")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", metavar="DATA", help="data to evaluate on (default: the run's own)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    _add_on_error(p, "listed in eval_metrics.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _add_extract_command(sub) -> None:
    from fasttl import backbones
    from fasttl.cache.build import SHARD_ROWS
    from fasttl.cache.kernels import CACHE_DTYPE, CACHE_DTYPES
    from fasttl.data.loader import BACKENDS
    from fasttl.data.labels import LABEL_KINDS

    p = sub.add_parser("extract", help="precompute a frozen backbone's features into a cache (torchrun-aware)")
    p.add_argument("--backbone", default=backbones.DEFAULT, help=f"backbone name (default {backbones.DEFAULT})")
    p.add_argument("--weights", metavar="FILE", help="state dict file for the backbone")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="class folders (DIR/train and DIR/test used when present), a file list LIST.csv/.tsv/.parquet "
                        "(path,label columns; paths relative to the list's folder) or WebDataset shards "
                        "'train-{000000..000127}.tar' (KEY.jpg + KEY.cls per sample)")
    p.add_argument("--classes", "--classes-file", dest="classes", metavar="FILE",
                   help="file list or WebDataset: class names, one a line (default: the labels' names, or indices)")
    p.add_argument("--labels", default="names", choices=LABEL_KINDS,
                   help="a file list's labels: class names (with --classes, each must be one of its names) or "
                        "indices into --classes")
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory (one sub-folder per split)")
    p.add_argument("--image-size", type=int, metavar="N", help="input size in pixels (default: the backbone's)")
    p.add_argument("--dtype", default=CACHE_DTYPE, choices=tuple(CACHE_DTYPES),
                   help=f"cache dtype (default {CACHE_DTYPE})")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per backbone call (default 32 on CPU, 128 on GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--shard-rows", type=int, default=SHARD_ROWS, metavar="N",
                   help=f"rows per shard file (default {SHARD_ROWS})")
    p.add_argument("--backend", default=BACKENDS[0], choices=BACKENDS, help="input pipeline")
    p.add_argument("--overwrite", action="store_true", help="rebuild a cache built for something else")
    _add_on_error(p, "listed in the manifest")
    _add_extraction_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)


def _add_predict_command(sub) -> None:
    from fasttl import backbones

    p = sub.add_parser("predict", help="predict images with a trained run (--run), or show a backbone's ImageNet "
                                       "top-5", description="With --run RUN: a CSV (path,predicted,confidence) of "
                                       "the run's predictions for image files and folders (walked recursively). "
                                       "Without: each image's top-5 ImageNet classes under --backbone.")
    p.add_argument("images", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--run", metavar="RUN", help="a finished run folder (any strategy)")
    p.add_argument("--out", metavar="FILE.csv", help="--run: write the CSV here (default: standard output)")
    p.add_argument("--top-k", "--top", dest="top_k", type=int, metavar="K",
                   help="--run: add the top2..topK classes and their confidences (default 1); without --run: how "
                        "many ImageNet classes to show (default 5)")
    p.add_argument("--device", default="cpu", help="--run: cpu or cuda (default cpu)")
    p.add_argument("--batch-size", type=int, metavar="N", help="--run: images per batch")
    _add_on_error(p, "listed", "--run: ")
    p.add_argument("--overwrite", action="store_true", help="--run: replace an existing --out file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--backbone", help=f"without --run: backbone name (default {backbones.DEFAULT})")
    p.add_argument("--weights", metavar="FILE", help="without --run: state dict file, for backbones whose weights no "
                                                     "package ships")
    p.set_defaults(func=_cmd_predict)


def _add_export_command(sub) -> None:
    from fasttl.export import DEFAULT_OPSET

    p = sub.add_parser("export", help="export a run's model to ONNX (images in [0, 1] to logits), verified with "
                                      "ONNX Runtime")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.add_argument("--image-size", type=int, metavar="N",
                   help="input height and width: the run's own (the default; another size is refused, as the run's "
                   "model was made at its size)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="K",
                   help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_cmd_export)


def _add_data_command(sub) -> None:
    from fasttl.data.fetch import DEADLINE_S, MIN_RATE, REMOTES

    p = sub.add_parser("data", help="data sets: fetch CIFAR-10 into $FASTTL_DATA")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    p.set_defaults(func=lambda args, parser=p: (parser.print_help(), 2)[1])
    q = data_sub.add_parser("fetch", help="download, verify (SHA-256) and extract a data set (resumable)",
                            description="Downloads the official archive with a progress bar, resumes a partial "
                                        "download, checks the SHA-256, and extracts it safely into DEST/<folder> "
                                        "(DEST: --dest, else $FASTTL_DATA, default ~/.cache/fasttl/data).",
                            epilog="data sets: " + "; ".join(f"{r.name} ({r.url}, {r.size / 1e6:.0f} MB)"
                                                            for r in REMOTES.values()))
    q.add_argument("name", choices=list(REMOTES), metavar="NAME", help=" or ".join(REMOTES))
    q.add_argument("--url", help="download from here instead (a mirror; needs --sha256)")
    q.add_argument("--sha256", metavar="HEX", help="the SHA-256 the file must have (default: the official archive's)")
    q.add_argument("--dest", metavar="DIR", help="where the data set's folder goes (default $FASTTL_DATA)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.add_argument("--deadline", type=float, default=DEADLINE_S, metavar="SECONDS",
                   help=f"stop a download (resumable) that takes longer than this (default {DEADLINE_S:g})")
    q.add_argument("--min-rate", type=float, default=MIN_RATE, metavar="BYTES_PER_S",
                   help=f"stop a download (resumable) slower than this over 30 s (default {MIN_RATE:,})")
    q.set_defaults(func=_cmd_data_fetch)


def _add_bench_command(sub) -> None:
    from fasttl.bench.runner import BENCHMARKS  # names only: the benchmark modules load when run

    p = sub.add_parser("bench", help="time fasttl beside the PyTorch ways of doing the same", add_help=False,
                       description="Times fasttl beside the fastest way a PyTorch user would do the same, in the "
                                   "same run, with each time's minimum, median and spread and the machine's load. "
                                   "`fasttl bench NAME --help` describes that benchmark.")
    p.add_argument("-h", "--help", action=_BenchHelp, nargs=0, help="show this help (and what each NAME given measures)")
    p.add_argument("names", nargs="+", metavar="NAME", choices=list(BENCHMARKS) + ["all"],
                   help=", ".join(BENCHMARKS) + ", or all")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    p.add_argument("--json", metavar="FILE", help="write machine-readable results here")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the speedups here")
    p.add_argument("--scale", action="store_true",
                   help="cache: the at-scale mode (a 2 GB cache written to /tmp, opened and read from its memory "
                        "maps in a fresh process; open time, RssAnon, epoch GB/s; WebDataset vs class folders)")
    p.add_argument("--e2e-subset", type=_per_class_pair, metavar="TRAIN,TEST",
                   help="e2e: CIFAR-10 images per class for training and test (default 500,100)")
    p.set_defaults(func=_cmd_bench)


# One function per command, in the order `fasttl --help` lists them.
COMMANDS = (_add_info_command, _add_run_command, _add_eval_command, _add_extract_command, _add_predict_command,
            _add_export_command, _add_data_command, _add_bench_command)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fasttl", description="Fast transfer learning from pretrained backbones.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def _reader_gone() -> int:
    """The reader of stdout has gone: nothing more to say, and nothing at exit."""
    quiet_stdout()
    return 1


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: the user's choice, not a bug's traceback (also
        # while the parser is built: it loads every strategy, seconds after fasttl itself loaded)
        say_error(f"\nfasttl: interrupted ({exc})" if str(exc) else "\nfasttl: interrupted")
        return exit_code(exc)


def _main(argv) -> int:
    escape_unshowable_text()
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit:  # --help (or an argument error) printed: a full disk behind stdout shows here
            flush_stdout()
            raise
        if not getattr(args, "func", None):
            parser.print_help()
            flush_stdout()
            return 2
    except BrokenPipeError:  # `fasttl bench --help | head`: help printed into a pipe that closed
        return _reader_gone()
    except OSError as exc:
        if exc.errno not in OS_ERRORS:
            raise
        say_error(f"fasttl: error: {os_error_line(exc)}")
        quiet_stdout()
        return 2
    try:
        with ending_signals_raised():  # kill, timeout, a closed terminal: out as Ctrl-C, through the cleanup
            code = args.func(args)
        flush_stdout()  # a full disk or a closed pipe behind stdout shows here, not at exit
        return code
    except BrokenPipeError:  # `fasttl predict ... | head`
        return _reader_gone()
    except Exception as exc:
        # A user's mistake is one line naming the culprit and the fix; a bug keeps its traceback.
        if settings.DEBUG.value() == "1":
            raise
        if isinstance(exc, OSError) and exc.errno in OS_ERRORS:
            say_error(f"fasttl: error: {os_error_line(exc)}")
            quiet_stdout()
            return 2
        stopped = peer_stopped(exc)
        if stopped:
            say_error(f"fasttl: error: {stopped}")
            return 2
        if not isinstance(exc, user_error_types()):
            raise
        say_error(f"fasttl: error: {one_line(exc)}")
        return 2
