"""The sixty-third hostile pass (about 300 attempts on fb774af; pass 62's three fixes held) found 6:
load_run("") and predict_run("", ...) took the current folder for the run; `run --out X
--tensorboard X` made its board inside --out before the folder check, which then refused X as not
fasttl's, for good; run wrote into a feature cache folder (--out or --tensorboard there), which
extract then refused as holding files not its own; --resume with another --data or --weights
path named neither path (and said "rewritten in place?", or two contradictory things when
--weights was dropped); FeatureCache.subset of a slice with a step of 0 or a float bound raised
bare errors; numpy integers were refused for predict's batch_size and predict_run's top_k. The
sixty-fourth (about 160 attempts on 4a792f2) found 3 at the new guard's edges: a user's own
manifest.json/labels.npy/build.json made a "feature cache folder"; a run without --out standing in a
cache still wrote there; concat and huge indices were not named. The sixty-fifth (about 85 on
09472fc) found 4: a user's unkeyed features-00000.npy still counted as proof; --resume skipped the
check for another run's curves in --tensorboard DIR/<run name>; the index shown was another one;
predict refused paths in a numpy array or a deque. Also the last read's: a hand-edited recorded path
that is no path crashed --resume."""
import os
import shutil

import numpy as np
import pytest
import torch

import fasttl
from conftest import cli, finished_run, one_epoch_run, one_line_error
from fasttl.util.errors import OptionError


@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):
    return finished_run(cat_ship, tmp_path_factory, "scratch63")


def _interrupted(out):
    os.remove(out / "metrics.json")  # as a run stopped after its checkpoint: resumable


# ---- F1: an empty run folder argument is refused, never the current folder --------------------------------------
@pytest.mark.parametrize("given", ["", "  "], ids=["empty", "blank"])
def test_an_empty_run_folder_is_refused_not_the_current_one(scratch_run, cat_ship, monkeypatch, given):
    from fasttl.predict import predict_run

    monkeypatch.chdir(scratch_run)  # standing in a run folder: the one an empty path would name
    image = str(sorted((cat_ship / "test" / "cat").iterdir())[0])
    said = r"^run_dir: an empty or blank path \(an unset variable\?\); give the run folder \('.' for the current one\)$"
    # before: load_run("") loaded the run standing there, and predict_run predicted with it
    with pytest.raises(OptionError, match=said):
        fasttl.load_run(given)
    with pytest.raises(OptionError, match=said):
        predict_run(given, [image], progress=False)


# ---- F2 and F3: --tensorboard inside --out, and run outputs inside a feature cache folder --------------------------
def test_tensorboard_inside_out_is_refused_before_out_is_made(cat_ship, tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (fasttl[tensorboard])")
    out = tmp_path / "x"
    words = ["run", "--data", cat_ship, "--out", out, "--strategy", "scratch", "--epochs", 1, "--image-size", 32,
             "--compare", "none", "--no-progress"]
    code, _, err = cli(capsys, *words, "--tensorboard", out)
    # before: "out: ... is not empty and holds no fasttl run", X left holding fasttl's board and lock, for good
    assert code == 2 and one_line_error(err) == f"fasttl: error: tensorboard: {out / 'x'} is inside this run's --out " \
        f"folder {out}; drop DIR (--tensorboard alone writes into {out / 'tensorboard'}), or give a folder outside it"
    assert not out.exists()
    code, _, err = cli(capsys, *words)  # and the folder stays usable
    assert code == 0, err


@pytest.mark.parametrize("how", ["out", "tensorboard"])
def test_run_writes_nothing_into_a_feature_cache_folder(cat_ship, tmp_path, capsys, how):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (fasttl[tensorboard])")
    cache = tmp_path / "cache"
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", cache, "--image-size", 32, "--no-progress")
    assert code == 0, err
    before = sorted(os.listdir(cache))
    where = ["--out", cache / "run"] if how == "out" else ["--out", tmp_path / "run", "--tensorboard", cache]
    code, _, err = cli(capsys, "run", "--data", cat_ship, *where, "--strategy", "scratch", "--epochs", 1,
                       "--image-size", 32, "--compare", "none", "--no-progress")
    # before: the run (or its event files) went into the cache, which extract then refused as "not fasttl's"
    board = cache / "run"  # --out itself, or the board DIR/<run folder name>
    line = one_line_error(err)
    assert code == 2 and line.startswith(f"fasttl: error: {how}: {board} is in the feature cache folder {cache} (it "
                                         "holds ") and line.endswith(f"), which only fasttl extract writes into; give "
                                                                     f"--{how} a folder outside it")
    assert sorted(os.listdir(cache)) == before
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", cache, "--image-size", 32, "--no-progress")
    assert code == 0, err  # the cache is still extract's


def test_a_cache_split_folder_and_a_build_in_progress_are_cache_folders(tmp_path):
    from fasttl.cache.folder import enclosing_cache_folder

    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    fasttl.FeatureCache.write(str(tmp_path / "c"), [rows], [0, 1], classes=["a", "b"], dtype="fp32")
    folder, proof = enclosing_cache_folder(str(tmp_path / "c" / "deep" / "er"))
    assert folder == str(tmp_path / "c") and proof in os.listdir(tmp_path / "c")
    (tmp_path / "building").mkdir()
    (tmp_path / "building" / "build.json").write_text('{"fingerprint": {"format": 2}}')  # as build.py writes
    assert enclosing_cache_folder(str(tmp_path / "building" / "x")) == (str(tmp_path / "building"), "build.json")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "manifest.json").write_text("{}")  # a user's manifest alone: no cache
    assert enclosing_cache_folder(str(tmp_path / "mine" / "x")) is None


