"""Placeholder, filled by its owner."""

from athooks.plugin import LossSpec

SPECS: list[LossSpec] = []
