"""The `athooks` command, run as a subprocess."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "athooks.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def table(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    assert set(lines[1].replace(" ", "")) == {"-"}  # header underline
    assert all(len(line) <= 80 for line in lines)
    return [line.split() for line in lines[2:]]


@pytest.mark.parametrize("model", ["resnet18", "timm:resnet18", "torchvision:resnet18"])
def test_layers_lists_modules_with_shapes_and_strides(model):
    res = run("layers", model, "--pattern", "layer?")
    assert res.returncode == 0, res.stderr
    header = res.stdout.splitlines()[0].split()
    assert header == ["name", "type", "output", "layout", "stride", "auto"]
    assert table(res.stdout) == [
        ["layer1", "Sequential", "64x56x56", "NCHW", "4", "*"],
        ["layer2", "Sequential", "128x28x28", "NCHW", "8", "*"],
        ["layer3", "Sequential", "256x14x14", "NCHW", "16", "*"],
        ["layer4", "Sequential", "512x7x7", "NCHW", "32", "*"],
    ]


def test_every_module_is_listed_and_long_names_fit():
    res = run("layers", "efficientnet_b0", "--input-size", "3", "64", "64")
    assert res.returncode == 0, res.stderr
    rows = table(res.stdout)
    assert len(rows) > 200 and rows[0][:4] == ["conv_stem", "Conv2d", "32x32x32", "NCHW"]


def test_pairs_of_a_teacher_and_a_student():
    res = run("layers", "resnet34", "--student", "resnet18")
    assert res.returncode == 0, res.stderr
    assert [r[0] for r in table(res.stdout)] == ["layer1", "layer2", "layer3", "layer4"]
    res = run(
        "layers", "torchvision:mobilenet_v3_large", "--student", "torchvision:mobilenet_v3_small"
    )
    assert res.returncode == 0, res.stderr
    assert table(res.stdout)[-1] == ["features", "960x7x7", "32", "features", "576x7x7"]
    res = run("layers", "athooks:wrn16_2", "--student", "athooks:wrn16_1", "--blocks")
    assert res.returncode == 0, res.stderr
    assert len(table(res.stdout)) == 6


def test_layers_from_an_import_path(tmp_path):
    (tmp_path / "mynets.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            def build_net():
                return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
            """
        )
    )
    res = run("layers", "mynets:build_net", "--input-size", "3", "8", "8", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert table(res.stdout) == [
        ["0", "Conv2d", "4x8x8", "NCHW", "1"],
        ["1", "ReLU", "4x8x8", "NCHW", "1", "*"],
    ]


def test_errors_are_one_line_with_exit_code_2():
    res = run("layers", "torchvision:resnet18", "--pattern", "layr?")
    assert res.returncode == 2
    assert res.stderr.startswith("athooks: error: pattern 'layr?' matched no module of the model")
    res = run("layers", "nosuchpkg_xyz:build")
    assert res.returncode == 2 and "cannot build model 'nosuchpkg_xyz:build'" in res.stderr
    res = run("layers", "resnet34", "--student", "resnet18", "--blocks")
    assert res.returncode == 2 and "same number of blocks per stage" in res.stderr


def test_list_shows_registered_names():
    res = run("list")
    assert res.returncode == 0
    mappings = res.stdout.splitlines()[0].removeprefix("mappings: ").split(", ")
    assert {"max_p", "sum", "sum_p"} <= set(mappings) and mappings == sorted(mappings)
    losses = res.stdout.splitlines()[1].removeprefix("losses:   ").split(", ")
    assert {"at", "fact", "grad_at", "input_grad_l2", "kd", "symmetry"} <= set(losses)
    providers = {
        line.split(":")[0].strip(): line for line in res.stdout.splitlines() if line[:2] == "  "
    }
    built_in = next(line for name, line in providers.items() if "built-in" in name)
    assert "losses at, fact, grad_at, input_grad_l2, kd, symmetry" in built_in


def test_plugins_lists_providers():
    res = run("plugins")
    assert res.returncode == 0, res.stderr
    rows = table(res.stdout)
    assert rows[[r[1] for r in rows].index("sum_p")][:5] == [
        "mapping",
        "sum_p",
        "athooks",
        "0.1.0",
        "(built-in)",
    ]


def test_layers_shows_layouts_and_dict_levels():
    res = run("layers", "torchvision:swin_t", "--input-size", "3", "64", "64")
    assert res.returncode == 0, res.stderr
    rows = {r[0]: r for r in table(res.stdout)}
    assert rows["features.1"][2:] == ["16x16x96", "NHWC", "4", "*"]
    assert rows["features"][2:] == ["2x2x768", "NHWC", "32", "*"]
    res = run("layers", "torchvision:vit_b_16", "--pattern", "encoder")
    assert res.returncode == 0, res.stderr
    assert table(res.stdout) == [["encoder", "Encoder", "197x768", "tokens", "16", "*"]]


def test_detector_levels_are_rows_without_downloading_a_backbone():
    model = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    res = run("layers", model, "--input-size", "3", "128", "128", "--pattern", "backbone")
    assert res.returncode == 0, res.stderr
    assert table(res.stdout) == [  # strides against the images as resized inside (320 px)
        ["backbone['0']", "BackboneWithFPN", "256x10x10", "NCHW", "32", "*"],
        ["backbone['1']", "BackboneWithFPN", "256x10x10", "NCHW", "32", "*"],
        ["backbone['pool']", "BackboneWithFPN", "256x5x5", "NCHW", "64", "*"],
    ]


@pytest.mark.parametrize("flag", [[], ["--unlabeled"]])
def test_demo_unlabeled_flag_reaches_the_config(flag, tmp_path, monkeypatch, capsys):
    """`athooks demo --unlabeled` sets DemoConfig.unlabeled; without it the defaults stay."""
    import athooks.demo.run
    from athooks.cli import main
    from athooks.demo.run import DemoConfig, DemoResult

    seen = []

    def fake_run_demo(config, out, **kwargs):
        seen.append(config)
        return DemoResult(
            config, 0.03, 0.2, 0.1, unlabeled_error=0.08 if config.unlabeled else None
        )

    monkeypatch.setattr(athooks.demo.run, "run_demo", fake_run_demo)
    assert main(["demo", *flag, "--out", str(tmp_path)]) == 0
    (config,) = seen
    assert config == DemoConfig(unlabeled=bool(flag))
    out = capsys.readouterr().out
    if flag:
        assert "and with it on the other 1000 images, unlabeled" in out
        assert "| student + AT, + 1000 unlabeled images | 8.0 |" in out
    else:
        assert "unlabeled images" not in out and "unlabeled," not in out
