"""Layer names and patterns: which modules of the teacher and the student to tap.

Names are those of ``model.named_modules()`` for the model as the user built it. Wrappers are
transparent: a ``DistributedDataParallel`` or ``DataParallel`` wrapper (``module.``) and a
``torch.compile`` wrapper (``_orig_mod.``) are looked through, and a pattern written with their
prefix is accepted too.

Pattern syntax:

* a plain name, ``"layer3.1"``, matches that module;
* ``*`` matches any run of characters within one dotted part, ``?`` one character, ``[...]`` a set;
* ``**`` crosses dotted parts: ``"layer3.**"`` is every module below ``layer3``, ``"**.bn2"`` every
  ``bn2`` at any depth;
* ``"re:<regex>"`` is a regular expression that must match the whole name.

The root module (name ``""``) is never matched by a pattern.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from torch import Tensor, nn

from athooks.errors import ConfigurationError, LayerResolutionError

__all__ = [
    "Layer",
    "ResolvedPair",
    "list_layers",
    "LayerSpec",
    "LayersArg",
    "compile_pattern",
    "match_modules",
    "resolve_pairs",
    "unwrap",
]

#: The name prefixes wrappers add: DataParallel and DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Layer:
    """A layer pattern together with how to read the tapped module's output.

    Args:
        pattern: A layer name or pattern (see the module docs for the syntax).
        select: Which tensor to use when the module returns a tuple, list or dict: an index, a
            key, or a callable taking the output and returning a tensor. ``None`` (default) takes
            the first tensor found, depth first, in order.
        transform: A callable applied to the selected tensor before any mapping, for example to
            turn tokens ``(B, N, C)`` into a feature map ``(B, C, H, W)``.

    Example:
        ```python
        import torch
        from athooks import Layer

        lstm_out = Layer("encoder", select=0)           # the output sequence of an nn.LSTM
        nhwc = Layer("stages.1", transform=lambda t: t.permute(0, 3, 1, 2))
        print(lstm_out.pattern, nhwc.pattern)
        ```
    """

    pattern: str
    select: int | str | Callable[[Any], Tensor] | None = None
    transform: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise ConfigurationError(
                f"Layer pattern must be a string, got {type(self.pattern).__name__}: "
                f"{self.pattern!r}; write e.g. Layer('layer3')"
            )


LayerSpec: TypeAlias = "str | Layer"
LayersArg: TypeAlias = (
    "str | Layer | Mapping[str | Layer, str | Layer]"
    " | Sequence[str | Layer | tuple[str | Layer, str | Layer]]"
)


def unwrap(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """Look through DataParallel, DistributedDataParallel and torch.compile wrappers.

    Args:
        model: The model as the user passes it.

    Returns:
        The innermost module and the name prefixes the wrappers added (outermost first).

    Example:
        ```python
        import torch
        from athooks.layers import unwrap

        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
        inner, prefixes = unwrap(torch.nn.DataParallel(net))
        assert inner is net and prefixes == ("module.",)
        ```
    """
    prefixes: list[str] = []
    while True:
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module):
            model = orig
            prefixes.append("_orig_mod.")
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
            "DataParallel",
            "DistributedDataParallel",
        ):
            model = inner
            prefixes.append("module.")
            continue
        return model, tuple(prefixes)


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Turn a layer pattern into a compiled regular expression that must match a whole name.

    Args:
        pattern: A name, a glob pattern, or ``"re:"`` followed by a regular expression.

    Returns:
        The compiled expression; use ``fullmatch``.

    Raises:
        ConfigurationError: If the pattern is empty or its regular expression is invalid.

    Example:
        ```python
        from athooks.layers import compile_pattern

        rx = compile_pattern("layer?")
        assert rx.fullmatch("layer1") and not rx.fullmatch("layer1.0")
        assert compile_pattern("**.bn2").fullmatch("layer1.0.bn2")
        ```
    """
    if not pattern:
        raise ConfigurationError(
            "empty layer pattern; give a module name such as 'layer3' or a pattern such as 'layer?'"
        )
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as err:
            raise ConfigurationError(
                f"invalid regular expression in layer pattern {pattern!r}: {err}; "
                "the text after 're:' must be a Python regular expression"
            ) from None
    parts = pattern.split(".")
    pieces: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            if len(parts) == 1:
                pieces.append(r"[^.]+(?:\.[^.]+)*")
            elif last:
                pieces.append(r"(?:\.[^.]+)+")
            else:
                # zero or more whole parts, each followed by a dot
                pieces.append(r"\.(?:[^.]+\.)*" if i > 0 else r"(?:[^.]+\.)*")
            continue
        body = _translate_part(part)
        if i > 0 and parts[i - 1] != "**":
            pieces.append(r"\.")
        pieces.append(body)
    return re.compile("".join(pieces))


