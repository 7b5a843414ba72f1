"""The demo: data, end-to-end run at tiny settings (timings belong to the demo's own output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from athooks import Distiller
from athooks.demo import cluttered_digits
from athooks.demo.run import DemoConfig, run_demo, train
from athooks.errors import ConfigurationError
from athooks.losses.base import loss as make_loss
from athooks.models import create_model
from athooks.plugin import Loss


def test_cluttered_digits_are_deterministic_with_a_fixed_split():
    x, y, xt, yt = cluttered_digits(seed=0)
    assert x.shape == (1300, 1, 32, 32) and xt.shape == (497, 1, 32, 32)
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    x2, y2, xt2, yt2 = cluttered_digits(seed=0)
    assert torch.equal(x, x2) and torch.equal(xt, xt2)
    assert torch.equal(y, y2) and torch.equal(yt, yt2)
    x3, y3, _, yt3 = cluttered_digits(seed=1)
    assert not torch.equal(x, x3)  # another placement of digits and clutter
    assert torch.equal(y, y3) and torch.equal(yt, yt3)  # the same split
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3


def test_demo_runs_end_to_end_and_caches_the_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("ATHOOKS_CACHE", str(tmp_path / "cache"))
    config = DemoConfig(teacher_epochs=1, epochs=1, labels=64)
    first = run_demo(config, tmp_path / "out", progress=False)
    assert 0 <= first.at_error <= 1 and 0 <= first.baseline_error <= 1
    assert first.times["teacher"] > 0
    assert (tmp_path / "out" / "attention-maps.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config"]["labels"] == 64 and saved["at_error"] == first.at_error
    assert "relative error reduction by AT" in (tmp_path / "out" / "results.md").read_text()
    assert "models" not in saved
    assert first.unlabeled_error is None and saved["unlabeled_error"] is None  # no --unlabeled
    assert set(first.models) == {"teacher", "student", "student + AT"}
    for name, model in (("teacher.pt", "teacher"), ("student-at.pt", "student + AT")):
        weights = torch.load(tmp_path / "out" / name, weights_only=True)
        for key, value in first.models[model].state_dict().items():
            assert torch.equal(weights[key], value)
    second = run_demo(config, tmp_path / "out2", progress=False, figure=False)
    assert second.times["teacher"] == 0  # loaded from the cache
    assert second.teacher_error == first.teacher_error
    assert second.baseline_error == first.baseline_error  # deterministic given the seed


def test_demo_command_line(tmp_path):
    env = {**os.environ, "ATHOOKS_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "athooks.cli",
            "demo",
            "--teacher-epochs",
            "1",
            "--epochs",
            "1",
            "--labels",
            "64",
            "--out",
            str(tmp_path / "out"),
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    assert "| student + AT (beta 300) |" in res.stdout
    assert f"attention maps: {tmp_path / 'out' / 'attention-maps.png'}" in res.stdout
    assert "epoch   1/1" in res.stderr  # the progress bars (tqdm), one per run
    assert "loss=" in res.stderr and "train acc=" in res.stderr


def test_the_teacher_does_not_depend_on_the_students_settings(tmp_path, monkeypatch):
    """The teacher's cache key names a fixed recipe, so its training must follow that recipe."""
    errors = []
    for i, student_settings in enumerate([{}, {"batch": 16, "lr": 0.01, "seed": 5}]):
        monkeypatch.setenv("ATHOOKS_CACHE", str(tmp_path / f"cache{i}"))  # train afresh each time
        config = DemoConfig(teacher_epochs=1, epochs=1, labels=32, **student_settings)
        errors.append(run_demo(config, tmp_path / f"out{i}", progress=False, figure=False))
    assert errors[0].teacher_error == errors[1].teacher_error
    teachers = sorted((tmp_path / "cache0").glob("*.pt")) + sorted(
        (tmp_path / "cache1").glob("*.pt")
    )
    assert teachers[0].name == teachers[1].name  # the same key
    a, b = (torch.load(t, weights_only=True) for t in teachers)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_shipped_teacher_loads_safely_and_reaches_its_recorded_error():
    """``athooks demo`` with defaults loads these weights instead of training its teacher."""
    from athooks.demo.data import cluttered_digits
    from athooks.demo.run import DemoConfig, evaluate, shipped_teacher
    from athooks.models import create_model

    config = DemoConfig()
    found = shipped_teacher(config)
    assert found is not None, "no shipped teacher fits the demo's default settings"
    weights, record = found
    teacher = create_model(config.teacher, num_classes=10, in_chans=1)
    teacher.load_state_dict(torch.load(weights, weights_only=True))
    _, _, x_test, y_test = cluttered_digits(config.data_seed)
    with torch.no_grad():
        error = evaluate(teacher, x_test, y_test)
    assert error == pytest.approx(record["test_error"], abs=1.5 / len(y_test))  # one digit
    assert error < 0.05 and record["settings"]["teacher_epochs"] == config.teacher_epochs
    assert shipped_teacher(replace(config, teacher_epochs=2)) is None  # other settings: trained


