"""The pluggy registry: built-ins through the public hookspecs, lookups, bad names, bad plugins."""

from __future__ import annotations

import inspect

import pytest
import torch

import athooks
import athooks.registry
from athooks import builtins, hookspecs
from athooks.errors import ConfigurationError, PluginError, UnknownNameError
from athooks.plugin import Loss, LossSpec, Mapping, MappingSpec, hookimpl


@pytest.fixture
def register():
    pm = athooks.get_plugin_manager()
    added = []

    def _register(obj, name):
        pm.register(obj, name=name)
        added.append(obj)
        return obj

    yield _register
    for obj in added:
        pm.unregister(obj)


def test_builtins_are_registered_through_the_public_hookspecs():
    pm = athooks.get_plugin_manager()
    assert pm.get_plugin("athooks.builtins") is builtins
    # every hook a built-in implements is one of the athooks_ hookspecs, in one module
    specs = {
        n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("athooks_")
    }
    assert specs == {"athooks_mappings", "athooks_losses"}
    assert {"athooks_mappings", "athooks_losses"} <= set(dir(builtins))
    builtin = {
        (kind, name)
        for kind, name, who, _ in athooks.registry.registered()
        if who.endswith("(built-in)")
    }
    assert builtin == {("mapping", n) for n in ("max_p", "sum", "sum_p")} | {
        ("loss", n) for n in ("at", "fact", "grad_at", "input_grad_l2", "kd", "symmetry")
    }


def test_unknown_names_list_registered_ones():
    with pytest.raises(UnknownNameError) as info:
        athooks.mapping("sum_q")
    msg = str(info.value)
    assert "unknown mapping 'sum_q'; registered mappings: " in msg
    assert all(f"{n}, " in msg or f"{n};" in msg for n in ("max_p", "sum", "sum_p"))
    assert "did you mean 'sum_p'" in msg and "plugin package" in msg
    with pytest.raises(
        UnknownNameError, match="registered losss|registered losses|registered loss"
    ):
        athooks.loss("attention")
    assert isinstance(info.value, KeyError) and isinstance(info.value, athooks.AthooksError)


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(
        ConfigurationError, match="mapping 'sum_p' got unexpected option.*q.*options are: p"
    ):
        athooks.mapping("sum_p", q=3)
    with pytest.raises(ConfigurationError, match="distance must be 'code'"):
        athooks.loss("at", distance="l1")


def test_loss_options_pass_mapping_options_through():
    at = athooks.loss("at", beta=10, mapping="max_p", p=4)
    assert at.beta == 10 and repr(at.mapping) == "max_p(p=4)"
    with pytest.raises(ConfigurationError, match="only apply to a mapping given by name"):
        athooks.loss("at", mapping=athooks.mapping("sum"), p=4)


def test_a_hand_registered_plugin_is_used_by_name(register):
    class Energy(Mapping):
        def forward(self, f):
            return f.pow(2).mean(1)

    class LogitGap(Loss):
        def forward(self, step):
            return (step.student_output - 0).pow(2).mean() * 0

    class Plugin:
        @hookimpl
        def athooks_mappings(self):
            return [MappingSpec("energy_t", Energy, "mean A^2")]

        @hookimpl
        def athooks_losses(self):
            return [LossSpec("zero_t", LogitGap)]

    register(Plugin(), "test-plugin")
    assert "energy_t" in athooks.list_mappings() and "zero_t" in athooks.list_losses()
    m = athooks.mapping("energy_t")
    assert m.name == "energy_t" and m(torch.ones(1, 2, 3, 3)).shape == (1, 3, 3)
    assert athooks.loss("zero_t").name == "zero_t"
    at = athooks.loss("at", mapping="energy_t")
    assert at.mapping.name == "energy_t"


def test_a_plain_callable_factory_result_is_wrapped(register):
    class Plugin:
        @hookimpl
        def athooks_mappings(self):
            return [MappingSpec("mean_abs_t", lambda: lambda f: f.abs().mean(1))]

    register(Plugin(), "callable-plugin")
    m = athooks.mapping("mean_abs_t")
    assert isinstance(m, Mapping) and m(torch.ones(2, 3, 4, 4)).shape == (2, 4, 4)


