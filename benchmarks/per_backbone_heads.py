"""Few images, several backbones: one cross-validated linear head per backbone, averaged
(fasttl.heads.parts), against the single backbone that cross-validation ranks best, which is
what the budget planner chose before (fasttl.transfer.planner: its candidates of more backbones
now come first where images are few).

Design split only: the draws are made from CIFAR-10 training images of the 5 hard classes (bird,
cat, deer, dog, frog) that no few-shot benchmark draw uses (few_shot_budget.py's seeds 0-4), and
scored on other such training images, never on the test split. Each draw's features go through
the run's own path (transfer.caching.cached_features, Lite0/1/2 at 160 px, multi-stage; the
scored images plain and mirrored, their logits averaged as --mirror-views test does); every head
is tune_linear's cross-validated one, the averages are tune_linear on FeatureCache.side_by_side.

    python benchmarks/per_backbone_heads.py --data ../shared/data/cifar10 [--per-class 40 120]

Writes benchmarks/results/per-backbone-heads.json, which make_results.py renders."""
import argparse
import datetime
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "per-backbone-heads.json")
sys.path.insert(0, HERE)
from budget_table import HARD  # noqa: E402
from record_run import machine_name, write_results  # noqa: E402

LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
BENCHMARK_DRAWS = range(5)  # few_shot_budget.py's seeds: their images are never used here
POOL, SCORED = 240, 400     # training images per class drawn from (6 draws of 40, 2 of 120), and scored on


def design_folder(data: str, out: str, seed: int = 1234) -> str:
    """Class folders of links: train/ holds POOL images a class no benchmark draw uses, test/ the
    next SCORED of them (both from CIFAR-10's training split)."""
    used = {c: set() for c in HARD}
    for draw in BENCHMARK_DRAWS:  # as budget_table.class_subset draws them
        rng = np.random.default_rng(draw)
        for name in HARD:
            files = sorted(os.listdir(os.path.join(data, "train", name)))
            used[name] |= {files[i] for i in rng.choice(len(files), size=40, replace=False)}
    rng = np.random.default_rng(seed)
    for name in HARD:
        files = [f for f in sorted(os.listdir(os.path.join(data, "train", name))) if f not in used[name]]
        order = [files[i] for i in rng.permutation(len(files))[:POOL + SCORED]]
        for split, chosen in (("train", order[:POOL]), ("test", order[POOL:])):
            os.makedirs(os.path.join(out, split, name))
            for f in chosen:
                os.symlink(os.path.join(data, "train", name, f), os.path.join(out, split, name, f))
    return out


def draws(labels, per_class: int):
    """Disjoint draws of `per_class` images a class from the pool (as many as it holds)."""
    by_class = [np.flatnonzero(labels == c) for c in range(len(HARD))]
    for d in range(POOL // per_class):
        yield d, sorted(int(i) for rows in by_class for i in rows[d * per_class:(d + 1) * per_class])


def main() -> None:
    from fasttl import backbones
    from fasttl.cache.cache import FeatureCache
    from fasttl.heads.tuning import tune_linear
    from fasttl.transfer.caching import Extraction, cached_features
    from fasttl.transfer.datasets import load_dataset
    from fasttl.transfer.plan_candidates import score_of

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--per-class", type=int, nargs="+", default=[40, 120])
    args = parser.parse_args()
    torch.manual_seed(0)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FASTTL_CACHE_DIR"] = os.path.join(tmp, "cache")
        dataset = load_dataset(design_folder(os.path.abspath(args.data), os.path.join(tmp, "design")))
        labels, scored = np.asarray(dataset.train.labels), np.asarray(dataset.test.labels)
        extraction = Extraction(160, features="multi")
        nets = {name: backbones.create(name) for name in LITES}
        test = {name: [cached_features(net, dataset.test, "test", extraction, mirror=m, progress=False)
                       for m in (False, True)] for name, net in nets.items()}
        for per_class in args.per_class:
            for draw, rows in draws(labels, per_class):
                source = dataset.train.subset(rows)
                views = {name: cached_features(net, source, "train", extraction, progress=False)
                         for name, net in nets.items()}

                def accuracy(names):
                    tuned = tune_linear([FeatureCache.side_by_side([views[n] for n in names]) if len(names) > 1
                                         else views[names[0]]], seed=0, progress=False)
                    head = tuned.head.eval()
                    with torch.no_grad():
                        logits = sum(head(torch.cat([test[n][m].all_features() for n in names], 1)) for m in (0, 1))
                    return score_of(tuned.choice)[0], float((logits.argmax(1).numpy() == scored).mean())

                singles = {name: accuracy([name]) for name in LITES}
                best = max(LITES, key=lambda n: singles[n][0])  # as the planner ranked them (ties: the first)
                row = {"per_class": per_class, "draw": draw, "singles": {n: s[1] for n, s in singles.items()},
                       "cv": {n: s[0] for n, s in singles.items()}, "best_single_by_cv": best,
                       "best_single": singles[best][1], "lite1+lite2": accuracy(LITES[1:])[1],
                       "all three": accuracy(LITES)[1]}
                print(row, flush=True)
                rows_out.append(row)
    write_results(RESULTS, {"rows": rows_out, "machine": machine_name(), "date": datetime.date.today().isoformat(),
                            "scored_per_class": SCORED, "command": "python benchmarks/per_backbone_heads.py "
                            + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
