"""The budget planner's early refusals (fasttl.transfer.planner): a budget below the least any
plan does on this machine, and a first head whose cross-validation alone would not fit, are
refused at once, each with a budget that would do."""
from __future__ import annotations

import time

from fasttl.transfer import budget
from fasttl.transfer.plan_candidates import INT8_GRAPH_S, MARGIN, OVERHEAD_S, SAFETY
from fasttl.util.errors import OptionError

MIN_BUDGET_S = 30.0     # below it no plan can screen one backbone and write a run: refused before any work
# The first head's estimate (_refuse_unaffordable_head): the path's solves (each fold's 4/5 of the
# rows, so folds - 1 probes' worth), the refits, and the share of a cold solve at the strongest
# strength that the path takes per solve on average (0.24 s against 6.3 s for the 60 solves of the
# cross-validated path on the 1,347 digits images: 0.44).
HEAD_REFITS = 4
HEAD_ESTIMATE_SHARE = 0.5


class Refusals:
    """The Planner's refusals (a mixin: they read its budget, probe, speeds and costs)."""

    def _refuse_if_impossible(self) -> None:
        """Before any screening, where this machine's speeds are known: a budget below the least
        any plan does is one error, at once. That least is the first single's screening, then the
        cheapest single's run without mirror views (or, before a head was ever timed here on enough
        rows, the fastest single's extraction alone); its suggestion adds the margin every refusal
        suggests (a budget that passes here may still be refused after the screening measures)."""
        if self.budget_s < MIN_BUDGET_S:
            raise OptionError(f"budget: {self.cfg.budget} is below the {MIN_BUDGET_S:.0f}s any plan needs (one "
                              "backbone screened, the run written); pass --budget 1m or more")
        singles = self._singles()
        speeds = [budget.measured_speed(self._speed_key(b, s)) for b, s in singles]
        if not speeds or None in speeds:
            return
        least = self._least_plan_s(singles, speeds)
        if least is None:
            images = len(self.dataset.train) + len(self.dataset.test)
            least = images / max(speeds) + OVERHEAD_S
            what = f"even the fastest backbone measured on this machine needs at least {{}} to extract its {images} " \
                "images"
        else:
            what = f"screening {singles[0][0]} at {singles[0][1]} px, then the cheapest run, needs at least {{}}"
        least += self.elapsed()
        if least > SAFETY * self.budget_s:
            self.record_used = True
            raise OptionError(f"budget: {self.cfg.budget} is too small for a model on this data here: "
                              f"{what.format(budget.shown(least / SAFETY))}; "
                              f"{budget.suggested(least * MARGIN / SAFETY, least / SAFETY)}{budget.speeds_from()}")

    def _least_plan_s(self, singles, speeds):
        """Seconds of the least a plan does, from this machine's record (None where it holds no
        head rate for the first single): the first single's probe extracted (an int8 graph
        quantized for it) and its head cross-validated, then the cheapest single's run without
        mirror views (a head not timed yet costed at the first's rate)."""
        rates = [budget.measured_head_rate(self._head_key(b)) for b, _ in singles]
        if rates[0] is None:
            return None
        heads = [len(self.probe) * len(self.dataset.classes) / (rate or rates[0]) for rate in rates]
        precisions = [self._precision(b, s) for b, s in singles]
        screen_s = self._probe_images() / speeds[0] + heads[0] + (INT8_GRAPH_S if precisions[0] == "int8" else 0.0)
        return screen_s + min(self._run_cost("none", "linear", head, [speed], precision)
                              for head, speed, precision in zip(heads, speeds, precisions))

    def _refuse_unaffordable_head(self, views) -> None:
        """The first head fit is the one nothing measured bounds (a cross-validated path took
        minutes on a loaded machine): timed first as one cold solve at the strongest strength (as
        each fold's path starts; the warm-started ones after it take fewer iterations) times the
        solves the path makes, after a small solve that pays the solver's first-call set-up, and
        refused at once when that leaves no time for the run."""
        import torch

        from fasttl.heads import solver
        from fasttl.heads.tuning import CROSS_VALIDATION_FOLDS

        x = torch.cat([v.all_features() for v in views]).float()
        y = torch.cat([v.labels for v in views]).long()
        widths = (views[0].fingerprint.get("layout") or {}).get("channels") or [views[0].feature_dim]
        mean, std = solver.block_scaling(x, widths)
        x = (x - mean) / std
        solver.solve(x[:64], y[:64], len(views[0].classes), solver.WEIGHT_DECAYS[0], max_iter=2)  # the set-up
        started = time.perf_counter()
        solver.solve(x, y, len(views[0].classes), solver.WEIGHT_DECAYS[0], max_iter=solver.PATH_MAX_ITER)
        solves = len(solver.WEIGHT_DECAYS) * (CROSS_VALIDATION_FOLDS - 1) + HEAD_REFITS
        needed = (self.elapsed() + (time.perf_counter() - started) * solves * HEAD_ESTIMATE_SHARE + OVERHEAD_S) \
            / SAFETY * MARGIN
        if needed > self.budget_s:
            raise OptionError(f"budget: {self.cfg.budget} is too small for a model on this data here: validating "
                              f"the first head on its {len(x)} probe rows needs {budget.about(needed)} with "
                              f"the screening; {budget.suggested(needed)}")  # (refused with its margin)
