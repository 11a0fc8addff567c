"""The options of a transfer run: the one place each option, its default, its choices and its
help are written. The `fasttl run` parser is generated from these fields, and per-strategy
defaults (epochs, lr, batch size) come from the strategy registry."""
from __future__ import annotations

import dataclasses
import math
import os

import torch
from dataclasses import dataclass, field
from typing import Optional

from fasttl import backbones
from fasttl.util.errors import OptionError
from fasttl.data.sources import ON_ERROR
from fasttl.cache import engines
from fasttl.cache.kernels import CACHE_DTYPE, CACHE_DTYPES
from fasttl.transfer import cross_fit
from fasttl.transfer.caching import FEATURE_TAPS, MIRROR_VIEWS, mirror_mode
from fasttl.data.labels import LABEL_KINDS
from fasttl.transfer.datasets import BUILTIN
from fasttl.util.checks import positive_int

MAX_IMAGE_SIZE = 1024


def option(default, help: str, *, kind=None, choices=None, metavar: Optional[str] = None, cli: bool = True,
           const=None, repeat: bool = False):
    """A RunConfig field: `kind` is the value's type on the command line (str, int, float, bool
    for a flag), `choices` a tuple or a callable returning one (looked up when asked); `const`:
    the value of the flag given without one (its value is then optional on the command line);
    `repeat`: the flag may be given several times, and the value is then the list of them."""
    kind = kind or type(default)
    return field(default=default, metadata=dict(help=help, kind=kind, choices=choices, metavar=metavar, cli=cli,
                                                 const=const, repeat=repeat))


def _strategies():
    from fasttl.transfer import registry

    return registry.names()


def _comparisons():
    return ("auto", "none") + _strategies()


