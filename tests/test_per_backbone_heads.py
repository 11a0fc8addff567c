"""With few images, features of several backbones side by side get one cross-validated linear head
per backbone, averaged into one linear head (fasttl.heads.parts): the parts found from the
features' own record, the average against float64 arithmetic, the tuned head against each part
tuned alone, its refit, a distillation teacher's record of it, the report's line and the
planner's preference."""
import json
import types
import zlib

import pytest
import torch

from fasttl.cache.cache import FeatureCache
from fasttl.heads import parts, shrinkage, solver, tuning
from fasttl.heads.train import make_head
from fasttl.util.errors import OptionError


def _generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _classes_apart(g, per_class, num_classes, width, spread=1.0):
    centers = torch.randn(num_classes, width, generator=g) * spread
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centers[labels] + torch.randn(len(labels), width, generator=g), labels


def _joined(tmp_path, request, widths=(7, 12), per_class=8, num_classes=3):
    """Two 'backbones' whose features see the same images, side by side as the planner joins them."""
    g = _generator(request)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    caches = []
    for i, width in enumerate(widths):
        x, _ = _classes_apart(g, per_class, num_classes, width, spread=1.5 - 0.5 * i)
        caches.append(FeatureCache.write(str(tmp_path / f"part{i}"), [x], labels.tolist(),
                                         classes=[f"c{k}" for k in range(num_classes)], fingerprint={"model": f"m{i}"}))
    return caches, FeatureCache.side_by_side(caches)


def test_the_parts_of_joined_features_are_their_backbones(tmp_path, request):
    caches, joined = _joined(tmp_path, request)
    assert parts.part_layouts(joined) == [("m0", [7]), ("m1", [12])]
    assert parts.part_layouts(caches[0]) == [(None, [7])]  # written by hand: one part
    split = parts.split(joined)
    assert [s.feature_dim for s in split] == [7, 12] and parts.split(caches[0]) == [caches[0]]
    for piece, original in zip(split, caches):
        assert torch.equal(piece.all_features(), original.all_features())
        assert torch.equal(piece.labels, original.labels) and piece.classes == original.classes
        assert parts.part_layouts(piece) == [(piece.fingerprint["backbone"]["name"], [original.feature_dim])]


def test_a_layout_that_does_not_split_by_its_name_is_one_part(tmp_path, request):
    _, joined = _joined(tmp_path, request)
    damaged = FeatureCache(joined.directory, dict(joined.manifest, fingerprint=dict(
        joined.fingerprint, layout={"taps": 0, "channels": [19]})), joined.all_features(), None, joined.labels,
        joined.samples)
    assert parts.part_layouts(damaged) == [("m0+m1", [19])]


@pytest.mark.parametrize("widths,num_classes,rows", [((3, 5), 2, 7), ((1, 4, 2), 3, 1), ((6, 6), 4, 0)])
def test_the_averaged_head_is_the_mean_of_its_parts(request, widths, num_classes, rows):
    g = _generator(request)
    heads = []
    for width in widths:
        head = make_head("linear", width, num_classes, torch.randn(width, generator=g),
                         torch.rand(width, generator=g) + 0.5)
        with torch.no_grad():
            head[-1].weight.copy_(torch.randn(num_classes, width, generator=g))
            head[-1].bias.copy_(torch.randn(num_classes, generator=g))
        heads.append(head.eval())
    x = torch.randn(rows, sum(widths), generator=g)
    expected = torch.zeros(rows, num_classes, dtype=torch.float64)
    start = 0
    for head, width in zip(heads, widths):
        piece = (x[:, start:start + width].double() - head[0].mean.double()) / head[0].std.double()
        expected += (piece @ head[-1].weight.double().T + head[-1].bias.double()) / len(heads)
        start += width
    got = parts.average(heads).eval()(x)
    assert got.shape == (rows, num_classes)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_cross_validated_head_of_joined_features_averages_each_part_tuned_alone(tmp_path, request):
    _, joined = _joined(tmp_path, request)
    tuned = tuning.tune_linear([joined], seed=3, progress=False)
    alone = [tuning.tune_linear([piece], seed=3, progress=False) for piece in parts.split(joined)]
    x = joined.all_features()
    expected = torch.stack([a.head.eval()(x[:, :7] if i == 0 else x[:, 7:]) for i, a in enumerate(alone)]).mean(0)
    torch.testing.assert_close(tuned.head.eval()(x), expected, rtol=1e-5, atol=1e-5)
    choice = tuned.choice
    assert choice["solver"] == parts.AVERAGED_SOLVER and [p["backbone"] for p in choice["parts"]] == ["m0", "m1"]
    for part, one in zip(choice["parts"], alone):
        setting = {k: one.choice[k] for k in (*tuning.SETTINGS, "temperature") if k in one.choice}
        assert {k: part[k] for k in setting} == setting and part["solver"] == one.choice["solver"]
    averaged = torch.stack([torch.log_softmax(a.out_of_fold, 1) for a in alone]).mean(0)
    assert choice["cv_accuracy"] == pytest.approx(float((averaged.argmax(1) == joined.labels).float().mean()))
    assert choice["cv_loss"] == pytest.approx(float(torch.nn.functional.nll_loss(averaged, joined.labels)), rel=1e-5)
    assert tuned.train_part is not None and tuned.train_part[-1].in_features == 19


