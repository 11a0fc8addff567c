"""`distill`: the small CNN at the data's native resolution learns from a teacher run's softened
outputs through fasttl's fused distillation loss. The teacher is any finished run whose strategy
can teach, rebuilt through the registry; its logits on the training images are computed once."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttl.util.errors import OptionError
from fasttl.util import files
from fasttl.util.files import read_json
from fasttl.transfer import cross_fit, registry
from fasttl.transfer.registry import Outcome, Strategy, register
from fasttl.transfer.trained import TrainedModel
from fasttl.transfer.rundir import (RunError, finite_logits, load_trained, read_config, read_recorded, weights_file,
                                   write_recorded)
from fasttl.data.splits import VALIDATION_FRACTION, validation_split
from fasttl.transfer.models import SmallCNN
from fasttl._op_checks import TEMPERATURE_RANGE
from fasttl.transfer.options import an_optional_fraction, option
from fasttl.transfer.common import param_dtype
from fasttl.transfer.small_cnn import (cnn_epoch, cnn_logits, cnn_loss, cnn_model, labels_of, load_cnn,
                                       native_images, train_cnn)
from fasttl.util.seeds import torch_seed

TEACHER_LOGITS = "teacher_logits.safetensors"
MAX_LOGITS_BYTES = 1 << 34  # 2 views x 50M images x 40 classes of fp32: far above any run's
# The validation sweep's choice, kept so that --resume continues training instead of sweeping again.
CHOICE = "distill_choice.json"


def _first_names(classes, shown: int = 6) -> str:
    """Class names for a one-line message: the first few, and how many more."""
    more = f", ... ({len(classes)} in all)" if len(classes) > shown else ""
    return ", ".join(repr(c[:40]) for c in list(classes)[:shown]) + more


def teacher_config(teacher_dir: str):
    """(config.json, strategy) of a teacher run, checked: a finished fasttl run of a strategy that
    can teach; an OptionError naming --teacher otherwise."""
    try:
        config = read_config(teacher_dir)
    except RunError as exc:  # the teacher's folder is the culprit, not the run being started
        raise OptionError(f"teacher: {exc} (--teacher takes a finished fasttl run)") from None
    if config["strategy"] not in registry.names():
        raise OptionError(f"teacher: {teacher_dir} is a {config['strategy']!r} run, a strategy this fasttl does not "
                          f"have ({', '.join(registry.names())})")
    if not isinstance(config.get("classes"), list) or not all(isinstance(c, str) for c in config["classes"]):
        raise OptionError(f"teacher: {teacher_dir}/config.json has no list of class names; give a finished fasttl "
                          "run as --teacher")
    strategy = registry.get(config["strategy"])
    if not strategy.can_teach:
        teachers = ", ".join(n for n in registry.names() if registry.get(n).can_teach)
        raise OptionError(f"teacher: {teacher_dir} is a {config['strategy']!r} run; a teacher must be a {teachers} run")
    return config, strategy


def teacher_model(teacher_dir: str, classes: List[str], device: torch.device) -> TrainedModel:
    """The teacher run's model, rebuilt by its own strategy."""
    config, _ = teacher_config(teacher_dir)
    taught = list(config.get("classes", []))
    if taught != list(classes):
        if sorted(taught) == sorted(classes):  # a file list's classes sort as their labels, unless a file says
            raise OptionError(f"teacher: {teacher_dir} was trained for the same classes in another order "
                              f"({_first_names(taught)}; the data's: {_first_names(classes)}); list them in the "
                              f"teacher's order, one a line, in a --classes-file (a file list or WebDataset --data)")
        raise OptionError(f"teacher: {teacher_dir} was trained for classes {_first_names(taught)}, but the data has "
                          f"{_first_names(classes)}; give a teacher trained on the data's classes")
    try:
        return load_trained(teacher_dir, device)
    except RunError as exc:
        raise OptionError(f"teacher: {exc} (--teacher takes a finished fasttl run)") from None


