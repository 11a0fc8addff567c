"""The sixty-first pass's leftover: --resume compared path options as typed, so the same data folder
given as ./data/, as an absolute path or from another folder was refused as other data (and a
teacher, target or classes file the same). Paths are now recorded as the absolute path they name; a
resumed run keeps the identity and key its interrupted run recorded (an older fasttl's run, whose
identity lacks a key added since, resumes with its checkpoints); a --weights file rewritten in place
since the run started is refused, as a teacher's weights are. Then passes 59-61's observations
(load_run and predict inputs, run() types, a repeated CSV header, link chains, the last epoch's lr,
lookalike class names, a predict --out naming an image). The sixty-second pass (about 760 attempts
on 16c9ebc) found 3: an older run's relative --data resumed from another folder was refused naming a
folder it never read (a path option is now compared by the content recorded for it); --tensorboard
DIR whose DIR/<run name> is the run's own --out or another run's folder blamed fasttl's lock file or
the other run's marker ("remove it"); FeatureCache.to passed a bad device to torch (bare errors)."""
import json
import os
import shutil

import pytest

from conftest import one_epoch_run, vouched_config_edit


def _interrupted(out):
    os.remove(out / "metrics.json")  # as a run stopped after its checkpoint: resumable


def _record(out):
    config = json.loads((out / "config.json").read_text())
    return config["identity"], config["run_key"]


@pytest.mark.parametrize("spelling", ["dot-slash", "absolute", "from-below", "through-a-link"])
def test_resume_takes_the_same_folder_however_it_is_spelled(cat_ship, tmp_path, monkeypatch, spelling):
    from fasttl.transfer.job import run

    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(cat_ship, data)
    monkeypatch.chdir(tmp_path)
    run(**one_epoch_run("data", out))
    _interrupted(out)
    before = _record(out)
    (tmp_path / "below").mkdir()
    (tmp_path / "link").symlink_to("data")
    again = {"dot-slash": "./data/", "absolute": str(data), "from-below": "../data", "through-a-link": "link/."}
    if spelling == "from-below":
        monkeypatch.chdir(tmp_path / "below")
    # before: "resume: ... (data: was 'data', now './data/')"
    run(**one_epoch_run(again[spelling], out, resume=True))
    assert (out / "metrics.json").is_file() and _record(out) == before
    assert before[0]["data"] == str(data)  # recorded as the folder it names


def test_resume_takes_the_data_moved_and_refuses_other_data(cat_ship, tmp_path):
    """Pass 62: a path whose content the identity holds (data_identity) is compared by that content."""
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import RunError

    shutil.copytree(cat_ship, tmp_path / "one")
    out = tmp_path / "run"
    run(**one_epoch_run(tmp_path / "one", out, epochs=2))
    _interrupted(out)
    os.rename(tmp_path / "one", tmp_path / "moved")  # mv keeps every file's time
    # before: "data: was '.../one', now '.../moved'"
    run(**one_epoch_run(tmp_path / "moved", out, epochs=2, resume=True))
    assert (out / "metrics.json").is_file()
    _interrupted(out)
    shutil.copytree(cat_ship, tmp_path / "two", copy_function=shutil.copy)  # new times: other data, as far as known
    # the run's own record kept: it started on one
    with pytest.raises(RunError, match=rf"\(data: was '{tmp_path / 'one'}', now '{tmp_path / 'two'}'\); run"):
        run(**one_epoch_run(tmp_path / "two", out, epochs=2, resume=True))  # (pass 63: the paths named)


def test_an_older_runs_data_typed_in_another_folder_resumes_from_here(cat_ship, tmp_path, monkeypatch):
    """Pass 62: an older run recorded `data` as typed in the folder it ran from."""
    from fasttl.transfer.job import run

    shutil.copytree(cat_ship, tmp_path / "data")
    (tmp_path / "below").mkdir()
    monkeypatch.chdir(tmp_path)
    first = tmp_path / "first"
    run(**one_epoch_run("data", first, epochs=2))
    _interrupted(first)
    out = vouched_config_edit(first, tmp_path / "older", lambda config: config["identity"].update(data="data"))
    monkeypatch.chdir(tmp_path / "below")
    # before: "data: was '<below>/data', now '<tmp>/data'", a folder the run never read
    run(**one_epoch_run("../data", out, epochs=2, resume=True))
    assert (out / "metrics.json").is_file()


