"""The library's version."""

__version__ = "0.5.0"
