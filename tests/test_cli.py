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


@pytest.mark.parametrize("model", ["resnet18", "timm:resnet18", "torchvision:resnet18"])
def test_layers_lists_modules(model):
    res = run("layers", model, "--pattern", "layer?")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["name", "type"]
    assert [line.split()[0] for line in lines[1:]] == ["layer1", "layer2", "layer3", "layer4"]
    assert all(len(line) <= 80 for line in lines)


def test_layers_from_an_import_path(tmp_path):
    (tmp_path / "mynets.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            def build_net():
                return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            """
        )
    )
    res = run("layers", "mynets:build_net", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1:] == ["0     Conv2d", "1     ReLU"]


def test_errors_are_one_line_with_exit_code_2():
    res = run("layers", "torchvision:resnet18", "--pattern", "layr?")
    assert res.returncode == 2
    assert res.stderr.startswith("athooks: error: pattern 'layr?' matched no module of the model")
    res = run("layers", "nosuchpkg_xyz:build")
    assert res.returncode == 2 and "cannot build model 'nosuchpkg_xyz:build'" in res.stderr


def test_list_shows_registered_names():
    res = run("list")
    assert res.returncode == 0
    assert "mappings: max_p, sum, sum_p" in res.stdout and "losses:   at" in res.stdout
