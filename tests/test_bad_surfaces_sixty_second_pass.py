"""The sixty-first pass's leftover: --resume compared path options as typed, so the same data folder
given as ./data/, as an absolute path or from another folder was refused as other data (and a
teacher, target or classes file the same). Paths are now recorded and compared as the absolute
path they name; a resumed run keeps the identity and key its interrupted run recorded (an older
fasttl's run, whose identity lacks a key added since, resumes with its checkpoints); a --weights
file rewritten in place since the run started is refused, as a teacher's weights are."""
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


def test_resume_still_refuses_another_folder_by_its_path(cat_ship, tmp_path, monkeypatch):
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import RunError

    for name in ("one", "two"):
        shutil.copytree(cat_ship, tmp_path / name, copy_function=shutil.copy2)  # the same content, times kept
    out = tmp_path / "run"
    run(**one_epoch_run(tmp_path / "one", out))
    _interrupted(out)
    with pytest.raises(RunError, match=rf"data: was '{tmp_path / 'one'}', now '{tmp_path / 'two'}'"):
        run(**one_epoch_run(tmp_path / "two", out, resume=True))


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
