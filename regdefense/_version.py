"""The package version, apart from the package face so that any layer may read it."""

__version__ = "0.1.0"