def _translate_part(part: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(part):
        c = part[i]
        if part.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^.]*")
            i += 1
        elif c == "?":
            out.append("[^.]")
            i += 1
        elif c == "[":
            j = part.find("]", i + 2)
            if j == -1:
                out.append(re.escape(c))
                i += 1
                continue
            inner = part[i + 1 : j]
            if inner.startswith("!"):
                inner = "^" + inner[1:]
            out.append("[" + inner.replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _is_pattern(text: str) -> bool:
    return text.startswith("re:") or any(c in text for c in "*?[")


def match_modules(
    model: nn.Module, pattern: str, *, side: str = "model"
) -> list[tuple[str, nn.Module]]:
    """All modules of ``model`` whose name matches ``pattern``, in module order.

    Args:
        model: The model (wrappers are looked through).
        pattern: A layer name or pattern.
        side: How to call the model in error messages (``"teacher"``, ``"student"``).

    Returns:
        ``(name, module)`` pairs in the order of ``named_modules()``.

    Raises:
        LayerResolutionError: If nothing matches; the message lists close names.

    Example:
        ```python
        import torchvision
        from athooks.layers import match_modules

        net = torchvision.models.resnet18()
        print([name for name, _ in match_modules(net, "layer?")])
        ```
    """
    if not isinstance(pattern, str) or not pattern:
        compile_pattern(pattern or "")  # raises the error for an empty pattern
    inner, prefixes = unwrap(model)
    named = [(n, m) for n, m in inner.named_modules() if n]
    candidates = [pattern]
    stripped = pattern
    for prefix in prefixes:
        if stripped.startswith(prefix):
            stripped = stripped[len(prefix) :]
            candidates.append(stripped)
    for candidate in reversed(candidates):  # most stripped first
        if not _is_pattern(candidate):
            hits = [(n, m) for n, m in named if n == candidate]
        else:
            rx = compile_pattern(candidate)
            hits = [(n, m) for n, m in named if rx.fullmatch(n)]
        if hits:
            return hits
    raise LayerResolutionError(_no_match_message(pattern, [n for n, _ in named], side))


def _no_match_message(pattern: str, names: list[str], side: str) -> str:
    probe = pattern[3:] if pattern.startswith("re:") else pattern
    literal = re.sub(r"[*?\[\]!]", "", probe)
    close = difflib.get_close_matches(literal, names, n=5, cutoff=0.6)
    close.sort(key=names.index)  # module order reads better than similarity order
    if not close:
        close = [n for n in names if "." not in n][:8]
        hint = f"top-level modules: {', '.join(close)}" if close else "the model has no submodules"
    else:
        hint = f"close names: {', '.join(close)}"
    return (
        f"pattern {pattern!r} matched no module of the {side}; {hint} "
        f"(see `athooks layers <model>` or athooks.list_layers(model))"
    )


def _normalise_layers(
    layers: Any,
) -> list[tuple[Layer, Layer]]:
    def as_layer(spec: Any, where: str) -> Layer:
        if isinstance(spec, Layer):
            return spec
        if isinstance(spec, str):
            return Layer(spec)
        raise ConfigurationError(
            f"{where}: expected a layer name, a pattern or athooks.Layer, got "
            f"{type(spec).__name__}: {spec!r}"
        )

    if isinstance(layers, (str, Layer)):
        spec = as_layer(layers, "layers")
        return [(spec, spec)]
    if isinstance(layers, Mapping):
        items: Iterable[Any] = [(k, v) for k, v in layers.items()]
    elif isinstance(layers, Sequence):
        items = layers
    else:
        raise ConfigurationError(
            f"layers must be a pattern, a list of names or (teacher, student) pairs, or a dict "
            f"teacher name -> student name; got {type(layers).__name__}"
        )
    out: list[tuple[Layer, Layer]] = []
    for i, item in enumerate(items):
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ConfigurationError(
                    f"layers[{i}] is a tuple of {len(item)} items; a pair is "
                    "(teacher_name, student_name)"
                )
            out.append((as_layer(item[0], f"layers[{i}][0]"), as_layer(item[1], f"layers[{i}][1]")))
        else:
            spec = as_layer(item, f"layers[{i}]")
            out.append((spec, spec))
    if not out:
        raise ConfigurationError(
            "layers is empty; name at least one layer to transfer attention at"
        )
    return out


@dataclass(frozen=True)
class ResolvedPair:
    """One teacher/student layer pair after pattern resolution."""

    teacher_name: str
    teacher_module: nn.Module
    teacher_layer: Layer
    student_name: str
    student_module: nn.Module
    student_layer: Layer


def resolve_pairs(teacher: nn.Module, student: nn.Module, layers: Any) -> list[ResolvedPair]:
    """Resolve a ``layers`` argument into concrete teacher/student module pairs.

    Each entry's teacher pattern and student pattern are matched separately; the matches are
    paired in module order and must be equally many.

    Args:
        teacher: The teacher model.
        student: The student model.
        layers: A pattern for both models, a list of names/patterns/``(teacher, student)``
            tuples, or a dict mapping teacher names to student names.

    Returns:
        The resolved pairs, in the order given.

    Raises:
        LayerResolutionError: If a pattern matches nothing or the two sides differ in count.

    Example:
        ```python
        import torchvision
        from athooks.layers import resolve_pairs

        t = torchvision.models.resnet34()
        s = torchvision.models.resnet18()
        pairs = resolve_pairs(t, s, "layer?")
        print([(p.teacher_name, p.student_name) for p in pairs])
        ```
    """
    pairs: list[ResolvedPair] = []
    for t_layer, s_layer in _normalise_layers(layers):
        t_hits = match_modules(teacher, t_layer.pattern, side="teacher")
        s_hits = match_modules(student, s_layer.pattern, side="student")
        if len(t_hits) != len(s_hits):
            raise LayerResolutionError(
                f"teacher pattern {t_layer.pattern!r} matched {len(t_hits)} modules but student "
                f"pattern {s_layer.pattern!r} matched {len(s_hits)}; each side must give the same "
                f"number so they can be paired in order.\n"
                f"  teacher: {_short_list([n for n, _ in t_hits])}\n"
                f"  student: {_short_list([n for n, _ in s_hits])}\n"
                "Use a narrower pattern (`*` stays within one dotted part) or explicit "
                "(teacher, student) pairs."
            )
        for (tn, tm), (sn, sm) in zip(t_hits, s_hits, strict=True):
            pairs.append(ResolvedPair(tn, tm, t_layer, sn, sm, s_layer))
    return pairs


def _short_list(names: Sequence[str], limit: int = 12) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... ({len(names) - limit} more)"


def list_layers(model: nn.Module) -> list[tuple[str, str]]:
    """Every named submodule of ``model`` with its class name, in module order.

    Args:
        model: Any module (wrappers are looked through).

    Returns:
        ``(name, class name)`` for every submodule except the root.

    Example:
        ```python
        import torch
        import athooks

        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        assert athooks.list_layers(net) == [("0", "Conv2d"), ("1", "ReLU")]
        ```
    """
    inner, _ = unwrap(model)
    return [(n, type(m).__name__) for n, m in inner.named_modules() if n]