def test_duplicate_names_fail_only_for_that_name(register):
    class Clash:
        @hookimpl
        def athooks_mappings(self):
            return [MappingSpec("sum", lambda: lambda f: f.sum(1))]

    register(Clash(), "clash-plugin")
    with pytest.raises(
        PluginError,
        match=r"'sum' is registered by more than one plugin \(athooks .*built-in.*clash-plugin",
    ):
        athooks.mapping("sum")
    assert athooks.mapping("sum_p") is not None  # the others keep working


def test_a_plugin_that_raises_does_not_break_the_others(register):
    class Broken:
        @hookimpl
        def athooks_mappings(self):
            raise RuntimeError("boom")

    class WrongType:
        @hookimpl
        def athooks_losses(self):
            return "not a list"

    register(Broken(), "broken-plugin")
    register(WrongType(), "wrongtype-plugin")
    assert athooks.mapping("sum_p") is not None and athooks.loss("at") is not None
    with pytest.raises(
        UnknownNameError, match="broken-plugin: its athooks_mappings.. raised RuntimeError: boom"
    ):
        athooks.mapping("whatever")
    with pytest.raises(
        UnknownNameError, match="wrongtype-plugin: its athooks_losses.. returned str"
    ):
        athooks.loss("whatever")


def test_a_factory_that_fails_or_returns_junk_names_the_plugin(register):
    def explode():
        raise RuntimeError("no weights")

    class Plugin:
        @hookimpl
        def athooks_mappings(self):
            return [MappingSpec("explodes_t", explode), MappingSpec("junk_t", lambda: 42)]

        @hookimpl
        def athooks_losses(self):
            return [LossSpec("notaloss_t", lambda: object())]

    register(Plugin(), "bad-factory-plugin")
    with pytest.raises(
        PluginError,
        match="mapping 'explodes_t' from bad-factory-plugin failed to build: RuntimeError: no weights",
    ):
        athooks.mapping("explodes_t")
    with pytest.raises(PluginError, match="built a int, which is not callable"):
        athooks.mapping("junk_t")
    with pytest.raises(
        PluginError, match="loss 'notaloss_t' from bad-factory-plugin built a object"
    ):
        athooks.loss("notaloss_t")


def test_name_must_be_a_string():
    with pytest.raises(ConfigurationError, match="name must be a string"):
        athooks.mapping(3)  # type: ignore[arg-type]


# ------------------------------------------------------------- issue 14, group B


def test_a_factory_value_error_is_the_users_bad_option(register):
    def sized(size=3):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        return lambda f: f.sum(1)

    class Plugin:
        @hookimpl
        def athooks_mappings(self):
            return [MappingSpec("sized_t", sized)]

    register(Plugin(), "value-error-plugin")
    with pytest.raises(ConfigurationError) as info:
        athooks.mapping("sized_t", size=0)
    assert not isinstance(info.value, PluginError)
    assert str(info.value) == (
        "mapping 'sized_t' rejected its options {'size': 0}: size must be >= 1, got 0"
    )
    assert isinstance(info.value.__cause__, ValueError)
    assert athooks.mapping("sized_t", size=2) is not None


def test_a_factory_configuration_error_is_prefixed_once(register):
    from athooks.losses import AT

    def strict_at(beta=1e3, mapping="sum_p", **options):
        if beta > 1e4:
            raise ConfigurationError(f"strict_at: beta must be <= 1e4, got {beta:g}")
        return AT(beta, mapping, **options)

    class Plugin:
        @hookimpl
        def athooks_losses(self):
            return [LossSpec("strict_at_t", strict_at)]

    register(Plugin(), "config-error-plugin")
    with pytest.raises(ConfigurationError) as info:
        athooks.loss("strict_at_t", beta=1e5)
    assert str(info.value) == (
        "loss 'strict_at_t' rejected its options {'beta': 100000.0}: "
        "strict_at: beta must be <= 1e4, got 100000"
    )
    assert isinstance(info.value.__cause__, ConfigurationError)
    # an inner lookup's error (the mapping's own) is passed on as it is, not wrapped again
    with pytest.raises(ConfigurationError) as info:
        athooks.loss("strict_at_t", mapping="sum_p", p=0.5)
    msg = str(info.value)
    assert msg.startswith("mapping 'sum_p' rejected its options {'p': 0.5}: sum_p: p must be >= 1")
    assert msg.count("rejected its options") == 1


