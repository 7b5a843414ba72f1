"""athooks.plan.LayerPlan: when a Distiller's layers are resolved."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import tiny_pair
from torch import nn

import athooks
from athooks import Layer
from athooks.errors import ConfigurationError, LayerResolutionError
from athooks.plan import LayerPlan

SUM_P = [athooks.mapping("sum_p")]


def test_named_layers_are_resolved_at_once():
    teacher, student = tiny_pair()
    plan = LayerPlan(teacher, student, "relu?", SUM_P, "auto")
    assert plan.taps is not None and plan.pairing is None
    assert plan.pairs() == [("relu1", "relu1"), ("relu2", "relu2"), ("relu3", "relu3")]


def test_auto_waits_for_the_first_real_input():
    teacher, student = torchvision.models.resnet34(), torchvision.models.resnet18()
    plan = LayerPlan(teacher, student, "auto", SUM_P, "auto")
    with pytest.raises(ConfigurationError, match="resolved on the student's first call"):
        plan.pairs()
    seen = []
    plan.on_resolved = seen.append
    plan.resolve_on((torch.randn(4, 3, 32, 32),), {})
    assert plan.pairs() == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    assert seen == [plan.taps] and plan.pairing is not None
    plan.resolve_on((torch.randn(4, 3, 224, 224),), {})  # once only
    assert len(plan.pairs()) == 3 and len(seen) == 1


def test_auto_with_input_size_or_without_mappings_is_resolved_at_once():
    teacher, student = torchvision.models.resnet34(), torchvision.models.resnet18()
    assert (
        len(LayerPlan(teacher, student, "auto", SUM_P, "auto", input_size=(3, 64, 64)).pairs()) == 4
    )
    assert LayerPlan(teacher, student, "auto", [], "auto").pairs() == []  # e.g. losses="kd"


def test_copy_decisions_loaded_before_resolution_are_checked_when_it_happens():
    teacher, student = tiny_pair()
    plan = LayerPlan(teacher, student, "auto", SUM_P, "auto")
    assert plan.load_state_dict({"taps.relu3.copy": torch.tensor(True)}, strict=True) == []
    assert plan.state_dict() == {"taps.relu3.copy": torch.tensor(True)}
    assert plan.load_state_dict({"other": torch.tensor(1)}, strict=True) == ["other"]
    plan = LayerPlan(teacher, student, "auto", SUM_P, "auto")
    plan.load_state_dict({"taps.nope.copy": torch.tensor(True)}, strict=True)
    with pytest.raises(ConfigurationError, match="'nope', which layers='auto' did not choose"):
        plan.resolve_on((torch.randn(2, 3, 16, 16),), {})


# ------------------------------------------------------------------ select="*": on the first call


class Neck(nn.Module):
    def __init__(self, keys=("p3", "p4", "p5"), width=4):
        super().__init__()
        self.keys = keys
        self.conv = nn.Conv2d(3, width, 3, padding=1)

    def forward(self, x):
        f = self.conv(x)
        return {k: f[..., :: 2**i, :: 2**i] for i, k in enumerate(self.keys)}


def test_every_tensor_is_expanded_on_the_first_call_over_the_shared_keys():
    teacher = nn.Sequential(Neck(("p3", "p4", "p5", "p6")))
    student = nn.Sequential(Neck(("p5", "p3", "extra")))
    plan = LayerPlan(teacher, student, Layer("0", select="*"), SUM_P, "auto")
    with pytest.raises(ConfigurationError, match=r"select='\*'.*first call"):
        plan.pairs()
    teacher.train()
    seen = []
    plan.on_resolved = seen.append
    plan.resolve_on((torch.randn(2, 3, 8, 8),), {})
    # the keys both have, in the teacher's order
    assert plan.pairs() == [("0['p3']", "0['p3']"), ("0['p5']", "0['p5']")]
    assert seen == [plan.taps]
    assert teacher.training and all(m.training for m in teacher.modules())  # modes restored


def test_every_tensor_without_shared_keys_or_of_a_tensor_output_is_a_clear_error():
    teacher, student = nn.Sequential(Neck(("a", "b"))), nn.Sequential(Neck(("c",)))
    plan = LayerPlan(teacher, student, Layer("0", select="*"), SUM_P, "auto")
    with pytest.raises(LayerResolutionError, match=r"\['a', 'b'\].*\['c'\]: no key in common"):
        plan.resolve_on((torch.randn(1, 3, 8, 8),), {})
    conv_t, conv_s = nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Conv2d(3, 4, 3))
    plan = LayerPlan(conv_t, conv_s, Layer("0", select="*"), SUM_P, "auto")
    with pytest.raises(LayerResolutionError, match="returned a single tensor"):
        plan.resolve_on((torch.randn(1, 3, 8, 8),), {})


def test_every_tensor_in_a_distiller_with_a_teacher_input():
    teacher = nn.Sequential(nn.Conv2d(1, 3, 1), Neck(("p3", "p4")))
    student = nn.Sequential(Neck(("p3", "p4")))
    gray = lambda x: x.mean(1, keepdim=True)  # noqa: E731
    with athooks.Distiller(
        teacher,
        student,
        layers=[(Layer("1", select="*"), Layer("0", select="*"))],
        teacher_input=gray,
    ) as d:
        student(torch.randn(2, 3, 8, 8))
        assert torch.isfinite(d.loss())
    assert d.pairs == [("1['p3']", "0['p3']"), ("1['p4']", "0['p4']")]