# ---- F4: --resume naming the paths that changed -------------------------------------------------------------------
def test_resume_names_the_data_path_when_the_data_is_another_folder(cat_ship, tmp_path):
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import RunError

    out = tmp_path / "run"
    run(**one_epoch_run(cat_ship, out, epochs=2))
    _interrupted(out)
    other = tmp_path / "other"
    shutil.copytree(cat_ship, other, copy_function=shutil.copy)
    # before: "(the data changed since the run started (...))", naming neither folder
    with pytest.raises(RunError, match=rf"\(data: was '{cat_ship}', now '{other}'\); run with the same options"):
        run(**one_epoch_run(other, out, epochs=2, resume=True))


def test_resume_names_the_weights_path_and_a_dropped_option_once(cat_ship, tmp_path):
    from fasttl import backbones
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import RunError

    state = backbones.create("resnet18", pretrained=False).state_dict()
    torch.save(state, tmp_path / "a.pt")
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "b.pt")
    shutil.copy2(tmp_path / "a.pt", tmp_path / "a-copy.pt")
    out = tmp_path / "run"
    options = one_epoch_run(cat_ship, out, strategy="mlp", backbone="resnet18", weights=str(tmp_path / "a.pt"),
                            epochs=2, features="head")
    run(**options)
    _interrupted(out)
    # before: "(the --weights file changed since the run started (rewritten in place?))" for another file
    with pytest.raises(RunError, match=rf"\(weights: was '{tmp_path / 'a.pt'}', now '{tmp_path / 'b.pt'}'\); run"):
        run(**dict(options, weights=str(tmp_path / "b.pt"), resume=True))
    # before: "weights: was '.../a.pt', now None; the --weights file changed since ..." (two contradictory things)
    with pytest.raises(RunError, match=rf"\(weights: was '{tmp_path / 'a.pt'}', now None\); run"):
        run(**dict(options, weights=None, resume=True))
    run(**dict(options, weights=str(tmp_path / "a-copy.pt"), resume=True))  # the same weights elsewhere resume
    assert (out / "metrics.json").is_file()


# ---- F5 and F6: a bad slice names `rows`; numpy integers where the API takes an int ------------------------------
@pytest.mark.parametrize("rows, error", [(slice(0, 2, 0), ValueError), (slice(0.0, 2), TypeError)],
                         ids=["step-0", "float-bound"])
def test_a_bad_slice_names_rows(tmp_path, rows, error):
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [np.zeros((3, 4), np.float32)], [0, 1, 0],
                                      classes=["a", "b"], dtype="fp32")
    # before: "slice step cannot be zero" / "slice indices must be integers ...", naming no argument
    with pytest.raises(error, match=r"^rows: a slice of integer bounds and a step other than 0, got slice\("):
        cache.subset(rows)
    assert torch.equal(cache.subset(slice(None, None, -1)).labels, torch.tensor([0, 1, 0]))


