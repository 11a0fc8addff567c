"""A plain `pip install .` (no editable mode, no extras) into a fresh virtual environment installs
everything `fasttl run` needs: the job runs there on its embedded default."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def tracked_files():
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the source tree to install can't be listed")
    return [f for f in listed.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


@pytest.mark.slow
def test_plain_pip_install_runs_the_job(tmp_path):
    source = tmp_path / "src"
    for name in tracked_files():  # a copy, so the install's build folder never meets the editable one
        os.makedirs(source / os.path.dirname(name), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")

    def pip(*args):
        result = subprocess.run([python, "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                                env=dict(os.environ, FASTTL_CUDA="OFF"), timeout=1500)
        assert result.returncode == 0, result.stderr[-3000:]

    # torch first, pinned to this interpreter's version: a bare requirement would pull a CUDA build
    pip(f"torch=={torch.__version__.split('+')[0]}")
    wheels = tmp_path / "wheels"
    built = subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, env=dict(os.environ, FASTTL_CUDA="OFF"), timeout=1500)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("fasttl-*.whl")
    with zipfile.ZipFile(wheel) as archive:  # the wheel stays small apart from the native module
        others = sum(i.compress_size for i in archive.infolist() if not i.filename.endswith(".so"))
    assert others < 10 * 2**20, f"{wheel.name}: {others / 2**20:.1f} MiB besides the native module"
    pip(str(wheel))
    out = tmp_path / "run"
    result = subprocess.run([str(venv / "bin" / "fasttl"), "run", "--epochs", "1", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=900,
                            env=dict(os.environ, FASTTL_CACHE_DIR=str(tmp_path / "cache")))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] > 0 and set(metrics["compare"]) == {"scratch"}
    assert metrics["device"] == "cpu"
