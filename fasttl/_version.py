"""fasttl's version, read from the installed package's metadata: pyproject.toml is the one place
it is written. An uninstalled checkout has none."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fasttl")
except PackageNotFoundError:
    __version__ = "0+unknown"
