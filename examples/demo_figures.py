"""Make the figures of the tutorial "See the attention" from the demo's trained models.

Trains (or loads the cached) teacher and the two students exactly as ``athooks demo`` does, with
its default settings, writing them to ``athooks-demo/`` as the demo does, then draws with
:mod:`athooks.viz`:

* ``docs/tutorials/img/demo-compare.png``: teacher, baseline student and AT student, every stage,
  on three test digits;
* ``docs/tutorials/img/demo-across-p.png``: the AT student's maps across layers and p (the
  paper's Figure 4, on digits).

Run from the repository root: ``python3 examples/demo_figures.py`` (about 3 minutes on two idle
CPU cores from an empty cache). ``--reuse`` draws the models an earlier ``athooks demo`` (or this
script) saved in ``athooks-demo/`` instead of training them again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import athooks.viz
from athooks.cli import load_checkpoint
from athooks.demo.data import cluttered_digits
from athooks.demo.run import DemoConfig, run_demo
from athooks.models import create_model

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "tutorials" / "img"


def trained_models(folder: Path, reuse: bool) -> dict[str, nn.Module]:
    """The demo's teacher, baseline student and AT student (default settings)."""
    config = DemoConfig()
    files = {"teacher": "teacher.pt", "student": "student.pt", "student + AT": "student-at.pt"}
    if reuse and all((folder / f).exists() for f in files.values()):
        models: dict[str, nn.Module] = {}
        for label, name in files.items():
            arch = config.teacher if label == "teacher" else config.student
            model = create_model(arch, num_classes=10, in_chans=1)
            models[label] = load_checkpoint(model, str(folder / name)).eval()
            print(f"{label}: loaded {folder / name}")
        return models
    result = run_demo(config, folder, figure=False)
    print(result.table())
    return result.models


def main() -> int:
    """Train (or load) the demo's models and write the two figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="load athooks-demo/*.pt if present")
    parser.add_argument("--out", default=str(ROOT / "athooks-demo"), help="the demo's folder")
    args = parser.parse_args()
    models = trained_models(Path(args.out), args.reuse)
    OUT.mkdir(parents=True, exist_ok=True)
    _, _, x_test, y_test = cluttered_digits(DemoConfig().data_seed)
    images = x_test[:3]
    with torch.no_grad():
        for label, model in models.items():
            pred = model.eval()(images).argmax(1).tolist()
            print(f"{label}: predicts {pred} for the drawn digits (labels {y_test[:3].tolist()})")
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
    print(f"wrote {OUT / 'demo-compare.png'} and {OUT / 'demo-across-p.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