def test_predict_takes_numpy_integers_and_one_path(scratch_run, cat_ship, tmp_path):
    from fasttl.predict import predict_run

    model = fasttl.load_run(scratch_run)
    images = sorted(str(p) for p in (cat_ship / "test").rglob("*.jpg"))
    names, probabilities = model.predict(images)
    # before: "batch_size: expected a positive integer, got np.int64(2)"
    again, same = model.predict(images, batch_size=np.int64(2))
    assert again == names and torch.allclose(same, probabilities, atol=1e-6)
    # before: "top_k: expected 1..2 (...), got np.int64(2)"; a str of paths read one character at a time
    result = predict_run(str(scratch_run), str(cat_ship / "test"), top_k=np.int64(2), progress=False)
    assert result["rows"] == len(images) and "top2" in result["csv"].splitlines()[0]
    for bad, said in (({"overwrite": "no"}, r"^overwrite: expected True or False, got 'no'$"),
                      ({"paths": [b"x.jpg"]}, r"^paths: bytes \(a path as bytes"),
                      ({"out": b"p.csv"}, r"^out: expected a file path \(a str or a pathlib.Path\), got bytes$")):
        kwargs = dict({"paths": images, "out": str(tmp_path / "p.csv"), "progress": False}, **bad)
        with pytest.raises(OptionError, match=said):
            predict_run(str(scratch_run), **kwargs)
    assert not (tmp_path / "p.csv").exists()


# ---- pass 64: a user's folder is no cache folder by its names alone; the default run folder; cache API messages ----
def test_a_users_files_named_as_a_caches_are_no_cache_folder(cat_ship, tmp_path, capsys, monkeypatch):
    from fasttl.cache.folder import enclosing_cache_folder

    project = tmp_path / "project"
    (project / "train").mkdir(parents=True)
    for folder in (project, project / "train"):
        (folder / "manifest.json").write_text('{"name": "my project"}')
        (folder / "labels.npy").write_bytes(b"mine")
        (folder / "build.json").write_text("{}")
    # before: "out: .../project/run is in the feature cache folder .../project" (by the file names alone)
    assert enclosing_cache_folder(str(project / "run")) is None
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--out", project / "run", "--strategy", "scratch", "--epochs",
                       1, "--image-size", 32, "--compare", "none", "--no-progress")
    assert code == 0, err
    (tmp_path / "closed").mkdir()
    (tmp_path / "closed" / "manifest.json").symlink_to(tmp_path / "closed")  # no plain file: never read
    assert enclosing_cache_folder(str(tmp_path / "closed" / "x")) is None


def test_a_run_without_out_standing_in_a_cache_folder_is_refused(cat_ship, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", cache, "--image-size", 32, "--no-progress")
    assert code == 0, err
    monkeypatch.chdir(cache)
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--strategy", "scratch", "--epochs", 1, "--image-size", 32,
                       "--compare", "none", "--no-progress")
    # before: runs/<data>-scratch made in the cache, which extract then refused for good
    assert code == 2 and one_line_error(err).startswith(f"fasttl: error: out: {cache / 'runs'}")
    assert f"is in the feature cache folder {cache} (it holds " in err and "which only fasttl extract writes" in err
    assert not (cache / "runs").exists()


def test_cache_api_refusals_name_their_argument_and_value(tmp_path):
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [np.zeros((3, 4), np.float32)], [0, 1, 0],
                                      classes=["a", "b"], dtype="fp32")
    for bad in (cache, None, 3):  # before: "'FeatureCache' object is not iterable" and the like
        with pytest.raises(ValueError, match=r"^caches: expected a non-empty list of FeatureCache objects$"):
            fasttl.FeatureCache.concat(bad)
    for bad, shown in ((np.array([2**63], np.uint64), 2**63), ([0, 2**70], 2**70)):
        # before: "got -9223372036854775808" (wrapped), and "got list"
        with pytest.raises(ValueError, match=rf"^rows: expected indices in \[0, 3\), got {shown}$"):
            cache.subset(bad)
        with pytest.raises(ValueError, match=rf"^indices: expected indices in \[0, 3\), got {shown}$"):
            cache.gather(bad)
    with pytest.raises(TypeError, match=r"^rows: expected integer row indices, a slice or a boolean mask, got list$"):
        cache.subset([[0], [1, 2]])
    assert cache.subset(np.array([2, 0], np.uint64)).labels.tolist() == [0, 0]


@pytest.mark.parametrize("recorded", [5, [5], ["a\x00b"], {"x": 1}, "a\x00b", ""], ids=repr)
def test_a_hand_edited_recorded_path_is_a_difference_not_a_crash(cat_ship, tmp_path, recorded):
    """Found in the last read: the paths of a recorded identity are made absolute for the comparison;
    a value no path (its marker rewritten to vouch for it) is compared as it is."""
    from conftest import vouched_config_edit
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import RunError

    first = tmp_path / "first"
    run(**one_epoch_run(cat_ship, first, epochs=2))
    _interrupted(first)
    out = vouched_config_edit(first, tmp_path / "edited",
                              lambda config: config["identity"].update(data=recorded, data_identity="0" * 64))
    # before the fix: TypeError (expected str, bytes or os.PathLike) or ValueError (embedded null byte)
    with pytest.raises(RunError, match=r"^resume: .* was run with other options or data \(data: was "):
        run(**one_epoch_run(cat_ship, out, epochs=2, resume=True))


