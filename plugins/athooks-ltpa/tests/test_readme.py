"""Every Python example of the package's README runs."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    import matplotlib.pyplot as plt

    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
    plt.close("all")