def test_a_builtin_option_error_names_the_loss_and_the_options_once():
    with pytest.raises(ConfigurationError) as info:
        athooks.loss("at", beta=float("nan"))
    assert str(info.value).startswith(
        "loss 'at' rejected its options {'beta': nan}: at: beta must be finite"
    )
    with pytest.raises(ConfigurationError) as info:
        athooks.loss("at", mapping="max_p", p=float("inf"))
    msg = str(info.value)
    assert msg.startswith("mapping 'max_p' rejected its options {'p': inf}: max_p: p must be")
    assert msg.count("rejected its options") == 1
    # the class of an inner athooks error is kept
    with pytest.raises(UnknownNameError, match="unknown mapping 'sum_q'"):
        athooks.loss("at", mapping="sum_q")


def test_a_long_option_value_is_shortened_in_the_message(register):
    def picky(table=None):
        raise ValueError("no table wanted")

    class Plugin:
        @hookimpl
        def athooks_mappings(self):
            return [MappingSpec("picky_t", picky)]

    register(Plugin(), "picky-plugin")
    with pytest.raises(ConfigurationError) as info:
        athooks.mapping("picky_t", table=torch.nn.Sequential(*[torch.nn.Linear(4, 4)] * 50))
    assert "{'table': <Sequential>}" in str(info.value) and len(str(info.value)) < 200


def test_other_factory_exceptions_stay_plugin_errors(register):
    def broken():
        raise KeyError("weights")

    class Plugin:
        @hookimpl
        def athooks_mappings(self):
            return [MappingSpec("broken_t", broken)]

    register(Plugin(), "keyerror-plugin")
    with pytest.raises(PluginError, match="failed to build: KeyError"):
        athooks.mapping("broken_t")


def clash(name="sum", summary="mine"):
    class Clash:
        @hookimpl
        def athooks_mappings(self):
            return [MappingSpec(name, lambda: lambda f: f.sum(1), summary)]

    return Clash()


def test_a_name_two_plugins_claim_is_still_listed(register):
    register(clash(), "clash-plugin")
    register(clash("twice_t"), "first-plugin")
    register(clash("twice_t"), "second-plugin")
    names = athooks.list_mappings()
    assert {"sum", "twice_t", "sum_p"} <= set(names) and names == sorted(names)
    with pytest.raises(PluginError, match="first-plugin, second-plugin"):
        athooks.mapping("twice_t")


def test_registered_shows_one_row_per_claiming_provider(register):
    register(clash(), "clash-plugin")
    rows = [r for r in athooks.registry.registered() if r[:2] == ("mapping", "sum")]
    assert [provider for _, _, provider, _ in rows] == [
        athooks.registry.plugin_label("athooks.builtins"),
        "clash-plugin",
    ]
    for _, _, _, summary in rows:
        assert summary.startswith("claimed twice; using it raises PluginError")
    assert "also: clash-plugin" in rows[0][3] and "mine" in rows[1][3]
    unique = [r for r in athooks.registry.registered() if r[:2] == ("mapping", "sum_p")]
    assert len(unique) == 1 and "claimed" not in unique[0][3]


def test_athooks_list_marks_a_name_claimed_twice(register, capsys):
    from athooks.cli import _cmd_list

    register(clash(), "clash-plugin")
    assert _cmd_list(None) == 0  # type: ignore[arg-type]
    out = capsys.readouterr().out.splitlines()
    mappings = out[0].removeprefix("mappings: ").split(", ")
    assert "sum" in mappings and mappings == sorted(mappings)
    assert any(
        "'sum'" in line and "clash-plugin" in line and "PluginError" in line for line in out[2:]
    )
