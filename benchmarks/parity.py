"""Parity of athooks' AT loss with an independent re-derivation of the reference formulas.

Prints, for a timm pair and a torchvision pair (ResNet-34 teacher, ResNet-18 student, random
weights, BN affine parameters randomised so no map is trivially zero), the largest relative error
of ``d.loss()`` against the hand-written reference over every built-in mapping, both distances
(authors' code and paper Eq. 2) and 3 input batches.

Run: python3 benchmarks/parity.py
"""

from __future__ import annotations

import pathlib
import sys

import timm
import torch
import torchvision

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from conftest import ref_at_loss_code, ref_at_loss_paper, resnet_stage_outputs

import athooks
from athooks import Distiller

MAPPINGS = [
    ("sum", {}, 1.0),
    ("sum_p", {"p": 2}, 2.0),
    ("sum_p", {"p": 4}, 4.0),
    ("max_p", {"p": 1}, 1.0),
    ("max_p", {"p": 2}, 2.0),
]


def models(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0 if kind == "timm" else 1)
    if kind == "timm":
        pair = (
            timm.create_model("resnet34", num_classes=10),
            timm.create_model("resnet18", num_classes=10),
        )
    else:
        pair = (
            torchvision.models.resnet34(num_classes=10),
            torchvision.models.resnet18(num_classes=10),
        )
    with torch.no_grad():
        for m in (*pair[0].modules(), *pair[1].modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return pair


def main() -> None:
    print("| pair | distance | cases | max relative error |")
    print("|---|---|---|---|")
    for kind in ("timm", "torchvision"):
        teacher, student = models(kind)
        for distance in ("code", "paper"):
            worst, cases = 0.0, 0
            for seed in range(3):
                x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
                for mapping, options, p in MAPPINGS:
                    loss = athooks.loss("at", mapping=mapping, distance=distance, **options)
                    with Distiller(teacher, student, layers="layer?", losses=loss) as d:
                        student(x)
                        got = d.loss().double().item()
                    teacher.eval()
                    with torch.no_grad():
                        pairs = list(
                            zip(
                                resnet_stage_outputs(teacher, x),
                                resnet_stage_outputs(student, x),
                                strict=True,
                            )
                        )
                    ref = ref_at_loss_code if distance == "code" else ref_at_loss_paper
                    want = ref(pairs, mapping=mapping, p=p).item()
                    worst = max(worst, abs(got - want) / abs(want))
                    cases += 1
            print(f"| {kind} resnet34 -> resnet18 | {distance} | {cases} | {worst:.2e} |")


if __name__ == "__main__":
    main()
