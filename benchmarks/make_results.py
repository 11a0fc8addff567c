"""Regenerates benchmarks/RESULTS.md from the JSON files in benchmarks/results/ (written by
`fasttl bench NAME --json benchmarks/results/NAME-DEVICE.json`). Never edit RESULTS.md by hand."""
import json
import statistics
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
GOALS = {
    "distill": "Goal: at least 2x faster than torch.compile and 6x faster than the fastest eager PyTorch formula, at 8192 x 1000 and 256 x 32000, fp32 forward + backward, in the same run on the 2-core CPU.",
    "data": "Goal: the pipeline is never the bottleneck: DALI delivers at least 3x the backbone's forward throughput at the same size.",
    "cache": "Goals: a cached epoch at least 50x faster than a recompute epoch; gather at least 50% of copy bandwidth.",
    "cache-scale": "Goals: anonymous memory (RssAnon) after open and at the epoch's peak under 300 MB above the interpreter's baseline; epoch throughput at least 20% of the memory copy's; open time flat in the row count, epoch time linear; a shuffled epoch over 2,000,000 x 512 fp16 rows at least 40% of the copy bandwidth with another process loading the machine (issue 32: met by shuffle=blocks, the block shuffle built for it).",
    "adam": "Goals: fp32 no slower than 1.1x torch fused AdamW; bf16 + master weights at least 1.3x faster than the PyTorch two-step way.",
}


def plot_speedups(payloads):
    """One bar chart of every CPU benchmark's ratios (fasttl bench's own plot), beside RESULTS.md."""
    from fasttl.bench.runner import plot

    results = [r for p in payloads if p["device"] == "cpu" and not p.get("quick") for r in p["results"]]
    if not results:
        return None
    path = HERE / "results" / "speedups-cpu.png"
    tmp = path.with_name(path.stem + ".tmp.png")
    plot({"results": results}, str(tmp))
    tmp.replace(path)
    return path


def parity_section(path: pathlib.Path) -> list:
    """Drop-in parity: each behaviour beside torch's, measured by benchmarks/parity_catalogue.py."""
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    m = r["machine"]
    parts = ["## Drop-in parity with PyTorch", "",
             f"Each place where a fasttl piece once behaved differently from the PyTorch piece it replaces, measured "
             f"again beside torch: `{r['command']}` ({m['cpu']}, torch {m['torch']}, {m['date']}). The tests named "
             "hold each behaviour.", "",
             "| behaviour | before | torch | fasttl now | tests |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        parts.append(f"| {row['behaviour']} | {row['before']} | {row['torch']} | {row['fasttl']} | "
                     f"`{row['tests']}` |")
    return parts + [""]


def resync_section(path: pathlib.Path) -> list:
    """What the masters' resync costs the fused step (benchmarks/ab_builds.py)."""
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    m = r["machine"]
    paired = [a / b for a, b in zip(r["kernel_this_ms"], r["kernel_base_ms"])]
    quartiles = statistics.quantiles(paired, n=4)
    return ["## What following edits costs the fused AdamW step", "",
            f"`python benchmarks/ab_builds.py BASE_SITE --rounds {r['rounds']}`: the bf16 + fp32-master step over 25M "
            f"params in 160 tensors, this build beside {r.get('base_build', 'the build before masters followed edits')}"
            f", in alternating processes ({m['cpu']}, {m['cores']} cores, load {m.get('load_1m')}, {m['date']}).", "",
            "| measured | with the check | without | ratio |", "|---|---|---|---|",
            f"| the native call alone (ms, median of {r['rounds']} processes x 21 steps) | "
            f"{r['kernel_this_median_ms']:.2f} | {r['kernel_base_median_ms']:.2f} | {r['kernel_ratio']:.3f} |",
            f"| the whole opt.step() (ms) | {r['step_this_median_ms']:.2f} | {r['step_base_median_ms']:.2f} | "
            f"{r['step_ratio']:.3f} |", "",
            f"Paired per process, the native call's ratio has median {statistics.median(paired):.3f} and interquartile "
            f"range {quartiles[0]:.3f} to {quartiles[2]:.3f}: at the 3% goal within this machine's run-to-run "
            "noise, not clearly below it (two shorter runs of 9 rounds the same day gave 1.017 and 1.049). The check "
            "reads each bf16 param before it is written (2 more bytes per param on a step that moves 28) and "
            "compares it with the master's rounding; "
            "written with store<bf16>'s NaN branch the same check cost 6 to 8% (1.064 and 1.082 the same day), as "
            "that select is most of the check's arithmetic. Only a NaN master is treated differently.", ""]


