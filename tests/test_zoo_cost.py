"""benchmarks/zoo_cost.py: its smoke mode end to end, and the layer mapping its rows rest on.

No timing is asserted (timings belong to the benchmark's output); these tests check that every
row gets a time and a memory cell, and that torchdistill's AT computes what athooks' does.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo_cost():
    name = "zoo_cost"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "zoo_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_recipe_layers_map_onto_both_pairs(zoo_cost):
    wrn = zoo_cost.overhead.build_model("athooks:wrn16_1")
    resnet = zoo_cost.overhead.build_model("timm:resnet18")
    recipe = zoo_cost.reproduce.Recipe
    assert zoo_cost.layers_on(recipe(), wrn) == ["layer1", "layer2", "layer3"]
    assert zoo_cost.layers_on(recipe(), resnet) == ["layer1", "layer2", "layer3", "layer4"]
    last = recipe(layers=("layer3",))
    assert zoo_cost.layers_on(last, wrn) == ["layer3"]
    assert zoo_cost.layers_on(last, resnet) == ["layer4"]  # the last stage of either model
    assert zoo_cost.layers_on(recipe(layers=("relu",)), wrn) == ["relu"]
    assert zoo_cost.layers_on(recipe(layers=("relu",)), resnet) == ["layer4"]


@pytest.mark.skipif(importlib.util.find_spec("torchdistill") is None, reason="no torchdistill")
def test_torchdistill_at_and_kd_agree_with_athooks(zoo_cost):
    setting = zoo_cost.settings_for(True, 4)[0]
    rows = {r.name: r for r in zoo_cost.cost_rows(["AT", "KD"])}
    variants = ["floor", "athooks:AT", "torchdistill:AT", "athooks:KD", "torchdistill:KD"]
    _, losses, failed = zoo_cost.build_all(setting, rows, variants, control=False)
    assert failed == {}
    for name in ("AT", "KD"):
        a, t = losses[f"athooks:{name}"], losses[f"torchdistill:{name}"]
        assert a > 0 and abs(a / t - 1) < 1e-4, (name, a, t)


@pytest.mark.slow
def test_smoke_mode_end_to_end(zoo_cost, tmp_path):
    out = tmp_path / "zoo-cost.md"
    assert zoo_cost.main(["--smoke", "--methods", "AT,KD", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## The zoo's cost per step (smoke)" in text and "- machine: " in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | layers | athooks: step time vs floor |")
    by_name = {r.split("|")[1].strip(): r.split("|") for r in rows[1:]}
    assert {"floor", "floor (A/A)", "AT", "KD"} <= set(by_name)
    for name in ("AT", "KD"):
        cells = by_name[name]
        assert cells[3].strip()[0].isdigit(), cells  # a step-time ratio
        assert cells[5].strip()[0].isdigit(), cells  # a peak-memory ratio


def test_every_stage_maps_to_every_stage(zoo_cost):
    fsp = zoo_cost.reproduce.Recipe(layers=("conv1", "layer1", "layer2", "layer3"))
    resnet = zoo_cost.overhead.build_model("timm:resnet18")
    assert zoo_cost.layers_on(fsp, resnet) == ["conv1", "layer1", "layer2", "layer3", "layer4"]
