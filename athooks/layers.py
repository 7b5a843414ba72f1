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

A text that is exactly the name of a module is that module, even when it holds pattern characters
(a module registered as ``"stage[0]"``); it is read as a pattern only when no module has that
name. The root module (name ``""``) is never matched by a pattern.

Module objects can be given instead of names (``layers=[student.layer3]``,
``layers=[(teacher.layer3, student.layer2)]``); they are found by identity.
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
    "ALL_TENSORS",
    "PRE_LOGITS",
    "find_classifier",
    "Layer",
    "ResolvedPair",
    "layer_label",
    "list_layers",
    "LayerSpec",
    "LayersArg",
    "compile_pattern",
    "expand_deferred",
    "match_modules",
    "resolve_pairs",
    "unwrap",
]

#: The pattern of :meth:`Layer.pre_logits`: the classifier's input, found on each model.
PRE_LOGITS = "<pre_logits>"

#: The name prefixes wrappers add: DataParallel and DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

#: ``Layer(name, select=ALL_TENSORS)``: every tensor of a dict, tuple or list output, each its
#: own pair, found on the first call.
ALL_TENSORS = "*"


@dataclass(frozen=True)
class Layer:
    """A layer pattern together with how to read the tapped module's output.

    Args:
        pattern: A layer name or pattern (see the module docs for the syntax).
        select: Which tensor to use when the module returns a tuple, list or dict: an index, a
            key, or a callable taking the output and returning a tensor. ``None`` (default) takes
            the first tensor found, depth first, in order. Several tensors of one output, each
            its own pair: a tuple or list of keys or indices (``select=("0", "1", "2")``, the
            levels of an FPN), expanded into one pair per key when the layers are resolved; or
            ``"*"`` (:data:`ALL_TENSORS`), every tensor of a dict, tuple or list output,
            expanded on the student's first call into one pair per key that both models'
            outputs have. Both sides of a pair select the same number of tensors; they are
            paired in order. The pairs are named with their key: ``backbone['0']``.
        transform: A callable applied to the selected tensor before any mapping, for example to
            turn tokens ``(B, N, C)`` into a feature map ``(B, C, H, W)``. With several keys it
            is applied to each of them.
        of: ``"output"`` (default): read what the module returns; ``"input"``: read what it is
            called with (its positional arguments, ``select`` choosing among them; the first
            tensor by default), e.g. the pre-logit vector that a classifier receives.
            :meth:`pre_logits` names that input on any model.

    Example:
        ```python
        import torch
        from athooks import Layer

        lstm_out = Layer("encoder", select=0)           # the output sequence of an nn.LSTM
        nhwc = Layer("stages.1", transform=lambda t: t.permute(0, 3, 1, 2))
        fpn = Layer("backbone", select=("0", "1", "2", "3"))  # four pairs, one per level
        every = Layer("backbone", select="*")            # every tensor of the output
        print(lstm_out.pattern, nhwc.pattern, fpn.select, every.multiple)
        ```
    """

    pattern: str
    select: int | str | tuple[int | str, ...] | Callable[[Any], Tensor] | None = None
    transform: Callable[[Tensor], Tensor] | None = None
    of: str = "output"

    @classmethod
    def pre_logits(cls) -> Layer:
        """The pre-logit features: the input of the model's classifier, found by name.

        The classifier is what timm's ``get_classifier()`` returns, else the ``fc``,
        ``classifier``, ``heads`` or ``head`` of torchvision's models (the last linear layer
        inside), else the model's last ``nn.Linear`` (:func:`find_classifier`). On another model,
        name the classifier yourself: ``Layer("head.proj", of="input")``.

        Returns:
            The layer spec.

        Example:
            ```python
            import torch
            import torchvision
            from athooks import Distiller, Layer

            t, s = torchvision.models.resnet34(), torchvision.models.resnet18()
            d = Distiller(t, s, layers=Layer.pre_logits(), losses="fact")
            print(d.pairs)  # [('fc:input', 'fc:input')]
            ```
        """
        return cls(PRE_LOGITS, of="input")

    def __post_init__(self) -> None:
        if self.of not in ("output", "input"):
            raise ConfigurationError(
                f"Layer({self.pattern!r}, of={self.of!r}): of must be 'output' (what the module "
                "returns) or 'input' (what it is called with)"
            )
        if not isinstance(self.pattern, str):
            raise ConfigurationError(
                f"Layer pattern must be a string, got {type(self.pattern).__name__}: "
                f"{self.pattern!r}; write e.g. Layer('layer3')"
            )
        if isinstance(self.select, (tuple, list)):
            keys = tuple(self.select)
            if not keys or not all(
                isinstance(k, (int, str)) and not isinstance(k, bool) and k != ALL_TENSORS
                for k in keys
            ):
                raise ConfigurationError(
                    f"Layer({self.pattern!r}, select={self.select!r}): several tensors are "
                    "selected by a non-empty tuple or list of keys or indices, e.g. "
                    "select=('0', '1', '2'); use select='*' for every tensor of the output"
                )
            if len(set(keys)) != len(keys):
                raise ConfigurationError(
                    f"Layer({self.pattern!r}, select={self.select!r}) names a key twice, which "
                    "would count its pair twice in the loss; give each key once"
                )
            object.__setattr__(self, "select", keys)  # a list would make the Layer unhashable

    @property
    def multiple(self) -> bool:
        """Whether the layer selects several tensors (a tuple of keys, or ``"*"``)."""
        return isinstance(self.select, tuple) or self.select == ALL_TENSORS

    def expand(self, keys: Sequence[int | str] | None = None) -> list[Layer]:
        """One layer per selected key: the keys of ``select``, or ``keys`` for ``"*"``.

        Args:
            keys: The keys ``"*"`` stands for (what the output holds); ignored otherwise.

        Returns:
            A layer per key, each selecting that key; ``[self]`` for a single selection.

        Example:
            ```python
            from athooks import Layer

            levels = Layer("fpn", select=("0", "1")).expand()
            assert [layer.select for layer in levels] == ["0", "1"]
            assert [x.select for x in Layer("fpn", select="*").expand(["p3", "p4"])] == [
                "p3",
                "p4",
            ]
            ```
        """
        if isinstance(self.select, tuple):
            chosen: Sequence[int | str] = self.select
        elif self.select == ALL_TENSORS and keys is not None:
            chosen = keys
        else:
            return [self]
        return [Layer(self.pattern, key, self.transform, self.of) for key in chosen]


