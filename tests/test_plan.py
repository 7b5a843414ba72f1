"""athooks.plan.LayerPlan: when a Distiller's layers are resolved."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import tiny_pair

import athooks
from athooks.errors import ConfigurationError
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
