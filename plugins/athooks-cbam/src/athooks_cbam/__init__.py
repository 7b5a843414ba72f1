"""CBAM-style spatial and SE-style channel attention maps for athooks (a plugin package)."""

from athooks_cbam.plugin import CBAMSpatial, SEChannel

__all__ = ["CBAMSpatial", "SEChannel"]
__version__ = "0.1.0"
