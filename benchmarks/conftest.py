import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small sizes, for a smoke run (CI)")


@pytest.fixture
def quick(request):
    return request.config.getoption("--quick")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU visible"))])
def device(request):
    return request.param
