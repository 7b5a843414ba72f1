"""Third-party plugins through real entry-point discovery, and how their failures are handled.

Each test writes a small installed distribution (a package and its ``*.dist-info`` with
``entry_points.txt``) into a temporary directory on ``sys.path``, which is exactly what
``importlib.metadata`` reads for a pip-installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import athooks
import athooks.registry as registry
from athooks import Distiller
from athooks.errors import CaptureError, PluginError, UnknownNameError


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install(dist, version, module_source, entry_name) -> registers a fake installed dist."""
    pm = athooks.get_plugin_manager()
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def _install(dist: str, version: str, source: str, entry: str | None = None) -> None:
        module = dist.replace("-", "_")
        entry = entry or module
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        info = tmp_path / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[athooks]\n{entry} = {module}\n")
        names.append(entry)

    yield _install
    for name in names:
        plugin = pm.get_plugin(name)
        if plugin is not None:
            pm.unregister(plugin)
        sys.modules.pop(name, None)
        registry._load_errors.pop(name, None)
        registry._distributions.pop(name, None)


GOOD = """
    from athooks.plugin import MappingSpec, hookimpl

    def mean_abs(features):
        return features.abs().mean(dim=1)

    @hookimpl
    def athooks_mappings():
        return [MappingSpec("mean_abs_ep", lambda: mean_abs, "mean |A| over channels")]
"""


def test_an_installed_plugin_is_found_through_its_entry_point(install):
    install("athooks-meanabs", "1.2.0", GOOD)
    registry.reload_entry_points()
    assert "mean_abs_ep" in athooks.list_mappings()
    rows = {name: provider for _, name, provider, _ in registry.registered()}
    assert rows["mean_abs_ep"] == "athooks-meanabs 1.2.0"
    assert rows["sum_p"].endswith("(built-in)")
    assert athooks.mapping("mean_abs_ep")(torch.ones(1, 3, 2, 2)).shape == (1, 2, 2)


def test_a_plugin_that_fails_to_import_leaves_the_rest_working(install):
    install("athooks-broken", "0.1", "import not_a_module_anywhere\n")
    with pytest.warns(
        registry.PluginLoadWarning,
        match=r"athooks-broken 0.1 .*failed to load: ModuleNotFoundError",
    ):
        registry.reload_entry_points()
    assert athooks.mapping("sum_p") is not None
    with pytest.raises(
        UnknownNameError,
        match=r"unknown mapping 'fancy'.*athooks-broken 0.1 \(entry point athooks_broken = athooks_broken\) failed to load",
    ):
        athooks.mapping("fancy")


def test_a_plugin_with_an_unknown_hook_is_left_out(install):
    install("athooks-typo", "0.1", GOOD.replace("def athooks_mappings", "def athooks_mapings"))
    with pytest.warns(
        registry.PluginLoadWarning,
        match=r"athooks-typo 0.1 was left out: unknown hook 'athooks_mapings'",
    ):
        registry.reload_entry_points()
    assert athooks.loss("at") is not None


def test_a_plugin_raising_in_its_hook_is_named(install):
    install(
        "athooks-raises",
        "2.0",
        """
        from athooks.plugin import hookimpl

        @hookimpl
        def athooks_losses():
            raise RuntimeError("cannot build")
    """,
    )
    registry.reload_entry_points()
    assert athooks.loss("at") is not None
    with pytest.raises(
        UnknownNameError,
        match=r"athooks-raises 2.0: its athooks_losses\(\) raised RuntimeError: cannot build",
    ):
        athooks.loss("theirs")


def test_a_name_clash_with_a_builtin_names_both(install):
    install(
        "athooks-clash",
        "0.3",
        """
        from athooks.plugin import MappingSpec, hookimpl

        @hookimpl
        def athooks_mappings():
            return [MappingSpec("max_p", lambda: (lambda f: f.amax(1)))]
    """,
    )
    registry.reload_entry_points()
    with pytest.raises(
        PluginError,
        match=r"'max_p' is registered by more than one plugin \(athooks .* \(built-in\), athooks-clash 0.3\)",
    ):
        athooks.mapping("max_p")
    assert athooks.mapping("sum_p") is not None


def test_a_mapping_returning_the_wrong_shape_names_its_distribution(install):
    install(
        "athooks-badshape",
        "0.9",
        """
        from athooks.plugin import MappingSpec, hookimpl

        @hookimpl
        def athooks_mappings():
            return [MappingSpec("flat_ep", lambda: (lambda f: f.flatten(1)))]
    """,
    )
    registry.reload_entry_points()
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.ReLU())
    at = athooks.loss("at", mapping="flat_ep")
    with (
        Distiller(teacher, student, layers="1", losses=at),
        pytest.raises(
            CaptureError,
            match=r"mapping 'flat_ep' \(from athooks-badshape 0.9\) returned a torch.float32 tensor of shape \(2, 144\)",
        ),
    ):
        student(torch.randn(2, 3, 8, 8))


def test_autoload_can_be_turned_off(tmp_path):
    (tmp_path / "athooks_envtest.py").write_text(textwrap.dedent(GOOD))
    info = tmp_path / "athooks_envtest-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: athooks-envtest\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[athooks]\nathooks_envtest = athooks_envtest\n")
    code = "import athooks; print('mean_abs_ep' in athooks.list_mappings())"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    on = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    off = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "ATHOOKS_DISABLE_PLUGIN_AUTOLOAD": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert on.stdout.strip() == "True", on.stderr
    assert off.stdout.strip() == "False", off.stderr


def test_the_cbam_plugin_package_is_found_through_its_entry_point():
    """plugins/athooks-cbam, installed as the README says, provides its names by entry point."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("athooks-cbam")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI"):
            pytest.fail("athooks-cbam is not installed; .ci/run installs it as the README says")
        pytest.skip(
            "athooks-cbam is not installed (python3 -m pip install -e plugins/athooks-cbam)"
        )
    assert [ep.value for ep in dist.entry_points if ep.group == "athooks"] == [
        "athooks_cbam.plugin"
    ]
    assert {"cbam_spatial", "se_channel"} <= set(athooks.list_mappings())
    providers = {name: who for _, name, who, _ in registry.registered()}
    assert providers["cbam_spatial"] == f"athooks-cbam {dist.version}"