def test_an_older_runs_identity_as_typed_resumes_with_its_checkpoints(cat_ship, tmp_path, monkeypatch):
    """An older fasttl recorded the path as typed and no key for options added since; its
    checkpoints carry the key of that identity."""
    import torch

    from fasttl.transfer.identity import key
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import Checkpoint

    shutil.copytree(cat_ship, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    first = tmp_path / "first"
    options = one_epoch_run("data", first, strategy="mlp", epochs=2, features="head", mirror_views="none")
    run(**options)
    _interrupted(first)

    def as_an_older_fasttl(config):
        config["identity"]["data"] = "data"
        for name in ("features", "mirror_views", "budget"):  # options added since, run as their old behaviour
            del config["identity"][name]
        config["run_key"] = key(config["identity"])

    out = vouched_config_edit(first, tmp_path / "older", as_an_older_fasttl)
    head = Checkpoint(str(out), "head")  # its checkpoint carries the key of that identity
    head.save({k: v for k, v in torch.load(head.path, weights_only=True).items() if k != "run_key"})
    before = _record(out)
    # before: the identity was recorded again in today's form on resume, and its new key was no longer
    # the checkpoint's ("a checkpoint of another run")
    run(**dict(options, out=str(out), resume=True))
    assert (out / "metrics.json").is_file() and _record(out) == before


def test_resume_refuses_weights_rewritten_in_place(cat_ship, tmp_path):
    import torch

    from fasttl import backbones
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import RunError

    weights, out = tmp_path / "w.pt", tmp_path / "run"
    state = backbones.create("resnet18", pretrained=False).state_dict()
    torch.save(state, weights)
    options = one_epoch_run(cat_ship, out, strategy="mlp", backbone="resnet18", weights=str(weights),
                            epochs=2, features="head")
    run(**options)
    _interrupted(out)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, weights)  # other weights
    # before: resumed, the head's finished epochs on features of the old weights, the rest on the new
    with pytest.raises(RunError, match=r"the --weights file changed since the run started \(rewritten in place\?\)"):
        run(**dict(options, resume=True))


# ---- the sixty-first pass's observations ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):
    from conftest import finished_run

    return finished_run(cat_ship, tmp_path_factory, "scratch62", epochs=3)


@pytest.mark.parametrize("given", [None, b"run", 3], ids=["none", "bytes", "int"])
def test_load_run_of_something_not_a_path_is_one_option_error(given):
    import fasttl
    from fasttl.util.errors import OptionError

    # before: TypeError (expected str, bytes or os.PathLike object / a bytes-like object is required)
    with pytest.raises(OptionError, match=r"^run_dir: expected the run folder's path \(a str or a pathlib.Path\), got "):
        fasttl.load_run(given)


def test_predict_takes_a_generator_and_names_bytes(scratch_run, cat_ship):
    import torch

    import fasttl
    from fasttl.util.errors import OptionError

    model = fasttl.load_run(scratch_run)
    images = sorted((cat_ship / "test").rglob("*.jpg"))
    names, probabilities = model.predict(images)
    # before: "expected uint8 pixels (0..255), got object" for the generator
    again, same = model.predict(p for p in images)
    assert again == names and torch.equal(same, probabilities)
    for given in (bytes(images[0]), [bytes(p) for p in images], images[0].read_bytes()):
        with pytest.raises(OptionError, match=r"^images: bytes \(a path as bytes, or a file's encoded content\?\)"):
            model.predict(given)  # before: "expected uint8 pixels (0..255), got |S.."


def test_run_takes_paths_and_numpy_numbers_as_the_cli_gives_them(cat_ship, tmp_path):
    import pathlib

    import numpy as np

    from fasttl.transfer.config import RunConfig
    from fasttl.transfer.job import run

    config = RunConfig(data=pathlib.Path(cat_ship), teacher=(pathlib.Path("t"),), epochs=np.int64(2),
                       lr=np.float32(0.5), tensorboard=False)
    assert (config.data, config.teacher, config.epochs, config.lr, config.tensorboard) == \
        (str(cat_ship), ["t"], 2, 0.5, None)
    assert type(config.epochs) is int and type(config.lr) is float
    # before: "data: expected a path (a string), got PosixPath(...)", "epochs: ... got np.int64(1)"
    run(**dict(one_epoch_run(cat_ship, tmp_path), data=pathlib.Path(cat_ship), out=tmp_path / "r",
               epochs=np.int64(1), seed=np.int32(3), tensorboard=False))
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["data"], config["out"], config["epochs"], config["seed"], config["tensorboard"]) == \
        (str(cat_ship), str(tmp_path / "r"), 1, 3, None)
    assert (tmp_path / "r" / "metrics.json").is_file()


