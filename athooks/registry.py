"""The plugin registry: mappings and losses by name, provided by pluggy plugins.

The registry is a :class:`pluggy.PluginManager` for project ``"athooks"`` with the hooks of
:mod:`athooks.hookspecs`. The built-in mappings and losses are a plugin like any other
(:mod:`athooks.builtins`). Each lookup asks every plugin, so a plugin registered at any time is seen
by the next lookup, and a plugin that misbehaves only breaks the names it provides.

Installed distributions that declare an entry point in group ``athooks`` are loaded on the first
lookup (set ``ATHOOKS_DISABLE_PLUGIN_AUTOLOAD=1`` to turn this off). Each is loaded on its own: one
that fails to import, or implements a hook athooks does not define, is left out with a warning,
and the error is repeated, naming its distribution, when a name it may provide is looked up.
Plugins run arbitrary code when they are loaded: install only plugins you trust.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

from athooks import hookspecs
from athooks.errors import AthooksError, ConfigurationError, PluginError, UnknownNameError
from athooks.specs import LossSpec, MappingSpec
from athooks.version import __version__

__all__ = [
    "build",
    "get_plugin_manager",
    "list_losses",
    "list_mappings",
    "load_errors",
    "plugin_label",
    "registered",
    "reload_entry_points",
]

BUILTIN_PLUGIN_NAME = "athooks.builtins"
ENTRY_POINT_GROUP = "athooks"
AUTOLOAD_ENV = "ATHOOKS_DISABLE_PLUGIN_AUTOLOAD"

_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_autoloaded = False
_distributions: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
_load_errors: dict[str, str] = {}  # plugin name -> what went wrong, naming the distribution


class PluginLoadWarning(UserWarning):
    """An installed athooks plugin could not be loaded; the others and the built-ins still work."""


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created on first use with the built-ins registered.

    Register a plugin object by hand with ``get_plugin_manager().register(obj, name="...")``.

    Returns:
        The :class:`pluggy.PluginManager` of athooks.

    Example:
        ```python
        import athooks
        from athooks.plugin import MappingSpec, hookimpl

        class MeanAbsPlugin:
            @hookimpl
            def athooks_mappings(self):
                return [MappingSpec("mean_abs_demo", lambda: (lambda f: f.abs().mean(1)))]

        pm = athooks.get_plugin_manager()
        plugin = MeanAbsPlugin()
        pm.register(plugin, name="mean-abs-demo")
        assert "mean_abs_demo" in athooks.list_mappings()
        pm.unregister(plugin)
        ```
    """
    global _manager
    with _lock:
        if _manager is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            # the built-ins sit above the registry (they are mappings and losses): by name
            pm.register(importlib.import_module(BUILTIN_PLUGIN_NAME), name=BUILTIN_PLUGIN_NAME)
            _manager = pm
        return _manager


@dataclass(frozen=True)
class _Entry:
    spec: MappingSpec | LossSpec
    plugin_name: str


@dataclass
class _Collected:
    entries: dict[str, _Entry]
    conflicts: dict[str, list[str]]  # name -> plugins that all registered it
    broken: dict[str, str]  # plugin name -> what went wrong
    claims: dict[str, list[_Entry]]  # name -> every entry of a name claimed more than once


def _autoload(pm: pluggy.PluginManager) -> None:
    """Load the ``athooks`` entry points once, each on its own."""
    global _autoloaded
    with _lock:
        if _autoloaded:
            return
        _autoloaded = True
        if os.environ.get(AUTOLOAD_ENV, "").strip() not in ("", "0"):
            return
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            label = f"{dist.name} {dist.version}" if dist is not None else f"entry point {ep.name}"
            if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as err:
                _fail(
                    ep.name,
                    f"{label} (entry point {ep.name} = {ep.value}) failed to load: "
                    f"{type(err).__name__}: {err}",
                )
                continue
            if dist is not None:
                _distributions[ep.name] = (dist.name, dist.version)
        while True:  # a plugin implementing a hook athooks does not define is left out
            try:
                pm.check_pending()
                break
            except pluggy.PluginValidationError as err:
                name = pm.get_name(err.plugin) or repr(err.plugin)
                pm.unregister(err.plugin)
                _fail(name, f"{plugin_label(name)} was left out: {err}")


def reload_entry_points() -> dict[str, str]:
    """Look for ``athooks`` entry points again, e.g. after installing a plugin in a notebook.

    Plugins already registered stay as they are; new ones are loaded as on the first lookup.

    Returns:
        The plugins that failed to load (see :func:`load_errors`).

    Example:
        ```python
        import athooks.registry

        athooks.registry.reload_entry_points()
        ```
    """
    global _autoloaded
    with _lock:
        _autoloaded = False
        _autoload(get_plugin_manager())
        return dict(_load_errors)


def _fail(plugin_name: str, message: str) -> None:
    _load_errors[plugin_name] = message
    warnings.warn(f"athooks plugin {message}", PluginLoadWarning, stacklevel=3)