def layer_label(name: str, layer: Layer) -> str:
    """How a tapped module is named in pairs, messages and state dicts: with its key, if any.

    Args:
        name: The module's name.
        layer: The layer spec it is read with.

    Returns:
        ``name`` for the module's (first) tensor or a callable selection, ``name[key]`` for one
        key or index of its output.

    Example:
        ```python
        from athooks import Layer
        from athooks.layers import layer_label

        assert layer_label("backbone", Layer("backbone", select="0")) == "backbone['0']"
        assert layer_label("lstm", Layer("lstm", select=0)) == "lstm[0]"
        assert layer_label("layer3", Layer("layer3")) == "layer3"
        assert layer_label("fc", Layer("fc", of="input")) == "fc:input"
        ```
    """
    select = layer.select
    suffix = ":input" if layer.of == "input" else ""
    if isinstance(select, (int, str)) and not isinstance(select, bool):
        return f"{name}{suffix}[{select!r}]"
    return name + suffix


LayerSpec: TypeAlias = "str | Layer | nn.Module"
LayersArg: TypeAlias = (
    "str | Layer | nn.Module | Mapping[str | Layer | nn.Module, str | Layer | nn.Module]"
    " | Sequence[str | Layer | nn.Module | tuple[str | Layer | nn.Module, str | Layer | nn.Module]]"
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


#: Where torchvision's models (and athooks.models) keep their classifier.
_CLASSIFIER_NAMES = ("fc", "classifier", "heads", "head", "last_linear")


def _last_linear(module: nn.Module, prefix: str) -> tuple[str, nn.Module] | None:
    if isinstance(module, nn.Linear):
        return prefix, module
    found = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            found = (f"{prefix}.{name}" if name and prefix else name or prefix, sub)
    return found


def find_classifier(model: nn.Module, side: str = "model") -> tuple[str, nn.Module]:
    """A model's classifier: the layer whose input is the pre-logit vector.

    timm models say it (``get_classifier()``); torchvision's keep it as ``fc``, ``classifier``
    (a linear layer, or a ``Sequential`` ending in one), ``heads`` or ``head``; otherwise the
    model's last ``nn.Linear`` in module order is taken. Wrappers (DDP, ``torch.compile``) are
    looked through; names are those of the model as given.

    Args:
        model: The model.
        side: ``"teacher"``, ``"student"`` or ``"model"``, for the message.

    Returns:
        The classifier's name and module.

    Raises:
        LayerResolutionError: If the model has no linear layer, naming how to give the layer.

    Example:
        ```python
        import torchvision
        from athooks.layers import find_classifier

        assert find_classifier(torchvision.models.resnet18())[0] == "fc"
        assert find_classifier(torchvision.models.mobilenet_v3_small())[0] == "classifier.3"
        ```
    """
    inner, prefixes = unwrap(model)
    prefix = "".join(prefixes)
    names = {id(m): n for n, m in inner.named_modules()}
    found: tuple[str, nn.Module] | None = None
    get = getattr(inner, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # a model's own method: fall back to the names
            head = None
        if isinstance(head, nn.Module) and id(head) in names and names[id(head)]:
            found = (names[id(head)], head)
    for attr in _CLASSIFIER_NAMES if found is None else ():
        sub = getattr(inner, attr, None)
        if isinstance(sub, nn.Module) and id(sub) in names:
            found = _last_linear(sub, names[id(sub)])
            if found is not None:
                break
    if found is None:
        found = _last_linear(inner, "")
    if found is None or not found[0]:
        raise LayerResolutionError(
            f"the {side} ({type(inner).__name__}) has no classifier athooks can find (no "
            "get_classifier(), fc, classifier or head, and no nn.Linear), so its pre-logit "
            "features cannot be named for it; give the layer whose input (or output) they "
            "are: Layer('head.proj', of='input'), or e.g. Layer('avgpool') (see `athooks layers "
            "<model>`)"
        )
    return prefix + found[0], found[1]


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

    A module whose name is exactly ``pattern`` is returned alone, before the text is read as a
    pattern: a module registered as ``"stage[0]"`` is found by that name.

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
    # a real module name wins before the text is read as a pattern: a module registered as
    # "stage[0]" is tapped by its own name, not by the set "[0]" (which would match "stage0")
    for candidate in reversed(candidates):  # most stripped first
        hits = [(n, m) for n, m in named if n == candidate]
        if hits:
            return hits
    for candidate in reversed(candidates):
        if _is_pattern(candidate):
            rx = compile_pattern(candidate)
            hits = [(n, m) for n, m in named if rx.fullmatch(n)]
            if hits:
                return hits
    raise LayerResolutionError(_no_match_message(pattern, [n for n, _ in named], side))


def _close_names_hint(text: str, names: list[str]) -> str:
    close = difflib.get_close_matches(text, names, n=5, cutoff=0.6)
    close.sort(key=names.index)  # module order reads better than similarity order
    if not close:
        close = [n for n in names if "." not in n][:8]
        return f"top-level modules: {', '.join(close)}" if close else "the model has no submodules"
    return f"close names: {', '.join(close)}"


def _no_match_message(pattern: str, names: list[str], side: str) -> str:
    probe = pattern[3:] if pattern.startswith("re:") else pattern
    hint = _close_names_hint(re.sub(r"[*?\[\]!]", "", probe), names)
    return (
        f"pattern {pattern!r} matched no module of the {side}; {hint} "
        f"(see `athooks layers <model>` or athooks.list_layers(model))"
    )


_Spec: TypeAlias = "Layer | nn.Module"


@dataclass(frozen=True)
class _Entry:
    """One entry of the ``layers`` argument: a pair of specs, or one spec for both models."""

    teacher: _Spec
    student: _Spec
    both: bool  # one spec used on both models (a module: found in the student or the teacher)
    label: str  # where it came from, for messages: "layers[1] ('layer4')"


def _same_spec(a: Any, b: Any) -> bool:
    """Whether two specs say the same thing: one module object, or equal names and reading."""
    if isinstance(a, nn.Module) or isinstance(b, nn.Module):
        return a is b
    if not isinstance(a, (str, Layer)) or not isinstance(b, (str, Layer)):
        return False
    la = a if isinstance(a, Layer) else Layer(a)
    lb = b if isinstance(b, Layer) else Layer(b)
    return (
        la.pattern == lb.pattern
        and _same(la.select, lb.select)
        and _same(la.transform, lb.transform)
    )


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # an object whose == does not give a truth value
        return False


def _is_spec(item: Any) -> bool:
    return isinstance(item, (str, Layer, nn.Module))


def _normalise_layers(layers: Any, describe: Callable[[Any], str] = repr) -> list[_Entry]:
    """The entries of a ``layers`` argument, each with a label that says where it came from.

    ``describe`` writes a spec in messages (the caller names module objects by their path).
    """

    def as_spec(spec: Any, where: str) -> _Spec:
        if isinstance(spec, (Layer, nn.Module)):
            return spec
        if isinstance(spec, str):
            return Layer(spec)
        raise ConfigurationError(
            f"{where}: expected a layer name, a pattern, athooks.Layer or a submodule of one of "
            f"the models, got {type(spec).__name__}: {spec!r:.80}"
        )

    if _is_spec(layers):
        return [_Entry(as_spec(layers, "layers"), as_spec(layers, "layers"), True, "layers")]
    if isinstance(layers, tuple) and len(layers) == 2 and all(_is_spec(x) for x in layers):
        first, second = layers
        if _same_spec(first, second):  # one pair of the same layer: the layer on both models
            spec = as_spec(first, "layers[0]")
            return [_Entry(spec, spec, True, f"layers ({describe(first)})")]
        a, b = describe(first), describe(second)
        raise ConfigurationError(
            f"layers=({a}, {b}) is ambiguous: a tuple of two layers could mean two layers, each "
            f"used on both models, or one (teacher, student) pair. Write layers=[{a}, {b}] for "
            f"two layers, each used on both models, or layers=[({a}, {b})] for one (teacher, "
            f"student) pair (teacher: {a}, student: {b})"
        )

    def shown(item: Any) -> str:  # "(a, b)" for a pair, "(a)" for one spec
        if isinstance(item, tuple):
            return "(" + ", ".join(describe(x) for x in item) + ")"
        return f"({describe(item)})"

    if isinstance(layers, Mapping):
        items: Iterable[tuple[str, Any]] = [
            (f"the entry {describe(k)}: {describe(v)}", (k, v)) for k, v in layers.items()
        ]
    elif isinstance(layers, Sequence):
        items = [(f"layers[{i}] {shown(item)}", item) for i, item in enumerate(layers)]
    else:
        raise ConfigurationError(
            f"layers must be a pattern, a module, a list of names, modules or (teacher, student) "
            f"pairs, or a dict teacher -> student; got {type(layers).__name__}"
        )
    out: list[_Entry] = []
    for i, (label, item) in enumerate(items):
        where = f"layers[{i}]"
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ConfigurationError(
                    f"layers[{i}] is a tuple of {len(item)} items; a pair is "
                    "(teacher_name, student_name)"
                )
            teacher = as_spec(item[0], f"{where}[0]")
            student = as_spec(item[1], f"{where}[1]")
            out.append(_Entry(teacher, student, False, label))
        else:
            spec = as_spec(item, where)
            out.append(_Entry(spec, spec, True, label))
    if not out:
        raise ConfigurationError(
            "layers is empty; name at least one layer to transfer attention at"
        )
    return out


@dataclass(frozen=True)
class ResolvedPair:
    """One teacher/student layer pair after pattern resolution.

    ``teacher_name`` and ``student_name`` are module names; :attr:`teacher_label` and
    :attr:`student_label` add the selected key (``backbone['0']``), as pairs are shown.
    """

    teacher_name: str
    teacher_module: nn.Module
    teacher_layer: Layer
    student_name: str
    student_module: nn.Module
    student_layer: Layer

    @property
    def teacher_label(self) -> str:
        """The teacher's side as shown in ``d.pairs``: its name, with its key if any."""
        return layer_label(self.teacher_name, self.teacher_layer)

    @property
    def student_label(self) -> str:
        """The student's side as shown in ``d.pairs``: its name, with its key if any."""
        return layer_label(self.student_name, self.student_layer)

    @property
    def deferred(self) -> bool:
        """Whether it selects ``"*"``: it is expanded when the models' outputs are known."""
        return self.teacher_layer.select == ALL_TENSORS

    def expand(
        self, teacher_keys: Sequence[int | str] | None = None, student_keys: Any = None
    ) -> list[ResolvedPair]:
        """One pair per selected key (a tuple of keys; for ``"*"``, the keys given).

        Args:
            teacher_keys: For ``"*"``: the teacher's keys to pair (those both outputs have).
            student_keys: For ``"*"``: the student's, in the same order (default the same).

        Returns:
            The pairs, the keys of both sides paired in order.
        """
        t_layers = self.teacher_layer.expand(teacher_keys)
        s_layers = self.student_layer.expand(
            student_keys if student_keys is not None else teacher_keys
        )
        return [
            ResolvedPair(
                self.teacher_name, self.teacher_module, t, self.student_name, self.student_module, s
            )
            for t, s in zip(t_layers, s_layers, strict=True)
        ]


def _python_path(side: str, name: str) -> str:
    """``student.layer4[1]`` for the module named ``layer4.1`` of the student."""
    parts = name.split(".")
    if all(p.isidentifier() or p.isdigit() for p in parts):
        return side + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts)
    return f"{side}.get_submodule({name!r})"


class _Model:
    """One side of the pair, for finding module objects by identity."""

    def __init__(self, model: nn.Module, side: str) -> None:
        self.model = model
        self.side = side
        self.inner = unwrap(model)[0]
        self.named = [(n, m) for n, m in self.inner.named_modules() if n]
        self.by_id = {id(m): n for n, m in self.named}

    def is_root(self, module: nn.Module) -> bool:
        return module is self.model or module is self.inner

    def name_of(self, module: nn.Module) -> str | None:
        return self.by_id.get(id(module))

    def exactly(self, name: str, found_in: str) -> tuple[str, nn.Module]:
        """The module named ``name`` (a name read off the other model), never a pattern."""
        for n, m in self.named:
            if n == name:
                return n, m
        hint = _close_names_hint(name, [n for n, _ in self.named])
        raise LayerResolutionError(
            f"layer {name!r} was given as a module object of the {found_in}, so it is tapped "
            f"by that name on the {self.side} as well, but the {self.side} has no module "
            f"{name!r}; {hint}. Give the pair explicitly: layers=[(teacher_layer, student_layer)]"
        )


def _module_name(module: nn.Module, side: _Model, other: _Model, where: str) -> str:
    """The name of ``module`` in ``side``, or an error saying where it is not."""
    if side.is_root(module) or other.is_root(module):
        whole = side if side.is_root(module) else other
        raise LayerResolutionError(
            f"{where} is the {whole.side} itself ({type(module).__name__}), not one of its "
            f"layers; give a submodule, e.g. {whole.side}.layer3, or its name"
        )
    name = side.name_of(module)
    if name is not None:
        return name
    elsewhere = other.name_of(module)
    if elsewhere is not None:
        raise LayerResolutionError(
            f"{where} is a {type(module).__name__} module that is not a submodule of the "
            f"{side.side}; it is a submodule of the {other.side} ({elsewhere!r}). Pairs are "
            f"(teacher, student): swap the two, or give a module of the {side.side}"
        )
    raise LayerResolutionError(
        f"{where} is a {type(module).__name__} module that is not a submodule of the "
        f"{side.side}; give one of the {side.side}'s modules (e.g. {side.side}.layer3) or a "
        "layer name"
    )


def resolve_pairs(teacher: nn.Module, student: nn.Module, layers: Any) -> list[ResolvedPair]:
    """Resolve a ``layers`` argument into concrete teacher/student module pairs.

    Each entry's teacher pattern and student pattern are matched separately; the matches are
    paired in module order and must be equally many. An exact module name wins over reading the
    text as a pattern. A module object is found by identity in its model (wrappers are looked
    through); a module given alone (not in a pair) is found in the student, or failing that in
    the teacher, and its name is used on the other model as well.

    Args:
        teacher: The teacher model.
        student: The student model.
        layers: A pattern or a module for both models, a list of names, patterns, modules and
            ``(teacher, student)`` tuples, or a dict mapping teacher layers to student layers.
            A top-level tuple of two different layers is refused as ambiguous.

    Returns:
        The resolved pairs, in the order given.

    Raises:
        ConfigurationError: If ``layers`` is malformed or ambiguous.
        LayerResolutionError: If a pattern matches nothing, the two sides differ in count, a
            module is not part of its model, or two entries give the same pair.

    Example:
        ```python
        import torchvision
        from athooks.layers import resolve_pairs

        t = torchvision.models.resnet34()
        s = torchvision.models.resnet18()
        pairs = resolve_pairs(t, s, "layer?")
        print([(p.teacher_name, p.student_name) for p in pairs])
        pairs = resolve_pairs(t, s, [(t.layer3[5], s.layer3[1]), s.layer4])
        assert [(p.teacher_name, p.student_name) for p in pairs] == [
            ("layer3.5", "layer3.1"),
            ("layer4", "layer4"),
        ]
        ```
    """
    t_side, s_side = _Model(teacher, "teacher"), _Model(student, "student")

    def describe(spec: Any) -> str:
        if isinstance(spec, nn.Module):
            for model in (s_side, t_side):
                name = model.name_of(spec)
                if name is not None:
                    return _python_path(model.side, name)
            return f"<{type(spec).__name__}>"
        text = repr(spec)
        return text if len(text) <= 80 else text[:77] + "..."

    pairs: list[ResolvedPair] = []
    sources: list[str] = []
    for entry in _normalise_layers(layers, describe):
        t_hits, t_layer = _resolve_side(entry, t_side, s_side)
        s_hits, s_layer = _resolve_side(entry, s_side, t_side)
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
        _check_selections(t_layer, s_layer, entry.label)
        for (tn, tm), (sn, sm) in zip(t_hits, s_hits, strict=True):
            pair = ResolvedPair(tn, tm, t_layer, sn, sm, s_layer)
            expanded = [pair] if pair.deferred else pair.expand()
            pairs.extend(expanded)
            sources.extend([entry.label] * len(expanded))
    _refuse_duplicates(pairs, sources)
    return pairs


def _check_selections(t_layer: Layer, s_layer: Layer, where: str) -> None:
    """Both sides of a pair select one tensor, or the same number of keys, or both ``"*"``."""
    t_star, s_star = t_layer.select == ALL_TENSORS, s_layer.select == ALL_TENSORS
    t_count = len(t_layer.select) if isinstance(t_layer.select, tuple) else 1
    s_count = len(s_layer.select) if isinstance(s_layer.select, tuple) else 1
    if t_star == s_star and (t_star or t_count == s_count):
        return

    def said(layer: Layer, star: bool, count: int) -> str:
        if star:
            return "every tensor (select='*')"
        return f"{count} tensor{'s' if count > 1 else ''} (select={layer.select!r})"

    raise LayerResolutionError(
        f"{where}: the teacher's layer selects {said(t_layer, t_star, t_count)} and the "
        f"student's {said(s_layer, s_star, s_count)}; a pair needs the same selection on both "
        "sides, paired in order: the same number of keys, or select='*' on both"
    )


def _resolve_side(
    entry: _Entry, side: _Model, other: _Model
) -> tuple[list[tuple[str, nn.Module]], Layer]:
    """The modules an entry names on one side, and the Layer that reads them."""
    spec = entry.teacher if side.side == "teacher" else entry.student
    if isinstance(spec, Layer) and spec.pattern == PRE_LOGITS:
        name, module = find_classifier(side.model, side.side)
        return [(name, module)], Layer(name, spec.select, spec.transform, "input")
    if isinstance(spec, Layer):
        return match_modules(side.model, spec.pattern, side=side.side), spec
    where = entry.label
    if not entry.both:
        name = _module_name(spec, side, other, f"the {side.side} layer of {where}")
        return [(name, spec)], Layer(name)
    # one module for both models: found in the student, or failing that in the teacher
    student, teacher = (side, other) if side.side == "student" else (other, side)
    for home in (student, teacher):
        found = home.name_of(spec)
        if found is not None:
            hit = (found, spec) if home is side else side.exactly(found, found_in=home.side)
            return [hit], Layer(found)
    if student.is_root(spec) or teacher.is_root(spec):
        _module_name(spec, student, teacher, where)  # raises: the model itself
    raise LayerResolutionError(
        f"{where} is a {type(spec).__name__} module that is a submodule of neither the teacher "
        "nor the student; give a module of one of the models (e.g. student.layer3) or a layer "
        "name"
    )


def _refuse_duplicates(pairs: list[ResolvedPair], sources: list[str]) -> None:
    """Two entries that give the same pair would count it twice in the loss: refuse it."""
    seen: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(pairs):
        bucket = seen.setdefault((id(p.teacher_module), id(p.student_module)), [])
        for j in bucket:
            q = pairs[j]
            if all(
                _same(getattr(p_layer, f), getattr(q_layer, f))
                for p_layer, q_layer in (
                    (p.teacher_layer, q.teacher_layer),
                    (p.student_layer, q.student_layer),
                )
                for f in ("select", "transform")
            ):
                raise LayerResolutionError(
                    f"the layer pair (teacher {p.teacher_name!r}, student {p.student_name!r}) "
                    f"is given twice, by {sources[j]} and by {sources[i]}, so it would be "
                    "counted twice in the loss. Remove one of the two entries, or narrow the "
                    "pattern so that it leaves this layer out"
                )
        bucket.append(i)


def expand_deferred(
    pairs: Sequence[ResolvedPair],
    teacher_keys: Mapping[str, Sequence[int | str] | None],
    student_keys: Mapping[str, Sequence[int | str] | None],
) -> list[ResolvedPair]:
    """Expand the ``select="*"`` pairs into one pair per key both modules' outputs have.

    Args:
        pairs: Resolved pairs; those selecting ``"*"`` are expanded, the others kept.
        teacher_keys: The keys (dict) or indices (tuple, list) of the tensors in each deferred
            teacher module's output, by module name; ``None`` for a module that returned a
            tensor.
        student_keys: The same for the student's modules.

    Returns:
        The pairs, in order, each deferred one replaced by its keys' pairs (in the teacher's
        order).

    Raises:
        LayerResolutionError: If a module returned a single tensor, the two outputs share no
            key, or an expanded pair is also given by another entry.

    Example:
        ```python
        import torch
        from athooks import Layer
        from athooks.layers import expand_deferred, resolve_pairs

        t, s = torch.nn.Sequential(torch.nn.Identity()), torch.nn.Sequential(torch.nn.Identity())
        pairs = resolve_pairs(t, s, Layer("0", select="*"))
        out = expand_deferred(pairs, {"0": ["p3", "p4", "p5"]}, {"0": ["p4", "p3"]})
        assert [(p.teacher_label, p.student_label) for p in out] == [
            ("0['p3']", "0['p3']"),
            ("0['p4']", "0['p4']"),
        ]
        ```
    """
    out: list[ResolvedPair] = []
    for pair in pairs:
        if not pair.deferred:
            out.append(pair)
            continue
        t_keys = teacher_keys.get(pair.teacher_name)
        s_keys = student_keys.get(pair.student_name)
        for side, name, keys in (
            ("teacher", pair.teacher_name, t_keys),
            ("student", pair.student_name, s_keys),
        ):
            if keys is None:
                raise LayerResolutionError(
                    f"Layer({pair.teacher_layer.pattern!r}, select='*') selects every tensor of "
                    f"a dict, tuple or list output, but {side} layer {name!r} returned a single "
                    "tensor (or did not run). Drop select='*' for this layer"
                )
        assert t_keys is not None and s_keys is not None
        shared = [k for k in t_keys if k in s_keys]
        if not shared:
            raise LayerResolutionError(
                f"select='*' pairs the keys the two outputs share, but teacher layer "
                f"{pair.teacher_name!r} returned {list(t_keys)} and student layer "
                f"{pair.student_name!r} returned {list(s_keys)}: no key in common. Pair "
                "them by hand: layers=[(Layer(teacher_name, select=('a', 'b')), "
                "Layer(student_name, select=('x', 'y')))]"
            )
        out.extend(pair.expand(shared))
    _refuse_duplicates(out, ["layers"] * len(out))
    return out


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