def test_a_csv_list_repeating_its_header_names_that_line(cat_ship, tmp_path):
    from conftest import image_list
    from fasttl.data.formats.filelist import read_file_list
    from fasttl.util.errors import DataError

    rows = image_list(cat_ship, tmp_path / "l")
    (tmp_path / "l" / "list.csv").write_text("\n".join(rows + [" path , label"] + rows[1:]) + "\n")
    # before: read as an image `path` of class `label` ("l/path cannot be read (it does not exist)")
    with pytest.raises(DataError, match=rf"list.csv line {len(rows) + 1} repeats the header line \(two lists "
                                        r"joined\?\); delete that line$"):
        read_file_list(str(tmp_path / "l" / "list.csv"))


def test_a_chain_of_links_longer_than_the_system_follows_is_no_loop(tmp_path):
    from fasttl.util.path_problems import LINKS_FOLLOWED, output_folder_problem

    (tmp_path / "l0").mkdir()
    for i in range(1, LINKS_FOLLOWED + 7):
        (tmp_path / f"l{i}").symlink_to(f"l{i - 1}")
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    chain, loop = tmp_path / f"l{LINKS_FOLLOWED + 6}", tmp_path / "a"
    # before: "is a symbolic link loop" for both
    assert output_folder_problem(str(chain / "x"), "advice") == \
        f"{chain} is a chain of more than 40 symbolic links (more than the system follows), where {chain / 'x'} " \
        "needs a folder; advice"
    assert output_folder_problem(str(loop / "x"), "advice").startswith(f"{loop} is a symbolic link loop, where")
    assert output_folder_problem(str(tmp_path / "l30" / "x"), "advice") == ""  # 30 links: followed


def test_the_last_epochs_lr_is_the_one_its_last_step_used(request):
    """OneCycleLR read after the last step is the cosine past its end, turning back up."""
    import zlib

    import torch

    from fasttl.heads.fit import fit, one_cycle, step

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    model = torch.nn.Linear(3, 2)
    steps_per_epoch, epochs = 5, 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = one_cycle(optimizer, 0.1, steps_per_epoch * epochs, 0.25)
    reference = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    expected_schedule = one_cycle(reference, 0.1, steps_per_epoch * epochs, 0.25)
    used = []
    for _ in range(steps_per_epoch * epochs):
        used.append(reference.param_groups[0]["lr"])
        reference.step()
        expected_schedule.step()

    def train_epoch(epoch):
        for _ in range(steps_per_epoch):
            step(model(torch.randn(4, 3)).square().mean(), optimizer, scheduler)
        return {"train_loss": 0.0}

    history = fit(model, optimizer, scheduler, epochs, train_epoch, progress=False)
    # before: the last epoch's lr was the schedule one step past its end (4e-7 here, above the 4e-8 used last)
    assert [r["lr"] for r in history] == [used[(e + 1) * steps_per_epoch - 1] for e in range(epochs)]
    assert history[-1]["lr"] == min(used)


@pytest.mark.parametrize("twin", ["\u0441at", "c\u0430t", "\u0441\u0430t"], ids=["cyrillic-es", "cyrillic-a", "both"])
def test_class_folders_differing_in_a_cyrillic_letter_are_refused(cat_ship, tmp_path, capsys, twin):
    from conftest import cli, one_line_error

    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    for split in ("train", "test"):
        shutil.copytree(data / split / "cat", data / split / twin)
    code, _, err = cli(capsys, "run", "--data", data, "--out", tmp_path / "r", "--strategy", "scratch", "--epochs", 1,
                       "--image-size", 32, "--no-progress")
    # before: three classes, two of them shown as "cat" in every report
    assert code == 2 and "differ only in letters drawn alike" in one_line_error(err)
    assert ascii(twin) in err and not (tmp_path / "r").exists()


def test_names_in_other_scripts_alone_are_names(tmp_path):
    from fasttl.data.labels import refuse_lookalikes

    refuse_lookalikes(["кот", "cat", "собака", "dog", "γάτα", "ship", "ship"], "classes:")  # nothing looks alike