def teacher_dirs(teacher) -> List[str]:
    """--teacher as a list of run folders (one, or an ensemble's)."""
    return [teacher] if isinstance(teacher, str) else list(teacher)


def _weights_digest(teacher_dir: str) -> str:
    """sha256 over a teacher run's saved models: a teacher re-run in place gives other logits."""
    import hashlib

    digest = hashlib.sha256()
    strategy = registry.get(read_config(teacher_dir)["strategy"])
    for name in strategy.outputs:
        path = os.path.join(teacher_dir, weights_file(name))
        if os.path.isfile(path):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _valid_kind(kind) -> bool:
    return isinstance(kind, str) and (kind == cross_fit.CROSS_FITTED or kind.startswith(cross_fit.IN_SAMPLE))


def _saved_logits(data: bytes, request: str, teachers: List[str], rows: int, classes: int):
    """(logits (2, N, C), how each teacher's were made) from an earlier start of this run, or None
    when the file is damaged, holds values no teacher gives (another shape, a non-float dtype,
    non-finite numbers) or was made for other teachers, teacher weights, --teacher-logits or seed."""
    from safetensors.torch import load

    try:
        metadata = _safetensors_metadata(data)
        if metadata.get("request") != request:
            return None
        tensors = load(data)
        views = torch.stack([tensors["logits"], tensors["logits_mirror"]])
        kinds = json.loads(metadata["kinds"])
    except Exception:  # a damaged file is recomputed, never trusted
        return None
    if (views.shape != (2, rows, classes) or not views.dtype.is_floating_point or not torch.isfinite(views).all()
            or not isinstance(kinds, dict) or sorted(kinds) != sorted(teachers)
            or not all(_valid_kind(k) for k in kinds.values())):
        return None
    return views.float(), kinds


def _safetensors_metadata(data: bytes) -> dict:
    """The __metadata__ of safetensors bytes (its header: an 8-byte length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


@torch.no_grad()
def teacher_view_logits(model: TrainedModel, source, progress: bool = False) -> Tensor:
    """(2, N, C): the teacher's logits on each training image as it is and mirrored, each view's
    from that view's own image (for feature teachers, from the "train" and "train-mirror" caches)."""
    return torch.stack([model.view_logits(source, mirror=view, progress=progress, split="train")
                        for view in (False, True)])


def _logit_makers(teacher_dir: str, model: TrainedModel, ds, cfg) -> Tuple[Callable[[], Tensor], str]:
    """(a function making one teacher's (2, N, C) logits per view, how it makes them): cross-fitted
    where asked and possible (fasttl.transfer.cross_fit), else in-sample with the reason. Making
    it checks what cross-fitting will read, so a bad teacher is refused before any teacher runs."""
    def in_sample() -> Tensor:  # a teacher's NaN is its weights', not the student's --lr
        return finite_logits(teacher_dir, teacher_view_logits(model, ds.train, cfg.progress))

    if cfg.teacher_logits == cross_fit.IN_SAMPLE:
        return in_sample, cross_fit.IN_SAMPLE
    config, fit = read_config(teacher_dir), model.cross_fitter()
    reason = f"a {config['strategy']} teacher is not refit" if fit is None else cross_fit.obstacle(config, ds)
    if reason is not None:
        return in_sample, f"{cross_fit.IN_SAMPLE}: {reason}"
    return (lambda: finite_logits(teacher_dir, fit(ds.train, cfg.seed, cfg.progress, split="train"))), \
        cross_fit.CROSS_FITTED


