"""benchmarks/overhead.py: its smoke mode end to end, and the pieces its comparisons rest on.

No timing is asserted here (timings belong to the benchmark's own output); these tests check that
the variants it compares compute the same thing and that the report is complete.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import pathlib
import shutil
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENVIRON_AUTOLOAD = os.environ.get("ATHOOKS_DISABLE_PLUGIN_AUTOLOAD")


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


def test_gpu_settings(overhead):
    cfg = overhead.settings_for(False, [64, 128], gpu=True)
    assert [s.label for s in cfg["light"]] == [
        f"{pair} 224x224 b{b} (stages)"
        for pair in ("resnet34->resnet18", "resnet50->resnet34")
        for b in (64, 128)
    ]
    assert cfg["memory"][-1].label == "resnet50->resnet34 224x224 b64 (blocks)"
    assert overhead.settings_for(True, [64], gpu=True) == overhead.settings_for(True, [64])


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


@pytest.mark.slow
def test_smoke_mode_of_the_options_part(overhead, tmp_path):
    """--compile and the teacher flags run the options part alone: every variant gets a row with
    its floor, the compiled ones a graph count with no break, the teacher options their maps'
    agreement with the float32 teacher within the tolerance the tests of athooks state."""
    out = tmp_path / "options.md"
    argv = ["--smoke", "--compile", "--compile-backend", "aot_eager", "--teacher-dtype", "bf16"]
    assert overhead.main([*argv, "--truncate", "--no-torchdistill", "--out", str(out)]) == 0
    text = out.read_text()
    assert "### The compiled student and the teacher options" in text
    assert "### Step time" not in text  # the flags run the options part alone
    rows = {
        r.split("|")[2].strip(): [c.strip() for c in r.split("|")[1:-1]]
        for r in text.splitlines()
        if r.startswith("| ") and "(stages)" in r
    }
    assert set(rows) == {
        "floor", "athooks", "athooks+teacher_bf16", "athooks+truncate",
        "floor+compile", "athooks+compile",
    }  # fmt: skip
    assert rows["athooks+compile"][2] == "floor+compile" and rows["athooks"][2] == "floor"
    for variant in ("floor+compile", "athooks+compile"):
        assert rows[variant][8] == "1 / 0", rows[variant]
    maps, loss = (float(v) for v in rows["athooks+teacher_bf16"][10].split(" / "))
    assert 0 < maps < 2e-2 and loss < 1e-2
    assert rows["athooks+truncate"][10] == "0.0e+00 / 0.0e+00"


# --------------------------------------------------------------------------- --baseline-src

BASELINE_MARK = "0.0+baseline-test"


def copy_tree(dest: pathlib.Path, edit=None) -> pathlib.Path:
    """A baseline checkout without git: this repository's athooks/ copied, optionally edited."""
    shutil.copytree(
        ROOT / "athooks", dest / "athooks", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("__init__.py", "version.py"):  # wherever the tree defines its version
        path = dest / "athooks" / name
        if path.exists():
            text = path.read_text().replace('__version__ = "', f'__version__ = "{BASELINE_MARK}')
            path.write_text(text)
    if edit:
        edit(dest / "athooks")
    return dest


@pytest.fixture(scope="module")
def baseline_tree(tmp_path_factory):
    return copy_tree(tmp_path_factory.mktemp("athooks-main"))


def test_rename_package(overhead):
    source = (
        "import athooks\n"
        "import athooks.registry\n"
        "import athooks.layers as layers  # comment\n"
        "from athooks.errors import AthooksError\n"
        "from athooks import Distiller\n"
        "from . import sibling\n"
        "    from athooks.taps import Tap\n"
        'importlib.import_module("athooks.viz")\n'
        'PROJECT = "athooks"\n'
        "import athooks_ltpa\n"
    )
    renamed = overhead.rename_package(source, new="athooks_baseline")
    assert renamed.splitlines() == [
        "import athooks_baseline as athooks",
        "import athooks_baseline.registry, athooks_baseline as athooks",
        "import athooks_baseline.layers as layers  # comment",
        "from athooks_baseline.errors import AthooksError",
        "from athooks_baseline import Distiller",
        "from . import sibling",
        "    from athooks_baseline.taps import Tap",
        'importlib.import_module("athooks_baseline.viz")',
        'PROJECT = "athooks"',  # pluggy's project name and the entry-point group stay
        "import athooks_ltpa",
    ]
    assert overhead.leftover_references(renamed.replace("    from", "from")) == []
    left = overhead.leftover_references("import athooks, os\nx = __import__('athooks')\n")
    assert [entry.split(":")[0] for entry in left] == ["line 1", "line 2"]


def test_baseline_runs_its_own_code(overhead, baseline_tree):
    import athooks

    main_pm = athooks.get_plugin_manager()
    main_plugins = set(main_pm.list_name_plugin())
    baseline = overhead.load_baseline(str(baseline_tree))
    assert overhead.load_baseline(str(baseline_tree)) is baseline  # once per process and tree
    assert baseline.__version__.startswith(BASELINE_MARK)  # the tree's code, not today's
    assert baseline.__name__ == "athooks_baseline"
    assert not pathlib.Path(baseline.__file__).is_relative_to(ROOT)
    assert baseline.Distiller is not athooks.Distiller
    assert baseline.Distiller.__module__ == "athooks_baseline.distiller"
    # its own plugin manager, holding only its own built-ins; today's is untouched
    assert baseline.get_plugin_manager() is not main_pm
    assert [name for name, _ in baseline.get_plugin_manager().list_name_plugin()] == [
        "athooks_baseline.builtins"
    ]
    assert set(main_pm.list_name_plugin()) == main_plugins
    assert "at" in baseline.list_losses()
    overhead.check_baseline_isolated(baseline)
    about = overhead.describe_baseline(str(baseline_tree), baseline)
    assert "not a git checkout" in about and "differs from today's athooks in 1 files" in about


def test_baseline_agrees_with_athooks(overhead, baseline_tree):
    setting = overhead.Setting("athooks:wrn16_2", "athooks:wrn16_1", 16, 2)
    opts = overhead.Options(torch.device("cpu"), baseline_src=str(baseline_tree))
    assert opts.baseline == "athooks@main"
    teacher, student = overhead.fresh_pair(setting)
    names = overhead.tap_names(student, setting.taps)
    x, _ = opts.batch(setting, seed=1)
    got = {}
    for variant in ("athooks", "athooks@main"):
        _, transfer = overhead.make_variant(
            variant, copy.deepcopy(teacher), copy.deepcopy(student), names, opts
        )
        got[variant] = transfer(x).detach()
    assert got["athooks"] > 0
    torch.testing.assert_close(got["athooks@main"], got["athooks"], rtol=1e-6, atol=0)
    steps, _ = overhead.build_variants(setting, ["floor", "reference", "athooks@main"], opts)
    assert list(steps) == ["floor", "reference", "athooks@main"]


def test_baseline_disagreeing_is_caught(overhead, tmp_path):
    # a baseline whose AT weighs twice as much: the loss check must see the baseline's code
    def double_beta(package: pathlib.Path) -> None:
        at = package / "losses" / "at.py"
        text = at.read_text()
        assert "        return scale * total\n" in text  # the edit must really happen
        at.write_text(
            text.replace("        return scale * total\n", "        return 2 * scale * total\n")
        )

    tree = copy_tree(tmp_path, edit=double_beta)
    setting = overhead.Setting("athooks:wrn16_2", "athooks:wrn16_1", 16, 2)
    opts = overhead.Options(torch.device("cpu"), baseline_src=str(tree), baseline_label="broken")
    with pytest.raises(RuntimeError, match="athooks@broken's transfer loss .* do not compute"):
        overhead.build_variants(setting, ["floor", "reference", "athooks", "athooks@broken"], opts)


@pytest.mark.slow
def test_smoke_mode_with_a_baseline(overhead, baseline_tree, tmp_path):
    out = tmp_path / "overhead.md"
    argv = ["--smoke", "--baseline-src", str(baseline_tree), "--only", "timing", "memory"]
    assert overhead.main([*argv, "--out", str(out)]) == 0
    assert os.environ.get(overhead.AUTOLOAD_ENV) == ENVIRON_AUTOLOAD  # restored
    text = out.read_text()
    assert f"- baseline `athooks@main`: athooks {BASELINE_MARK}" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    timing_header = next(r for r in rows if r.startswith("| setting | variant | median step"))
    assert timing_header.endswith("| wall vs athooks@main | CPU vs athooks@main |")
    memory_header = next(r for r in rows if r.startswith("| setting | variant | peak RSS"))
    assert memory_header.endswith("| vs athooks@main | step memory vs athooks@main |")
    baseline_rows = [r for r in rows if "| athooks@main |" in r]
    assert len(baseline_rows) == 2  # a timing row and a memory row
    memory_row = next(r for r in baseline_rows if "(blocks)" in r)
    assert float(memory_row.split("|")[3].replace(",", "")) > 50  # MB: a child with torch
    assert "### athooks against athooks@main: step time and peak memory, side by side" in text
    start = text.index("### athooks against athooks@main")
    table = [r for r in text[start:].splitlines() if r.startswith("| ")][1:]  # no header
    assert len(table) == 2  # the timing setting and the memory setting of --smoke
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert any(c[0].isdigit() for c in cells[1:]), row


# --------------------------------------------------------------------------- instrumentation


def test_instrumentation_targets_exist_today(overhead):
    targets, missing = overhead.resolve_targets(overhead.instrumentation_targets())
    assert missing == []
    assert len(targets) == len(overhead.instrumentation_targets())


def test_breakdown_notes_renamed_internals(overhead, monkeypatch, capsys):
    renamed = [
        *overhead.instrumentation_targets()[:1],
        ("athooks.distiller.Distiller", "_no_such_method", "gone"),
        ("athooks.no_such_module.Thing", "run", "gone too"),
        ("athooks.distiller.Distiller", "detach", "exists, not called in a step"),
    ]
    monkeypatch.setattr(overhead, "instrumentation_targets", lambda: renamed)
    report = overhead.Report()
    setting = overhead.Setting("athooks:wrn16_2", "athooks:wrn16_1", 16, 2)
    overhead.breakdown_section(report, setting, overhead.Options(torch.device("cpu")), 1, 2)
    text = "\n".join(report.lines)
    assert "| student taps: mapping at capture |" in text  # the target that exists still runs
    assert "**athooks step minus floor step**" in text
    assert "`athooks.distiller.Distiller._no_such_method` does not exist" in text
    assert "`athooks.no_such_module.Thing` does not exist" in text
    assert "`athooks.distiller.Distiller.detach` exists but was never called" in text
    assert "update `instrumentation_targets()`" in capsys.readouterr().out


def test_interleaved_runs_steps_in_a_row_and_keeps_their_mean(overhead):
    """--steps-per-round K: each round runs a variant K times in a row, one time per round."""
    calls = {"a": 0, "b": 0}
    order = []

    def step(name):
        def run(x, y):
            calls[name] += 1
            order.append(name)

        return run

    timing = overhead.interleaved(
        {"a": step("a"), "b": step("b")}, None, None, torch.device("cpu"), 1, 3, repeat=4
    )
    assert calls == {"a": 16, "b": 16}
    assert order[:8] == ["a"] * 4 + ["b"] * 4 and order[8:16] == ["b"] * 4 + ["a"] * 4
    assert [len(v) for v in timing.wall.values()] == [3, 3]
    assert all(t >= 0 for v in timing.cpu.values() for t in v)
