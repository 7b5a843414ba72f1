"""Make the figures of the tutorial "See the attention" from the demo's trained models.

Trains (or loads the cached) teacher and the two students exactly as ``athooks demo`` does, with
its default settings, then draws with :mod:`athooks.viz`:

* ``docs/tutorials/img/demo-compare.png``: teacher, baseline student and AT student, every stage,
  on three test digits;
* ``docs/tutorials/img/demo-across-p.png``: the AT student's maps across layers and p (the
  paper's Figure 4, on digits).

Run from the repository root: ``python3 examples/demo_figures.py`` (about 3 minutes on two CPU
cores from an empty cache).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import athooks.viz
from athooks.demo.data import cluttered_digits
from athooks.demo.run import DemoConfig, run_demo

OUT = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "img"


def main() -> int:
    """Train the demo's models and write the two figures."""
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        result = run_demo(DemoConfig(), folder, figure=False)
    print(result.table())
    models = result.models
    _, _, x_test, y_test = cluttered_digits(result.config.data_seed)
    images = x_test[:3]
    fig = athooks.viz.compare(
        models["teacher"],
        {"student": models["student"], "student + AT": models["student + AT"]},
        images,
        p=2,
        dpi=80,
    )
    fig.savefig(OUT / "demo-compare.png", dpi=80)
    fig = athooks.viz.plot_across_p(models["student + AT"], images[:1], ps=(1, 2, 4), dpi=80)
    fig.savefig(OUT / "demo-across-p.png", dpi=80)
    print(f"labels of the drawn digits: {y_test[:3].tolist()}")
    print(f"wrote {OUT / 'demo-compare.png'} and {OUT / 'demo-across-p.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