def teacher_logits_for(teacher, ds, cfg, run_dir: str, device: torch.device) -> Tuple[Tensor, Dict[str, str]]:
    """The teachers' logits per view of every training image, (2, N, C), averaged over the teachers
    of an ensemble, and how each teacher's were made (cross-fitted, or in-sample and why); kept in
    the run directory (safetensors: tensors and strings of metadata, nothing that could run code on
    load) and reused by --resume while the teachers' weights and these options are the same."""
    from safetensors.torch import save

    teachers = [files.absolute(t) for t in teacher_dirs(teacher)]
    models = [teacher_model(t, ds.classes, device) for t in teachers]  # every teacher checked before any runs
    request = json.dumps({"teachers": teachers, "weights": [_weights_digest(t) for t in teachers],
                          "teacher_logits": cfg.teacher_logits, "folds": cross_fit.FOLDS, "seed": cfg.seed})
    data = read_recorded(run_dir, TEACHER_LOGITS, MAX_LOGITS_BYTES)  # what this run wrote, unchanged since
    if data is not None:
        saved = _saved_logits(data, request, teachers, len(ds.train), len(ds.classes))
        if saved is not None:
            return saved
    makers = [_logit_makers(t, m, ds, cfg) for t, m in zip(teachers, models)]
    logits = torch.stack([make().float() for make, _ in makers]).mean(0)
    kinds = {t: kind for t, (_, kind) in zip(teachers, makers)}
    write_recorded(run_dir, TEACHER_LOGITS, save({"logits": logits[0].contiguous(),
                                                  "logits_mirror": logits[1].contiguous()},
                                                 metadata={"request": request, "kinds": json.dumps(kinds)}))
    return logits, kinds


# --distill-features: weight of the feature term beside the logit loss (the targets are scaled to
# unit mean square, so the term starts near this value).
FEATURE_WEIGHT = 1.0


class FeatureHint:
    """The --distill-features term: FEATURE_WEIGHT * MSE between a linear projection of the
    student's penultimate features and the teacher's cached features of the same view of the
    same image (teacher_features: (2, N, D), plain and mirrored). The projection trains with the
    student and is dropped afterwards; the student's penultimate features are read by a hook."""

    def __init__(self, student_dim: int, teacher_features: Tensor, seed: int, device: torch.device,
                 dtype: torch.dtype):
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(torch_seed(seed + 1))  # the projection's own seeded start, not the student's
        self.projection = torch.nn.Linear(student_dim, teacher_features.shape[-1]).to(device, dtype)
        torch.random.set_rng_state(generator_state)
        rms = (torch.linalg.vector_norm(teacher_features, dtype=torch.float32)
               / math.sqrt(max(teacher_features.numel(), 1)))
        self.targets = teacher_features.to(device, torch.float16) / rms.clamp_min(1e-6).to(device, torch.float16)
        self.hidden, self.handle = None, None

    def attach(self, student: torch.nn.Module) -> None:
        self.handle = student.features.register_forward_hook(self._keep)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.hidden = self.handle = None

    def _keep(self, module, inputs, output) -> None:
        self.hidden = output

    def __call__(self, idx: Tensor, mirrored: Tensor) -> Tensor:
        target = self.targets[mirrored.long(), idx].float()
        return FEATURE_WEIGHT * F.mse_loss(self.projection(self.hidden).float(), target)


def teacher_features_for(teacher, ds, cfg) -> Tensor:
    """(2, N, D) fp16: the first teacher's cached features of each training image, per view."""
    first = files.absolute(teacher_dirs(teacher)[0])
    model = teacher_model(first, ds.classes, torch.device("cpu"))
    views = [model.view_features(ds.train, mirror=view, progress=cfg.progress, split="train") for view in (False, True)]
    if views[0] is None:
        raise OptionError(f"distill_features: the teacher {first} is a {read_config(first)['strategy']!r} run, "
                          "which has no cached features to match; give a linear or mlp teacher first, or drop "
                          "--distill-features")
    return torch.stack(views)


# The (T, alpha) pairs the validation sweep tries; a value given on the command line is kept fixed.
TEMPERATURES, ALPHAS = (1.0, 2.0, 4.0), (0.5, 0.9)
SWEEP = ((4.0, 0.9), (4.0, 0.5), (2.0, 0.9), (1.0, 0.5))
# Each candidate trains for a third of --epochs, at most this many: enough to rank the candidates
# (the sweep of a 30-epoch run), without the sweep outgrowing the training it is for on longer schedules.
SWEEP_EPOCHS_MAX = 10