def load_errors() -> dict[str, str]:
    """Plugins that could not be loaded, by entry-point name, with what went wrong.

    Returns:
        A copy of the record, after loading the entry points if that has not happened yet.

    Example:
        ```python
        import athooks.registry

        print(athooks.registry.load_errors())  # {} when every installed plugin loaded
        ```
    """
    _autoload(get_plugin_manager())
    return dict(_load_errors)


def _collect(kind: str) -> _Collected:
    pm = get_plugin_manager()
    _autoload(pm)
    hook_name = "athooks_mappings" if kind == "mapping" else "athooks_losses"
    spec_type: type = MappingSpec if kind == "mapping" else LossSpec
    caller = getattr(pm.hook, hook_name)
    entries: dict[str, _Entry] = {}
    conflicts: dict[str, list[str]] = {}
    claims: dict[str, list[_Entry]] = {}
    broken: dict[str, str] = {}
    for impl in caller.get_hookimpls():  # registration order: the built-ins come first
        plugin_name = impl.plugin_name
        try:
            specs = impl.function()
        except Exception as err:  # a broken plugin must not take the others down
            broken[plugin_name] = f"its {hook_name}() raised {type(err).__name__}: {err}"
            continue
        if not isinstance(specs, (list, tuple)):
            broken[plugin_name] = (
                f"its {hook_name}() returned {type(specs).__name__}, expected a list of "
                f"{spec_type.__name__}"
            )
            continue
        for spec in specs:
            if not isinstance(spec, (MappingSpec, LossSpec)) or not isinstance(spec, spec_type):
                broken[plugin_name] = (
                    f"its {hook_name}() returned {spec!r}; each item must be a {spec_type.__name__}"
                )
                continue
            if not isinstance(spec, spec_type) or not isinstance(spec.name, str) or not spec.name:
                broken[plugin_name] = (
                    f"its {hook_name}() returned {spec!r}; each item must be a "
                    f"{spec_type.__name__} with a non-empty name"
                )
                continue
            if spec.name in entries or spec.name in conflicts:
                owners = conflicts.setdefault(spec.name, [])
                claimed = claims.setdefault(spec.name, [])
                if spec.name in entries:
                    first = entries.pop(spec.name)
                    owners.append(first.plugin_name)
                    claimed.append(first)
                owners.append(plugin_name)
                claimed.append(_Entry(spec, plugin_name))
                continue
            entries[spec.name] = _Entry(spec, plugin_name)
    return _Collected(entries, conflicts, broken, claims)


def plugin_label(plugin_name: str) -> str:
    """A readable label for a registered plugin: its distribution and version when known.

    Args:
        plugin_name: The name the plugin was registered under.

    Returns:
        E.g. ``"athooks 0.1.0 (built-in)"`` or ``"athooks-cbam 0.1.0"`` or the plain name.
    """
    if plugin_name == BUILTIN_PLUGIN_NAME:
        return f"athooks {__version__} (built-in)"
    if plugin_name in _distributions:
        dist, version = _distributions[plugin_name]
        return f"{dist} {version}"
    return plugin_name


def _lookup(kind: str, name: str) -> _Entry:
    if not isinstance(name, str):
        raise ConfigurationError(f"a {kind} name must be a string, got {type(name).__name__}")
    found = _collect(kind)
    if name in found.entries:
        return found.entries[name]
    if name in found.conflicts:
        owners = ", ".join(plugin_label(p) for p in found.conflicts[name])
        raise PluginError(
            f"{kind} name {name!r} is registered by more than one plugin ({owners}); names must "
            "be unique. Uninstall one of them, or unregister it with "
            "athooks.get_plugin_manager().unregister(...)"
        )
    known = sorted(found.entries)
    close = difflib.get_close_matches(name, known, n=3)
    msg = f"unknown {kind} {name!r}; registered {kind}s: {', '.join(known) or '(none)'}"
    if close:
        msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
    problems = [f"{plugin_label(p)}: {why}" for p, why in found.broken.items()]
    problems += list(_load_errors.values())
    if problems:
        msg += f". Some plugins failed, so {name!r} may be one of theirs: {'; '.join(problems)}"
    else:
        msg += (
            f". If {name!r} comes from a plugin package, check that it is installed in this "
            "environment and registered (`athooks list` shows what is available)"
        )
    raise UnknownNameError(msg)


