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


def test_first_calls_of_the_ops_do_not_import_torch_dynamo():
    """@custom_op kernels import torch._dynamo (over a second) at their first call; fasttl's ops
    are registered without that wrapper, and stay so."""
    code = (
        "import sys, torch, fasttl\n"
        "from fasttl.cache.kernels import gather, pool_store\n"
        "student = torch.randn(4, 10, requires_grad=True)\n"
        "fasttl.distillation_loss(student, torch.randn(4, 10), torch.tensor([1, 2, 3, 4])).backward()\n"
        "cache = torch.empty(4, 8, dtype=torch.float16)\n"
        "pool_store(torch.randn(4, 8, 2, 2), cache, torch.arange(4))\n"
        "assert gather(cache, torch.tensor([0, 3])).shape == (2, 8)\n"
        "assert student.grad is not None and torch.isfinite(student.grad).all()\n"
        "print('dynamo imported:', 'torch._dynamo' in sys.modules)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "dynamo imported: False" in result.stdout