def candidates(temperature: Optional[float], alpha: Optional[float]) -> List[Tuple[float, float]]:
    if temperature is not None and alpha is not None:
        return [(float(temperature), float(alpha))]
    if temperature is not None:
        return [(float(temperature), a) for a in ALPHAS]
    if alpha is not None:
        return [(t, float(alpha)) for t in TEMPERATURES]
    return list(SWEEP)


def choose_on_validation(cfg, ds, logits: Tensor, train_x: Tensor, device: torch.device,
                         features: Optional[Tensor] = None) -> Dict[str, object]:
    """T and alpha by a small sweep: a student per candidate trained on the training split less a
    stratified validation split (fasttl.data.splits.validation_split), for a third of the epochs
    (at most SWEEP_EPOCHS_MAX), and scored on that validation split. Given the teacher's `features`
    (--distill-features), one more student at the chosen T and alpha adds the feature term, which is
    kept only if it scores higher. The test split is never looked at."""
    pairs = candidates(cfg.temperature, cfg.alpha)
    if len(pairs) == 1 and features is None:
        return {"temperature": pairs[0][0], "alpha": pairs[0][1], "given": True}
    labels = labels_of(ds.train, device)
    train_idx, val_idx = validation_split(labels.tolist(), cfg.seed)
    if not val_idx:  # one image per class: nothing to validate on
        return {"temperature": pairs[0][0], "alpha": pairs[0][1], "distill_features": False,
                "validation": {"validation_images": 0, "fraction": VALIDATION_FRACTION, "seed": cfg.seed},
                "refit_on": "train (no validation split)"}
    train_idx, val_idx = torch.as_tensor(train_idx, device=device), torch.as_tensor(val_idx, device=device)
    x, y, soft = train_x[train_idx], labels[train_idx], logits.to(device)[:, train_idx]
    epochs = max(1, min(SWEEP_EPOCHS_MAX, math.ceil(cfg.epochs / 3)))

    def score(temperature: float, alpha: float, with_features: bool) -> float:
        hint = (FeatureHint(SmallCNN.FEATURE_DIM, features[:, train_idx.cpu()], cfg.seed, device,
                            train_x.dtype) if with_features else None)
        model, optimizer, scheduler = cnn_model(cfg, len(ds.classes), device, train_x.dtype,
                                                epochs * math.ceil(len(y) / cfg.batch_size),
                                                extra=() if hint is None else (hint.projection,))
        if hint is not None:
            hint.attach(model)
        loss_fn = cnn_loss(y, soft, temperature, alpha, extra=hint)
        for epoch in range(epochs):
            model.train()
            cnn_epoch(model, x, y, cfg.batch_size, optimizer, scheduler, epoch, cfg.seed, loss_fn)
        if hint is not None:
            hint.detach()
        predicted = cnn_logits(model, train_x[val_idx]).argmax(1)
        return float((predicted == labels[val_idx].cpu()).float().mean())

    sweep = [{"temperature": t, "alpha": a, "val_accuracy": score(t, a, False)} for t, a in pairs]
    best = max(sweep, key=lambda r: r["val_accuracy"])  # the first of equals: the list's order
    choice = {"temperature": best["temperature"], "alpha": best["alpha"], "val_accuracy": best["val_accuracy"],
              "sweep": sweep, "sweep_epochs": epochs, "refit_on": "train (all of it, for --epochs)",
              "validation": {"validation_images": len(val_idx), "fraction": VALIDATION_FRACTION, "seed": cfg.seed}}
    if features is not None:
        with_features = score(best["temperature"], best["alpha"], True)
        kept = with_features > best["val_accuracy"]
        choice.update(distill_features=kept, features_val_accuracy=with_features,
                      val_accuracy=max(with_features, best["val_accuracy"]))
    if len(pairs) == 1:
        choice["given"] = True
    return choice


