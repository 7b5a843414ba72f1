"""The demo: data, end-to-end run at tiny settings (timings belong to the demo's own output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from athooks.demo import cluttered_digits
from athooks.demo.run import DemoConfig, run_demo


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
    assert "epoch   1/1" in res.stderr  # the progress line


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
