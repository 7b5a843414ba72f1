"""benchmarks/zoo.py: its smoke run end to end, and the benchmark's own judgement of a pair.

The rules that call a pair suspicious are the benchmark's, independent of athooks' discovery, so
they are tested here on hand-built cases: a model whose map ignores its input is flagged, a stem
paired with a deep stage is flagged, and so on, and the ordinary pairs of a ResNet are not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torchvision
from torch import nn

from athooks import Distiller

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo():
    spec = importlib.util.spec_from_file_location("zoo", ROOT / "benchmarks" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ the rules


def test_ordinary_resnet_pairs_are_not_suspicious(zoo):
    for name, depth in (("layer1", 0.3), ("layer2", 0.5), ("layer3", 0.7)):
        t = zoo.Side(name, depth, (64, 16, 16), batch=2, input_dependent=True, classes=10)
        s = zoo.Side(name, depth + 0.05, (32, 16, 16), batch=2, input_dependent=True, classes=10)
        assert zoo.judge_pair(t, s) == [], name


def test_stem_paired_with_a_deep_stage(zoo):
    stem = zoo.Side("patch_embed", 0.3, (192, 8, 8))  # by name, whatever its depth
    deep = zoo.Side("blocks.11", 0.8, (192, 8, 8))
    assert any("stem paired with a deep stage" in r for r in zoo.judge_pair(stem, deep))
    early = zoo.Side("layer1.0.conv1", 0.05, (64, 32, 32))  # by depth: first 10% of modules
    assert any("stem paired" in r for r in zoo.judge_pair(deep, early))
    # a stem with a stem, or a deep stage with a deep stage, is fine
    assert not any("stem" in r for r in zoo.judge_pair(stem, zoo.Side("stem", 0.05, (32, 8, 8))))
    assert not zoo.judge_pair(deep, zoo.Side("layer4", 0.85, (512, 8, 8)))
    # names of stems, and names that only contain a stem's word deeper in the tree
    assert zoo.is_stem("conv1", None) and zoo.is_stem("backbone.body.conv1", None)
    assert zoo.is_stem("features.0", None) and zoo.is_stem("stem.2", None)
    assert not zoo.is_stem("layer1.0.conv1", 0.5) and not zoo.is_stem("features.10", 0.5)


def test_head_or_logits_map(zoo):
    assert zoo.is_head("head.fc", None, None) and zoo.is_head("classifier.4", None, None)
    assert zoo.is_head("roi_heads.box_predictor", None, None)
    assert zoo.is_head("final_conv", None, None) and zoo.is_head("logits", None, None)
    assert zoo.is_head("decoder", 21, 21)  # num_classes channels, whatever the name
    assert not zoo.is_head("layer3", 256, 10) and not zoo.is_head("blocks.0.mlp.fc1", 64, 10)
    # as many channels as classes, but early: a stem (dpn48b's has 10 channels), not logits
    assert not zoo.is_head("features.conv1_1", 10, 10, rel_depth=0.05)
    assert zoo.is_head("decoder", 21, 21, rel_depth=0.95)
    t = zoo.Side("classifier", 0.9, (7, 12, 12), classes=7)
    s = zoo.Side("backbone.3", 0.9, (24, 12, 12), classes=7)
    assert zoo.judge_pair(t, s) == ["head or logits map: teacher classifier 7x12x12"]


def test_one_cell_batch_and_relative_depth(zoo):
    one = zoo.Side("layer4", 0.8, (512, 1, 1))
    assert any("map of one cell" in r for r in zoo.judge_pair(one, zoo.Side("x", 0.8, (8, 2))))
    tokens = zoo.Side("blocks.3", 0.8, (192, 1))  # (C, T) with T = 1
    assert any("one cell" in r for r in zoo.judge_pair(tokens, zoo.Side("y", 0.8, (8, 4, 4))))
    roi = zoo.Side("roi_heads.box_head", 0.8, (1024, 7, 7), batch=1024)
    assert any("not the input's batch" in r for r in zoo.judge_pair(roi, roi))
    shallow, deep = zoo.Side("a", 0.30, (8, 8, 8)), zoo.Side("b", 0.70, (8, 8, 8))
    assert zoo.judge_pair(shallow, deep) == ["mismatched relative depth: 0.30 vs 0.70"]
    assert zoo.judge_pair(shallow, zoo.Side("b", 0.60, (8, 8, 8))) == []  # 0.30 apart: fine


def test_attention_internal_tensor(zoo):
    k_norm = zoo.Side("blocks.2.blocks.1.3.attn.k_norm", 0.5, (3, 197, 64))
    block = zoo.Side("blocks.2", 0.5, (192, 14, 14))
    reasons = zoo.judge_pair(k_norm, block)
    assert "inside an attention layer: teacher blocks.2.blocks.1.3.attn.k_norm 3x197x64" in reasons
    assert any("map not square" in r for r in reasons)  # (B, heads, N, head_dim) as NCHW
    assert zoo.judge_pair(block, zoo.Side("layers.1.attention", 0.5, (8, 4)))  # any attn module
    assert zoo.judge_pair(block, zoo.Side("encoder.blocks.15.attn.v_norm", 0.5, (8, 4)))
    assert not zoo.judge_pair(block, zoo.Side("attn_pool_stage", 0.5, (8, 4, 4)))


def test_layout_misread(zoo):
    nhwc = zoo.Side("features.1", 0.2, (32, 32, 96))  # (B, H, W, C) read as (B, C, H, W)
    nchw = zoo.Side("layer1", 0.2, (64, 32, 32))
    assert zoo.judge_pair(nhwc, nchw) == [
        "map not square, from a square input: teacher features.1 32x32x96 "
        "(a channels-last or token layout read as NCHW?)"
    ]
    video = zoo.Side("layer1", 0.2, (64, 4, 16, 16))  # (C, T, H, W): H and W are compared
    assert zoo.judge_pair(video, video) == []


class PositionalStage(nn.Module):
    """A stage that ignores its input: a learned map, broadcast to the batch (xcit's pos_embed)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 8, 4, 4))

    def forward(self, x):
        return self.table.expand(x.shape[0], -1, -1, -1)


class WithPosEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pos = PositionalStage()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.body(self.conv(x) + self.pos(x))
        return self.fc(h.mean((2, 3)))


def test_measure_flags_an_input_independent_map(zoo):
    model = WithPosEmbed()
    x1, x2 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    sides = [zoo.Side("pos", map_shape=(8, 4, 4)), zoo.Side("body", map_shape=(8, 4, 4))]
    zoo.measure_side(model, sides, (lambda: model(x1), lambda: model(x2)), classes=10)
    pos, body = sides
    assert pos.input_dependent is False and body.input_dependent is True
    assert pos.batch == body.batch == 2
    # forward order, by last completion, of the 7 modules that ran: conv, pos, body.0-2, body, fc
    assert pos.rel_depth == pytest.approx(2 / 7) and body.rel_depth == pytest.approx(6 / 7)
    reasons = zoo.judge_pair(pos, body)
    assert "input-independent map: teacher pos (the same output for two inputs)" in reasons


def test_measure_tells_a_zero_map_and_a_tiny_one(zoo):
    dead = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    with torch.no_grad():
        dead[0].weight.zero_()
        dead[0].bias.fill_(-1.0)  # ReLU of -1: zero for every input
    tiny = nn.Sequential(nn.Conv2d(3, 4, 1))
    with torch.no_grad():
        tiny[0].weight.mul_(1e-9)  # input-dependent, but below any absolute tolerance
        tiny[0].bias.zero_()
    x1, x2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    d_side, t_side = zoo.Side("1"), zoo.Side("0")
    zoo.measure_side(dead, [d_side], (lambda: dead(x1), lambda: dead(x2)), classes=None)
    zoo.measure_side(tiny, [t_side], (lambda: tiny(x1), lambda: tiny(x2)), classes=None)
    assert d_side.input_dependent is False and d_side.all_zero
    assert t_side.input_dependent is True
    assert d_side.map_shape == (4, 4, 4)  # from the tapped tensor when athooks gave none
    assert any("zero for both inputs" in r for r in zoo.judge_pair(d_side, t_side))


# ------------------------------------------------------------------------- running and reporting


def test_warnings_are_attributed_to_athooks_or_not(zoo):
    teacher, student = torchvision.models.resnet34(), torchvision.models.resnet18()
    with zoo.record_warnings() as log:
        warnings.warn("not from athooks", UserWarning, stacklevel=1)
        with Distiller(teacher, student, layers="layer4") as d:  # 1x1 at 32 px: athooks warns
            student(torch.randn(2, 3, 32, 32))
            d.loss()
    mine = [w for w in log if w.message == "not from athooks"]
    assert len(mine) == 1 and not mine[0].athooks
    assert any(w.athooks and "single cell" in w.message for w in log)


def build_tiny():
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1))
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1))
    return teacher, student


