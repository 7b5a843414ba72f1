"""athooks.step directly: the teacher's guard, which calls are steps, re-runs; athooks.context."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import TinyCNN
from torch import nn
from torch.utils.checkpoint import checkpoint

import athooks
from athooks import Layer
from athooks.context import in_backward, internal_depth, internal_run
from athooks.errors import CaptureError, ConfigurationError
from athooks.step import (
    Attachment,
    ModelRunner,
    StepRecorder,
    TeacherGuard,
    TeacherRunner,
    refuse_data_parallel,
    register_student,
)
from athooks.taps import TapSet

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def flags(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


# ------------------------------------------------------------------ context


def test_internal_runs_nest_per_thread():
    seen = []
    with internal_run():
        with internal_run():
            seen.append(internal_depth())
        worker = threading.Thread(target=lambda: seen.append(internal_depth()))
        worker.start()
        worker.join()
    assert seen == [2, 0] and internal_depth() == 0


def test_in_backward_is_true_only_inside_a_backward_pass():
    seen = []
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(in_backward()) or g)
    y.sum().backward()
    assert seen == [True] and not in_backward()


# ------------------------------------------------------------------ the teacher's guard


def test_guard_freezes_restores_exactly_once_in_any_order():
    teacher = TinyCNN(8)
    teacher.bn1.eval()  # a mixed mode
    teacher.head.weight.requires_grad_(False)
    before = flags(teacher)
    a, b = TeacherGuard.acquire(teacher), TeacherGuard.acquire(teacher)
    assert a is b and not any(flags(teacher)[0]) and not any(flags(teacher)[1])
    a.release()
    assert not any(flags(teacher)[0])  # still held by the second
    b.release()
    assert flags(teacher) == before


def test_guard_gives_back_a_parameter_replaced_inside_the_block():
    teacher = TinyCNN(8)
    guard = TeacherGuard.acquire(teacher)
    teacher.head.weight = nn.Parameter(torch.zeros_like(teacher.head.weight), requires_grad=False)
    guard.release()
    assert teacher.head.weight.requires_grad  # its name's flag before the block


def test_guard_leaves_what_an_attached_student_owns():
    student = TinyCNN(8)
    teacher = nn.Sequential(student, nn.Linear(5, 5))  # contains the student
    release = register_student(student)
    guard = TeacherGuard.acquire(teacher)
    try:
        assert guard.shares_modules
        assert all(p.requires_grad for p in student.parameters())
        assert not teacher[1].weight.requires_grad and not teacher[1].training
        assert student.training
        with guard.run():  # a teacher run: everything in eval mode
            assert not any(m.training for m in teacher.modules())
        assert student.training and all(m.training for m in student.modules())
        assert not teacher.training
    finally:
        guard.release()
        release()
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_a_student_attaching_later_gets_its_modules_back_and_loses_them_again():
    mid = TinyCNN(8)
    guard = TeacherGuard.acquire(mid)  # mid as a teacher first
    assert not mid.training
    release = register_student(mid)  # then as another Distiller's student: a chain
    assert mid.training and all(p.requires_grad for p in mid.parameters())
    release()
    assert not mid.training and not any(p.requires_grad for p in mid.parameters())
    guard.release()
    assert mid.training and all(p.requires_grad for p in mid.parameters())


def test_guard_run_puts_back_modules_a_parent_switched_to_training():
    teacher = TinyCNN(8)
    guard = TeacherGuard.acquire(teacher)
    teacher.bn1.train()  # e.g. a parent's .train()
    with guard.run():
        assert not teacher.bn1.training
    assert not teacher.bn1.training  # teacher-only: stays in eval until the release
    guard.release()
    assert teacher.bn1.training


def test_refuse_data_parallel_over_several_devices():
    wrapped = nn.DataParallel(TinyCNN(8))
    refuse_data_parallel(wrapped, "student")  # CPU-only: no devices, it calls the module
    wrapped.device_ids = [0, 1]
    with pytest.raises(ConfigurationError, match="DistributedDataParallel"):
        refuse_data_parallel(nn.Sequential(wrapped), "student")


# ------------------------------------------------------------------ which calls are steps


class Recorder:
    """A StepRecorder on a student, with a teacher runner, hooks in place."""

    def __init__(self, student=None, teacher=None, **options):
        self.student = student or TinyCNN(8)
        self.teacher = teacher or TinyCNN(8)
        self.runner = TeacherRunner(self.teacher, None)
        self.runner.taps = TapSet("teacher", self.teacher, [athooks.mapping("sum_p")])
        self.runner.taps.add("relu1", self.teacher.relu1, Layer("relu1"))
        self.recorder = StepRecorder(
            self.student,
            self.runner,
            needs_teacher_output=True,
            needs_input_grad=options.pop("needs_input_grad", False),
            no_grad=options.pop("no_grad", "skip"),
        )
        self.teacher_runs = []
        self.teacher.register_forward_hook(lambda m, a, o: self.teacher_runs.append(1))
        self.attachment = Attachment.attach(self.recorder)
        self.attachment.handles += self.runner.taps.attach()

    def close(self):
        self.attachment.release()


def test_a_step_runs_the_teacher_and_records_the_outputs():
    r = Recorder()
    try:
        out = r.student(X)
        record = r.recorder.ready()
        assert r.teacher_runs == [1] and record.complete and record.student_output is out
        assert record.grad_enabled and record.teacher is not None and len(record.teacher) == 1
        r.recorder.release(record)
        with pytest.raises(CaptureError, match="already called"):
            r.recorder.ready()
    finally:
        r.close()


def test_calls_without_gradient_are_skipped_or_captured():
    for policy, runs in (("skip", []), ("capture", [1])):
        r = Recorder(no_grad=policy)
        try:
            with torch.no_grad():
                r.student(X)
            assert r.teacher_runs == runs
        finally:
            r.close()


def test_a_nested_call_of_the_student_is_part_of_the_step():
    class Crops(TinyCNN):
        def forward(self, x):
            if isinstance(x, list):
                return torch.stack([self(c) for c in x])
            return super().forward(x)

    r = Recorder(student=Crops(8), teacher=Crops(8))
    try:
        r.student([X, X])
        record = r.recorder.ready()
        # one teacher run, which itself recursed on the two crops (3 forwards of the teacher);
        # had the student's inner calls been steps, there would be 9
        assert r.teacher_runs == [1, 1, 1] and record.complete
        assert record.student_output.shape == (2, 2, 5)  # the outer call's output
    finally:
        r.close()


def test_an_interrupted_forward_leaves_no_stale_step():
    r = Recorder()
    stop = r.student.relu2.register_forward_hook(
        lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    try:
        with pytest.raises(KeyboardInterrupt):
            r.student(X)
        with pytest.raises(CaptureError, match="did not finish"):
            r.recorder.ready()
        stop.remove()
        r.student(X)
        assert r.teacher_runs == [1, 1] and r.recorder.ready().complete
    finally:
        r.close()


def test_internal_runs_and_backward_recomputes_are_not_steps():
    r = Recorder()
    try:
        with internal_run():
            r.student(X)
        assert r.teacher_runs == []
        x = X.clone().requires_grad_()
        out = checkpoint(r.student, x, use_reentrant=False)
        assert r.teacher_runs == [1]
        out.sum().backward()  # the recompute runs the student again, inside backward
        assert r.teacher_runs == [1] and r.recorder.ready().complete
    finally:
        r.close()


def test_steps_are_per_thread():
    r = Recorder()
    outputs = {}
    barrier = threading.Barrier(2)

    def run(name, x):
        outputs[name] = r.student(x)
        barrier.wait(10)
        outputs[name + "_record"] = r.recorder.ready()

    try:
        threads = [threading.Thread(target=run, args=(f"t{i}", X + i)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(2):
            assert outputs[f"t{i}_record"].student_output is outputs[f"t{i}"]
    finally:
        r.close()


def test_model_runner_reruns_the_student_and_the_teacher_capturing_nothing():
    r = Recorder(needs_input_grad=True)
    try:
        r.student(X)
        record = r.recorder.ready()
        runner = ModelRunner(record, r.student, r.runner)
        x = runner.student_input()
        assert x.requires_grad and torch.equal(x, X)
        flipped = runner.run_student_on(x.flip(-1))
        t_out = runner.run_teacher_on(x.detach().requires_grad_())
        assert flipped.requires_grad and t_out.requires_grad
        assert r.teacher_runs == [1, 1] and len(record.teacher) == 1  # nothing new captured
    finally:
        r.close()


def test_attachment_release_removes_every_hook_and_gives_the_teacher_back():
    teacher = TinyCNN(8)
    teacher.layer_mode = teacher.bn2.eval()  # a mixed mode to give back
    before = flags(teacher)
    r = Recorder(teacher=teacher)
    assert not any(flags(teacher)[0])
    r.close()
    r.close()  # idempotent
    assert flags(teacher) == before
    assert len(teacher._forward_hooks) == 1  # only the test's own hook
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in r.student.modules())
    assert not any(m._forward_hooks for m in teacher.modules() if m is not teacher)


def test_a_steady_training_step_makes_few_python_calls_of_athooks():
    """The fixed cost per step is Python calls (the Performance page, "Fixed cost"): a step of
    three AT pairs on WRN-16 at batch 2 makes 216 calls of athooks' own functions after the first
    step (265 before the capture and teacher-run fast paths). Counted, not timed, so it holds on
    a loaded machine; the bound leaves room for a check or two, not for a new layer of calls."""
    import collections
    import os
    import sys

    import torch.nn.functional as F  # noqa: N812

    from athooks.models import create_model

    package = os.path.dirname(athooks.__file__)
    torch.manual_seed(0)
    teacher, student = create_model("wrn16_2").eval(), create_model("wrn16_1")
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    pairs = [(n, n) for n in ("layer1", "layer2", "layer3")]
    calls: collections.Counter[str] = collections.Counter()

    def profile(frame, event, arg):
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(package) and not name.endswith("models.py"):
            calls[frame.f_code.co_name] += 1

    with athooks.Distiller(teacher, student, layers=pairs, losses=athooks.loss("at")) as d:
        for _ in range(2):  # the first step probes and checks once
            (F.cross_entropy(student(x), y) + d.loss()).backward()
        sys.setprofile(profile)
        try:
            (F.cross_entropy(student(x), y) + d.loss()).backward()
        finally:
            sys.setprofile(None)
    assert 150 < sum(calls.values()) <= 230, calls.most_common(20)
