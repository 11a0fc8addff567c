import pytest
import torch

CUDA_REASON = "no CUDA GPU visible (the CUDA kernels are compiled, but only a GPU machine runs them)"


def devices():
    """CPU always; CUDA as a parameter that skips with a reason where no GPU is visible."""
    return [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)),
    ]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, reproducible from the test's name.
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
