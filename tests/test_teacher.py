"""The opt-in teacher options: compiled, autocast, channels-last, truncated.

Each is checked against the AT loss written from the paper (``ref_at_loss_code``) on feature maps
computed by hand in float64, with the tolerance the Performance page states, and against what
the user had: the teacher's parameters (dtype, memory format), its hooks and modes are unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SMALL_BATCHES, TinyCNN, ref_at_loss_code
from torch import nn

import athooks
from athooks import CaptureError, ConfigurationError, Distiller

X = SMALL_BATCHES
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def reference(teacher: TinyCNN, student: TinyCNN, x: torch.Tensor) -> float:
    """The AT loss of the three ReLU outputs, in float64, from copies of both models."""
    t, s = copy.deepcopy(teacher).double().eval(), copy.deepcopy(student).double()
    with torch.no_grad():
        return float(
            ref_at_loss_code(list(zip(t.features(x.double()), s.features(x.double()), strict=True)))
        )


def snapshot(model: nn.Module) -> list[tuple[str, torch.dtype, tuple[int, ...], bool]]:
    return [(n, p.dtype, p.stride(), p.requires_grad) for n, p in model.named_parameters()]


def losses_with(**options) -> tuple[list[float], list[float], TinyCNN]:
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), TinyCNN(8, inplace=False)
    before = snapshot(teacher)
    got, want = [], []
    with Distiller(teacher, student, layers="relu?", **options) as d:
        for x in X:
            want.append(reference(teacher, student, x))
            student(x)
            got.append(d.loss().item())
    assert snapshot(teacher) == before and teacher.training
    assert not teacher._forward_hooks and not teacher.relu1._forward_hooks
    return got, want, teacher


@pytest.mark.parametrize(
    "options, rel",
    [
        ({}, 1e-5),
        ({"teacher_channels_last": True}, 1e-5),
        ({"truncate_teacher": True}, 1e-5),
        ({"teacher_dtype": torch.bfloat16}, 1e-2),
        ({"teacher_compile": {"backend": "aot_eager"}}, 1e-5),
        ({"teacher_compile": {"backend": "aot_eager"}, "truncate_teacher": True}, 1e-5),
        ({"teacher_dtype": torch.bfloat16, "teacher_channels_last": True}, 1e-2),
        ({"teacher_dtype": torch.float16}, 1e-2),
        (
            {
                "teacher_dtype": torch.bfloat16,
                "teacher_channels_last": True,
                "teacher_compile": {"backend": "aot_eager"},
                "truncate_teacher": True,
            },
            1e-2,
        ),
    ],
    ids=[
        "default",
        "channels_last",
        "truncate",
        "bf16",
        "compile",
        "compile+truncate",
        "bf16+cl",
        "fp16",
        "all four",
    ],
)
def test_each_option_gives_the_reference_loss_within_its_tolerance(options, rel):
    got, want, _ = losses_with(**options)
    assert got == pytest.approx(want, rel=rel)


def test_truncate_stops_the_teacher_after_its_last_tapped_layer_from_the_second_step():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), TinyCNN(8, inplace=False)
    heads = []
    teacher.head.register_forward_hook(lambda *a: heads.append(1))
    with Distiller(teacher, student, layers="relu?", truncate_teacher=True) as d:
        for x in X:
            student(x)
            d.loss()
    assert len(heads) == 1  # the first step runs the teacher whole, to count its taps' calls
    teacher(X[0])
    assert len(heads) == 2  # after the block the teacher runs as it is


def test_bf16_teacher_gives_float32_maps_and_outputs_and_leaves_the_teacher_in_float32():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), TinyCNN(8, inplace=False)
    seen = {}

    class Spy(athooks.Loss):
        name = "dtype_spy"
        needs_teacher_output = True

        def __init__(self) -> None:
            super().__init__()
            self.mapping = athooks.mapping("sum_p")

        def captures(self):
            return (self.mapping,)

        def forward(self, step):
            seen["output"] = step.teacher_output.dtype
            seen["maps"] = {t.dtype for t, _ in step.maps(self.mapping)}
            return step.student_output.sum() * 0

    with Distiller(
        teacher, student, layers="relu?", losses=["at", Spy()], teacher_dtype=torch.bfloat16
    ) as d:
        student(X[0])
        d.loss()
    assert seen == {"output": torch.float32, "maps": {torch.float32}}
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}


def test_truncate_refuses_a_loss_that_needs_the_teachers_output():
    teacher, student = TinyCNN(16), TinyCNN(8)
    with pytest.raises(ConfigurationError, match="reads the teacher's output"):
        Distiller(teacher, student, layers="relu?", losses=["at", "kd"], truncate_teacher=True)


class Branchy(TinyCNN):
    """Runs its third block twice on wide inputs: another count of tapped calls."""

    def forward(self, x):
        _, b, c = self.features(x)
        if x.shape[-1] > 16:
            c = self.relu3(self.bn3(self.conv3(b)))
        return self.head(c.mean((2, 3)))


def test_truncate_refuses_a_teacher_whose_layers_depend_on_the_input():
    torch.manual_seed(0)
    teacher, student = Branchy(16), TinyCNN(8, inplace=False)
    with Distiller(teacher, student, layers="relu?", truncate_teacher=True) as d:
        student(torch.randn(2, 3, 32, 32))
        d.loss()
        with pytest.raises(CaptureError, match="teacher runs other layers"):
            student(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"teacher_compile": "yes"}, "teacher_compile must be"),
        ({"teacher_dtype": torch.int8}, "teacher_dtype must be"),
        ({"teacher_channels_last": 1}, "teacher_channels_last must be True or False"),
    ],
)
def test_wrong_option_values_are_refused(options, match):
    with pytest.raises(ConfigurationError, match=match):
        Distiller(TinyCNN(16), TinyCNN(8), layers="relu?", **options)


def test_truncate_leaves_the_users_own_teacher_calls_whole():
    """The cut applies to athooks' run of the teacher only: the user's own call of the teacher
    inside the block (its logits, for a loss of their own), or a student that calls the teacher
    in its forward, runs the teacher whole, with the logits of the teacher alone."""
    torch.manual_seed(0)
    teacher, student = TinyCNN(16).eval(), TinyCNN(8, inplace=False)
    want = teacher(X[0])
    with Distiller(teacher, student, layers="relu?", truncate_teacher=True) as d:
        for x in X:
            student(x)
            assert d.loss().item() == pytest.approx(reference(teacher, student, x), rel=1e-5)
            with torch.no_grad():
                torch.testing.assert_close(teacher(X[0]), want)

    class CallsTheTeacher(TinyCNN):
        def __init__(self, other: nn.Module) -> None:
            super().__init__(8, inplace=False)
            self.other = [other]  # not a submodule
            self.seen: list[torch.Tensor] = []

        def forward(self, x):
            with torch.no_grad():
                self.seen.append(self.other[0](x))
            return super().forward(x)

    student = CallsTheTeacher(teacher)
    with Distiller(teacher, student, layers="relu?", truncate_teacher=True) as d:
        for x in X:
            student(x)
            assert d.loss().item() == pytest.approx(reference(teacher, student, x), rel=1e-5)
    for x, seen in zip(X, student.seen, strict=True):
        torch.testing.assert_close(seen, teacher(x))


class SameClass(TinyCNN):
    def forward(self, x):
        return super().forward(x)


def test_teacher_and_student_of_one_class_both_compiled_with_inference_mode_validation():
    """A teacher compiled by athooks and a student compiled by the user, of the same class: each
    runs its own code (dynamo guards on the hooks), the loss is the float64 reference's, and a
    validation forward under inference_mode passes through without a step."""
    torch.manual_seed(0)
    teacher, student = SameClass(16), SameClass(8, inplace=False)
    backend = {"backend": "aot_eager"}
    with Distiller(teacher, student, layers="relu?", teacher_compile=backend) as d:
        compiled = torch.compile(student, **backend)
        for x in X:
            compiled(x)
            assert d.loss().item() == pytest.approx(reference(teacher, student, x), rel=1e-5)
            with torch.inference_mode():
                torch.testing.assert_close(compiled(x), student(x))
            with pytest.raises(CaptureError, match="already called"):
                d.loss()


def test_a_teacher_the_user_compiled_given_with_teacher_compile():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), TinyCNN(8, inplace=False)
    given = torch.compile(teacher, backend="aot_eager")
    with Distiller(given, student, layers="relu?", teacher_compile={"backend": "aot_eager"}) as d:
        for x in X:
            student(x)
            assert d.loss().item() == pytest.approx(reference(teacher, student, x), rel=1e-5)
