"""torch.compile: athooks' taps trace into the student's graph, with the values of eager mode.

References are independent: the authors' AT loss written from the paper (``ref_at_loss_code``)
on feature maps computed by hand, in float64.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch._dynamo.config as dynamo_config
import torch._dynamo.utils as dynamo_utils
from conftest import SMALL_BATCHES, TinyCNN, ref_at_loss_code
from torch import nn

import athooks
from athooks import CaptureError, Distiller

X = SMALL_BATCHES
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def pre_activation_maps(model: TinyCNN, x: torch.Tensor) -> list[torch.Tensor]:
    """The three BatchNorm outputs, before the in-place ReLUs, computed by hand."""
    a = model.bn1(model.conv1(x))
    b = model.bn2(model.conv2(torch.relu(a)))
    c = model.bn3(model.conv3(torch.relu(b)))
    return [a, b, c]


class Student(TinyCNN):
    def forward(self, x):
        return super().forward(x)


def explain_breaks(model: nn.Module, x: torch.Tensor) -> list[str]:
    out = torch._dynamo.explain(model)(x)
    assert out.graph_break_count == len(out.break_reasons) or out.break_reasons
    return [r.reason.splitlines()[0] for r in out.break_reasons] if out.graph_break_count else []


def test_no_graph_break_on_a_timm_resnet_with_auto_layers():
    torch.manual_seed(0)
    teacher = timm.create_model("resnet34", num_classes=10)
    student = timm.create_model("resnet18", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with Distiller(teacher, student, layers="auto") as d:
        compiled = torch.compile(student, backend="eager")
        compiled(x)
        d.loss()
        out = torch._dynamo.explain(student)(x)
        assert out.graph_break_count == 0, [r.reason for r in out.break_reasons]
        assert out.graph_count == 1
        compiled(x)
        assert d.loss().item() > 0


def steps_match_the_reference(d, compiled, teacher, student, reference, maps) -> None:
    """Steps on ``X`` in float64: each loss and gradient is the AT loss from the paper on the
    maps ``maps(model, x)`` computed by hand (``reference``: an untouched copy of the student)."""
    for x in X:
        x = x.double()
        compiled(x)
        loss = d.loss()
        student.zero_grad()
        loss.backward()
        with torch.no_grad():
            t_maps = maps(teacher, x)
        want = ref_at_loss_code(list(zip(t_maps, maps(reference, x), strict=True)))
        reference.zero_grad()
        want.backward()
        assert loss.item() == pytest.approx(want.item(), rel=1e-9)
        for p, q in zip(student.parameters(), reference.parameters(), strict=True):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_steps_match_the_reference_with_inplace_relu_after_the_taps(backend):
    """Taps on BatchNorms that an in-place ReLU overwrites: eager athooks copies them; in the
    compiled graph nothing needs copying. Loss and gradient of each step are the reference's."""
    torch.manual_seed(0)
    teacher, student = TinyCNN(16).double(), Student(8).double()
    teacher.eval()
    reference = copy.deepcopy(student)
    with Distiller(teacher, student, layers="bn?") as d:
        compiled = torch.compile(student, backend=backend)
        steps_match_the_reference(d, compiled, teacher, student, reference, pre_activation_maps)
        assert explain_breaks(student, X[0].double()) == []


def relu_outputs(model: TinyCNN, x: torch.Tensor) -> list[torch.Tensor]:
    """The three ReLU outputs, computed by hand."""
    a = torch.relu(model.bn1(model.conv1(x)))
    b = torch.relu(model.bn2(model.conv2(a)))
    return [a, b, torch.relu(model.bn3(model.conv3(b)))]


class Wrapped(TinyCNN):
    def forward(self, x):
        return super().forward(x)


@pytest.mark.parametrize("in_place", [False, True], ids=["torch.compile", "model.compile"])
@pytest.mark.parametrize("before", [False, True], ids=["after-attach", "before-attach"])
def test_compiled_before_or_after_attach_wrapped_or_in_place(in_place, before):
    """``torch.compile(student)`` or ``student.compile()``, before or after the Distiller: no
    graph break, and each step's loss and gradient are the float64 reference's."""
    torch.manual_seed(0)
    teacher, student = TinyCNN(16).double().eval(), Wrapped(8, inplace=False).double()
    reference = copy.deepcopy(student)

    def compile_student() -> nn.Module:
        if in_place:
            student.compile(backend="aot_eager")
            return student
        return torch.compile(student, backend="aot_eager")

    compiled = compile_student() if before else None
    if before:
        compiled(X[0].double())  # compiled code without the taps, from before the block
    with Distiller(teacher, student, layers="relu?") as d:
        if compiled is None:
            compiled = compile_student()
        dynamo_utils.counters.clear()
        steps_match_the_reference(d, compiled, teacher, student, reference, relu_outputs)
        assert not dynamo_utils.counters["graph_break"]
        assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