def saved_choice(run_dir: str, cfg) -> Optional[dict]:
    """The choice an interrupted run's sweep made (CHOICE), or None to sweep again: a file that is
    missing or damaged, or whose values this run's sweep could not have chosen (a (T, alpha) not
    among its candidates, the feature term without --distill-features), is never trusted."""
    data = read_recorded(run_dir, CHOICE, files.MAX_JSON_BYTES)  # what this run wrote, unchanged since
    try:
        choice = json.loads(data)
        pair = (choice["temperature"], choice["alpha"])
    except (ValueError, KeyError, TypeError):
        return None
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in pair):  # True == 1.0
        return None
    features = choice.get("distill_features", False)
    if pair not in candidates(cfg.temperature, cfg.alpha) or features not in (False, bool(cfg.distill_features)):
        return None
    return choice


def refuse_teachers_of_test_images(teachers: List[str], test) -> None:
    """A teacher trained on the student's test images would carry them into the student, whose test
    score would no longer be held out: refused, naming one image (by file, links and hard links)."""
    from fasttl.data.sources import disk_keys
    from fasttl.transfer.evaluate import own_dataset
    from fasttl.util.errors import DataError, UserError

    from fasttl.transfer import trained_images

    tested = {key: i for i, key in enumerate(disk_keys(test)) if key is not None}
    for teacher in teachers:
        shared = trained_images.shared_images(test, trained_images.recorded(teacher, read_config(teacher)[
            "train_samples"]) or set())
        if shared:  # its record: what it trained on, whatever became of its data since
            raise DataError(f"teacher: {teacher} trained on {len(shared)} of this run's test images ({shared[0]}"
                            f"{', ...' if len(shared) > 1 else ''}); distill from a teacher trained on other images")
        try:
            trained = own_dataset(read_config(teacher)).train
        except (UserError, OSError):
            continue  # its data gone or changed since: nothing left to compare
        shared = [test.name_of(tested[key]) for key in disk_keys(trained) if key in tested]
        if shared:
            raise DataError(f"teacher: {teacher} trained on {len(shared)} of this run's test images ({shared[0]}"
                            f"{', ...' if len(shared) > 1 else ''}); distill from a teacher trained on other images")


