"""The options of a transfer run. RunConfig is generated: the options every run reads (below,
each with its default, choices, help and check written once) followed by those each strategy
declares in its own class (Strategy.options). The `fasttl run` parser, its --help and the
refusals come from these fields; per-strategy defaults (epochs, lr, batch size) from the
strategy registry."""
from __future__ import annotations

import dataclasses
import os

import torch
from dataclasses import dataclass
from typing import Optional

from fasttl import backbones
from fasttl.util.checks import a_flag, plain_number, torch_device
from fasttl.util.errors import OptionError
from fasttl.data.sources import ON_ERROR
from fasttl.cache import engines
from fasttl.cache.kernels import CACHE_DTYPE, CACHE_DTYPES
from fasttl.transfer import registry
from fasttl.transfer.budget import a_budget
from fasttl.transfer.caching import FEATURE_TAPS
from fasttl.data.labels import LABEL_KINDS
from fasttl.transfer.datasets import BUILTIN
from fasttl.transfer.options import (a_learning_rate, a_path, a_positive_int, an_optional_positive_int, choices_of,
                                     option)

from fasttl.data.spec import MAX_IMAGE_SIZE, check_image_size  # noqa: E402, F401 (MAX_IMAGE_SIZE: re-exported)


def _strategies():
    return registry.names()


def _comparisons():
    return ("auto", "none") + _strategies()


def _a_tensorboard_folder(name: str, value) -> None:
    if not (value is None or value is True or isinstance(value, str) and value):
        raise OptionError(f"{name}: expected a folder (a string) or True (the run folder), got {value!r}")


def _plain(value, metadata: dict):
    """A value from a script as the command line gives it: a pathlib.Path as its text, a numpy
    number as Python's (what a PyTorch user passes); anything else is left to the option's check."""
    if metadata["path"] and isinstance(value, (list, tuple)):
        return [_plain(each, metadata) for each in value]
    if metadata["path"] and isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
        return os.fspath(value)
    return plain_number(value)


def _no_board_as_none(value):
    return None if value is False else value  # tensorboard=False from a script: off, as left out


