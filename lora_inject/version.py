"""The library's version."""

__version__ = "0.7.0"