# ---- pass 62, F2: --tensorboard DIR whose DIR/<run name> is a run folder; F3: FeatureCache.to's device -----------
def test_tensorboard_into_the_run_folder_itself_or_another_run_names_that(cat_ship, scratch_run, tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (fasttl[tensorboard])")
    from fasttl.transfer.job import run
    from fasttl.util.errors import OptionError

    out = tmp_path / "boards" / "run"
    # before: "boards/run/.fasttl-run.lock is a symbolic link or not a folder ... (remove it, ...)", fasttl's own
    # lock, and boards/run left holding only that lock
    with pytest.raises(OptionError, match=rf"^tensorboard: {out} is this run's --out folder itself; drop DIR "
                                          rf"\(--tensorboard alone writes into {out / 'tensorboard'}\), or give a "
                                          r"folder outside it$"):
        run(**one_epoch_run(cat_ship, out, tensorboard=str(tmp_path / "boards")))
    assert not out.exists()
    other = tmp_path / "others" / "run"
    shutil.copytree(scratch_run, other)
    # before: "others/run/.fasttl-run is a symbolic link or not a folder ... (remove it ...)": another run's marker
    with pytest.raises(OptionError, match=rf"^tensorboard: {other} is in the fasttl run folder {other}, which only its "
                                          r"run writes into; give another --tensorboard folder$"):
        run(**one_epoch_run(cat_ship, tmp_path / "mine" / "run", tensorboard=str(tmp_path / "others")))
    assert not (tmp_path / "mine").exists() and (other / ".fasttl-run").is_file()


def test_a_users_file_beside_the_model_folders_is_left_alone(cat_ship, tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (fasttl[tensorboard])")
    from fasttl.transfer.job import run
    from fasttl.util.errors import OptionError

    (tmp_path / "boards" / "run").mkdir(parents=True)
    (tmp_path / "boards" / "run" / "notes.txt").write_text("mine")
    # before: "notes.txt is a symbolic link or not a folder ... (remove it, ...)"
    run(**one_epoch_run(cat_ship, tmp_path / "run", tensorboard=str(tmp_path / "boards")))
    assert (tmp_path / "boards" / "run" / "notes.txt").read_text() == "mine"
    assert any((tmp_path / "boards" / "run" / "scratch").iterdir())
    (tmp_path / "b2" / "run").mkdir(parents=True)
    (tmp_path / "b2" / "run" / "scratch").write_text("a file where a model's events go")
    with pytest.raises(OptionError, match=r"b2/run/scratch is a symbolic link or not a folder, where fasttl writes "
                                          r"event files into a folder of its own; move it away, or give another"):
        run(**one_epoch_run(cat_ship, tmp_path / "r2" / "run", tensorboard=str(tmp_path / "b2")))


@pytest.mark.parametrize("device, said", [("cuda", "device: cuda asked for, but torch sees no CUDA GPU"),
                                          ("gpu", "device: expected cpu, cuda or cuda:N, got 'gpu'"),
                                          (5, "device: expected cpu, cuda or cuda:N, got 5"),
                                          ("mps", "device: expected cpu, cuda or cuda:N, got 'mps'")])
def test_feature_cache_to_names_a_device_it_cannot_use(tmp_path, device, said):
    import numpy as np
    import torch

    import fasttl
    from fasttl.util.errors import OptionError

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible: cuda is a device this machine has")
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [rows], [0, 1, 0], classes=["a", "b"], dtype="fp32")
    # before: a bare AssertionError (cuda), RuntimeError (gpu, 5) or NotImplementedError (mps)
    with pytest.raises(OptionError, match=rf"^{said}"):
        cache.to(device)
    assert torch.equal(cache.to("cpu").all_features(), torch.from_numpy(rows))
    assert torch.equal(cache.subset(slice(1, None)).all_features(), torch.from_numpy(rows[1:]))  # a slice: its rows


def test_predict_out_naming_an_image_says_the_name_first(scratch_run, cat_ship, tmp_path, capsys):
    from conftest import cli, one_line_error

    image = tmp_path / "0000.jpg"
    shutil.copy(sorted((cat_ship / "test" / "cat").iterdir())[0], image)
    for more in ([], ["--overwrite"]):
        code, _, err = cli(capsys, "predict", "--run", scratch_run, cat_ship / "test", "--out", image, *more,
                           "--no-progress")
        # before: without --overwrite "exists; pass --overwrite to replace it", a fix the name then refused
        assert code == 2 and one_line_error(err) == f"fasttl: error: out: {str(image)!r} does not end in .csv (name " \
                                                    "the file predictions.csv, say)"