def _a_seed(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise OptionError(f"{name}: expected an integer in [0, 2**63), got {value!r}")


def _an_image_size(name: str, value) -> None:
    check_image_size(name, value, OptionError)


def _a_backbone(name: str, value) -> None:
    backbones.check_name(value)


def _a_device(name: str, value) -> None:
    torch_device(value, name)


@dataclass
class RunOptions:
    """The options every run reads; RunConfig adds each strategy's own (see the module's doc)."""

    data: Optional[str] = option(None, "'cifar10-mini' (the embedded default: 1,500 real CIFAR-10 images), "
                                 "'digits' (scikit-learn's 8x8 digits), 'cifar10' ($FASTTL_DATA), a "
                                 "class-folder DIR, a file list LIST.csv/.tsv/.parquet (path,label columns) or "
                                 "WebDataset shards 'train-{000000..000127}.tar'", kind=str, metavar="DATA",
                                 check=a_path, path=True)
    classes_file: Optional[str] = option(None, "class names, one a line, for a file list or WebDataset --data "
                                         "(default: the labels' own names, or the class indices)", kind=str,
                                         metavar="FILE", check=a_path, path=True)
    labels: str = option("names", "a file list's labels: class names (with --classes-file, each must be one of its "
                         "names) or indices into --classes-file", choices=LABEL_KINDS)
    backbone: str = option(backbones.DEFAULT, "backbone name: " + ", ".join(backbones.available()) + ", or 2 to 3 of "
                           + ", ".join(backbones.JOINABLE) + " joined by '+' (their features side by side; linear, "
                           "mlp)", metavar="NAME",
                           check=_a_backbone, scoped=True)
    weights: Optional[str] = option(None, "backbone state dict file", kind=str, metavar="FILE", check=a_path,
                                     scoped=True, path=True)
    strategy: str = option("linear", "how to transfer (see the table in the README)", choices=_strategies)
    image_size: Optional[int] = option(None, "backbone input size (default: 64 for 8x8 digits, else the backbone's "
                                       "run size, 160 for the EfficientNet-Lites)", kind=int,
                                       metavar="N", check=_an_image_size)
    epochs: Optional[int] = option(None, "epochs (default: the strategy's)", kind=int, metavar="N",
                                   check=a_positive_int)
    batch_size: Optional[int] = option(None, "batch size (default: the strategy's)", kind=int,
                                       metavar="N", check=a_positive_int)
    lr: Optional[float] = option(None, "peak learning rate (default: the strategy's)", kind=float, metavar="X",
                                check=a_learning_rate)
    device: str = option("cpu", "where models, features and images live: cpu, cuda or cuda:N", metavar="DEVICE",
                         check=_a_device)
    seed: int = option(0, "seed of every random choice", metavar="N", check=_a_seed)
    out: Optional[str] = option(None, "run directory (default runs/<data>-<strategy>, -2, -3, ... when taken)",
                                kind=str, metavar="RUN_DIR", check=a_path, path=True)
    compare: str = option("auto", "train another strategy beside, on the same data (auto: the from-scratch "
                          "baseline for the data sets fasttl ships, none otherwise)", choices=_comparisons)
    train_per_class: Optional[int] = option(None, "use N training images per class (seeded)", kind=int, metavar="N",
                                            check=an_optional_positive_int)
    test_per_class: Optional[int] = option(None, "use N test images per class (seeded)", kind=int, metavar="N",
                                           check=an_optional_positive_int)
    precision: str = option("auto", "bf16 params with fp32 master weights, or fp32 (auto: bf16 on cuda, fp32 on "
                            "cpu)", choices=("auto", "fp32", "bf16"))
    cache_dtype: str = option(CACHE_DTYPE, "feature cache dtype", choices=tuple(CACHE_DTYPES), scoped=True)
    features: str = option("multi", "linear/mlp/dann/finetune: what each cached vector holds: head (the backbone's "
                           "final pooled features) or multi (beside them, the pooled outputs of its last four stages)",
                           choices=lambda: tuple(FEATURE_TAPS), scoped=True)
    engine: str = option("auto", "what runs the frozen backbone during extraction (auto: onnxruntime on the CPU "
                         "when installed, else torch)", choices=engines.ENGINES, scoped=True)
    extract_precision: str = option("auto", "extraction precision (auto: bf16 autocast on cuda; on the CPU int8 for "
                                    "a linear/mlp run where the CPU has int8 dot products (VNNI), else fp32; bf16 "
                                    "features are about 3%% off fp32; int8: ONNX Runtime on the CPU, quantized on a "
                                    "sample of the images: a run's training images, for linear and mlp)",
                                    choices=engines.PRECISIONS, scoped=True)
    budget: Optional[str] = option(None, "plan within this time (90s, 10m, 1.5h): backbone(s), image size, mirror "
                                   "views and head (linear or mlp) chosen on validation among what fits on this "
                                   "machine; options given beside it are kept", kind=str, metavar="TIME",
                                   check=a_budget)
    resume: bool = option(False, "continue an interrupted run from its last finished epoch")
    overwrite: bool = option(False, "replace the run in --out (and rebuild a feature cache that fails its checks)")
    on_error: str = option("fail", "an unreadable image: fail (names it) or skip (left out, listed in skipped.csv)",
                           choices=ON_ERROR)
    download: bool = option(False, "cifar10: download it into $FASTTL_DATA when it is not there (as `fasttl data "
                            "fetch cifar10`)")
    tensorboard: Optional[object] = option(None, "also write TensorBoard scalars, into DIR/<run folder name> (no DIR: "
                                           "the run folder's tensorboard/); needs pip install 'fasttl[tensorboard]'",
                                           kind=str, metavar="DIR", const=True, path=True,
                                           check=_a_tensorboard_folder, convert=_no_board_as_none)
    progress: bool = option(True, "progress bars", cli=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = _plain(getattr(self, f.name), f.metadata)
            if f.metadata["convert"] is not None:  # a value in an older form (a run's config.json) as today's
                value = f.metadata["convert"](value)
            setattr(self, f.name, value)

    def resolved(self, native_size: int, images: int = 0) -> "RunOptions":
        """Fills the per-strategy defaults and checks every option; `images`: the data's training
        and test images (what a run's automatic extraction precision depends on)."""
        self._check_choices()
        strategy = registry.get(self.strategy)
        compare = self.compare
        if compare == "auto":
            compare = registry.baseline().name if self.data in (None, *BUILTIN) else "none"
        trained = [strategy] + ([registry.get(compare)] if compare not in ("none", self.strategy) else [])
        for each in trained:
            for name in each.requires:
                if not getattr(self, name):
                    raise OptionError(f"{name}: --{'strategy' if each is strategy else 'compare'} {each.name} needs "
                                      f"--{name.replace('_', '-')} {option_metadata(name)['metavar']} "
                                      f"({option_metadata(name)['help']})")
        for each in trained:
            joined = backbones.SEPARATOR in self.backbone
            if joined and self.weights is not None:
                raise OptionError(f"weights: one file cannot hold the weights of {self.backbone}, a concatenation; "
                                  "drop --weights, or pass one backbone")
            if joined and each.reads_option("backbone") and not each.joins_backbones:
                raise OptionError(f"backbone: {self.backbone} joins backbones, which --strategy/--compare {each.name} "
                                  "cannot train (it needs one network); use linear or mlp, or one backbone")
            if self.extract_precision == "int8" and each.reads_option("extract_precision") and not each.joins_backbones:
                raise OptionError(f"extract_precision: int8 extracts for the heads on pooled features (linear, mlp), "
                                  f"not for --strategy/--compare {each.name}; pass fp32 or auto")
        if self.compare == self.strategy:
            raise OptionError(f"compare: --compare {self.compare} is the --strategy itself; compare with another "
                              "strategy, or pass --compare none")
        shared = set(strategy.outputs) & set(trained[-1].outputs) if len(trained) > 1 else set()
        if shared:  # one would overwrite the other's weights in the run folder
            raise OptionError(f"compare: --strategy {strategy.name} and --compare {trained[-1].name} both save "
                              f"{sorted(shared)[0]}.safetensors in one run folder; run them into two --out folders")
        _check_unused(self, trained)
        out = dataclasses.replace(self)
        out.epochs = strategy.epochs if self.epochs is None else self.epochs
        out.lr = strategy.lr if self.lr is None else self.lr
        out.batch_size = strategy.batch_size if self.batch_size is None else self.batch_size
        out.image_size = self.image_size if self.image_size is not None else (
            64 if native_size <= 16 else backbones.run_image_size(self.backbone))
        out.compare = compare
        if out.precision == "auto":
            out.precision = "bf16" if str(out.device).startswith("cuda") else "fp32"
        out.extract_precision = _run_extract_precision(out, trained, images)
        out._check_values()
        return out

    def _check_choices(self) -> None:
        """Choices and flags, first: `overwrite="no"` from a script is a mistake, never True."""
        for f in dataclasses.fields(self):
            if f.metadata["kind"] is bool:
                a_flag(f.name, getattr(self, f.name), OptionError)
            choices = choices_of(f.metadata)
            if choices and getattr(self, f.name) not in choices:
                raise OptionError(f"{f.name}: unknown {getattr(self, f.name)!r}; choose from {', '.join(choices)}")
        _a_backbone("backbone", self.backbone)

    def _check_values(self) -> None:
        """Each option's own check, then the rules between options."""
        for f in dataclasses.fields(self):
            if f.metadata["check"] is not None:
                f.metadata["check"](f.name, getattr(self, f.name))
        if self.download and self.data != "cifar10":
            raise OptionError("download: --download fetches only --data cifar10; drop it for other data")
        if self.resume and self.overwrite:
            raise OptionError("resume: --resume continues a run and --overwrite replaces it; pass one of them")
        engines.resolve(self.engine, self.extract_precision, torch.device(str(self.device).split(":")[0]))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# A run's auto precision is int8 from this many training and test images: quantizing the graph on
# a new training set costs 3 to 5 s, and int8 saves about 1.5 ms an image (the 1,500-image embedded
# default took 21.4 s in int8 against 18.0 s in fp32; full CIFAR-10 265 s against 372 s).
INT8_AUTO_MIN_IMAGES = 10_000
# ... and only where its accuracy was measured (backbone, image size, features; a concatenation
# where each of its parts was): one image's int8 features differ from fp32's by more at other
# settings (at 32 px, head features, 4% of photos by over 0.35, against none at these), and nothing
# measured their effect there: opt-in. Full CIFAR-10, linear head, test accuracy int8 / fp32: Lite0
# 0.8563 / 0.8562, Lite2 0.8621 / 0.8601; held-out training images: benchmarks/RESULTS.md, "int8
# extraction".
INT8_AUTO_MEASURED = {("efficientnet_lite0", 160, "multi"), ("efficientnet_lite1", 160, "multi"),
                      ("efficientnet_lite2", 160, "multi")}


def auto_int8(cfg, backbone: str, image_size: int, images: int) -> bool:
    """Whether --extract-precision auto extracts `backbone` at `image_size` in int8 for a feature
    run (linear, mlp) of `images` training and test images: the CPU has int8 dot products
    (engines.cpu_has_int8_dot) and ONNX Runtime, the data is large enough to pay for quantizing
    (INT8_AUTO_MIN_IMAGES), at settings whose accuracy was measured (INT8_AUTO_MEASURED). ONNX
    Runtime's int8 graph then runs about 1.6x as fast as fp32 with the held-out accuracy within
    measuring noise. The budget planner asks it of each candidate."""
    parts = backbone.split(backbones.SEPARATOR)
    if cfg.extract_precision != "auto" or cfg.engine == "torch" or images < INT8_AUTO_MIN_IMAGES or \
            any((part, image_size, cfg.features) not in INT8_AUTO_MEASURED for part in parts):
        return False
    return str(cfg.device).split(":")[0] == "cpu" and engines.cpu_has_int8_dot() and engines.onnxruntime_available()


def _run_extract_precision(cfg, trained, images: int) -> str:
    """--extract-precision auto in a run: int8 where every strategy trained reads pooled features
    (linear, mlp) and auto_int8 says so; else as resolve() has it."""
    readers = [each for each in trained if each.reads_option("extract_precision")]
    if readers and all(each.joins_backbones for each in readers) and \
            auto_int8(cfg, cfg.backbone, cfg.image_size, images):
        return "int8"
    return cfg.extract_precision


def run_config() -> type:
    """RunOptions with every registered strategy's own options after them (a base class's options,
    which linear and mlp share, counted once). An option declared twice is a programming error."""
    common = {f.name for f in dataclasses.fields(RunOptions)}
    owned, owner = {}, {}
    for name in registry.names():
        for key, declared in registry.get(name).options.items():
            if key in common or (key in owned and owned[key] is not declared):
                raise ValueError(f"option {key!r}: declared by strategy {name!r} and by "
                                 f"{owner.get(key, 'the common options')}; declare each option once")
            owned[key], owner[key] = declared, owner.get(key, name)
    config = dataclasses.make_dataclass("RunConfig", [(key, object, declared) for key, declared in owned.items()],
                                        bases=(RunOptions,))
    config.__module__ = __name__
    config.__doc__ = ("The options of a transfer run, as `fasttl run` takes them: those every run reads, then each "
                      "strategy's own.")
    return config


RunConfig = run_config()


def _check_unused(cfg: RunOptions, trained) -> None:
    """An option that only another strategy reads is a mistake to point out, not to ignore."""
    for name in ("epochs", "lr", "batch_size", "precision"):
        if getattr(cfg, name) not in (None, "auto") and not any(name in s.training_options for s in trained):
            raise OptionError(f"{name}: --{name.replace('_', '-')} is not read by --strategy {cfg.strategy} "
                              f"({registry.get(cfg.strategy).help}); drop it, or --compare a strategy that trains "
                              "in epochs")
    for f in dataclasses.fields(cfg):
        if not scoped(f.name) or getattr(cfg, f.name) in (None, f.default) or \
                any(s.reads_option(f.name) for s in trained):
            continue
        readers = [n for n in registry.names() if registry.get(n).reads_option(f.name)]
        raise OptionError(f"{f.name}: --{f.name.replace('_', '-')} is read only by --strategy {' or '.join(readers)}; "
                          f"drop it for --strategy {cfg.strategy}")


def scoped(name: str) -> bool:
    """Whether only some strategies read option `name`: one a strategy declares, or a common one
    marked scoped (the backbone's: --backbone, --weights, the extraction's options; the small CNNs
    of scratch and distill have no backbone)."""
    return any(name in registry.get(n).options for n in registry.names()) or \
        option_metadata(name)["scoped"]


def option_metadata(name: str) -> dict:
    """help, kind, choices, metavar, check of one run option (other commands reuse them)."""
    return {f.name: f.metadata for f in dataclasses.fields(run_config())}[name]


def options():
    """(name, default, metadata) of every option, in order: what the CLI parser is built from (the
    registry as it is now, a strategy registered after import included)."""
    return [(f.name, f.default, f.metadata) for f in dataclasses.fields(run_config())]
