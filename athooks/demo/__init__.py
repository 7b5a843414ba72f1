"""``athooks demo``: attention transfer on real handwritten digits, on a laptop CPU, no download."""

from athooks.demo.data import cluttered_digits
from athooks.demo.run import DemoResult, run_demo

__all__ = ["DemoResult", "cluttered_digits", "run_demo"]
