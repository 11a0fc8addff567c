"""What a person reads: report.md (transfer beside scratch), confusion_matrix.png, curves.png."""
from __future__ import annotations

import os
from typing import Dict, List

from fasttl.util.files import write_atomic
from fasttl.util.outputs import markdown_cell, plot_labels


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MAX_FIGURE_INCHES = 24
MAX_NAMED_CLASSES = 40


def plot_confusion_matrix(metrics: Dict[str, object], path: str, title: str) -> None:
    plt = _plt()
    import numpy as np

    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    classes = metrics["classes"]
    normalized = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    # Readable up to about 40 classes; beyond, a fixed size (the figure's memory grows with its
    # area: 300 classes at the per-class size took 13 GB) with the cells alone, no names.
    size = min(max(4.5, 0.55 * len(classes) + 2), MAX_FIGURE_INCHES)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if len(classes) <= MAX_NAMED_CLASSES:
        labels = plot_labels(classes)
        ax.set_xticks(range(len(classes)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    balanced = f", balanced {metrics['balanced_accuracy']:.3f}" if "balanced_accuracy" in metrics else ""
    # two lines: one would be wider than a few classes' figure, and cut at both edges
    ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.3f}{balanced}", fontsize=10)
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if normalized[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    _tight_layout(fig)
    _save(fig, path)


# Which records a curve shows, and how: the validation curve is what choices are made on; a
# strategy's per-epoch test curve (where it keeps one) is drawn, labelled as used for none.
_CURVES = (("train", "-", "train"), ("val", "--", "validation"), ("eval", ":", "test, not used for any choice"))


def _groups(history: List[Dict[str, float]]) -> Dict[str, List[Dict[str, float]]]:
    """Records split by the setting they were trained with (an MLP head's weight decays)."""
    groups: Dict[str, List[Dict[str, float]]] = {}
    for record in history:
        key = f" wd={record['weight_decay']:g}" if "weight_decay" in record else ""
        groups.setdefault(key, []).append(record)
    return groups


def plot_curves(histories: Dict[str, List[Dict[str, float]]], path: str) -> None:
    """Loss and accuracy per epoch; records without epochs (the linear head's regularization
    path) in a third panel, validation accuracy against the L2 strength."""
    plt = _plt()
    paths = {f"{name} {part}" if part else name: [r for r in h if r.get("part") == part]  # a line per backbone
             for name, h in histories.items() if h and "epoch" not in h[0] and "val_accuracy" in h[0]
             for part in dict.fromkeys(r.get("part") for r in h)}
    fig, axes = plt.subplots(1, 3 if paths else 2, figsize=(15 if paths else 10, 4))
    loss_ax, acc_ax = axes[0], axes[1]
    for name, history in histories.items():
        if not history or name in paths or "epoch" not in history[0]:  # (an untuned head: nothing to draw)
            continue
        for setting, records in _groups(history).items():
            epochs = [h["epoch"] for h in records]
            for key, style, label in _CURVES:
                if f"{key}_loss" in records[0]:
                    loss_ax.plot(epochs, [h[f"{key}_loss"] for h in records], style, label=f"{name}{setting} {label}")
                if f"{key}_accuracy" in records[0]:
                    acc_ax.plot(epochs, [h[f"{key}_accuracy"] for h in records], style,
                                label=f"{name}{setting} {label}")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss per epoch")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy per epoch", ylim=(0, 1))
    if paths:
        path_ax = axes[2]
        shrinkages = {name: [h for h in history if "shrinkage" in h] for name, history in paths.items()}
        for name, history in paths.items():
            strengths = [h for h in history if "weight_decay" in h]
            path_ax.plot([h["weight_decay"] for h in strengths], [h["val_accuracy"] for h in strengths], "o-",
                         label=f"{name} validation")
        path_ax.set(xscale="log", xlabel="L2 strength (weight decay)", ylabel="validation accuracy",
                    title="linear head: regularization path")
        if any(shrinkages.values()):  # cross-validated few-shot heads also tried shrinkage LDA: its own scale
            lda_ax = path_ax.twiny()
            for name, records in shrinkages.items():
                lda_ax.plot([h["shrinkage"] for h in records], [h["val_accuracy"] for h in records], "s--",
                            color="tab:red", label=f"{name} shrinkage LDA")
            lda_ax.set(xlabel="LDA shrinkage (top axis)", xlim=(0, 1))
            lda_ax.legend(fontsize=7, loc="lower left")
            path_ax.set_ylabel("cross-validated accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _tight_layout(fig)
    _save(fig, path)


def _save(fig, path: str) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # what a layout left past an edge is kept
    _plt().close(fig)
    write_atomic(path, buffer.getvalue())


def _recall_cell(recall) -> str:
    return "n/a (no test image)" if recall is None else f"{recall:.3f}"


def _choices(results: Dict[str, Dict[str, object]]) -> List[str]:
    """What each model chose on its validation split (never on test)."""
    lines = []
    for name, result in results.items():
        choice = (result.get("notes") or {}).get("choice")
        if not choice:
            continue
        validation = choice.get("validation", {})
        settings = ", ".join(f"{key.replace('_', ' ')} {value:g}" if isinstance(value, float) else
                             f"{key.replace('_', ' ')} {value}" for key, value in choice.items()
                             if key in ("weight_decay", "shrinkage", "logit_adjustment", "epochs", "lr_scale",
                                        "epoch_kept", "regularize", "temperature", "alpha", "distill_features"))
        if "shrinkage" in choice:
            settings = f"the linear head as shrinkage LDA, {settings}"
        if isinstance(choice.get("parts"), list):
            settings = "one linear head per backbone, averaged (" + "; ".join(
                f"{markdown_cell(str(part.get('backbone')))}: " + (
                    f"shrinkage LDA {part.get('shrinkage'):g}, temperature {part.get('temperature', 1):.3g}"
                    if "shrinkage" in part else f"L2 strength {part.get('weight_decay'):g}")
                + (f", alone {part['cv_accuracy']:.4f} cross-validated" if "cv_accuracy" in part else "")
                for part in choice["parts"]) + ")"
        if not validation.get("validation_images"):  # one image per class: nothing could be held out
            lines += [f"- **{name}**: {settings}, the defaults: no class had two training images, so no "
                      f"validation split could be carved and nothing was tuned. The test split was evaluated once."]
            continue
        on = (f"by {choice['cross_validation']} cross-validation on all {validation['cross_validated_images']} "
              f"training images (seed {validation.get('seed', '?')})" if validation.get("cross_validated_images") else
              f"on {validation['validation_images']} validation images ({validation.get('fraction', 0):.0%} of each "
              f"class, seed {validation.get('seed', '?')})")
        lines += [f"- **{name}**: {settings}, chosen {on}"
                  + (f": cross-validated accuracy {choice['cv_accuracy']:.4f}" if "cv_accuracy" in choice else
                     f": validation accuracy {choice['val_accuracy']:.4f}" if "val_accuracy" in choice else "")
                  + (f", balanced {choice['val_balanced_accuracy']:.4f} (training classes imbalanced "
                     f"{choice['class_imbalance']:.0f}:1: the logit adjustment was chosen on balanced accuracy)"
                     if "val_balanced_accuracy" in choice else "")
                  + f"; then refit on {choice.get('refit_on', 'train')}. The test split was evaluated once, at the end."
                  + (f" Result: {choice['outcome']}." if choice.get("outcome") else "")]
    return ["", "## Choices made on validation", ""] + lines if lines else []


def _plan(results: Dict[str, Dict[str, object]]) -> List[str]:
    """--budget: why this model (fasttl.transfer.planner): every candidate screened, its
    validation score and planned cost, and what was passed over."""
    plan = next(((r.get("notes") or {}).get("plan") for r in results.values() if (r.get("notes") or {}).get("plan")),
                None)
    if not isinstance(plan, dict):
        return []
    probe = plan.get("probe", {})
    lines = ["", "## Why this model", "",
             f"Budget {markdown_cell(str(plan.get('budget')))} ({plan.get('budget_s', 0):.0f} s); the run took "
             f"{plan.get('wall_s', 0):.0f} s, planned {plan.get('planned_s', 0):.0f} s. Candidates were screened on "
             + ("all" if probe.get("all_training_images") else "a seeded probe of")
             + f" {probe.get('images')} training images (at most {probe.get('per_class_at_most')} a class), each "
             "scored on validation data carved from them (never the test split); the best whose full run fit what "
             "was left of the budget was trained." + _pins(plan.get("pinned"))
             + (" No candidate could be scored (no class has two training images): the choice is the defaults', "
                "not a validated one." if all(str(c.get("scored_by", "")).startswith("none")
                                               for c in plan.get("candidates", [])) else "")
             + (f" The chosen candidate's score is over {(plan.get('chosen') or {}).get('scored_images')} held-out "
                "images only: too few to tell the candidates apart (equal scores go to the defaults)."
                if plan.get("scored_too_few") else "")
             + (" With few images, the linear candidates of more backbones side by side come first, then the "
                "score: one cross-validated head per backbone, averaged, scored above the single backbone that "
                "cross-validation ranked best, on training images no benchmark draws (cross-validation on so few "
                "images can't see it; benchmarks/RESULTS.md, \"Few images: one head per backbone, averaged\")."
                if plan.get("more_backbones_first") else "")
             + (" Cross-validation scores the training views, so mirror views test and none score alike: the "
                "plan kept the defaults' test (not a validated choice)."
                if (plan.get("chosen") or {}).get("mirror_views") == "test"
                and str((plan.get("chosen") or {}).get("scored_by", "")).startswith("cross") else ""),
             "", "| backbone | size | extraction | head | mirror views | validation score | planned full run (s) | |",
             "|---|---|---|---|---|---|---|---|"]
    chosen = plan.get("chosen") or {}
    for c in plan.get("candidates", []):
        mark = "**chosen**" if all(c.get(k) == chosen.get(k) for k in ("backbone", "image_size", "head",
                                                                         "mirror_views")) else ""
        lines.append(f"| {markdown_cell(str(c.get('backbone')))} | {c.get('image_size')} | "
                     f"{markdown_cell(str(c.get('precision', 'fp32')))} | {c.get('head')} | "
                     f"{c.get('mirror_views')} | {_score_cell(c)} | "
                     f"{c.get('planned_s', 0):.0f} | {mark} |")
    lines += [f"- not screened: {markdown_cell(str(s.get('what')))}: {markdown_cell(str(s.get('why')))}"
              for s in plan.get("skipped", [])]
    return lines


def _score_cell(candidate: dict) -> str:
    score = candidate.get("score")
    shown = f"{score:.4f}" if isinstance(score, (int, float)) and not isinstance(score, bool) else "n/a"
    return f"{shown} ({candidate.get('scored_by')})"


def _pins(pinned) -> str:
    """The options given beside --budget, as the report says them."""
    if not isinstance(pinned, dict) or not pinned:
        return ""
    shown = ", ".join(f"{str(k).replace('_', ' ')} {markdown_cell(str(v))}" for k, v in pinned.items())
    return f" Kept as given: {shown}."


def _views_note(config: Dict[str, object]) -> str:
    """The views a feature-transfer run trained on and averaged at test (--mirror-views)."""
    from fasttl.transfer import registry
    from fasttl.transfer.caching import views_of

    strategy = config.get("strategy")
    if strategy not in registry.names() or not registry.get(strategy).reads_option("mirror_views"):
        return ""

    def named(views, both: str):
        return f"plain and mirrored ({both})" if len(views) == 2 else "plain"

    return (f"; views: train {named(views_of(config, 'train'), 'each a row the head trains on')}, "
            f"test {named(views_of(config, 'test'), 'logits averaged')}")


def _training_note(config: Dict[str, object]) -> str:
    """Epochs, batch and lr, said of the models that read them (a linear head reads none)."""
    from fasttl.transfer import registry

    trained = [name for name in (config.get("strategy"), config.get("compare")) if name in registry.names()]
    readers = [name for name in trained if registry.get(name).training_options]
    if not readers:
        return ""
    who = "" if readers == trained else f" ({' and '.join(readers)})"
    return f"{config.get('epochs')} epochs, batch {config.get('batch_size')}, lr {config.get('lr')}{who}, "


def _backbone_note(config: dict) -> str:
    """The backbone and its extraction, where a trained strategy runs one (the small CNNs of
    scratch and distill train at the images' native size: their report names none)."""
    from fasttl.transfer import registry

    trained = [name for name in (config.get("strategy"), config.get("compare")) if name in registry.names()]
    if not any(registry.get(name).reads_option("backbone") for name in trained):
        return f"The small CNN at the images' native size ({config.get('native_size')} px), "
    return (f"Backbone `{config.get('backbone')}`, image size {config.get('image_size')} px, features "
            f"{config.get('features', 'head')}, ")


def write_report(run_dir: str, config: Dict[str, object], results: Dict[str, Dict[str, object]],
                 dataset_line: str, main: str) -> None:
    """report.md: the run's configuration, a table of each trained model beside the others
    (transfer beside scratch), per-class recall, timings and the plots."""
    names = list(results)
    lines = [f"# fasttl run: {main}", "", dataset_line, "",
             _backbone_note(config) + _training_note(config) + f"seed {config.get('seed')}, device "
             f"{config.get('device')}" + _views_note(config) + ".",
             "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in (("accuracy", "top-1 accuracy"), ("balanced_accuracy", "balanced accuracy"),
                       ("macro_f1", "macro F1"), ("loss", "test loss")):
        lines.append(f"| {label} | " + " | ".join(f"{results[n]['metrics'][key]:.4f}" for n in names) + " |")
    for key, label in (("train_s", "train time (s)"), ("extract_s", "feature extraction (s)"),
                       ("eval_s", "evaluation (s)"), ("train_images_per_s", "train images/s")):
        if any(key in results[n]["timings"] for n in names):
            lines.append(f"| {label} | " + " | ".join(
                f"{results[n]['timings'][key]:.1f}" if key in results[n]["timings"] else "-" for n in names) + " |")
    if len(names) > 1:
        gap = results[names[0]]["metrics"]["accuracy"] - results[names[1]]["metrics"]["accuracy"]
        lines += ["", f"**{names[0]} vs {names[1]}: {gap:+.1%} accuracy.**"]
    classes = results[names[0]]["metrics"]["classes"]
    lines += ["", "## Per-class recall", "", "| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in classes:
        lines.append(f"| {markdown_cell(c)} | "
                     + " | ".join(_recall_cell(results[n]['metrics']['per_class_recall'][c]) for n in names) + " |")
    lines += _choices(results)
    lines += _plan(results)
    lines += ["", "![confusion matrix](confusion_matrix.png)", "", "![curves](curves.png)", ""]
    write_atomic(os.path.join(run_dir, "report.md"), "\n".join(lines).encode())


def _tight_layout(fig) -> None:
    """tight_layout where the labels allow it; matplotlib's warning that long ones do not is no
    message for the user (the figure is written either way)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
