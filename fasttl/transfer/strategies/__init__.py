"""The transfer strategies, one module each; importing this package registers them all (see
fasttl.transfer.registry), in the order `fasttl run --help` lists them. A new strategy is one new
module here and one name in the import below."""
from fasttl.transfer.strategies import feature, finetune, scratch, distill, dann  # noqa: F401  (order matters)