def robustness_section(path: pathlib.Path) -> list:
    """The catalogue of hostile inputs: cases per area, and what they did before and after."""
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    columns = r["columns"]
    parts = ["## Robustness: hostile input", "",
             f"Machine: {r['machine']}; date {r['date']}. Command: `{r['command']}` (every case is a test; "
             "each asserts the exit code or exception, that the message names the culprit, and that no file "
             "outside the intended output changed).", "",
             "| area | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    totals_before, totals_after = [0] * len(columns), [0] * len(columns)
    for area in r["areas"]:
        cells = [f"{b} -> {a}" if i else str(b) for i, (b, a) in enumerate(zip(area["before"], area["after"]))]
        totals_before = [t + b for t, b in zip(totals_before, area["before"])]
        totals_after = [t + a for t, a in zip(totals_after, area["after"])]
        parts.append(f"| {area['area']} | " + " | ".join(cells) + " |")
    parts.append("| **all** | " + " | ".join([str(totals_before[0])] + [f"{b} -> {a}" for b, a in
                                                                        zip(totals_before[1:], totals_after[1:])])
                 + " |")
    parts += ["", "Each cell: before the hardening -> now. How the before column was found:"]
    parts += [f"- {area['area']} ({area['tests']}): {area['how']}." for area in r["areas"]]
    f = r["fuzz"]
    parts += ["", f"Fuzzing (`tests/test_op_fuzz.py`, seeded by the test id): {f['calls_per_run']} raw-op calls per "
                  f"run, {f['accepted_equal_to_reference']} accepted and equal to the float64 reference, "
                  f"{f['refused']} refused naming the argument; {f['extra_seeds_checked']} more seeds "
                  f"({f['extra_calls']} calls) checked once, clean. The same calls against the replaced code: "
                  f"{f['same_calls_against_replaced_code']}. {f['randomly_damaged_images_through_dali']} randomly "
                  "damaged images that pass the structure check went through DALI without a crash.", ""]
    return parts


def _accuracy_per_minute(rows: list, extract_path: pathlib.Path) -> list:
    """What each (backbone, size) costs on full CIFAR-10 (60,000 images through the backbone at the
    measured multi-stage extraction rate of the default engine) beside what it scores above."""
    if not extract_path.exists():
        return []
    bench = json.loads(extract_path.read_text())["results"][0]
    rates = {}
    for row in bench["rows"]:
        if row["taps"] > 0 and row["precision"] == "fp32":
            key = (row["backbone"], row["size"])
            rates[key] = max(rates.get(key, 0.0), row["images_per_s"])
    parts = ["", "Cost of each on full CIFAR-10 (60,000 images through the backbone once, at the fastest fp32 "
             "engine's multi-stage rate from `fasttl bench extract`, benchmarks/results/extract-cpu.json). That "
             "benchmark ran while other jobs shared the two cores: compare the rows with each other, not with "
             "a wall clock.", "",
             "| backbone | size | images/s | extraction of 60,000 images (min) | accuracy above (4 stages) |",
             "|---|---|---|---|---|"]
    for (backbone, size), rate in sorted(rates.items()):
        accuracy = next((row["test_accuracy"] for row in rows if (row["backbone"], row["size"], row["taps"]) ==
                         (backbone, size, 4)), None)
        parts.append(f"| {backbone} | {size} px | {rate:.0f} | {60000 / rate / 60:.1f} | "
                     + (f"{accuracy:.4f} |" if accuracy is not None else "- |"))
    return parts


def feature_transfer_section(path: pathlib.Path) -> list:
    """Issue 13's grid: validation-tuned linear-head accuracy per backbone, input size and number
    of tapped stages (benchmarks/feature_grid.py)."""
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    rows = [row for row in r["rows"] if row["scaling"] == "block"]
    configs = sorted({(row["backbone"], row["size"], row["train_per_class"], row["test_per_class"]) for row in rows})
    taps = sorted({row["taps"] for row in rows})
    parts = ["## Feature transfer: backbone, size and features", "",
             f"Machine: {r['machine']}; date {r['date']}. Command: `python benchmarks/feature_grid.py BACKBONE SIZE` "
             "(CIFAR-10 JPEGs from ../shared: 500 training and 200 test images per class). Test accuracy of the "
             "linear head whose L2 strength was chosen on a 10% validation split of the training images, then "
             "refit on all of them; columns: how many intermediate stages the cached vector pools beside the "
             "head's 1280 features (0 = `--features head`, 4 = `--features multi`). Standard error of one "
             "accuracy: about 0.009.", "",
             "| backbone | size | " + " | ".join(f"{t} stages" for t in taps) + " | chosen L2 (4 stages) |",
             "|---|---|" + "---|" * (len(taps) + 1)]
    for backbone, size, train, test in configs:
        cells = {row["taps"]: row for row in rows if (row["backbone"], row["size"], row["train_per_class"],
                                                     row["test_per_class"]) == (backbone, size, train, test)}
        parts.append(f"| {backbone} | {size} px | " + " | ".join(
            f"{cells[t]['test_accuracy']:.4f}" if t in cells else "-" for t in taps)
            + (f" | {cells[4]['weight_decay']:g} |" if 4 in cells else " | - |"))
    parts += _accuracy_per_minute(rows, path.parent / "extract-cpu.json")
    other = [row for row in r["rows"] if row["scaling"] != "block"]
    if other:
        parts += ["", "The same heads with every feature standardized on its own instead of the block scaling "
                  "fasttl uses (each stage's block centered and divided by one number):", "",
                  "| backbone | size | stages | per-feature standardization | block scaling |", "|---|---|---|---|---|"]
        for row in other:
            block = next((b for b in rows if (b["backbone"], b["size"], b["taps"], b["train_per_class"]) ==
                          (row["backbone"], row["size"], row["taps"], row["train_per_class"])), None)
            parts.append(f"| {row['backbone']} | {row['size']} px | {row['taps']} | {row['test_accuracy']:.4f} | "
                         + (f"{block['test_accuracy']:.4f} |" if block else "- |"))
    return parts + [""]


def lpft_section(path: pathlib.Path) -> list:
    """Issue 18's table (benchmarks/lpft_table.py): model transfer against its own linear probe
    over training-set size."""
    if not path.exists():
        return []
    rows = json.loads(path.read_text())["rows"]
    sizes = sorted({(r["classes"], r["train_per_class"], r["image_size"]) for r in rows})
    first = rows[0]
    parts = ["## Fine-tuning against its own linear probe (LP-FT)", "",
             f"Machine: {first['machine']}; date {first['date']}. Command: `python benchmarks/lpft_table.py SIZE` "
             "(CIFAR-10 JPEGs from ../shared; 5x40: the first five classes, 40 training and 200 test images per "
             "class; 10xN: all ten, N training and 100 test images per class). Wall time: the whole `fasttl run` "
             "process, building its feature cache included (each size starts from an empty cache, which the "
             "linear run builds and the LP-FT runs reuse: LP-FT's probe is `linear`'s, on the same features). Epochs: run / kept on "
             "validation (0 = the probe itself). Standard error of one accuracy: about 0.015 at 1,000 test images.",
             "", "Goal: LP-FT at its defaults at least the linear probe's accuracy at every size, and at "
             "least 2 points above it at 500/class.", ""]
    for classes, per_class, size in sizes:
        group = [r for r in rows if (r["classes"], r["train_per_class"], r["image_size"]) == (classes, per_class, size)]
        parts += [f"### {classes} classes, {per_class} training images per class, {size} px", "",
                  "| model | accuracy | wall s | epochs run / kept | lr scale | command |", "|---|---|---|---|---|---|"]
        for r in group:
            epochs = "-" if r.get("epochs_run") is None else (
                f"{r['epochs_run']}" + (f" / {r['epoch_kept']}" if r.get("epoch_kept") is not None else ""))
            scale = "-" if r.get("lr_scale") is None else f"{r['lr_scale']:g}"
            parts.append(f"| {r['variant']} | {r['accuracy']:.4f} | {r['wall_s']:.1f} | {epochs} | {scale} | "
                         f"`{r['command']}` |")
        linear = next((r for r in group if r["variant"] == "linear"), None)
        lpft = next((r for r in group if r["variant"] == "LP-FT (default)"), None)
        if linear and lpft:
            parts += ["", f"LP-FT (default) - linear: {100 * (lpft['accuracy'] - linear['accuracy']):+.1f} points."]
        if lpft and lpft.get("outcome"):
            parts += ["", f"LP-FT's result: {lpft['outcome']}."]
        parts.append("")
    notes = json.loads(path.read_text()).get("notes", [])
    return parts + [f"- {note}" for note in notes] + ([""] if notes else [])


def distill_student_section(path: pathlib.Path) -> list:
    """Issue 14's measurement (benchmarks/distill_pair.py): the distilled student beside its
    from-scratch twin on the same test images."""
    if not path.exists():
        return []
    rows = json.loads(path.read_text())["rows"]
    parts = ["## Distillation: the student against its from-scratch twin", "",
             "Command per row: `python benchmarks/distill_pair.py STUDENT_RUN [TWIN_RUN]` after the `fasttl run` "
             "shown. Difference: student minus twin on the same test images, with its standard error (from the "
             "images where the two disagree). Goal: at least +2 points.", "",
             "| run | train images | epochs | teacher (test) | teacher logits (accuracy on train) | T, alpha | "
             "feature term | student | twin | difference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        teacher = ", ".join(f"{v:.4f}" for v in (r.get("teacher_test_accuracy") or {}).values() if v is not None)
        choice, paired = r.get("choice", {}), r["paired"]
        feature = {True: "kept", False: "dropped on validation"}.get(choice.get("distill_features"), "off")
        on_train = r.get("teacher_train_accuracy")
        logits = r.get("teacher_logits", "in-sample") + ("" if on_train is None else f" ({on_train:.4f})")
        parts.append(f"| {r['name']} | {r['train_images']} | {r['epochs']} | {teacher} | {logits} | "
                     f"{choice.get('temperature')}, {choice.get('alpha')} | {feature} | {r['student_accuracy']:.4f} | "
                     f"{r['twin_accuracy']:.4f} | {100 * paired['difference']:+.2f} +- "
                     f"{100 * paired['standard_error']:.2f} |")
    return parts + _provenance(rows, lambda r: f"{r['name']}:")


def _provenance(rows: list, describe) -> list:
    """A table's closing lines: what each row is and the command, machine and date that made it."""
    return [""] + [f"- {describe(r)} `{r['command']}`; {r['machine']}, {r['date']}." for r in rows] + [""]


def mirror_views_section(path: pathlib.Path) -> list:
    """Why --mirror-views defaults to test (benchmarks/mirror_views.py): the validation accuracy
    each way of scoring validation chooses along the L2 path, the plain view alone or both views'
    logits averaged."""
    if not path.exists():
        return []
    parts = ["## Mirror views at test", "",
             "Validation splits only (10% of the training images, per seed). The head trains on the plain view; "
             "\"plain\" scores each L2 strength on the plain validation images, \"averaged\" on the mean of their "
             "plain and mirrored logits (what `--mirror-views test` does, and what its test split gets). Each "
             "column is the best strength on its own score.", "",
             "| run | train images | seed | validation images | plain: L2, accuracy | averaged: L2, accuracy | "
             "difference |", "|---|---|---|---|---|---|---|"]
    rows = json.loads(path.read_text())["rows"]
    for r in rows:
        for s in r["splits"]:
            best = {k: max(s[k], key=lambda wd: s[k][wd]) for k in ("plain", "averaged")}  # first of equals
            plain, averaged = s["plain"][best["plain"]], s["averaged"][best["averaged"]]
            parts.append(f"| {r['name']} | {s['train_images'] + s['validation_images']} | {s['seed']} | "
                         f"{s['validation_images']} | {float(best['plain']):g}, {plain:.4f} | "
                         f"{float(best['averaged']):g}, {averaged:.4f} | {100 * (averaged - plain):+.2f} |")
    return parts + _provenance(rows, lambda r: f"{r['name']}: {r['backbone']} at {r['image_size']} px, "
                                              f"{r['features']} features;")


def few_shot_section(path: pathlib.Path) -> list:
    """The linear head's L2 strength chosen on one 10% split or by 5-fold cross-validation
    (benchmarks/few_shot.py): accuracy on the design split (training images never drawn, where
    tuning.CROSS_VALIDATION_BELOW was read) and on the test split, mean over the draws."""
    if not path.exists():
        return []
    parts = ["## Few images: one validation split or cross-validation", "",
             "K training images per class drawn per seed; the linear head's L2 strength chosen on one 10% "
             "validation split (\"split\"), or by stratified 5-fold cross-validation on all K (\"folds\") among "
             "the L2 strengths and, in rows that record it, shrinkage LDA (\"LDA\": the draws where folds chose it). "
             "\"design\": accuracy on training images never drawn, where the size below which fasttl "
             "cross-validates was chosen; \"test\": the test split, reported only. Mean over the draws, with the "
             "standard error of the paired difference.", "",
             "| run | K per class | draws | design: split | folds | difference | test: split | folds | LDA |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = json.loads(path.read_text())["rows"]
    for r in rows:
        for size in r["sizes"]:
            draws = size["draws"]

            def mean(way, part):
                return sum(d[way][part] for d in draws) / len(draws)

            gaps = [d["folds"]["design"] - d["split"]["design"] for d in draws]
            spread = (sum((g - sum(gaps) / len(gaps)) ** 2 for g in gaps) / max(1, len(gaps) - 1)) ** 0.5
            parts.append(f"| {r['name']} | {size['per_class']} | {len(draws)} | {mean('split', 'design'):.4f} | "
                         f"{mean('folds', 'design'):.4f} | {100 * sum(gaps) / len(gaps):+.2f} +- "
                         f"{100 * spread / len(gaps) ** 0.5:.2f} | {mean('split', 'test'):.4f} | "
                         f"{mean('folds', 'test'):.4f} | {_lda_draws(r, draws)} |")
    return parts + _provenance(rows, lambda r: f"{r['name']} ({' '.join(r['classes'])}): {r['backbone']} at "
                                              f"{r['image_size']} px, {r['features']} features, plain view;")


def _lda_draws(row, draws) -> str:
    """How many draws' cross-validation chose shrinkage LDA; '-' for rows from before it was offered."""
    if "shrinkage" not in row.get("offered", ()):
        return "-"
    return f"{sum('shrinkage' in d['folds'] for d in draws)} of {len(draws)}"


def long_tail_section(path: pathlib.Path) -> list:
    """The linear head with and without its logit adjustment on long-tailed training data
    (benchmarks/long_tail.py), scored on a balanced test set."""
    if not path.exists():
        return []
    parts = ["## Long-tailed data", "",
             "CIFAR-10 training classes with 200 down to 2 images (imbalance 100, exponential profile; which classes "
             "are rare is drawn per seed), a balanced test set. \"without\": the head as before (fit to the training "
             "prior); \"with\": the logit adjustment (tau and the L2 strength chosen on the validation split by "
             "balanced accuracy). Balanced accuracy is the mean per-class recall.", "",
             "| run | seed | balanced accuracy without | with | accuracy without | with | tau chosen |",
             "|---|---|---|---|---|---|---|"]
    rows = json.loads(path.read_text())["rows"]
    for r in rows:
        for s in r["seeds"]:
            parts.append(f"| {r['name']} | {s['seed']} | {s['without']['balanced_accuracy']:.4f} | "
                         f"{s['with']['balanced_accuracy']:.4f} | {s['without']['accuracy']:.4f} | "
                         f"{s['with']['accuracy']:.4f} | {s['with']['logit_adjustment']} |")
        gains = [s["with"]["balanced_accuracy"] - s["without"]["balanced_accuracy"] for s in r["seeds"]]
        parts.append(f"| {r['name']} | mean | | | | | balanced accuracy {100 * sum(gains) / len(gains):+.1f} points "
                     f"(from {100 * min(gains):+.1f} to {100 * max(gains):+.1f}) |")
    return parts + _provenance(rows, lambda r: f"{r['name']}: {r['backbone']} at {r['image_size']} px, "
                                              f"{r['features']} features, {r['test_per_class']} test images per class;")


def budget_section(path: pathlib.Path) -> list:
    """`fasttl run --budget` over data shapes x budgets beside the defaults (benchmarks/budget_table.py)."""
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    parts = ["## Budget planner (`fasttl run --budget`)", "",
             f"Machine: {record['machine']}; date {record['date']}. Command: `{record['command']}`. Each run in a "
             "fresh process from an empty feature cache (graphs exported, every image extracted; the per-machine "
             "speed record kept). \"default\": `fasttl run` with no budget. Every choice was made on the training "
             "images (cross-validated probe); the test split was scored once per run.", "",
             "| data | budget | accuracy | balanced accuracy | wall s | planned s | chosen (backbone, size, mirror "
             "views, head) |", "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if "error" in r:
            parts.append(f"| {r['shape']} | {r['budget']} | - | - | {r['wall_s']:.0f} | - | {r['error']} |")
            continue
        c = r["chosen"]
        planned = f"{r['planned_s']:.0f}" if "planned_s" in r else "-"
        parts.append(f"| {r['shape']} | {r['budget'] or 'default'} | {r['accuracy']:.4f} | "
                     f"{r['balanced_accuracy']:.4f} | {r['wall_s']:.0f} | {planned} | {c['backbone']}, "
                     f"{c['image_size']} px, {c['mirror_views']}, {c['strategy']}"
                     + (f", {c['extract_precision']} extraction" if c.get("extract_precision") == "int8" else "")
                     + " |")
    return parts + [""]


def _head_setting(run: dict) -> str:
    """' (shrinkage LDA 0.9)' or ' (L2 1)': the linear head's chosen setting, where the row records it;
    ' (one head per backbone: LDA 0.9, L2 1)' where it averaged one head per backbone."""
    setting = run.get("head_setting") or {}
    if setting.get("parts"):
        return " (one head per backbone, averaged: " + ", ".join(
            f"LDA {p['shrinkage']:g}" if "shrinkage" in p else f"L2 {p.get('weight_decay', 0):g}"
            for p in setting["parts"]) + ")"
    if "shrinkage" in setting:
        return f" (shrinkage LDA {setting['shrinkage']:g})"
    return f" (L2 {setting['weight_decay']:g})" if "weight_decay" in setting else ""


def few_shot_budget_section(path: pathlib.Path) -> list:
    """Few-shot 5x40 over draws of its training images: a budget beside the defaults (benchmarks/few_shot_budget.py)."""
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    summary = record["summary"]
    parts = [f"## Few-shot 5x40 over draws: `--budget {record['budget']}` beside the defaults", "",
             f"Machine: {record['machine']}; date {record['date']}. Command: `{record['command']}`. bird, cat, deer, "
             f"dog and frog: {record['train_per_class']} training images a class drawn per seed, scored on "
             f"{record['test_per_class']} test images a class; each run in a fresh process from an empty feature "
             "cache, every choice made on the training images.", "",
             "| draw | default accuracy | budget accuracy | gain (points) | budget's wall s | chosen (backbone, size, "
             "mirror views, head) |", "|---|---|---|---|---|---|"]
    for r in record["rows"]:
        d, b = r["default"], r["budget"]
        c = b.get("chosen") or {}
        parts.append(f"| {r['draw']} | {d['accuracy']:.4f} | {b['accuracy']:.4f} | "
                     f"{100 * (b['accuracy'] - d['accuracy']):+.2f} | {b['wall_s']:.0f} | {c.get('backbone')}, "
                     f"{c.get('image_size')} px, {c.get('mirror_views')}, {c.get('strategy')}{_head_setting(b)} |")
    parts += ["", f"- Mean gain of `--budget {record['budget']}` over the defaults: "
              f"{summary['mean_gain_points']:+.2f} +- {summary['standard_error']:.2f} points (standard error over "
              f"{summary['draws']} draws)."] + ([f"- {record['note']}"] if record.get("note") else []) + [""]
    return parts


def _budget_seconds(path: pathlib.Path) -> float:
    """few-shot-budget-3m.json -> 180.0: the records in the order of their budgets."""
    budget = path.stem.rsplit("-", 1)[1]
    return float(budget[:-1]) * {"s": 1, "m": 60, "h": 3600}[budget[-1]]


def per_backbone_heads_section(path: pathlib.Path) -> list:
    """One head per backbone, averaged, against the best single by cross-validation, on the design
    split (benchmarks/per_backbone_heads.py)."""
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    parts = ["## Few images: one head per backbone, averaged", "",
             f"Machine: {record['machine']}; date {record['date']}. Command: `{record['command']}`. Design split: "
             "draws of CIFAR-10 training images of bird, cat, deer, dog and frog that no few-shot benchmark draw "
             f"uses, scored on {record['scored_per_class']} other training images a class (never the test split). "
             "Every head is the cross-validated linear head of `fasttl run` (Lite0/1/2 at 160 px, multi-stage, "
             "mirrored scored images averaged); 'best single by CV' is the backbone whose cross-validated accuracy "
             "on the draw's images was highest, what the budget planner chose before.", "",
             "| images a class | draw | Lite0 | Lite1 | Lite2 | best single by CV | Lite1+Lite2 averaged | all three "
             "averaged | all three - best single (points) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        s = r["singles"]
        parts.append(f"| {r['per_class']} | {r['draw']} | {s['efficientnet_lite0']:.4f} | "
                     f"{s['efficientnet_lite1']:.4f} | {s['efficientnet_lite2']:.4f} | {r['best_single']:.4f} "
                     f"({r['best_single_by_cv'].replace('efficientnet_', '')}) | {r['lite1+lite2']:.4f} | "
                     f"{r['all three']:.4f} | {100 * (r['all three'] - r['best_single']):+.2f} |")
    for size in sorted({r["per_class"] for r in record["rows"]}):
        rows = [r for r in record["rows"] if r["per_class"] == size]
        gains = [100 * (r["all three"] - r["best_single"]) for r in rows]
        pair = [100 * (r["lite1+lite2"] - r["best_single"]) for r in rows]
        error = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("nan")
        parts.append(f"- {size} a class: all three averaged {statistics.mean(gains):+.2f} +- {error:.2f} points over "
                     f"the best single by CV (higher on {sum(g > 0 for g in gains)} of {len(gains)} draws); "
                     f"Lite1+Lite2 averaged {statistics.mean(pair):+.2f}.")
    return parts + ([f"- {record['note']}"] if record.get("note") else []) + [""]


def int8_section(path: pathlib.Path) -> list:
    """int8 extraction against fp32 (benchmarks/int8_accuracy.py): the tuned linear probe's
    accuracy on images held out of CIFAR-10's training split, and each engine's extraction rate."""
    if not path.exists():
        return []
    parts = ["## int8 extraction", "",
             "ONNX Runtime fp32 and int8 (static QDQ quantization, per-channel int8 weights, uint8 activations "
             "calibrated on a seeded sample of 64 of the fit images; both splits go through that one graph, as a run's "
             "splits go through the graph its training images calibrated) on the same images. The linear probe "
             "is fit on the \"fit\" images (its L2 strength chosen on their validation split) and scored on the "
             "\"score\" images: both drawn from the training split, never the test split. images/s: the extraction "
             "loop (decode, backbone, pooling, store), without exporting or quantizing the graph.", "",
             "| run | seed | fp32 accuracy | int8 accuracy | difference (points) | fp32 images/s | int8 images/s | "
             "int8 speedup |", "|---|---|---|---|---|---|---|---|"]
    rows = json.loads(path.read_text())["rows"]
    for r in rows:
        for s in r["seeds"]:
            parts.append(f"| {r['name']} | {s['seed']} | {s['fp32']['accuracy']:.4f} | {s['int8']['accuracy']:.4f} | "
                         f"{s['difference_points']:+.2f} | {s['fp32']['images_per_s']:.0f} | "
                         f"{s['int8']['images_per_s']:.0f} | {s['speedup']:.2f}x |")
        gaps = [s["difference_points"] for s in r["seeds"]]
        mean = sum(gaps) / len(gaps)
        spread = (sum((g - mean) ** 2 for g in gaps) / max(1, len(gaps) - 1)) ** 0.5 / len(gaps) ** 0.5
        parts.append(f"| {r['name']} | mean | | | {mean:+.2f} +- {spread:.2f} | | | |")
    return parts + _provenance(rows, lambda r: f"{r['name']}: {r['backbone']} at {r['image_size']} px, "
                                              f"{r['features']} features, {r['fit_per_class']} fit and "
                                              f"{r['score_per_class']} score images per class"
                                              + (f" ({r['note']})" if r.get("note") else "") + ";")


def _headed(title: str, r: dict) -> list:
    """A section's title, then the machine, date and command of its one record."""
    return [f"## {title}", "", f"Machine: {r['machine']}; date {r['date']}. Command: `{r['command']}`.", ""]


def extraction_split_section(path: pathlib.Path) -> list:
    """Decode and inference threads, batch size (benchmarks/extraction_split.py)."""
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    parts = _headed("Extraction: decode and inference threads, batch size", r) + [
             f"The extraction loop (decode, backbone, pooling) over {r['images']} CIFAR-10 training JPEGs, "
             "EfficientNet-Lite0 at 160 px, multi-stage features, ONNX Runtime; the settings alternate within each of "
             f"{r['rounds']} rounds (median, with every round's rate). Decode overlaps inference in every setting: "
             "DALI's threads or the DataLoader's worker processes prepare the next batch while the engine runs. "
             "First row: fasttl's defaults.", "",
             "| precision | decode | decode threads | engine threads | batch | images/s (median) | rounds | "
             "vs defaults |", "|---|---|---|---|---|---|---|---|"]
    for precision in ("fp32", "int8"):
        rows = [x for x in r["rows"] if x["precision"] == precision]
        base = rows[0]["median"]
        for x in rows:
            parts.append(f"| {precision} | {x['backend']} | {x['decode_threads']} | {x['engine_threads']} | "
                         f"{x['batch']} | {x['median']:.0f} | {' / '.join(f'{v:.0f}' for v in x['images_per_s'])} | "
                         f"{x['median'] / base:.2f}x |")
    return parts + ([""] + [r["note"]] if r.get("note") else []) + [""]


def concatenated_speed_section(path: pathlib.Path) -> list:
    """Backbones side by side against their parts (benchmarks/concatenated_speed.py): what the
    budget planner's CONCATENATED_SHARE is."""
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    parts = _headed("Extraction: backbones side by side", r) + [
             f"The extraction loop over {r['images']} CIFAR-10 training JPEGs at {r['image_size']} px, multi-stage "
             f"features, {r['precision']} (ONNX Runtime), each backbone in turn in each of {r['rounds']} rounds (best "
             "round). share: a concatenation's seconds an image over the sum of its parts' (it decodes each image "
             "once for all of them); the budget planner costs a concatenation as its parts' sum times this share.",
             "", "| backbone | images/s | every round | share |", "|---|---|---|---|"]
    for x in r["rows"]:
        parts.append(f"| {x['backbone']} | {x['images_per_s']:.0f} | "
                     f"{' / '.join(f'{v:.0f}' for v in x['per_round_images_per_s'])} | "
                     + (f"{x['share']:.2f} |" if "share" in x else "- |"))
    return parts + [""]


def main() -> None:
    parts = ["# Benchmark results", "",
             "Generated by `python benchmarks/make_results.py` from `benchmarks/results/*.json`; each table",
             "was produced by the command shown above it. Ratios are measured in the same run.", ""]
    payloads = []
    # rendered by their own functions below
    sections = ("robustness.json", "feature-transfer.json", "lpft.json", "distill-student.json",
                "mirror-views.json", "parity.json", "adam-resync-cpu.json", "long-tail.json",
                "few-shot.json", "int8-accuracy.json", "budget-table.json", "extraction-split.json",
                "concatenated-speed.json", "per-backbone-heads.json")
    for path in sorted(p for p in (HERE / "results").glob("*.json")
                       if p.name not in sections and not p.name.startswith("few-shot-budget-")):
        payload = json.loads(path.read_text())
        payloads.append(payload)
        m = payload["machine"]
        for result in payload["results"]:
            name = result["name"]
            quick = " --quick" if payload.get("quick") else ""
            if result.get("mode") == "scale":
                quick += " --scale"
            subset = result.get("subset")
            if subset and not payload.get("quick"):
                quick += f" --e2e-subset {subset['train_per_class']},{subset['test_per_class']}"
            title = f"## {name}{' at scale' if result.get('mode') == 'scale' else ''} ({payload['device']})"
            if subset:
                title += f", {subset['train_per_class']} training images per class"
            parts += [title, "",
                      f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads"
                      + (f", GPU {m['gpu']}" if m.get("gpu") else "")
                      + f"; torch {m['torch']}, fasttl {m['fasttl']}; date {m['date']}.", "",
                      f"Command: `fasttl bench {name} --device {payload['device']}{quick} --json benchmarks/results/{path.name}`", ""]
            goal = GOALS.get(f"{name}-{result['mode']}" if result.get("mode") else name)
            if goal:
                parts += [goal, ""]
            parts += [result["table"], ""]
            for note in result.get("notes", []):
                parts += [f"- {note}"]
            if result.get("notes"):
                parts.append("")
    chart = plot_speedups(payloads)
    if chart:
        parts[5:5] = [f"![fasttl's ratio over each alternative, every benchmark]({chart.relative_to(HERE)})", ""]
    runs = sorted((HERE / "results" / "runs").glob("*.json"))
    if runs:
        parts += ["## Transfer results (`fasttl run`)", "",
                  "Each row is one run, recorded with `benchmarks/record_run.py` from its run directory. Times in "
                  "seconds (extract: building the feature cache; 0 when an earlier run's cache was reused).", ""]
        for path in runs:
            r = json.loads(path.read_text())
            parts += [f"### {r['name']}", "",
                      f"`{r['command']}`  ", f"{r['dataset']}: {r['train_samples']} train / {r['test_samples']} test "
                      f"images; {r['backbone']} at {r['image_size']} px; {r['epochs']} epochs; {r['device']}; "
                      f"{r['machine']}; {r['date']}.", ""]
            if r.get("goal"):
                parts += [r["goal"], ""]
            parts += ["| model | accuracy | macro F1 | extract s | train s | eval s | whole job s |",
                      "|---|---|---|---|---|---|---|"]
            for name, m in r["models"].items():
                t = m["timings"]
                cells = [f"{t[k]:.1f}" if k in t else "-" for k in ("extract_s", "train_s", "eval_s", "total_s")]
                parts.append(f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | " + " | ".join(cells) + " |")
            parts.append("")
    parts += feature_transfer_section(HERE / "results" / "feature-transfer.json")
    parts += mirror_views_section(HERE / "results" / "mirror-views.json")
    parts += long_tail_section(HERE / "results" / "long-tail.json")
    parts += few_shot_section(HERE / "results" / "few-shot.json")
    parts += budget_section(HERE / "results" / "budget-table.json")
    for path in sorted((HERE / "results").glob("few-shot-budget-*.json"), key=_budget_seconds):
        parts += few_shot_budget_section(path)
    parts += per_backbone_heads_section(HERE / "results" / "per-backbone-heads.json")
    parts += int8_section(HERE / "results" / "int8-accuracy.json")
    parts += extraction_split_section(HERE / "results" / "extraction-split.json")
    parts += concatenated_speed_section(HERE / "results" / "concatenated-speed.json")
    parts += lpft_section(HERE / "results" / "lpft.json")
    parts += distill_student_section(HERE / "results" / "distill-student.json")
    parts += parity_section(HERE / "results" / "parity.json")
    parts += resync_section(HERE / "results" / "adam-resync-cpu.json")
    parts += robustness_section(HERE / "results" / "robustness.json")
    out = HERE / "RESULTS.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
