"""Loading, build information and the `fasttl info` command."""
import json
import subprocess
import sys

import torch

import fasttl


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_works_without_the_native_module_and_the_first_call_explains():
    code = (
        "import sys; sys.modules['fasttl._C'] = None\n"
        "import torch, fasttl\n"
        "assert fasttl.build_info()['loaded'] is False\n"
        "try:\n"
        "    fasttl.distillation_loss(torch.randn(2, 3), torch.randn(2, 3))\n"
        "except RuntimeError as e:\n"
        "    print('ERROR:', e)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "native module is not available" in result.stdout
    assert "pip install" in result.stdout


def test_build_info_reports_the_native_build():
    info = fasttl.build_info()
    assert info["loaded"] is True
    assert info["version"] == fasttl.__version__
    assert info["openmp_threads"] >= 1
    if info["cuda"]:
        archs = info["cuda_archs"].split(",")
        assert archs and all(a.strip().isdigit() for a in archs), info["cuda_archs"]


def test_info_command_prints_every_field():
    result = subprocess.run([sys.executable, "-m", "fasttl", "info", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("fasttl", "torch", "native_module", "cuda_kernels", "cuda_archs", "gpu_visible", "openmp_threads", "dali"):
        assert key in report
    assert report["torch"] == torch.__version__
    assert report["gpu_visible"] == torch.cuda.is_available()
    text = subprocess.run([sys.executable, "-m", "fasttl", "info"], capture_output=True, text=True, timeout=120).stdout
    assert "CUDA kernels" in text and "OpenMP threads" in text and "DALI" in text


def test_cuda_call_on_a_build_without_cuda_kernels_is_a_clear_error(monkeypatch):
    from fasttl import _native

    class CpuOnlyBuild:
        @staticmethod
        def build_info():
            return {"version": fasttl.__version__, "cuda": False, "cuda_archs": "", "openmp_threads": 1}

    monkeypatch.setattr(_native, "native", CpuOnlyBuild())
    try:
        _native.require_cuda_kernels("distill_rows_cuda")
    except RuntimeError as e:
        assert "no CUDA kernels" in str(e) and "distill_rows_cuda" in str(e)
    else:
        raise AssertionError("expected a RuntimeError")
