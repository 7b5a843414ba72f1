"""athooks.losses.lossset.LossSet: labels, mappings, evaluation and state of a Distiller's losses."""

from __future__ import annotations

import pytest
import torch
from conftest import ref_attention

import athooks
from athooks.errors import CaptureError, ConfigurationError
from athooks.losses.base import Step
from athooks.losses.lossset import LossSet
from athooks.mappings import FunctionMapping


def test_labels_are_unique_and_mappings_shared_once():
    shared = athooks.mapping("sum_p")
    losses = LossSet(["at", athooks.loss("at", mapping=shared), athooks.loss("at", mapping=shared)])
    assert losses.labels == ["at", "at_2", "at_3"] and len(losses.mappings) == 2
    assert not losses.needs_teacher_output and not losses.needs_input_grad
    assert LossSet("kd").needs_teacher_output and LossSet("grad_at").needs_input_grad


def test_evaluate_sums_the_terms_against_the_paper():
    losses = LossSet(["at", athooks.loss("at", beta=10.0)])
    a_t, a_s = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4, requires_grad=True)
    t_vals = {m: m(a_t) for m in losses.mappings}
    step = Step([("t", "s")], [t_vals], [{m: m(a_s) for m in losses.mappings}])
    total, terms = losses.evaluate(step)
    ref = (ref_attention(a_s) - ref_attention(a_t)).pow(2).mean()
    assert terms["at"].item() == pytest.approx(1e3 * ref.item(), rel=1e-5)
    assert terms["at_2"].item() == pytest.approx(10 * ref.item(), rel=1e-5)
    assert total.item() == pytest.approx(1010 * ref.item(), rel=1e-5) and total.requires_grad


def test_a_loss_that_returns_a_vector_is_refused():
    class Vector(athooks.Loss):
        def forward(self, step):
            return torch.ones(3)

    with pytest.raises(CaptureError, match="must return a scalar tensor"):
        LossSet(Vector()).evaluate(Step([], [], []))


def test_state_round_trip_and_strict_keys():
    gate = torch.nn.Conv2d(1, 1, 1)
    mapping = FunctionMapping(lambda f: gate(f.pow(2).mean(1, keepdim=True)).squeeze(1))
    mapping.gate = gate
    losses = LossSet(athooks.loss("at", mapping=mapping))
    state = losses.state_dict()
    assert set(state) == {"0.mapping.gate.weight", "0.mapping.gate.bias"} and losses.has_state
    other = LossSet(athooks.loss("at", mapping=mapping))
    other.load_state_dict(state)
    with pytest.raises(ConfigurationError, match=r"missing losses\.0\.mapping\.gate\.bias"):
        other.load_state_dict({"0.mapping.gate.weight": state["0.mapping.gate.weight"]})
    other.load_state_dict({}, strict=False)  # what matches, nothing here


def test_follow_moves_the_losses_to_the_models_dtype():
    gate = torch.nn.Conv2d(1, 1, 1)
    mapping = FunctionMapping(lambda f: gate(f).squeeze(1))
    mapping.gate = gate
    losses = LossSet(athooks.loss("at", mapping=mapping))
    losses.follow(torch.nn.Linear(2, 2).double())
    assert gate.weight.dtype == torch.float64