def build(kind: str, name: str, options: dict[str, Any]) -> tuple[Any, str]:
    """Call the factory a plugin registered for ``name``, with the user's options.

    The registry knows no mapping or loss type: :func:`athooks.mapping` and :func:`athooks.loss`
    check what the factory built.

    Args:
        kind: ``"mapping"`` or ``"loss"``.
        name: The registered name.
        options: The user's options.

    Returns:
        What the factory built, and the label of the plugin that provides ``name``
        (:func:`plugin_label`).

    Raises:
        UnknownNameError: If no plugin registers ``name``.
        PluginError: If two plugins claim it, or the factory fails.
        ConfigurationError: If an option is unknown, or the factory refuses its value.

    Example:
        ```python
        from athooks.registry import build

        made, provider = build("mapping", "sum_p", {"p": 4})
        assert provider.endswith("(built-in)")
        ```
    """
    entry = _lookup(kind, name)
    factory: Callable[..., Any] = entry.spec.factory
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without signatures: just call
        signature = None
    if signature is not None:
        try:
            signature.bind(**options)
        except TypeError:
            accepted = [
                p.name
                for p in signature.parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
            has_var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
            if not has_var_kw:
                bad = sorted(set(options) - set(accepted))
                raise ConfigurationError(
                    f"{kind} {name!r} got unexpected option(s) {', '.join(bad) or '(none)'}; "
                    f"its options are: {', '.join(accepted) or '(none)'}"
                ) from None
    try:
        obj = factory(**options)
    except Exception as err:
        ours = isinstance(err, AthooksError)
        if ours and _raised_by_an_inner_lookup(err):
            raise  # e.g. loss("at", mapping="sum_p", p=0.5): the mapping's error says it all
        if isinstance(err, (TypeError, ValueError)) and (
            not ours or type(err) is ConfigurationError
        ):  # the factory refused the user's option: the user's error, not the plugin's
            raise ConfigurationError(
                f"{kind} {name!r} rejected its options {_shown(options)}: {err}"
            ) from err
        if isinstance(err, ConfigurationError):
            raise  # a subclass (UnknownNameError, LayerResolutionError): keep its class
        raise PluginError(
            f"{kind} {name!r} from {plugin_label(entry.plugin_name)} failed to build: "
            f"{type(err).__name__}: {err}"
        ) from err
    return obj, plugin_label(entry.plugin_name)


def _raised_by_an_inner_lookup(err: BaseException) -> bool:
    """Whether ``err`` came out of a registry call the factory made itself (a loss's mapping).

    Its message already names that mapping or loss and its options; wrapping it again would
    repeat them.
    """
    tb = err.__traceback__.tb_next if err.__traceback__ is not None else None  # skip our frame
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == __name__:
            return True
        tb = tb.tb_next
    return False


def _shown(options: dict[str, Any]) -> str:
    """The options as a dict literal, each value short: multi-line reprs by class, long ones cut."""
    parts = []
    for key, value in options.items():
        text = repr(value)
        if "\n" in text:  # a module, a tensor: its class says enough
            text = f"<{type(value).__name__}>"
        elif len(text) > 40:
            text = text[:37] + "..."
        parts.append(f"{key!r}: {text}")
    return "{" + ", ".join(parts) + "}"


def registered() -> list[tuple[str, str, str, str]]:
    """Every registered mapping and loss with the plugin that provides it.

    Returns:
        ``(kind, name, provider, summary)`` rows, mappings first, each kind sorted by name;
        ``provider`` is the distribution and version (``"athooks 0.1.0 (built-in)"``). A name
        that several plugins claim has one row per claim, in registration order, whose summary
        starts with ``"claimed twice; using it raises PluginError"``.

    Example:
        ```python
        import athooks.registry

        rows = athooks.registry.registered()
        assert ("mapping", "sum_p") in [(kind, name) for kind, name, _, _ in rows]
        ```
    """
    rows = []
    for kind in ("mapping", "loss"):
        found = _collect(kind)
        for name in sorted({*found.entries, *found.claims}):
            if name in found.entries:
                entry = found.entries[name]
                rows.append((kind, name, plugin_label(entry.plugin_name), entry.spec.summary))
                continue
            claims = found.claims[name]
            times = "twice" if len(claims) == 2 else f"{len(claims)} times"
            for claim in claims:
                others = ", ".join(plugin_label(c.plugin_name) for c in claims if c is not claim)
                summary = f"claimed {times}; using it raises PluginError (also: {others})"
                if claim.spec.summary:
                    summary += f"; {claim.spec.summary}"
                rows.append((kind, name, plugin_label(claim.plugin_name), summary))
    return rows


def list_mappings() -> list[str]:
    """Names of every registered attention mapping, sorted.

    A name two plugins claim is listed too, although using it raises :class:`PluginError`
    (``athooks.registry.registered()`` shows who claims it).

    Returns:
        The names.

    Example:
        ```python
        import athooks

        assert {"sum", "sum_p", "max_p"} <= set(athooks.list_mappings())
        ```
    """
    found = _collect("mapping")
    return sorted({*found.entries, *found.claims})


def list_losses() -> list[str]:
    """Names of every registered transfer loss, sorted.

    A name two plugins claim is listed too, although using it raises :class:`PluginError`
    (``athooks.registry.registered()`` shows who claims it).

    Returns:
        The names.

    Example:
        ```python
        import athooks

        assert "at" in athooks.list_losses()
        ```
    """
    found = _collect("loss")
    return sorted({*found.entries, *found.claims})


_MOVED = {"mapping": "athooks.mappings", "loss": "athooks.losses.base"}


def __getattr__(name: str) -> Any:
    # athooks.registry.mapping/loss moved next to Mapping and Loss; kept reachable for old code
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
