"""lorq's version, from the installed package's metadata (nothing imports the package root)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorq")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0.0.0+unknown"
