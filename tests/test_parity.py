"""d.loss() equals an independent re-derivation of the reference formulas, to 1e-5 relative."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from conftest import ref_at_loss_code, ref_at_loss_paper, resnet_stage_outputs

import athooks
from athooks import Distiller

MAPPINGS = [
    ("sum", {}, 1.0),
    ("sum_p", {"p": 2}, 2.0),
    ("sum_p", {"p": 4}, 4.0),
    ("max_p", {"p": 2}, 2.0),
    ("max_p", {"p": 1}, 1.0),
]


def _pair(kind: str):
    # different seeds: both libraries' ResNets initialise identically from the same seed
    torch.manual_seed(0 if kind == "timm" else 1)
    if kind == "timm":
        return timm.create_model("resnet34", num_classes=10), timm.create_model(
            "resnet18", num_classes=10
        )
    return torchvision.models.resnet34(num_classes=10), torchvision.models.resnet18(num_classes=10)


@pytest.fixture(scope="module", params=["timm", "torchvision"])
def models(request):
    teacher, student = _pair(request.param)
    # perturb the zero-initialised last BNs of timm so that every map is non-trivial
    with torch.no_grad():
        for m in (*teacher.modules(), *student.modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return teacher, student


@pytest.mark.parametrize("distance", ["code", "paper"])
@pytest.mark.parametrize(("mapping", "options", "p"), MAPPINGS)
def test_loss_matches_reference(models, mapping, options, p, distance):
    teacher, student = models
    student.train()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    beta = 1e3 if distance == "code" else 10.0
    loss_fn = athooks.loss("at", beta=beta, mapping=mapping, distance=distance, **options)
    with Distiller(teacher, student, layers="layer?", losses=loss_fn) as d:
        student(x)
        got = d.loss()
    # the reference: both models' stage outputs computed by hand, teacher in eval mode
    teacher.eval()
    with torch.no_grad():
        t_feats = resnet_stage_outputs(teacher, x)
        s_feats = resnet_stage_outputs(student, x)  # train-mode BN, like the student above
    ref = ref_at_loss_code if distance == "code" else ref_at_loss_paper
    want = ref(list(zip(t_feats, s_feats, strict=True)), beta=beta, mapping=mapping, p=p)
    assert d.pairs == [(f"layer{i}", f"layer{i}") for i in range(1, 5)]
    rel = abs(got.double().item() - want.item()) / abs(want.item())
    assert rel < 1e-5, (got.item(), want.item(), rel)


def test_parity_error_report(models, capsys):
    """Print the measured relative error of the default loss (quoted in the closing note)."""
    teacher, student = models
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with Distiller(teacher, student, layers="layer?") as d:
        student(x)
        got = d.loss().double().item()
    teacher.eval()
    with torch.no_grad():
        pairs = list(
            zip(resnet_stage_outputs(teacher, x), resnet_stage_outputs(student, x), strict=True)
        )
    want = ref_at_loss_code(pairs).item()
    rel = abs(got - want) / want
    print(f"default AT parity: athooks {got:.8g} reference {want:.8g} relative error {rel:.2e}")
    assert rel < 1e-5
