"""Which layers a Distiller taps: resolved at once for names, on the first real call for ``"auto"``.

Named layers (patterns, modules, pairs) are resolved when the Distiller is made. ``"auto"`` and
``"blocks"`` depend on what the models produce for the input they are trained on, so they are
resolved on the student's first call inside the block, from a batch of one taken from its real
input (:func:`athooks.discovery.auto_pairs`), unless ``input_size`` asks for a dummy input now.
A layer that selects every tensor of its output (``Layer(name, select="*")``) is expanded on the
first call too, into one pair per key both outputs have (:func:`output_keys`).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from collections.abc import Mapping as MappingABC
from typing import Any

import torch
from torch import nn

from athooks.context import internal_run
from athooks.discovery import AUTO_MODES, Pairing, auto_pairs
from athooks.errors import ConfigurationError, PairingWarning
from athooks.layers import Layer, ResolvedPair, expand_deferred, resolve_pairs, unwrap
from athooks.mappings import Embedding, Mapping
from athooks.taps import PairedTaps
from athooks.tensors import adapted_input, first_tensor

__all__ = ["LayerPlan", "resolve_embedding"]


def _warn(pairing: Pairing) -> None:
    """Emit the pairing's warnings, once, where ``"auto"`` is resolved."""
    for message in pairing.warnings:
        warnings.warn(message, PairingWarning, stacklevel=4)