class _Spy(Loss):
    """Records what ``d.loss()`` sees: the student's output (its batch) and the target."""

    name = "spy"

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []
        self.targets: list[object] = []

    def forward(self, step):
        self.outputs.append(step.student_output.detach().clone())
        self.targets.append(step.target)
        return step.student_output.sum() * 0


def _tiny_unlabeled_run(monkeypatch, unlabeled):
    """Two epochs of 8 labelled images at batch 4, with a spy on d.loss() and on the CE."""
    torch.manual_seed(0)
    teacher = create_model("wrn16_1", num_classes=10, in_chans=1)
    student = create_model("wrn16_1", num_classes=10, in_chans=1)
    config = DemoConfig(batch=4, shift=0)  # no shift: the images reach the student as they are
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    inputs, ce_calls = [], []
    real_ce = F.cross_entropy

    def ce_spy(logits, target, *args, **kwargs):
        ce_calls.append((logits.detach().clone(), target.clone()))
        return real_ce(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", ce_spy)
    spy = _Spy()
    # input_size: the layers are found now, so the probe's forward is not among the inputs
    d = Distiller(teacher, student, losses=[make_loss("at", beta=300), spy], input_size=(1, 32, 32))
    student.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    train(student, x, y, epochs=2, config=config, distiller=d, progress=False, unlabeled=unlabeled)
    return x, y, inputs, ce_calls, spy


def test_unlabeled_images_reach_the_distiller_and_not_the_cross_entropy(monkeypatch):
    extra = torch.randn(6, 1, 32, 32) + 10  # 6 unlabeled images, told apart by their values
    x, y, inputs, ce_calls, spy = _tiny_unlabeled_run(monkeypatch, extra)
    assert len(inputs) == len(ce_calls) == len(spy.outputs) == 4  # one forward per step
    seen_unlabeled = []
    for xb, (logits, target), out, t in zip(
        inputs, ce_calls, spy.outputs, spy.targets, strict=True
    ):
        assert xb.shape[0] == 8  # 4 labelled + 4 unlabeled: d.loss() sees both
        assert out.shape == (8, 10)
        assert t is None  # the batch has no labels for its second half
        labelled, unlabeled = xb[:4], xb[4:]
        rows = [int((x == img).flatten(1).all(1).nonzero()) for img in labelled]
        assert torch.equal(target, y[rows])  # the CE: the labelled part's labels ...
        assert torch.equal(logits, out[:4])  # ... on the labelled part's logits only
        for img in unlabeled:
            (row,) = (extra == img).flatten(1).all(1).nonzero()[0].tolist()
            seen_unlabeled.append(row)
    # cycling through the unlabeled images: each once per pass, in an order of their own
    assert sorted(seen_unlabeled[:6]) == list(range(6))
    assert sorted(seen_unlabeled[6:12]) == list(range(6))


def test_unlabeled_images_leave_the_labelled_batches_unchanged(monkeypatch):
    _, _, with_extra, _, _ = _tiny_unlabeled_run(monkeypatch, torch.randn(6, 1, 32, 32))
    _, _, without, ce_calls, spy = _tiny_unlabeled_run(monkeypatch, None)
    assert [b.shape[0] for b in without] == [4, 4, 4, 4]
    assert all(torch.equal(a[:4], b) for a, b in zip(with_extra, without, strict=True))
    assert all(t is not None for t in spy.targets)  # with labels for the whole batch: given
    assert all(logits.shape[0] == 4 for logits, _ in ce_calls)


def test_demo_with_unlabeled_images_adds_a_student_and_leaves_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("ATHOOKS_CACHE", str(tmp_path / "cache"))
    config = DemoConfig(epochs=1, labels=64)  # the shipped teacher: nothing to train
    plain = run_demo(config, tmp_path / "plain", progress=False, figure=False)
    extra = run_demo(
        replace(config, unlabeled=True), tmp_path / "extra", progress=False, figure=False
    )
    assert plain.unlabeled_error is None and "at_unlabeled" not in plain.times
    assert "unlabeled" not in (tmp_path / "plain" / "results.md").read_text()
    assert not (tmp_path / "plain" / "student-at-unlabeled.pt").exists()
    # the two students of the default demo are the same
    assert (extra.baseline_error, extra.at_error) == (plain.baseline_error, plain.at_error)
    for name in ("student", "student + AT"):
        a, b = plain.models[name].state_dict(), extra.models[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert extra.unlabeled_error is not None and 0 <= extra.unlabeled_error <= 1
    assert extra.times["at_unlabeled"] > 0
    saved = json.loads((tmp_path / "extra" / "results.json").read_text())
    assert saved["unlabeled_error"] == extra.unlabeled_error and saved["config"]["unlabeled"]
    md = (tmp_path / "extra" / "results.md").read_text()
    assert f"| student + AT, + 1236 unlabeled images | {100 * extra.unlabeled_error:.1f} |" in md
    weights = torch.load(tmp_path / "extra" / "student-at-unlabeled.pt", weights_only=True)
    model = extra.models["student + AT, unlabeled"]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_unlabeled_needs_images_without_labels(tmp_path):
    with pytest.raises(ConfigurationError, match="none is left as unlabeled data"):
        run_demo(DemoConfig(unlabeled=True, labels=1300), tmp_path, progress=False)
