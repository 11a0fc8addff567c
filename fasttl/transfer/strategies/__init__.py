"""The transfer strategies, one module each; importing this package registers them all (see
fasttl.transfer.registry), in the order of the import below, which is the order `fasttl run --help`
lists them. A new strategy is one new module here and one name in that import."""
from fasttl.transfer.strategies import feature, finetune, scratch, distill, dann  # noqa: F401
