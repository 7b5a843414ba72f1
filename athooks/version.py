"""athooks' version, at the bottom of the package so that any module can name it."""

__version__ = "0.1.0"