def _teacher_accuracy(teacher: str) -> Optional[float]:
    """The teacher's test accuracy as its metrics.json records it, for the student's notes only; None
    when the file is missing or damaged, a value that is no accuracy (true, 10**400, NaN, 7.5) too:
    metrics.json is not hash-recorded, and this runs after the student trained, so it never fails."""
    try:
        value = read_json(os.path.join(teacher, "metrics.json"))["accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:  # NaN too
        return None
    return float(value)  # compared only above: an int of 400 digits is no float


def _a_temperature(name: str, value) -> None:
    """None (chosen on validation) or a temperature distillation_loss takes."""
    if value is None:
        return
    low, high = TEMPERATURE_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise OptionError(f"{name}: expected a number in [{low:g}, {high:g}] (beyond it the softened distributions "
                          f"are uniform or one-hot to the last bit), got {value!r}")


def _teacher_runs(name: str, value) -> None:
    """None, a run folder or a list of them, each named once."""
    teachers = [value] if isinstance(value, str) else value
    if teachers is None:
        return
    if not isinstance(teachers, (list, tuple)) or not teachers or not all(isinstance(t, str) and t for t in teachers):
        raise OptionError(f"{name}: expected a run folder or a list of them, got {value!r}")
    if len({os.path.realpath(os.path.expanduser(t)) for t in teachers}) < len(teachers):
        raise OptionError(f"{name}: {list(teachers)} names a run twice; give each teacher once")


@register
class Distill(Strategy):
    name = "distill"
    display = "distill (student with teacher)"
    help = ("the small CNN at native resolution from the softened outputs of a teacher run (--teacher RUN_DIR, "
            "repeated for an ensemble), per view of each image; T and alpha chosen on validation")
    requires = ("teacher",)
    options = {
        "teacher": option(None, "distill: the teacher run (linear, mlp or finetune); repeat it for an ensemble whose "
                          "logits are averaged", kind=str, metavar="RUN_DIR", repeat=True, check=_teacher_runs,
                          path=True),
        "temperature": option(None, "distill: softening temperature (default: chosen with alpha on the validation "
                              "split)", kind=float, metavar="T", check=_a_temperature),
        "alpha": option(None, "distill: weight of the soft term (default: chosen with T on the validation split)",
                        kind=float, metavar="A", check=an_optional_fraction),
        "distill_features": option(False, "distill: also match a projection of the student's penultimate features "
                                   "to the teacher's cached features (MSE), kept only if it scores higher on the "
                                   "validation split"),
        "teacher_logits": option(cross_fit.MODES[0], "distill: the teacher's soft targets on each training image: "
                                 "in-sample (from the teacher's own head, which trained on them) or cross-fitted "
                                 "(from a linear/mlp teacher's head refit on the other folds of its training images, "
                                 "so they are as unsure as the teacher is on images it never saw; in-sample where "
                                 "it can't be: a finetune teacher, a student on other images, too few images)",
                                 choices=cross_fit.MODES),
    }
    # 50: on 10,000 CIFAR-10 images the student beat its twin by +2.43 and +2.47 points (two seeds)
    # at 50 epochs, +2.02 and +1.44 at 30, +0.53 at 10 (benchmarks/RESULTS.md, "Distillation"): the
    # teacher's help grows as the twin overfits.
    epochs, lr, batch_size = 50, 3e-3, 64
    outputs = ("distill",)

    def inputs_identity(self, cfg) -> dict:
        return {"teachers_weights": [_weights_digest(t) for t in teacher_dirs(cfg.teacher)]}

    def preflight(self, cfg) -> None:
        for teacher in teacher_dirs(cfg.teacher):
            teacher_config(teacher)

    def check_data(self, cfg, ds) -> None:
        refuse_teachers_of_test_images(teacher_dirs(cfg.teacher), ds.test)

    def train(self, cfg, ds, run_dir, device) -> List[Outcome]:
        started = time.perf_counter()
        logits, kinds = teacher_logits_for(cfg.teacher, ds, cfg, run_dir, device)
        teacher_s = time.perf_counter() - started
        train_x = native_images(ds.train, ds.native_size, cfg.seed, device, param_dtype(cfg))
        features = teacher_features_for(cfg.teacher, ds, cfg) if cfg.distill_features else None
        started = time.perf_counter()
        choice = saved_choice(run_dir, cfg) if cfg.resume else None
        if choice is None:
            choice = choose_on_validation(cfg, ds, logits, train_x, device, features)
            write_recorded(run_dir, CHOICE, json.dumps(choice, indent=1).encode())
        sweep_s = time.perf_counter() - started
        hint = (FeatureHint(SmallCNN.FEATURE_DIM, features, cfg.seed, device, train_x.dtype)
                if choice.get("distill_features") else None)
        outcome = train_cnn(cfg, ds, run_dir, self.name, self.display, device, teacher_logits=logits,
                            temperature=choice["temperature"], alpha=choice["alpha"], train_x=train_x, hint=hint)
        outcome.timings.update(teacher_logits_s=teacher_s, sweep_s=sweep_s)
        labels = labels_of(ds.train, logits.device)
        teachers = [files.absolute(t) for t in teacher_dirs(cfg.teacher)]
        outcome.notes.update(
            teacher=teachers[0] if len(teachers) == 1 else teachers,
            teacher_test_accuracy={t: _teacher_accuracy(t) for t in teachers},
            teacher_train_accuracy=float((logits.mean(0).argmax(1) == labels).float().mean()),
            teacher_logits=kinds[teachers[0]] if len(teachers) == 1 else kinds,
            teacher_views="per view: plain and mirrored images, each with its own logits",
            temperature=choice["temperature"], alpha=choice["alpha"], choice=choice)
        return [outcome]

    def load(self, run_dir, device) -> TrainedModel:
        return load_cnn(run_dir, self.name, device)
