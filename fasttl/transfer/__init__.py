"""The transfer job: strategies (a registry), metrics, reports and the run directory.

    fasttl.transfer.run(data="cifar10", strategy="mlp", epochs=20)     # as `fasttl run`
    fasttl.transfer.evaluate_run("runs/cifar10-mlp", data="my_data")  # as `fasttl eval`
"""
# First: every strategy registers itself, so the registry's lookups find them all, whichever
# module of this package is imported.
from fasttl.transfer import strategies  # noqa: F401
from fasttl.transfer import registry
from fasttl.transfer.config import RunConfig
from fasttl.transfer.evaluate import evaluate_run
from fasttl.transfer.job import run

__all__ = ["RunConfig", "evaluate_run", "registry", "run"]
