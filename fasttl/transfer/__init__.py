"""The transfer job: strategies (a registry), metrics, reports and the run directory.

    fasttl.transfer.run(data="cifar10", strategy="mlp", epochs=20)     # as `fasttl run`
    fasttl.transfer.evaluate_run("runs/cifar10-mlp", data="my_data")  # as `fasttl eval`
"""
from fasttl.transfer import registry
from fasttl.transfer.config import RunConfig
from fasttl.transfer.evaluate import evaluate_run
from fasttl.transfer.job import run

__all__ = ["RunConfig", "evaluate_run", "registry", "run"]