class Returns(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = TinyCNN(8)

    def forward(self, x):
        feats = self.body.relu2(self.body.bn2(self.body.conv2(self.body.relu1(self.body.conv1(x)))))
        return feats


def test_output_edited_after_the_compiled_forward_is_refused_at_backward():
    torch.manual_seed(0)
    teacher, student = Returns(), Returns()
    with Distiller(teacher, student, layers="body.relu2") as d:
        compiled = torch.compile(student, backend="aot_eager")
        out = compiled(X[0])
        out.mul_(3)  # an edit of the tapped output, after the forward
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            d.loss().backward()


class Validated(TinyCNN):
    def forward(self, x):
        return super().forward(x)


def test_validation_between_steps_captures_nothing_and_compiles_once_per_mode():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), Validated(8)
    twin = copy.deepcopy(student)
    with Distiller(teacher, student, layers="relu?") as d:
        compiled = torch.compile(student, backend="aot_eager")
        graphs = []
        for x in X:
            compiled(x)
            loss = d.loss()
            with torch.no_grad():
                compiled(x)  # validation: not a step
            with pytest.raises(CaptureError, match="already called"):
                d.loss()
            graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2], "a step must not recompile"
    with Distiller(teacher, twin, layers="relu?") as d:
        twin(X[-1])
        assert loss.item() == pytest.approx(d.loss().item(), rel=1e-5)


class Shared(TinyCNN):
    def forward(self, x):
        return super().forward(x)


def test_a_hookless_model_of_the_same_class_compiled_first_does_not_hide_the_taps():
    """A baseline or EMA copy of the student's class compiled without hooks: its code must not
    run for the hooked student (dynamo skips hook guards by default)."""
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), Shared(8)
    baseline, twin = copy.deepcopy(student), copy.deepcopy(student)
    compiled_baseline = torch.compile(baseline, backend="aot_eager")
    compiled_baseline(X[0])
    with Distiller(teacher, twin, layers="relu?") as d:
        twin(X[0])
        want = d.loss().item()
    with Distiller(teacher, student, layers="relu?") as d:
        compiled = torch.compile(student, backend="aot_eager")
        compiled(X[0])
        assert d.loss().item() == pytest.approx(want, rel=1e-5)
        torch.testing.assert_close(compiled_baseline(X[1]), baseline(X[1]))
        compiled_baseline = torch.compile(copy.deepcopy(baseline), backend="aot_eager")
        compiled_baseline(X[1])  # another hookless one compiled inside the block
        compiled(X[0])
        assert d.loss().item() == pytest.approx(want, rel=1e-5)


class After(TinyCNN):
    def forward(self, x):
        return super().forward(x)


def test_after_the_block_compiled_code_runs_without_the_taps_and_the_setting_is_back():
    torch.manual_seed(0)
    before = dynamo_config.skip_nnmodule_hook_guards
    teacher, student = TinyCNN(16), After(8)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    with Distiller(teacher, student, layers="relu?") as d:
        assert dynamo_config.skip_nnmodule_hook_guards is False
        compiled = torch.compile(student, backend="aot_eager")
        compiled(X[0])
        d.loss()
    assert dynamo_config.skip_nnmodule_hook_guards == before
    ran = len(calls)
    torch.testing.assert_close(compiled(X[1]), student(X[1]))
    assert len(calls) == ran  # the teacher no longer runs
    assert not student._forward_hooks and not student.relu1._forward_hooks


class Nested(TinyCNN):
    def forward(self, x):
        return super().forward(x)


def test_nested_distillers_restore_the_setting_once_the_last_detaches():
    before = dynamo_config.skip_nnmodule_hook_guards
    teacher = TinyCNN(16)
    first = Distiller(teacher, Nested(8), layers="relu?").attach()
    second = Distiller(teacher, Nested(8), layers="relu?").attach()
    first.detach()
    assert dynamo_config.skip_nnmodule_hook_guards is False
    second.detach()
    assert dynamo_config.skip_nnmodule_hook_guards == before


def paper_grad_at(teacher: nn.Module, student: nn.Module, x, y, beta: float):
    """Eq. 3-5: beta/2 * mean_b ||J_S - J_T||_2, J = d CE_sum / dx, from copies in float64;
    with the student's copy, for its gradients."""
    t, s = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()
    xs = x.double().requires_grad_()
    (j_s,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(s(xs), y, reduction="sum"), xs, create_graph=True
    )
    xt = x.double().requires_grad_()
    (j_t,) = torch.autograd.grad(torch.nn.functional.cross_entropy(t(xt), y, reduction="sum"), xt)
    return beta / 2 * (j_s - j_t).flatten(1).norm(dim=1).mean(), s


class GradStudent(TinyCNN):
    def forward(self, x):
        return super().forward(x)


def test_grad_at_with_a_compiled_student_eager_backend_or_a_clear_error():
    """Double backward: the eager backend gives the paper's value; AOTAutograd backends, which
    cannot differentiate twice, are refused at d.loss() with the remedy, not at backward."""
    torch.manual_seed(0)
    teacher, student = TinyCNN(16).eval(), GradStudent(8, inplace=False).eval()
    y = torch.arange(4) % 5
    with Distiller(teacher, student, losses=athooks.loss("grad_at", beta=2.0)) as d:
        torch.compile(student, backend="eager")(X[0])
        got = d.loss(y)
        want, reference = paper_grad_at(teacher, student, X[0], y, 2.0)
        assert got.item() == pytest.approx(want.item(), rel=1e-4)
        got.backward()
        want.backward()
        for p, q in zip(student.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad.float(), rtol=1e-3, atol=1e-5)
    torch._dynamo.reset()
    with Distiller(teacher, student, losses="grad_at") as d:
        torch.compile(student, backend="aot_eager")(X[0])
        with pytest.raises(CaptureError, match="double backward.*backend='eager'"):
            d.loss(y)
