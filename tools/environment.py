"""The Python the Makefile installs into and runs: prints its path.

    python3 tools/environment.py .venv

The given Python itself when it may take packages (a virtual or conda environment, a pyenv or
python.org build); else a virtual environment in the given folder, made from it on first use.
Debian's and Ubuntu's python3 is externally managed (PEP 668): pip refuses to install into it,
and installing around that would mix fasttl's torch with the system's packages.

Standard library only, Python 3.9+: it runs before anything is installed.
"""
import os
import subprocess
import sys
import sysconfig

MARKER = "EXTERNALLY-MANAGED"  # PEP 668: the distribution manages this Python's packages


def in_environment() -> bool:
    """A virtual environment (venv, virtualenv) or an active conda one: packages go there."""
    conda = os.environ.get("CONDA_PREFIX")
    return sys.prefix != sys.base_prefix or (conda is not None and os.path.realpath(conda) ==
                                             os.path.realpath(sys.prefix))


def externally_managed(stdlib: str, prefix: str) -> bool:
    """The distribution's Python: PEP 668's marker beside its standard library, or installed
    under /usr by the system's package manager."""
    return os.path.isfile(os.path.join(stdlib, MARKER)) or os.path.realpath(prefix) == "/usr"


def venv_python(venv: str) -> str:
    return os.path.join(os.path.abspath(venv), "Scripts" if os.name == "nt" else "bin",
                        "python.exe" if os.name == "nt" else "python")


def interpreter(venv: str) -> str:
    """The path of the Python to use, making `venv` when it is needed and not there yet."""
    if in_environment() or not externally_managed(sysconfig.get_path("stdlib"), sys.prefix):
        return sys.executable
    python = venv_python(venv)
    if os.path.isfile(python):
        return python
    made = subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True, text=True)
    if made.returncode != 0 or not os.path.isfile(python):
        why = " ".join((made.stderr or made.stdout).split())[:200] or "no interpreter was made"
        raise SystemExit(f"make: {sys.executable} is the system's Python (pip may not install into it), and "
                         f"`{sys.executable} -m venv {venv}` failed ({why}); install the venv module "
                         "(Debian/Ubuntu: sudo apt install python3-venv), or pass PYTHON=<a Python of yours>")
    print(f"make: {sys.executable} is the system's Python, so fasttl goes into the virtual environment {venv} "
          f"(afterwards: source {venv}/bin/activate, or run {venv}/bin/fasttl)", file=sys.stderr)
    return python


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1] or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python3 tools/environment.py VENV_FOLDER")
    print(interpreter(sys.argv[1]))


if __name__ == "__main__":
    main()
