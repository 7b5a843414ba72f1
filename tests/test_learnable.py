"""Learnable mappings and losses: parameters, device/dtype, checkpoint and bit-exact resume."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F  # noqa: N812
from conftest import TinyCNN
from torch import nn

import athooks
from athooks import Distiller
from athooks.mappings import Features
from athooks.plugin import Loss, Mapping

X = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)]
Y = [torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(100 + i)) for i in range(6)]


class SmoothedEnergy(Mapping):
    """sum_c A^2, then a learned 3x3 smoothing of the map (channel-count independent)."""

    name = "smoothed_energy"

    def __init__(self) -> None:
        super().__init__()
        self.smooth = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, features):
        return F.softplus(self.smooth(features.pow(2).sum(1, keepdim=True))).squeeze(1)


class Hint(Loss):
    """FitNets-style hint: a learned 1x1 regressor from student to teacher width."""

    name = "hint"

    def __init__(self, student_chs: int, teacher_chs: int) -> None:
        super().__init__()
        self.regressor = nn.Conv2d(student_chs, teacher_chs, 1)
        self.features = Features()

    def captures(self):
        return (self.features,)

    def forward(self, step):
        (a_t, a_s), *_ = step.features(self.features)
        return F.mse_loss(self.regressor(a_s), a_t)


def make(seed: int = 0):
    torch.manual_seed(0)
    teacher = TinyCNN(16, inplace=False)  # the same (trained, frozen) teacher every time
    torch.manual_seed(seed)
    student = TinyCNN(8, inplace=False)
    losses = [athooks.loss("at", mapping=SmoothedEnergy()), Hint(32, 64)]
    d = Distiller(teacher, student, layers="relu3", losses=losses)
    opt = torch.optim.SGD([*student.parameters(), *d.parameters()], lr=0.05, momentum=0.9)
    return teacher, student, d, opt


def train(student, d, opt, steps):
    with d:
        for i in steps:
            loss = F.cross_entropy(student(X[i]), Y[i]) + d.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_parameters_of_learnable_mappings_and_losses_reach_the_optimizer():
    _, student, d, opt = make()
    names = [n for n, _ in d.named_parameters()]
    # no tap has run yet; the step counter (schedule.step) is always there
    assert set(d.state_dict()) == {f"losses.{n}" for n in names} | {"schedule.step"}
    assert names == [
        "0.mapping.smooth.weight",
        "0.mapping.smooth.bias",
        "1.regressor.weight",
        "1.regressor.bias",
    ]
    before = [p.detach().clone() for p in d.parameters()]
    train(student, d, opt, range(2))
    assert all(p.grad is not None for p in d.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, d.parameters(), strict=True))


def test_parameters_follow_the_students_dtype():
    teacher, student, d, _ = make()
    student.double()
    teacher.double()
    with d:
        assert all(p.dtype == torch.float64 for p in d.parameters())
        student(X[0].double())
        assert torch.isfinite(d.loss())
        student.float()
        teacher.float()
        student(X[0])  # moved again at the next step
        assert all(p.dtype == torch.float32 for p in d.parameters())
        d.loss().backward()


def test_checkpoint_and_resume_is_bit_exact():
    # uninterrupted: 6 steps
    _, student_a, d_a, opt_a = make()
    train(student_a, d_a, opt_a, range(6))

    # interrupted after 3 steps, saved, restored into fresh objects, 3 more steps
    _, student_b, d_b, opt_b = make()
    train(student_b, d_b, opt_b, range(3))
    buffer = io.BytesIO()
    torch.save(
        {
            "student": student_b.state_dict(),
            "distiller": d_b.state_dict(),
            "opt": opt_b.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    _, student_c, d_c, opt_c = make(seed=123)  # different initialisation, overwritten by the load
    checkpoint = torch.load(buffer, weights_only=True)
    student_c.load_state_dict(checkpoint["student"])
    d_c.load_state_dict(checkpoint["distiller"])
    opt_c.load_state_dict(checkpoint["opt"])
    train(student_c, d_c, opt_c, range(3, 6))

    for a, c in zip(student_a.state_dict().values(), student_c.state_dict().values(), strict=True):
        assert torch.equal(a, c)
    for a, c in zip(d_a.state_dict().values(), d_c.state_dict().values(), strict=True):
        assert torch.equal(a, c)


def test_builtin_losses_have_no_parameters():
    teacher, student = TinyCNN(16), TinyCNN(8)
    d = Distiller(teacher, student, layers="relu?", losses=["at", "kd"])
    assert list(d.parameters()) == [] and d.state_dict() == {"schedule.step": torch.tensor(0)}


def test_state_dict_records_tap_modes_and_rejects_unknown_keys():
    _, student, d, opt = make()
    train(student, d, opt, range(1))
    state = d.state_dict()
    assert state["taps.relu3.copy"].item() is False  # relu3 is not overwritten in place
    import pytest

    from athooks.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="unexpected key 'taps.nope.copy'.*strict=False"):
        d.load_state_dict({**state, "taps.nope.copy": torch.tensor(True)})
    d.load_state_dict({**state, "taps.nope.copy": torch.tensor(True)}, strict=False)