def test_the_averaged_setting_refits_the_same_head(tmp_path, request):
    _, joined = _joined(tmp_path, request)
    tuned = tuning.tune_linear([joined], seed=0, progress=False)
    setting = {"parts": [{k: p[k] for k in ("weight_decay", "shrinkage", "temperature") if k in p}
                         for p in tuned.choice["parts"]]}
    again = tuning.fit_setting([joined], setting).head.eval()
    torch.testing.assert_close(again(joined.all_features()), tuned.head.eval()(joined.all_features()),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="3 backbones' settings for features of 2"):
        tuning.fit_setting([joined], {"parts": setting["parts"] + [{"weight_decay": 1.0}]})


def _teacher(tmp_path, backbone, choice):
    run_dir = tmp_path / "teacher"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"notes": {"choice": choice}}))
    (run_dir / "config.json").write_text(json.dumps({"backbone": backbone}))
    return str(run_dir)


PAIR = "efficientnet_lite1+efficientnet_lite2"
GOOD_PARTS = [{"backbone": "efficientnet_lite1", "solver": shrinkage.SOLVER, "shrinkage": 0.9, "temperature": 20.5},
              {"backbone": "efficientnet_lite2", "solver": solver.SOLVER, "weight_decay": 1.0}]


def test_a_teacher_that_averaged_is_refit_part_by_part(tmp_path):
    from fasttl.transfer import registry

    run_dir = _teacher(tmp_path, PAIR, {"solver": parts.AVERAGED_SOLVER, "parts": GOOD_PARTS})
    assert registry.get("linear").fit_settings(run_dir) == {
        "parts": [{"shrinkage": 0.9, "temperature": 20.5}, {"weight_decay": 1.0}]}


@pytest.mark.parametrize("edit,culprit", [
    (lambda p: p[:1], "has parts [{"),
    (lambda p: "x" * 5000, "has parts 'xxx"),
    (lambda p: [p[0], 7], "has parts [{"),
    (lambda p: [dict(p[0], shrinkage=0.33), p[1]], "(notes.choice.parts[0]) has shrinkage 0.33"),
    (lambda p: [dict(p[0], temperature=1e300), p[1]], "(notes.choice.parts[0]) has temperature 1e+300"),
    (lambda p: [p[0], dict(p[1], solver=parts.AVERAGED_SOLVER)], "(notes.choice.parts[1]) has solver 'one head"),
    (lambda p: [p[0], {"backbone": "efficientnet_lite2", "solver": solver.SOLVER}],
     "(notes.choice.parts[1]) has weight_decay None"),
    (lambda p: [p[1], p[0]], "(notes.choice.parts[0]) has backbone 'efficientnet_lite2', not 'efficientnet_lite1', "
                             "the teacher's backbone 1 of 2"),
    (lambda p: [p[0], {k: v for k, v in p[1].items() if k != "backbone"}],
     "(notes.choice.parts[1]) has backbone None")])
def test_a_teacher_with_damaged_parts_is_named(tmp_path, edit, culprit):
    from fasttl.transfer import registry

    run_dir = _teacher(tmp_path, PAIR, {"solver": parts.AVERAGED_SOLVER, "parts": edit(GOOD_PARTS)})
    with pytest.raises(OptionError) as error:
        registry.get("linear").fit_settings(run_dir)
    message = str(error.value)
    assert culprit in message and "metrics.json" in message and "\n" not in message and len(message) < 500


def test_a_single_backbone_teacher_that_claims_to_average_is_named(tmp_path):
    from fasttl.transfer import registry

    run_dir = _teacher(tmp_path, "efficientnet_lite1", {"solver": parts.AVERAGED_SOLVER, "parts": GOOD_PARTS[:1]})
    with pytest.raises(OptionError, match=r"has solver 'one head per backbone, averaged', not a single head's "
                                          r"solver \(its backbone is one\)"):
        registry.get("linear").fit_settings(run_dir)