def test_run_case_records_a_step_a_model_error_and_a_timeout(zoo, tmp_path, capsys):
    def ok_build():
        teacher, student = build_tiny()
        return teacher, student, zoo.image_task((3, 16, 16))

    result = zoo.run_case(zoo.Case("homemade", "tiny", "t", "s", ok_build), timeout=30)
    assert result["error"] is None, result
    assert result["ok"] and result["pairs"] and result["stage"] is None
    assert all(len(p) == 2 for p in result["pair_sides"])

    def bad_input():  # the model cannot run this input, with or without athooks
        teacher, student = build_tiny()
        return teacher, student, zoo.image_task((5, 16, 16))

    result = zoo.run_case(zoo.Case("homemade", "bad", "t", "s", bad_input), timeout=30)
    assert not result["ok"] and result["stage"] == "model" and "RuntimeError" in result["error"]

    def slow():
        time.sleep(5)

    start = time.perf_counter()
    result = zoo.run_case(zoo.Case("homemade", "slow", "t", "s", slow, timeout=1), timeout=1)
    assert time.perf_counter() - start < 4
    assert result["error"].startswith("CaseTimeoutError") and result["stage"] == "build"

    rows = zoo.summarise(
        [
            {**result, "ok": True, "stage": None, "suspicious": []},
            {**result, "ok": False, "stage": "model", "suspicious": []},
            {**result, "ok": False, "stage": "distill", "suspicious": ["x"], "warned": False},
        ]
    )
    total = rows[-1]
    assert (total["cases"], total["ok"], total["error"], total["model-err"]) == (3, 1, 1, 1)
    assert total["susp-unwarned"] == 1 and total["ok%"] == 50.0  # model errors left out
    # saved results are judged again, by today's rules, when reported from their JSON
    saved = tmp_path / "saved.json"
    sides = [[dataclasses.asdict(zoo.Side("a.attn", 0.5)), dataclasses.asdict(zoo.Side("b", 0.5))]]
    case = {**result, "ok": True, "stage": None, "suspicious": [], "pair_sides": sides}
    saved.write_text(json.dumps({"cases": [case]}))
    assert zoo.main(["--from-json", str(saved), "--require-ok", "0.97"]) == 0
    assert "a.attn - b: inside an attention layer" in capsys.readouterr().out
    parsed = zoo.parse_table("header line\n" + zoo.format_table(rows) + "\n\nfailures")
    assert [r["group"] for r in parsed] == ["homemade", "total"] and parsed[1]["ok%"] == "50.0"


@pytest.mark.slow
def test_smoke_run(tmp_path):
    out = tmp_path / "zoo.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "zoo.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("zoo_smoke", ROOT / "benchmarks" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_smoke"] = module
    spec.loader.exec_module(module)
    rows = {r["group"]: r for r in module.parse_table(proc.stdout)}
    assert set(rows) == {*module.GROUPS, "total"}
    for group in module.GROUPS:
        row = rows[group]
        assert int(row["cases"]) > 0, group
        counts = int(row["ok"]) + int(row["error"]) + int(row["model-err"])
        assert counts == int(row["cases"]), row
    data = json.loads(out.read_text())
    assert len(data["cases"]) == int(rows["total"]["cases"])
    assert {"ok", "error", "pairs", "warnings", "suspicious", "warned"} <= set(data["cases"][0])


def test_docstring_examples(zoo):
    import doctest

    assert doctest.testmod(zoo).failed == 0