@dataclass
class RunConfig:
    data: Optional[str] = option(None, "'cifar10-mini' (the embedded default: 1,500 real CIFAR-10 images), "
                                 "'digits' (scikit-learn's 8x8 digits), 'cifar10' ($FASTTL_DATA), a "
                                 "class-folder DIR, a file list LIST.csv/.tsv/.parquet (path,label columns) or "
                                 "WebDataset shards 'train-{000000..000127}.tar'", kind=str, metavar="DATA")
    classes_file: Optional[str] = option(None, "class names, one a line, for a file list or WebDataset --data "
                                         "(default: the labels' own names, or the class indices)", kind=str,
                                         metavar="FILE")
    labels: str = option("names", "a file list's labels: class names (with --classes-file, each must be one of its "
                         "names) or indices into --classes-file", choices=LABEL_KINDS)
    backbone: str = option(backbones.DEFAULT, "backbone name", choices=backbones.available)
    weights: Optional[str] = option(None, "backbone state dict file", kind=str, metavar="FILE")
    strategy: str = option("linear", "how to transfer (see the table in the README)", choices=_strategies)
    image_size: Optional[int] = option(None, "backbone input size (default: 64 for 8x8 digits, else the backbone's "
                                       "run size, 160 for the EfficientNet-Lites)", kind=int,
                                       metavar="N")
    epochs: Optional[int] = option(None, "epochs (default: the strategy's)", kind=int, metavar="N")
    batch_size: Optional[int] = option(None, "batch size (default: the strategy's)", kind=int, metavar="N")
    lr: Optional[float] = option(None, "peak learning rate (default: the strategy's)", kind=float, metavar="X")
    device: str = option("cpu", "where models, features and images live: cpu, cuda or cuda:N", metavar="DEVICE")
    seed: int = option(0, "seed of every random choice", metavar="N")
    out: Optional[str] = option(None, "run directory (default runs/<data>-<strategy>, -2, -3, ... when taken)",
                                kind=str, metavar="RUN_DIR")
    compare: str = option("auto", "train another strategy beside, on the same data (auto: the from-scratch "
                          "baseline for the data sets fasttl ships, none otherwise)", choices=_comparisons)
    teacher: Optional[object] = option(None, "distill: the teacher run (linear, mlp or finetune); repeat it for an "
                                       "ensemble whose logits are averaged", kind=str, metavar="RUN_DIR",
                                       repeat=True)
    target_data: Optional[str] = option(None, "dann: the unlabeled target domain (class folders; labels only "
                                        "for evaluation)", kind=str, metavar="DIR")
    train_per_class: Optional[int] = option(None, "use N training images per class (seeded)", kind=int, metavar="N")
    test_per_class: Optional[int] = option(None, "use N test images per class (seeded)", kind=int, metavar="N")
    finetune_stages: Optional[int] = option(None, "finetune: unfreeze the top K stages (default all)", kind=int,
                                            metavar="K")
    finetune_from: str = option("probe", "finetune: start from the tuned linear probe on cached features, with the "
                                "lr scale and epoch chosen on validation (probe: LP-FT), or from a random head for "
                                "--epochs epochs (random: plain fine-tuning)", choices=("probe", "random"))
    regularize: str = option("none", "finetune: decay the backbone toward zero (none: AdamW weight decay) or toward "
                             "its pretrained weights (l2sp)", choices=("none", "l2sp"))
    precision: str = option("auto", "bf16 params with fp32 master weights, or fp32 (auto: bf16 on cuda, fp32 on "
                            "cpu)", choices=("auto", "fp32", "bf16"))
    cache_dtype: str = option(CACHE_DTYPE, "feature cache dtype", choices=tuple(CACHE_DTYPES))
    features: str = option("multi", "linear/mlp/dann/finetune: what each cached vector holds: head (the backbone's "
                           "final pooled features) or multi (beside them, the pooled outputs of its last four stages)",
                           choices=lambda: tuple(FEATURE_TAPS))
    engine: str = option("auto", "what runs the frozen backbone during extraction (auto: onnxruntime on the CPU "
                         "when installed, else torch)", choices=engines.ENGINES)
    extract_precision: str = option("auto", "extraction precision (auto: bf16 autocast on cuda, fp32 on the CPU; "
                                    "bf16 features are about 3%% off fp32)", choices=engines.PRECISIONS)
    mirror_views: str = option("test", "linear/mlp: where the horizontally mirrored images are a second view: test "
                               "(test, validation and predict average both views' logits: one more pass over the "
                               "test and validation images), both (the head also trains on both: twice the "
                               "training extraction) or none",
                               choices=tuple(MIRROR_VIEWS), const="both", metavar="{" + ",".join(MIRROR_VIEWS) + "}")
    temperature: Optional[float] = option(None, "distill: softening temperature (default: chosen with alpha on the "
                                          "validation split)", kind=float, metavar="T")
    alpha: Optional[float] = option(None, "distill: weight of the soft term (default: chosen with T on the "
                                    "validation split)", kind=float, metavar="A")
    distill_features: bool = option(False, "distill: also match a projection of the student's penultimate "
                                    "features to the teacher's cached features (MSE), kept only if it scores "
                                    "higher on the validation split")
    teacher_logits: str = option(cross_fit.MODES[0], "distill: the teacher's soft targets on each training image: "
                                 "in-sample (from the teacher's own head, which trained on them) or cross-fitted "
                                 "(from a linear/mlp teacher's head refit on the other folds of its training images, "
                                 "so they are as unsure as the teacher is on images it never saw; in-sample where "
                                 "it can't be: a finetune teacher, a student on other images, too few images)",
                                 choices=cross_fit.MODES)
    resume: bool = option(False, "continue an interrupted run from its last finished epoch")
    overwrite: bool = option(False, "replace the run in --out (and rebuild a feature cache that fails its checks)")
    on_error: str = option("fail", "an unreadable image: fail (names it) or skip (left out, listed in skipped.csv)",
                           choices=ON_ERROR)
    download: bool = option(False, "cifar10: download it into $FASTTL_DATA when it is not there (as `fasttl data "
                            "fetch cifar10`)")
    tensorboard: Optional[object] = option(None, "also write TensorBoard scalars, into DIR/<run folder name> (no DIR: "
                                           "the run folder's tensorboard/); needs pip install 'fasttl[tensorboard]'",
                                           kind=str, metavar="DIR", const=True)
    progress: bool = option(True, "progress bars", cli=False)

    def __post_init__(self):
        self.mirror_views = mirror_mode(self.mirror_views)  # True/False: the flag it was before it had modes

    def resolved(self, native_size: int) -> "RunConfig":
        """Fills the per-strategy defaults and checks every option."""
        from fasttl.transfer import registry

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
        if self.compare == self.strategy:
            raise OptionError(f"compare: --compare {self.compare} is the --strategy itself; compare with another "
                              "strategy, or pass --compare none")
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
        out._check_values()
        return out

    def _check_choices(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            choices = choices() if callable(choices) else choices
            if choices and getattr(self, f.name) not in choices:
                raise OptionError(f"{f.name}: unknown {getattr(self, f.name)!r}; choose from {', '.join(choices)}")

    def _check_values(self) -> None:
        if not (self.tensorboard is None or self.tensorboard is True or isinstance(self.tensorboard, str)
                and self.tensorboard):
            raise OptionError(f"tensorboard: expected a folder (a string) or True (the run folder), got "
                              f"{self.tensorboard!r}")
        if self.download and self.data != "cifar10":
            raise OptionError("download: --download fetches only --data cifar10; drop it for other data")
        teachers = [self.teacher] if isinstance(self.teacher, str) else self.teacher
        if teachers is not None and (not isinstance(teachers, (list, tuple)) or not teachers or
                                     not all(isinstance(t, str) and t for t in teachers)):
            raise OptionError(f"teacher: expected a run folder or a list of them, got {self.teacher!r}")
        if teachers is not None and len({os.path.realpath(os.path.expanduser(t)) for t in teachers}) < len(teachers):
            raise OptionError(f"teacher: {list(teachers)} names a run twice; give each teacher once")
        for name in ("data", "out", "weights", "target_data", "classes_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise OptionError(f"{name}: expected a path (a string), got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise OptionError(f"seed: expected an integer in [0, 2**63), got {self.seed!r}")
        for name in ("epochs", "batch_size", "image_size"):
            positive_int(name, getattr(self, name), OptionError)
        if self.image_size > MAX_IMAGE_SIZE:
            raise OptionError(f"image_size: {self.image_size} px is more than fasttl handles ({MAX_IMAGE_SIZE})")
        for name in ("train_per_class", "test_per_class", "finetune_stages"):
            positive_int(name, getattr(self, name), OptionError, optional=True)
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if name == "temperature" and value is None:
                continue  # chosen on validation
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise OptionError(f"{name}: expected a finite number > 0, got {value!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise OptionError(f"alpha: expected a number in [0, 1], got {self.alpha!r}")
        if self.resume and self.overwrite:
            raise OptionError("resume: --resume continues a run and --overwrite replaces it; pass one of them")
        if not (self.device == "cpu" or str(self.device).startswith("cuda")):
            raise OptionError(f"device: expected cpu, cuda or cuda:N, got {self.device!r}")
        engines.resolve(self.engine, self.extract_precision, torch.device(str(self.device).split(":")[0]))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_unused(cfg: "RunConfig", trained) -> None:
    """An option that only another strategy reads is a mistake to point out, not to ignore."""
    from fasttl.transfer import registry

    for name in ("epochs", "lr", "batch_size"):
        if getattr(cfg, name) is not None and not any(name in s.training_options for s in trained):
            raise OptionError(f"{name}: --{name.replace('_', '-')} is not read by --strategy {cfg.strategy} "
                              f"({registry.get(cfg.strategy).help}); drop it, or --compare a strategy that trains "
                              "in epochs")

    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name in ("teacher", "target_data", "finetune_stages", "finetune_from", "regularize", "distill_features",
                 "teacher_logits", "temperature", "alpha", "mirror_views", "weights"):
        if getattr(cfg, name) in (None, defaults[name]) or any(name in s.requires + s.uses for s in trained):
            continue
        readers = [n for n in registry.names() if name in registry.get(n).requires + registry.get(n).uses]
        raise OptionError(f"{name}: --{name.replace('_', '-')} is read only by --strategy {' or '.join(readers)}; "
                          f"drop it for --strategy {cfg.strategy}")


def option_metadata(name: str) -> dict:
    """help, kind, choices, metavar of one run option (other commands reuse them)."""
    return {f.name: f.metadata for f in dataclasses.fields(RunConfig)}[name]


def options():
    """(name, default, metadata) of every option, in order: what the CLI parser is built from."""
    return [(f.name, f.default, f.metadata) for f in dataclasses.fields(RunConfig)]
