"""benchmarks/overhead.py: its smoke mode end to end, and the pieces its comparisons rest on.

No timing is asserted here (timings belong to the benchmark's own output); these tests check that
the variants it compares compute the same thing and that the report is complete.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["overhead"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("spec", ["timm:resnet18", "athooks:wrn16_1"])
def test_staged_forward_is_the_model_run_by_hand(overhead, spec):
    torch.manual_seed(0)
    model = overhead.build_model(spec).eval()
    x = torch.randn(2, 3, 32, 32)
    names = overhead.tap_names(model, "blocks") + overhead.tap_names(model, "stages")
    seen = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: seen.__setitem__(n, out.clone())
        )
        for n in names
    ]
    with torch.no_grad():
        want = model(x)
        for h in handles:
            h.remove()
        logits, feats = overhead.staged_forward(model, x, names)
    torch.testing.assert_close(logits, want)
    for name, feat in zip(names, feats, strict=True):
        torch.testing.assert_close(feat, seen[name], msg=name)


def test_tap_names(overhead):
    model = overhead.build_model("timm:resnet34")  # 3-4-6-3 blocks
    assert overhead.tap_names(model, "stages") == ["layer1", "layer2", "layer3", "layer4"]
    blocks = overhead.tap_names(model, "blocks")
    assert len(blocks) == 16 and blocks[0] == "layer1.0" and blocks[-1] == "layer4.2"
    assert overhead.tap_names(model, 1) == ["layer4.2"]
    assert overhead.tap_names(model, 4) == [blocks[3], blocks[7], blocks[11], blocks[15]]
    assert overhead.tap_names(model, 16) == blocks
    with pytest.raises(ValueError, match="17"):
        overhead.tap_names(model, 17)


def test_authors_at_loss_against_athooks(overhead):
    # the reference's formula equals athooks' AT (code distance) on the same maps
    import athooks

    t, s = torch.randn(4, 8, 5, 5), torch.randn(4, 3, 5, 5)
    m = athooks.mapping("sum_p", p=2)
    got = athooks.loss("at").pair_loss(m(t), m(s))
    torch.testing.assert_close(overhead.at_loss(s, t), got)


def test_variants_disagreeing_are_caught(overhead, monkeypatch):
    setting = overhead.Setting("athooks:wrn16_2", "athooks:wrn16_1", 16, 2)
    opts = overhead.Options(torch.device("cpu"))
    monkeypatch.setattr(
        overhead, "at_loss", lambda x, y: (overhead.at(x) - overhead.at(y)).abs().mean()
    )
    with pytest.raises(RuntimeError, match="do not compute the same thing"):
        overhead.build_variants(setting, ["floor", "reference", "athooks"], opts)


@pytest.mark.slow
def test_smoke_mode_end_to_end(overhead, tmp_path):
    out = tmp_path / "overhead.md"
    assert overhead.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    variants = ["floor", "reference", "athooks"]
    if overhead.have_torchdistill():
        variants.append("torchdistill")
    for section in (
        "### Step time",
        "### Peak memory",
        "### Cost against the number of captured blocks",
        "### Where athooks' extra time goes",
    ):
        assert section in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for variant in variants:
        # a timing row and a memory row per variant, with numbers in them
        assert sum(f"| {variant} |" in r for r in rows) >= 2, variant
    memory_rows = [r for r in rows if "(blocks)" in r]
    assert len(memory_rows) == len(variants)
    for row in memory_rows:
        peak = float(row.split("|")[3].replace(",", ""))
        assert peak > 50  # MB: a python process with torch in it
    assert "- athooks: own work" in text and "ms per captured block" in text
    assert "**athooks step minus floor step**" in text
