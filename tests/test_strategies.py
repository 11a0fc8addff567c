"""The strategy registry: every strategy runs on the device asked for and records it, and its
`load` rebuilds a model that predicts what the run itself predicted."""
import csv
import json

import pytest
from conftest import THREE_CLASSES
import torch

from fasttl.util.errors import OptionError
from fasttl.transfer import registry
from fasttl.transfer.config import RunConfig
from fasttl.transfer.job import run

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("strategy-cache"))


@pytest.fixture(scope="module")
def teacher(three_classes, tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("teacher") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTTL_CACHE_DIR", cache_dir)
        run(data=str(three_classes), strategy="linear", image_size=32, out=str(out), progress=False)
    return out


@pytest.mark.parametrize("name", registry.names())
def test_every_strategy_trains_where_asked_records_it_and_loads_back(name, three_classes, teacher, tmp_path,
                                                                     cache_dir, monkeypatch):
    monkeypatch.setenv("FASTTL_CACHE_DIR", cache_dir)
    strategy = registry.get(name)
    given = {"teacher": str(teacher), "target_data": str(three_classes)}  # what a strategy may require
    extra = {option: given[option] for option in strategy.requires}
    out = tmp_path / "run"
    metrics = run(data=str(three_classes), strategy=name, epochs=1, image_size=32, out=str(out), device="cpu",
                  compare="scratch" if name != "scratch" else "none", progress=False, **extra)
    assert metrics["device"] == "cpu" and metrics["precision"] == "fp32"
    for other in metrics["compare"].values():
        assert other["device"] == "cpu" and other["precision"] == "fp32"
    written = json.loads((out / "metrics.json").read_text())
    assert written["device"] == "cpu"

    # load() rebuilds the model: its predictions on the evaluated images are the run's own
    model = strategy.load(str(out), torch.device("cpu"))
    assert model.classes == THREE_CLASSES
    with open(out / "predictions.csv") as f:
        saved = [row["predicted"] for row in csv.DictReader(f)]
    if name == "dann":
        from fasttl.transfer.strategies.dann import target_source

        source = target_source(str(three_classes), THREE_CLASSES)
    else:
        from fasttl.transfer.datasets import load_dataset

        source = load_dataset(str(three_classes)).test
    logits, labels = model.logits(source)
    assert [THREE_CLASSES[i] for i in logits.argmax(1).tolist()] == saved
    # and its image-level module agrees with the cached path up to the cache's fp16 rounding
    images = next(iter(__import__("fasttl").data.ImageLoader(source, model.spec, 4)))[0]
    direct = model.module(images).float()
    assert direct.shape == (4, len(THREE_CLASSES))
    assert torch.allclose(direct, logits[:4], atol=0.05 * float(logits.abs().max()) + 1e-3)


def test_unknown_strategies_and_missing_requirements_are_option_errors():
    with pytest.raises(OptionError, match="strategy: unknown 'magic'; choose from linear"):
        registry.get("magic")
    with pytest.raises(OptionError, match="teacher: --strategy distill needs --teacher RUN_DIR"):
        RunConfig(strategy="distill").resolved(32)
    with pytest.raises(OptionError, match="target_data: --strategy dann needs --target-data DIR"):
        RunConfig(strategy="dann").resolved(32)


def test_per_strategy_defaults_come_from_the_registry():
    for name in registry.names():
        strategy = registry.get(name)
        cfg = RunConfig(strategy=name, **{option: "given" for option in strategy.requires}).resolved(32)
        assert (cfg.epochs, cfg.lr, cfg.batch_size) == (strategy.epochs, strategy.lr, strategy.batch_size)
    assert RunConfig(epochs=3, lr=0.5).resolved(32).epochs == 3


def test_a_new_strategy_is_one_registered_class(monkeypatch):
    from fasttl.cli import build_parser

    @registry.register
    class Probe(registry.Strategy):
        name = "probe-for-test"
        help = "a strategy defined by this test"

    try:
        assert "probe-for-test" in registry.names()
        args = build_parser().parse_args(["run", "--strategy", "probe-for-test"])
        assert args.strategy == "probe-for-test"
        assert RunConfig(strategy="probe-for-test").resolved(32).epochs == registry.Strategy.epochs
    finally:
        registry._REGISTRY.pop("probe-for-test")


def test_compare_auto_is_the_baseline_for_the_embedded_default_only():
    assert RunConfig().resolved(8).compare == registry.baseline().name
    assert RunConfig(data="some/folder").resolved(32).compare == "none"
    assert RunConfig(data="some/folder", compare="scratch").resolved(32).compare == "scratch"


def test_a_strategy_declares_its_own_options_and_the_cli_and_refusals_follow():
    """An option a strategy declares is a RunConfig field, a `fasttl run` flag with its help, is
    checked by its own check, and is refused with any other strategy (generated, not listed)."""
    from fasttl.cli import build_parser
    from fasttl.transfer import config
    from fasttl.transfer.options import a_positive_int, option

    @registry.register
    class Probe(registry.Strategy):
        name = "probe-for-test"
        help = "a strategy defined by this test"
        options = {"probe_depth": option(2, "probe-for-test: how deep it probes", metavar="N",
                                         check=a_positive_int)}

    try:
        made = config.run_config()
        assert made(strategy="probe-for-test").resolved(32).probe_depth == 2
        parser = build_parser()
        assert parser.parse_args(["run", "--strategy", "probe-for-test", "--probe-depth", "3"]).probe_depth == 3
        run_help = next(a for a in parser._subparsers._group_actions[0].choices["run"]._actions
                        if a.dest == "probe_depth").help
        assert run_help == "probe-for-test: how deep it probes (default 2)"
        with pytest.raises(OptionError, match=r"^probe_depth: expected a positive integer, got 0$"):
            made(strategy="probe-for-test", probe_depth=0).resolved(32)
        with pytest.raises(OptionError, match=r"^probe_depth: --probe-depth is read only by --strategy "
                                              r"probe-for-test; drop it for --strategy linear$"):
            made(strategy="linear", probe_depth=5).resolved(32)
        assert made(strategy="linear", compare="probe-for-test", probe_depth=5).resolved(32).probe_depth == 5
    finally:
        registry._REGISTRY.pop("probe-for-test")


def test_an_option_declared_twice_is_refused_when_the_config_is_made():
    from fasttl.transfer import config
    from fasttl.transfer.options import option

    @registry.register
    class Clash(registry.Strategy):
        name = "clash-for-test"
        options = {"seed": option(1, "a second seed")}

    try:
        with pytest.raises(ValueError, match="option 'seed': declared by strategy 'clash-for-test' and by the "
                                             "common options; declare each option once"):
            config.run_config()
    finally:
        registry._REGISTRY.pop("clash-for-test")


@pytest.mark.parametrize("name", [n for n in registry.names() if registry.get(n).options])
def test_each_strategys_own_options_are_flags_refused_elsewhere(name):
    """Every option a strategy declares is in RunConfig and in `fasttl run --help`, and given to a
    strategy that does not read it, is refused naming its readers."""
    import dataclasses

    from fasttl.cli import build_parser

    strategy = registry.get(name)
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    other = next(n for n in registry.names() if not registry.get(n).reads_option(next(iter(strategy.options), "")))
    for option_name, declared in strategy.options.items():
        assert fields[option_name] is declared
        assert "--" + option_name.replace("_", "-") in help_text
        value = {bool: True, int: 3, float: 0.5, str: "x"}[declared.metadata["kind"]]
        choices = declared.metadata["choices"]
        value = next(c for c in (choices() if callable(choices) else choices) if c != declared.default) \
            if choices else value
        with pytest.raises(OptionError, match=f"^{option_name}: --{option_name.replace('_', '-')} is read only by "
                                              f"--strategy .*{name}.*; drop it for --strategy {other}$"):
            RunConfig(strategy=other, compare="none", **{option_name: value}).resolved(32)