class LayerPlan:
    """The layer pairs of a Distiller and their taps, once they can be known.

    Args:
        teacher: The teacher model.
        student: The student model.
        layers: The Distiller's ``layers`` argument.
        mappings: The mappings the losses need (no mapping: no layer is tapped).
        copy: The student's ``copy_outputs`` policy.
        input_size: Resolve ``"auto"``/``"blocks"`` now, on a dummy input of this size.
        teacher_input: The Distiller's ``teacher_input`` (for the first call's probe).

    Attributes:
        pairing: What ``"auto"``/``"blocks"`` found (``None`` for named layers, or until found).
        taps: The taps, once resolved (else ``None``).
        on_resolved: Called with the taps when they are resolved after construction.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        layers: Any,
        mappings: Sequence[Mapping],
        copy: str,
        *,
        input_size: Sequence[int] | None = None,
        teacher_input: Callable[..., Any] | None = None,
        embedding: Any = None,
    ) -> None:
        self.teacher, self.student, self.layers = teacher, student, layers
        self.embedding: ResolvedPair | None = None
        self.embedding_mapping: Mapping | None = None
        if embedding is not None:
            self.embedding = resolve_embedding(teacher, student, embedding)
            self.embedding_mapping = Embedding()
        self.mappings, self.copy, self.teacher_input = list(mappings), copy, teacher_input
        self.pairing: Pairing | None = None
        self.taps: PairedTaps | None = None
        self.on_resolved: Callable[[PairedTaps], None] | None = None
        self._pending: tuple[dict[str, bool], bool] = ({}, False)
        self._lock = threading.Lock()
        self._deferred: list[ResolvedPair] | None = None
        if not self.mappings:
            self._use([])
        elif not self.automatic:
            resolved = resolve_pairs(teacher, student, layers)
            if any(p.deferred for p in resolved):
                self._deferred = resolved  # select="*": the keys are known on the first call
            else:
                self._use(resolved)
        elif input_size is not None:
            self.pairing = auto_pairs(teacher, student, layers, input_size)
            _warn(self.pairing)
            self._use(resolve_pairs(teacher, student, self.pairing.layers()))

    @property
    def automatic(self) -> bool:
        """Whether the layers are ``"auto"`` or ``"blocks"``."""
        return isinstance(self.layers, str) and self.layers in AUTO_MODES

    def resolve_on(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Resolve ``"auto"``/``"blocks"`` from the student's first real call (thread-safe)."""
        with self._lock:
            if self.taps is not None:
                return
            if self._deferred is not None:
                taps = self._use(self._expanded(args, kwargs))
                if self.on_resolved is not None:
                    self.on_resolved(taps)
                return
            self.pairing = auto_pairs(
                self.teacher,
                self.student,
                self.layers,
                example=(args, kwargs),
                teacher_input=self.teacher_input,
            )
            _warn(self.pairing)
            taps = self._use(resolve_pairs(self.teacher, self.student, self.pairing.layers()))
            if self.on_resolved is not None:
                self.on_resolved(taps)

    def _expanded(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[ResolvedPair]:
        """The ``select="*"`` pairs expanded over the keys of the models' real outputs."""
        assert self._deferred is not None
        star = [p for p in self._deferred if p.deferred]
        t_args, t_kwargs = adapted_input(self.teacher_input, args, kwargs)
        t_keys = output_keys(self.teacher, [p.teacher_name for p in star], t_args, t_kwargs)
        s_keys = output_keys(self.student, [p.student_name for p in star], args, kwargs)
        return expand_deferred(self._deferred, t_keys, s_keys)

    def _use(self, resolved: Sequence[ResolvedPair]) -> PairedTaps:
        taps = PairedTaps(
            self.teacher,
            self.student,
            resolved,
            self.mappings,
            self.copy,
            embedding=self.embedding,
            embedding_mapping=self.embedding_mapping,
        )
        copies, strict = self._pending
        unknown = taps.student.load_copy_state(copies)
        if strict and unknown:
            raise ConfigurationError(
                f"the Distiller's state dict, loaded before its layers were chosen, has tap "
                f"modes for student layers {', '.join(map(repr, unknown))}, which "
                f"layers={self.layers!r} did not choose (it chose "
                f"{', '.join(s for _, s in taps.pairs) or 'none'}). Build the Distiller as the "
                "saved one was built (e.g. the same layers), or load with strict=False"
            )
        self.taps = taps
        return taps

    def pairs(self) -> list[tuple[str, str]]:
        """The ``(teacher_name, student_name)`` pairs.

        Raises:
            ConfigurationError: For ``"auto"``/``"blocks"`` before the student's first call.
        """
        if self.taps is None and self._deferred is not None:
            raise ConfigurationError(
                "a layer selects every tensor of its output (select='*'), so its pairs are "
                "known on the student's first call inside the block, from the keys both "
                "outputs have; call student(x) first, or name the keys, e.g. "
                "Layer(name, select=('0', '1', '2'))"
            )
        if self.taps is None:
            raise ConfigurationError(
                f"layers={self.layers!r} is resolved on the student's first call inside the "
                "block, from its real input; call student(x) first, pass input_size=(C, H, W) "
                "to resolve it now from a dummy input, or see athooks.describe(teacher, student)"
            )
        return list(self.taps.pairs)

    def state_dict(self) -> dict[str, Any]:
        """Each student tap's copy decision, as ``{"taps.<student layer>.copy": bool tensor}``."""
        copies = self.taps.student.copy_state() if self.taps is not None else self._pending[0]
        return {f"taps.{name}.copy": torch.tensor(copy) for name, copy in copies.items()}

    def load_state_dict(self, state: dict[str, Any], strict: bool) -> list[str]:
        """Restore :meth:`state_dict`'s copy decisions; returns the keys that fit no tap.

        Before the layers are resolved, the decisions are kept and checked at resolution.
        """
        copies: dict[str, bool] = {}
        unknown: list[str] = []
        for key, value in state.items():
            if key.startswith("taps.") and key.endswith(".copy") and len(key) > 10:
                copies[key[len("taps.") : -len(".copy")]] = bool(value)
            else:
                unknown.append(key)
        if self.taps is None:
            self._pending = (copies, strict)
        else:
            unknown += [f"taps.{n}.copy" for n in self.taps.student.load_copy_state(copies)]
        return unknown


def resolve_embedding(teacher: nn.Module, student: nn.Module, spec: Any) -> ResolvedPair:
    """The one pair of layers whose outputs (or inputs) are the models' pre-logit vectors.

    Args:
        teacher: The teacher model.
        student: The student model.
        spec: ``"auto"`` (the classifiers' inputs, :meth:`athooks.Layer.pre_logits`), or a layer
            for both models (a name, a :class:`athooks.Layer`, a module), or a ``(teacher,
            student)`` tuple of them.

    Returns:
        The resolved pair.

    Raises:
        ConfigurationError: If ``spec`` names more than one pair.
        LayerResolutionError: If a layer cannot be found.
    """
    chosen = Layer.pre_logits() if isinstance(spec, str) and spec == "auto" else spec
    pairs = resolve_pairs(teacher, student, [chosen])
    if len(pairs) != 1 or pairs[0].deferred or pairs[0].teacher_layer.multiple:
        raise ConfigurationError(
            f"embedding={spec!r} names {len(pairs)} layer pairs; the embedding is one layer per "
            "model (its output, or with Layer(name, of='input') its input, one vector (B, D) "
            "per sample); give one name, Layer, module or (teacher, student) tuple"
        )
    return pairs[0]


def output_keys(
    model: nn.Module, names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, list[int | str] | None]:
    """The keys (or indices) of the tensors each named module returns, from one forward.

    The model runs once on ``(args, kwargs)``, in eval mode under ``no_grad``, as one of
    athooks' own runs (no attached Distiller sees it); each module's ``training`` flag is
    restored.

    Args:
        model: The model (wrappers are looked through).
        names: Module names.
        args: The call's positional arguments.
        kwargs: Its keyword arguments.

    Returns:
        ``{name: keys}``: the keys of a dict output (or the indices of a tuple or list) whose
        values hold a tensor, in order; ``None`` for a tensor output or a module that did not
        run.

    Example:
        ```python
        import torch
        from athooks.plan import output_keys

        class Levels(torch.nn.Module):
            def forward(self, x):
                return {"p3": x, "p4": x[..., ::2, ::2], "meta": "not a tensor"}

        net = torch.nn.Sequential(Levels())
        assert output_keys(net, ["0"], (torch.zeros(1, 3, 8, 8),), {}) == {"0": ["p3", "p4"]}
        ```
    """
    inner, _ = unwrap(model)
    found: dict[str, list[int | str] | None] = dict.fromkeys(names)

    def keys_of(output: Any) -> list[int | str] | None:
        if isinstance(output, MappingABC):
            return [k for k, v in output.items() if first_tensor(v) is not None]
        if isinstance(output, (tuple, list)):
            return [i for i, v in enumerate(output) if first_tensor(v) is not None]
        return None

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, hook_args: Any, output: Any) -> None:
            found[name] = keys_of(output)

        return hook

    handles = [inner.get_submodule(n).register_forward_hook(hook_for(n)) for n in set(names)]
    flags = [(m, m.training) for m in inner.modules()]
    try:
        for module, _ in flags:
            module.training = False
        with internal_run(), torch.no_grad():
            inner(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    return found
