"""The Makefile's choice of Python (tools/environment.py): the given one where packages may be
installed, else a virtual environment made from it (Debian/Ubuntu's python3 is externally
managed, PEP 668, and pip refuses to install into it)."""
import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(ROOT, "tools", "environment.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import environment  # noqa: E402


def _system_python():
    """A Python that is externally managed here, or a skip saying there is none."""
    for path in ("/usr/bin/python3",):
        if os.path.isfile(path):
            probe = subprocess.run([path, "-c", "import sysconfig, sys; print(sysconfig.get_path('stdlib')); "
                                    "print(sys.prefix)"], capture_output=True, text=True)
            stdlib, prefix = probe.stdout.split()
            if probe.returncode == 0 and environment.externally_managed(stdlib, prefix):
                return path
    pytest.skip("no externally managed system Python on this machine (/usr/bin/python3)")


def _choose(python, venv, cwd):
    return subprocess.run([python, SCRIPT, str(venv)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_the_marker_or_a_usr_prefix_is_a_system_python(tmp_path):
    stdlib = tmp_path / "lib"
    stdlib.mkdir()
    assert not environment.externally_managed(str(stdlib), str(tmp_path))
    (stdlib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\n")
    assert environment.externally_managed(str(stdlib), str(tmp_path))
    assert environment.externally_managed(str(tmp_path / "elsewhere"), "/usr")


def test_a_python_that_takes_packages_is_used_as_it_is(tmp_path):
    if environment.externally_managed(sysconfig.get_path("stdlib"), sys.prefix) and not environment.in_environment():
        pytest.skip("this test interpreter is itself a system Python")
    chosen = _choose(sys.executable, tmp_path / "venv", tmp_path)
    assert chosen.returncode == 0 and chosen.stdout.strip() == sys.executable and chosen.stderr == ""
    assert not (tmp_path / "venv").exists()


def test_a_system_python_gets_a_virtual_environment_made_once(tmp_path):
    python = _system_python()
    venv = tmp_path / "venv"
    first = _choose(python, venv, tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(venv / "bin" / "python") and os.path.isfile(first.stdout.strip())
    assert "virtual environment" in first.stderr and "source" in first.stderr
    # pip may install there: the environment is not externally managed
    check = subprocess.run([first.stdout.strip(), SCRIPT, str(tmp_path / "other")], capture_output=True, text=True)
    assert check.stdout.strip() == first.stdout.strip() and not (tmp_path / "other").exists()
    again = _choose(python, venv, tmp_path)
    assert again.returncode == 0 and again.stdout == first.stdout and again.stderr == ""
    # the Makefile runs its commands with it
    dry = subprocess.run(["make", "-n", "-C", ROOT, f"PYTHON={python}", f"VENV={venv}", "test"],
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert f"{venv}/bin/python -m pytest tests -q" in dry.stdout
    assert f"{venv}/bin/python -m pip install -q \"torch==" in dry.stdout


def test_a_venv_that_cannot_be_made_is_one_line_saying_what_to_install(tmp_path):
    python = _system_python()
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder would go")
    failed = _choose(python, blocker / "venv", tmp_path)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and failed.stdout == "" and len(lines) == 1, failed.stderr
    assert lines[0].startswith(f"make: {python} is the system's Python") and "apt install python3-venv" in lines[0]
    assert blocker.read_text() == "a file where the folder would go"


@pytest.mark.parametrize("args", [[], [""], ["--help"], ["a", "b"]])
def test_usage_is_one_line(args):
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip() == "usage: python3 tools/environment.py VENV_FOLDER"