def test_the_report_names_each_backbones_head():
    from fasttl.transfer.report import _choices

    choice = {"solver": parts.AVERAGED_SOLVER, "parts": [GOOD_PARTS[0], dict(GOOD_PARTS[1], cv_accuracy=0.7612)],
              "cv_accuracy": 0.75, "cross_validation":
              "5-fold, stratified", "validation": {"validation_images": 20, "cross_validated_images": 200, "seed": 0}}
    text = "\n".join(_choices({"linear": {"notes": {"choice": choice}}}))
    assert "one linear head per backbone, averaged (efficientnet\\_lite1: shrinkage LDA 0.9, temperature 20.5; " \
           "efficientnet\\_lite2: L2 strength 1, alone 0.7612 cross-validated)" in text
    assert "cross-validated accuracy 0.7500" in text


@pytest.mark.parametrize("smallest,expected", [(40, [1, 2, 3]), (200, [1, 2, 3]), (201, [0, 0, 0])])
def test_with_few_images_the_planner_puts_more_backbones_first(smallest, expected):
    from fasttl.transfer import planner

    plan = types.SimpleNamespace(smallest_class=smallest)
    plan.few_images = types.MethodType(planner.Planner.few_images, plan)
    names = ["efficientnet_lite2", "efficientnet_lite1+efficientnet_lite2",
             "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2"]
    assert [planner.Planner._backbones_first(plan, types.SimpleNamespace(backbone=n, head="linear"))
            for n in names] == expected
    assert [planner.Planner._backbones_first(plan, types.SimpleNamespace(backbone=n, head="mlp"))
            for n in names] == [0, 0, 0]  # an MLP on backbones side by side is one head, not an average
    assert (smallest < tuning.CROSS_VALIDATION_BELOW) == plan.few_images()


def test_the_curves_draw_each_backbones_path(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from fasttl.transfer import report

    saved = []
    monkeypatch.setattr(report, "_save", lambda fig, path: saved.append(fig))
    records = [dict(r, part=p) for p in ("m0", "m1") for r in ({"weight_decay": 5.0, "val_accuracy": 0.6},
                                                               {"weight_decay": 1.0, "val_accuracy": 0.7},
                                                               {"shrinkage": 0.9, "val_accuracy": 0.75})]
    report.plot_curves({"linear": records}, str(tmp_path / "curves.png"))
    path_ax, lda_ax = saved[0].axes[2], saved[0].axes[3]
    assert sorted(line.get_label() for line in path_ax.get_lines()) == ["linear m0 validation",
                                                                         "linear m1 validation"]
    assert sorted(line.get_label() for line in lda_ax.get_lines()) == ["linear m0 shrinkage LDA",
                                                                        "linear m1 shrinkage LDA"]
    assert all(len(line.get_xdata()) == 2 for line in path_ax.get_lines())
    plt.close(saved[0])


def test_models_named_with_a_plus_are_still_their_own_parts(tmp_path, request):
    g = _generator(request)
    labels = torch.arange(3).repeat_interleave(6)
    caches = [FeatureCache.write(str(tmp_path / name.replace("+", "_")), [torch.randn(18, width, generator=g)],
                                 labels.tolist(), classes=["a", "b", "c"], fingerprint={"model": name})
              for name, width in (("res+net", 5), ("b", 4))]
    joined = FeatureCache.side_by_side(caches)
    assert parts.part_layouts(joined) == [("res+net", [5]), ("b", [4])]
    assert tuning.tune_linear([joined], seed=0, progress=False).choice["solver"] == parts.AVERAGED_SOLVER


def test_features_near_float32s_limit_are_scaled_not_zeroed(tmp_path, request):
    """Squares of 1e30 overflow float32: the block's scale was inf and its weights all zero."""
    _, joined = _joined(tmp_path, request)
    x = joined.all_features()
    mean, scale = solver.block_scaling(x * 1e30, [7, 12])
    torch.testing.assert_close(scale / 1e30, solver.block_scaling(x, [7, 12])[1], rtol=1e-5, atol=0)
    huge = FeatureCache(joined.directory, joined.manifest, x * torch.cat([torch.full((7,), 1e30), torch.ones(12)]),
                        None, joined.labels, joined.samples)
    tuned, plain = (tuning.tune_linear([c], seed=0, progress=False) for c in (huge, joined))
    assert torch.isfinite(tuned.head[-1].weight).all() and tuned.head[-1].weight[:, :7].abs().sum() > 0
    assert torch.equal(tuned.head.eval()(huge.all_features()).argmax(1), plain.head.eval()(x).argmax(1))
