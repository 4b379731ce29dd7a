"""The installed version of daskptycho (``0+unknown`` when run from a source tree)."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("daskptycho")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
