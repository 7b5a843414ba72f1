"""Every method of the zoo on a timm pair of different widths, with ``layers="auto"``.

No hand-made adapter: the connectors build themselves from the first step's shapes, the embedding
tap finds the classifiers' inputs, and each method trains the student (and its own parameters)
through an optimiser made before the first step, as a user's loop does.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812

import athooks
from athooks.registry import registered

#: Options a method needs on this pair (beyond the authors' defaults).
OPTIONS: dict[str, dict] = {
    "crd": {"n_data": 64, "nce_k": 16},
    "fsp": {"connector": True},  # FSP compares width-by-width matrices: widths differ here
}
#: CAT-KD reads the map the classifier pools: layer4, 1x1 at 32 px, which "auto" never pairs.
SIZES = {"catkd": 64}
N_CLASSES = 5
BATCH = 4


def zoo_losses() -> list[str]:
    return sorted(name for kind, name, provider, _ in registered() if "athooks-zoo" in provider)


def test_every_method_of_the_issue_is_registered_by_the_zoo():
    expected = {
        "fitnet", "nst", "fsp", "ab", "ft", "ofd", "cwd", "reviewkd", "catkd",
        "pkt", "rkd", "sp", "cc", "vid", "crd", "crd_inbatch",
        "dkd", "dist", "logit_std",
    }  # fmt: skip
    assert expected <= set(zoo_losses())


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    teacher = timm.create_model("resnet26", num_classes=N_CLASSES)  # widths 256 ... 2048
    student = timm.create_model("resnet10t", num_classes=N_CLASSES)  # widths 64 ... 512
    return teacher, student


@pytest.mark.parametrize("name", zoo_losses())
def test_method_trains_on_a_timm_pair_of_different_widths(pair, name):
    teacher, student = pair
    loss = athooks.loss(name, **OPTIONS.get(name, {}))
    size = SIZES.get(name, 32)
    d = athooks.Distiller(teacher, student, layers="auto", losses=loss, input_size=(3, size, size))
    params = list(d.parameters())  # before the first step: connectors as placeholders
    opt = torch.optim.SGD([*student.parameters(), *params], lr=1e-3)
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    y = torch.arange(BATCH) % N_CLASSES
    before = [p.detach().clone() for p in student.parameters()]
    with d:
        for _ in range(2):
            out = student(x)
            term = d.loss(target=y, index=torch.arange(BATCH))
            assert torch.isfinite(term), (name, term)
            opt.zero_grad()
            (F.cross_entropy(out, y) + term).backward()
            opt.step()
    changed = [not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True)]
    assert any(changed)
    built = [p for p in d.parameters() if not isinstance(p, torch.nn.UninitializedParameter)]
    assert all(p.grad is not None for p in built if p.requires_grad), name
    assert not any("connector" in k or k.startswith("losses") for k in student.state_dict())