# ---- pass 65: shard names without a key, --resume into another run's curves, index values, iterables of paths -----
def test_a_users_unkeyed_shard_names_are_no_proof_and_the_proof_is_named(cat_ship, tmp_path, capsys):
    from fasttl.cache.folder import enclosing_cache_folder

    project = tmp_path / "project"
    project.mkdir()
    np.save(project / "features-00000.npy", np.zeros(3))  # a user's own, named as format 1 named shards
    np.save(project / "scales-00001.npy", np.zeros(3))
    # before: every run below it refused as "in the feature cache folder"
    assert enclosing_cache_folder(str(project / "run")) is None
    cache = tmp_path / "cache"
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", cache, "--image-size", 32, "--no-progress")
    assert code == 0, err
    folder, proof = enclosing_cache_folder(str(cache / "x" / "y"))
    assert (folder, proof) == (str(cache), ".fasttl-extract")  # the mark extract leaves on its root
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--out", cache / "run", "--strategy", "scratch", "--epochs",
                       1, "--image-size", 32, "--compare", "none", "--no-progress")
    assert code == 2 and f"is in the feature cache folder {cache} (it holds {proof}), which only" in err


def test_resume_never_adds_curves_to_another_runs_board(cat_ship, tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (fasttl[tensorboard])")
    from fasttl.transfer.job import run

    boards = tmp_path / "boards"
    first = tmp_path / "a" / "run"
    run(**one_epoch_run(cat_ship, first, tensorboard=str(boards)))
    second = tmp_path / "b" / "run"  # another run of the same folder name
    options = one_epoch_run(cat_ship, second, epochs=2)
    run(**options)
    _interrupted(second)
    before = sorted(p.name for p in (boards / "run" / "scratch").iterdir())
    # before: --resume skipped the check, and its curves went beside the first run's under one name
    with pytest.raises(OptionError, match=rf"^tensorboard: {boards / 'run'} already holds event files"):
        run(**dict(options, tensorboard=str(boards), resume=True))
    assert sorted(p.name for p in (boards / "run" / "scratch").iterdir()) == before
    _interrupted(first)  # and the run whose curves they are resumes into them
    run(**one_epoch_run(cat_ship, first, tensorboard=str(boards), resume=True))


@pytest.mark.parametrize("rows, shown", [([-2**70, 1], -2**70), ([5, -2**64], -2**64), ([2**63, -1], 2**63)],
                         ids=["below-first", "below-later", "above-and-negative"])
def test_an_index_beyond_int64_is_the_one_shown(tmp_path, rows, shown):
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [np.zeros((3, 4), np.float32)], [0, 1, 0],
                                      classes=["a", "b"], dtype="fp32")
    # before: "got 1", "got 5" (another index of the list), "got torch.float64" (a list of integers)
    with pytest.raises(ValueError, match=rf"^rows: expected indices in \[0, 3\), got {shown}$"):
        cache.subset(rows)
    with pytest.raises(ValueError, match=rf"^indices: expected indices in \[0, 3\), got {shown}$"):
        cache.gather(rows)


def test_predict_takes_paths_in_any_ordered_iterable(scratch_run, cat_ship):
    import collections

    model = fasttl.load_run(scratch_run)
    images = sorted(str(p) for p in (cat_ship / "test").rglob("*.jpg"))
    names, probabilities = model.predict(images)
    # before: "images: expected uint8 pixels (0..255), got <U..; ... call .model on them"
    for given in (np.array(images), collections.deque(images)):
        again, same = model.predict(given)
        assert again == names and torch.equal(same, probabilities)
    with pytest.raises(OptionError, match=r"^images: a set has no order to give the predictions in; give a list$"):
        model.predict(set(images))


@pytest.mark.parametrize("flag", ["progress", "overwrite"])
def test_predicts_flags_are_true_or_false(scratch_run, cat_ship, tmp_path, capsys, flag):
    from fasttl.predict import predict_run

    image = str(sorted((cat_ship / "test" / "cat").iterdir())[0])
    # before: progress="no" drew a progress bar (any truthy value was taken)
    with pytest.raises(OptionError, match=rf"^{flag}: expected True or False, got 'no'$"):
        predict_run(str(scratch_run), [image], out=str(tmp_path / "p.csv"), **dict({"progress": False}, **{flag: "no"}))
    if flag == "progress":
        with pytest.raises(OptionError, match=r"^progress: expected True or False, got 'no'$"):
            fasttl.load_run(scratch_run).predict([image], progress="no")
    assert capsys.readouterr().err == "" and not (tmp_path / "p.csv").exists()
