"""Taps: athooks' forward hooks, which turn a module's output into attention maps as it is produced.

A :class:`Tap` watches one module of one model; a :class:`TapSet` holds one side's taps (the
teacher's or the student's), places and removes their hooks, and *arms* them: a tap captures only
while its set is armed in the calling thread, and only calls made at the depth of athooks' own
model runs at which it was armed (see :mod:`athooks.context`), so a probe, a loss's re-run of a
model, or another thread never writes into a step's captures. What a tap keeps from a call is a
:class:`Capture`: the maps every mapping the losses asked for computed from the output
(:func:`apply_layer`, the one capture path athooks has, also used by :mod:`athooks.viz`).

In-place overwrites (``ReLU(inplace=True)`` after a tapped BatchNorm, ``x += shortcut``): the maps
are computed at capture, so their values are those of the output as it was produced. For backward,
a map needs the feature map it was computed from; if a later in-place op changes it, the gradient
would come from the edited values. A student tap therefore copies its output during the first
forward ("probing") and watches the output's version counter until the forward ends; taps whose
output was overwritten keep copying, the others stop. If an output that was not overwritten while
probing is overwritten in a later forward, :meth:`athooks.Distiller.loss` raises; if it is edited
after the forward (``out.mul_(3)`` on a returned stage output), ``backward()`` raises
:class:`athooks.CaptureError` naming the layer: the tensors the maps save for backward carry their
version at capture and are checked when backward reads them.

Those saved tensors are also kept out of any saved-tensor hooks in force (non-reentrant gradient
checkpointing, ``save_on_cpu``): the tapped feature map stays referenced until the backward pass,
as it would without checkpointing, and a checkpoint's recompute, where the taps are not armed,
saves exactly what the segment saved.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from athooks.context import functorch_active, internal_depth
from athooks.errors import CaptureError
from athooks.layers import Layer, ResolvedPair, layer_label
from athooks.mappings import Mapping as AttentionMapping
from athooks.mappings import apply_mapping
from athooks.tensors import device_type, first_tensor, select_tensor

__all__ = [
    "Capture",
    "Captures",
    "InertHook",
    "PairedTaps",
    "StopForward",
    "Tap",
    "TapSet",
    "apply_layer",
    "check_finite",
    "is_replica",
    "select_tensor",
    "refuse_tokens",
    "token_layout",
]

#: Modules whose output puts the features last, ``(B, N, C)``: the last of them in a tapped
#: module tells a token sequence from a 1-D feature map ``(B, C, T)``.
_FEATURES_LAST = (nn.Linear, nn.LayerNorm, nn.RNNBase, nn.MultiheadAttention)
#: Modules whose output puts the channels second, ``(B, C, T)``.
_CHANNELS_FIRST = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.GroupNorm)


def _features_last_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        return int(shape[0]) if len(shape) == 1 else None
    if isinstance(module, nn.RNNBase):
        width = module.proj_size or module.hidden_size
        return int(width) * (2 if module.bidirectional else 1)
    if isinstance(module, nn.MultiheadAttention):
        return int(module.embed_dim)
    return None


def token_layout(module: nn.Module, features: Tensor) -> str | None:
    """Why a 3-D output of ``module`` is a token sequence ``(B, N, C)``, not ``(B, C, T)``.

    A 3-D tensor is read as a 1-D feature map ``(B, C, T)``; a transformer block, a linear
    layer or an RNN returns ``(B, N, C)`` instead, and its "attention map" would then run over
    the channels. The last module of ``module`` (itself included) that fixes the layout decides:
    a ``Linear``, ``LayerNorm``, RNN or ``MultiheadAttention`` whose width is the last dimension
    (and not the second) means tokens; a ``Conv1d`` or a 1-D norm means channels first.

    Args:
        module: The module that produced the tensor.
        features: Its selected output.

    Returns:
        A reason (naming the module that decided), or ``None`` when the tensor is not 3-D or
        nothing says it is a token sequence.

    Example:
        ```python
        import torch
        from athooks.taps import token_layout

        block = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        print(token_layout(block, block(torch.randn(2, 10, 32))))
        conv = torch.nn.Conv1d(3, 32, 3)
        assert token_layout(conv, conv(torch.randn(2, 3, 10))) is None
        ```
    """
    if features.dim() != 3 or features.shape[1] == features.shape[2]:
        return None
    last: tuple[str, nn.Module] | None = None
    for name, sub in module.named_modules():
        if isinstance(sub, _FEATURES_LAST + _CHANNELS_FIRST):
            last = (name, sub)
    if last is None or isinstance(last[1], _CHANNELS_FIRST):
        return None
    name, sub = last
    width = _features_last_width(sub)
    if width != features.shape[2]:
        return None
    kind = type(sub).__name__
    if name:
        return f"its {kind} {name!r} puts {width} features in the last dimension"
    return f"a {kind} puts its {width} features in the last dimension"


def refuse_tokens(module: nn.Module, features: Tensor, where: str) -> None:
    """Raise if :func:`token_layout` finds ``features`` of ``module`` a token sequence.

    Args:
        module: The tapped module.
        features: Its selected output, before any mapping (no transform given).
        where: The layer, for the message.

    Raises:
        CaptureError: If the output is tokens ``(B, N, C)``, naming the transform to give.
    """
    why = token_layout(module, features)
    if why is not None:
        raise CaptureError(
            f"{where} produced a tensor of shape {tuple(features.shape)}, which looks "
            f"like a sequence of tokens (B, N, C) ({why}), not a 1-D feature map (B, C, T): "
            "its attention map would run over the channels. Give the layer a transform that "
            "puts the channels second, e.g. athooks.Layer(name, transform=lambda t: "
            "t.transpose(1, 2)), or athooks.discovery.TokensToMap(prefix, grid) for tokens "
            "of a patch grid; if it really is (B, C, T), say so with transform=lambda t: t"
        )


def apply_layer(
    layer: Layer,
    output: Any,
    mappings: Sequence[AttentionMapping],
    where: str,
    *,
    copy: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, dict[AttentionMapping, Tensor]]:
    """Compute every mapping on a module's output, as the layer spec says to read it.

    The tensor is selected (``layer.select``), copied when ``copy`` is set, transformed
    (``layer.transform``), then given to each mapping.

    Args:
        layer: The layer spec.
        output: What the module returned.
        mappings: The mappings to apply.
        where: The layer, for error messages (``"student layer 'layer3'"``).
        copy: Whether to map a copy of the selected tensor rather than the tensor itself.
        dtype: Map the selected tensor converted to this floating dtype (a copy, if it is not in
            it already), e.g. float32 for a teacher run in bfloat16.

    Returns:
        The selected tensor (before any copy) and the result of each mapping.

    Raises:
        CaptureError: If no tensor can be selected, the transform returns something else, or a
            mapping's input or output has the wrong shape.

    Example:
        ```python
        import torch
        import athooks
        from athooks.taps import apply_layer

        out = (torch.randn(2, 8, 4, 4), "aux")
        sum_p = athooks.mapping("sum_p")
        raw, maps = apply_layer(athooks.Layer("block", select=0), out, [sum_p], "layer 'block'")
        assert raw is out[0] and maps[sum_p].shape == (2, 4, 4)
        ```
    """
    if isinstance(layer.select, tuple) or layer.multiple:
        raise CaptureError(
            f"{where} is read with select={layer.select!r}, several tensors, but one capture "
            "maps one tensor; expand the layer first (athooks.Layer.expand(), one layer per "
            "key), as athooks.Distiller does"
        )
    raw = select_tensor(output, layer.select, where)
    if dtype is not None and raw.is_floating_point() and raw.dtype != dtype:
        source = raw.to(dtype)  # a copy already
    else:
        source = raw.clone() if copy else raw
    features = layer.transform(source) if layer.transform is not None else source
    if not isinstance(features, Tensor):
        raise CaptureError(
            f"the transform of {where} returned a {type(features).__name__}, not a tensor"
        )
    return raw, {mapping: apply_mapping(mapping, features, where) for mapping in mappings}


@dataclass
class Capture:
    """What a tap kept from its module's last call in one step.

    Attributes:
        values: The result of each mapping.
        source: The student's selected output, held until its forward ends (to read its version
            counter), else ``None``.
        version: The output's version counter at capture (``None`` for inference tensors).
        calls: How many times the module ran in the step (the last call is kept).
        grad_enabled: Whether gradient was enabled at capture.
        overwritten: Whether the output was modified in place after capture with no copy kept.
    """

    values: dict[AttentionMapping, Tensor]
    source: Tensor | None
    version: int | None
    calls: int
    grad_enabled: bool
    overwritten: bool = False


class Captures(dict[int, Capture]):
    """One side's captures of one step, by tap index.

    Attributes:
        depth: The depth of athooks' own runs (:func:`athooks.context.internal_depth`) at which
            the set was armed; calls at another depth are not captured.
        replicas: Names of tapped modules whose ``DataParallel`` replicas fired.
    """

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.replicas: list[str] = []
        self.calls = 0  # of the tapped modules, in this step


class StopForward(BaseException):
    """Raised by a teacher's last tap to cut its forward short (``truncate_teacher=True``).

    A :class:`BaseException`, so that a model's own ``except Exception`` does not swallow it;
    athooks' teacher runner catches it around the teacher's call, and it never reaches the user.
    """


class InertHook:
    """What a pickled athooks hook becomes when unpickled: a hook that does nothing.

    Example:
        ```python
        from athooks.taps import InertHook

        assert InertHook()(None, (), None) is None
        ```
    """

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """Do nothing."""
        return None


def is_replica(module: nn.Module, original: nn.Module) -> bool:
    """Whether ``module`` is a ``DataParallel`` replica of ``original``.

    A replica (``module._replicate_for_data_parallel()``) is another module object that shares
    the original's hook dictionaries; a deep copy (an EMA model) has copies of them.

    Args:
        module: The module a hook fired on.
        original: The module the hook was registered on.

    Returns:
        ``True`` for a replica.
    """
    return (
        module is not original
        and getattr(module, "_is_replica", False) is True
        and module._forward_hooks is original._forward_hooks
    )


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors share storage (``True`` when it cannot be told: torch.func wrappers)."""
    try:
        return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
    except (NotImplementedError, RuntimeError):
        return True


class _TapHook:
    """The callable registered with ``register_forward_hook`` for the taps of one module.

    One hook per module, however many taps read it (several keys of a dict output, say). It
    holds its set weakly and checks the module identity, so that a deep copy of the model (an
    EMA copy, which copies hooks along with the modules) never writes into the original's captures,
    and pickling a model that carries it does not fail.
    """

    __slots__ = ("__weakref__", "_indices", "_set")

    def __init__(self, tapset: TapSet, indices: Sequence[int]) -> None:
        self._set = weakref.ref(tapset)
        self._indices = tuple(indices)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        tapset = self._set()
        if tapset is None:
            return
        store = tapset.armed()
        if store is None or store.depth != internal_depth():
            return
        first = tapset.taps[self._indices[0]]
        if module is not first.module:
            if is_replica(module, first.module):
                store.replicas.extend(tapset.taps[i].name for i in self._indices)
            return
        for index in self._indices:
            tap = tapset.taps[index]
            store[index] = tap.capture(
                args if tap.layer.of == "input" else output, store.get(index)
            )
        store.calls += 1
        if tapset.stop_after is not None and store.calls == tapset.stop_after:
            raise StopForward

    def __deepcopy__(self, memo: dict[int, Any]) -> _TapHook:
        return self

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (InertHook, ())


class Tap:
    """A forward hook's logic for one module: keep the attention maps of its output.

    Args:
        side: ``"teacher"``, ``"student"`` (or ``"model"`` for a plain probe, kept like the
            teacher's: without gradient).
        name: The module's name in its model.
        module: The module.
        layer: The layer spec (pattern, ``select``, ``transform``).
        mappings: The mappings to compute at capture.
        copy: ``"auto"`` (probe on the first call, see the module docs) or ``"always"``; only
            the student's taps copy.

    Attributes:
        name: The tap's label, the module's name with the selected key if any
            (:func:`athooks.layers.layer_label`): ``backbone['0']``.
        module_name: The module's name.
    """

    def __init__(
        self,
        side: str,
        name: str,
        module: nn.Module,
        layer: Layer,
        mappings: Sequence[AttentionMapping],
        copy: str = "auto",
    ) -> None:
        self.side = side
        self.module_name = name
        self.name = layer_label(name, layer)
        self.module = module
        self.layer = layer
        self.mappings = tuple(mappings)
        self.where = f"{side} layer {self.name!r}"
        self.student = side == "student"
        self.copy = self.student and copy == "always"
        self.probing = self.student and copy == "auto"
        self.warned_no_grad = False
        self.layout_checked = layer.transform is not None  # a transform says what it returns
        self.float_maps = False  # maps of a float32 copy, autocast off (teacher_dtype)
        # the output itself, when it is a tensor, is what apply_layer would map: no select, no
        # transform (a step's fixed cost is mostly such Python calls at small batches)
        self._whole = layer.select is None and layer.transform is None and layer.of == "output"

    def capture(self, output: Any, previous: Capture | None = None) -> Capture:
        """Compute the maps of one call of the module (the last call of a step wins).

        Args:
            output: What the module returned.
            previous: What an earlier call in the same step captured, if any.

        Returns:
            The capture.
        """
        if self.float_maps:
            with torch.autocast(device_type(output), enabled=False):
                return self._capture(output, previous)
        return self._capture(output, previous)

    def _capture(self, output: Any, previous: Capture | None) -> Capture:
        if torch.compiler.is_compiling():
            return self._capture_traced(output, previous)
        copy = self.copy or self.probing
        grad = torch.is_grad_enabled()
        if self.student and grad and not functorch_active():
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                raw, values = self._apply(output, copy)
        else:
            raw, values = self._apply(output, copy)
        if not self.layout_checked:
            self.check_layout(raw)
        if not self.student:
            for mapping, value in values.items():
                if value.requires_grad:
                    value = value.detach()
                if _shares_memory(value, raw):
                    value = value.clone()  # a view of the output could be overwritten later
                values[mapping] = value
        version = None if raw.is_inference() else raw._version
        return Capture(
            values=values,
            source=raw if self.student and version is not None else None,
            version=version,
            calls=previous.calls + 1 if previous is not None else 1,
            grad_enabled=grad,
        )

    def _apply(self, output: Any, copy: bool) -> tuple[Tensor, dict[AttentionMapping, Tensor]]:
        """:func:`apply_layer` for this tap, without its selection steps for a whole tensor."""
        if self._whole and isinstance(output, Tensor) and not self.float_maps:
            source = output.clone() if copy else output
            return output, {m: apply_mapping(m, source, self.where) for m in self.mappings}
        return apply_layer(
            self.layer, output, self.mappings, self.where, copy=copy, dtype=self.dtype
        )

    def _capture_traced(self, output: Any, previous: Capture | None) -> Capture:
        """:meth:`capture` as torch.compile traces it into the model's graph.

        Version counters cannot be read while tracing, so the first-call probe of ``copy="auto"``
        cannot run here: a tap that has not probed yet (no eager step before compiling) maps a
        copy, as ``copy="always"`` does, and keeps doing so, since a later in-place op in the
        traced forward (``ReLU(inplace=True)`` after a BatchNorm) would otherwise change what the
        backward of the map reads, with no error under some backends. Inside inductor's graph the
        copy fuses into the map's kernel. A tap that probed in an eager step copies only if that
        step found an in-place overwrite. An edit of a returned output after the forward is
        refused by autograd's own check of the graph's saved tensors.
        """
        copy = self.copy or self.probing
        raw, values = apply_layer(
            self.layer, output, self.mappings, self.where, copy=copy, dtype=self.dtype
        )
        if not self.layout_checked:  # pure Python on shapes: nothing enters the graph
            refuse_tokens(self.module, raw, self.where)
        if not self.student:
            values = {mapping: value.detach().clone() for mapping, value in values.items()}
        return Capture(
            values=values,
            source=None,
            version=None,
            calls=previous.calls + 1 if previous is not None else 1,
            grad_enabled=torch.is_grad_enabled(),
        )

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype the maps are computed in, if not the features' own."""
        return torch.float32 if self.float_maps else None

    def check_layout(self, features: Tensor) -> None:
        """Refuse a token sequence ``(B, N, C)`` read as a 1-D feature map (once per tap).

        Args:
            features: The selected output, given to the mappings as it is (no transform).

        Raises:
            CaptureError: If :func:`token_layout` finds it is a token sequence.
        """
        refuse_tokens(self.module, features, self.where)
        self.layout_checked = True

    def _pack(self, tensor: Tensor) -> tuple[Tensor, int]:
        return tensor, tensor._version

    def _unpack(self, packed: tuple[Tensor, int]) -> Tensor:
        tensor, version = packed
        if tensor._version != version:
            raise CaptureError(
                f"the output of {self.where} was modified in place after athooks captured it "
                f"(e.g. `out.mul_(...)` on a tensor the model returned, after the forward), so "
                "the gradient of its attention map would be computed from the edited values. "
                "Edit a copy (`out = out.clone()`) instead, or pass "
                "Distiller(..., copy_outputs='always') to map a copy of every tapped output"
            )
        return tensor

    def end_forward(self, cap: Capture) -> None:
        """After the model's forward: note an in-place overwrite of the captured output."""
        if cap.source is None:
            return
        bumped = cap.source._version != cap.version
        cap.source = None  # the version is all it was held for
        if self.probing:
            self.probing = False
            self.copy = bumped
        elif bumped and not self.copy:
            cap.overwritten = True


class TapSet:
    """One model's taps: deduplicated, attached and armed together.

    Args:
        side: ``"teacher"`` or ``"student"`` (or ``"model"``), for messages and capture policy.
        model: The model the taps are on (for messages about it).
        mappings: The mappings every tap computes.
        copy: The student's ``copy_outputs`` policy (``"auto"`` or ``"always"``).

    Example:
        ```python
        import torch
        import torchvision
        import athooks
        from athooks.taps import TapSet

        model = torchvision.models.resnet18()
        sum_p = athooks.mapping("sum_p")
        taps = TapSet("model", model, [sum_p])
        index = taps.add("layer3", model.layer3, athooks.Layer("layer3"))
        taps.attach()
        store = taps.arm()
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
        taps.disarm()
        taps.detach()
        assert store[index].values[sum_p].shape == (1, 4, 4)
        ```
    """

    def __init__(
        self,
        side: str,
        model: nn.Module,
        mappings: Sequence[AttentionMapping],
        copy: str = "auto",
    ) -> None:
        self.side = side
        self.model = model
        self.mappings = tuple(mappings)
        self.copy_policy = copy
        self.taps: list[Tap] = []
        self.stop_after: int | None = None  # raise StopForward after this many calls
        self._index: dict[tuple[int, Layer, tuple[int, ...]], int] = {}
        self._handles: list[RemovableHandle] = []
        self._local = threading.local()

    def add(
        self,
        name: str,
        module: nn.Module,
        layer: Layer,
        mappings: Sequence[AttentionMapping] | None = None,
    ) -> int:
        """Add a tap on ``module`` (read as ``layer`` says), or find the same one.

        Args:
            name: The module's name.
            module: The module.
            layer: How to read it.
            mappings: What this tap computes, if not the set's mappings (an embedding's).

        Returns:
            The tap's index, the key of its :class:`Capture` in a step's :class:`Captures`.
        """
        chosen = self.mappings if mappings is None else tuple(mappings)
        key = (id(module), layer, tuple(id(m) for m in chosen))
        if key not in self._index:
            self._index[key] = len(self.taps)
            tap = Tap(self.side, name, module, layer, chosen, copy=self.copy_policy)
            self.taps.append(tap)
        return self._index[key]

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return bool(self._handles)

    def attach(self) -> list[RemovableHandle]:
        """Register one forward hook per tapped module (for all the taps that read it).

        Returns:
            The hook handles (also kept by the set; :meth:`detach` removes them).
        """
        by_module: dict[int, list[int]] = {}
        for i, tap in enumerate(self.taps):
            by_module.setdefault(id(tap.module), []).append(i)
        self._handles = [
            self.taps[indices[0]].module.register_forward_hook(_TapHook(self, indices))
            for indices in by_module.values()
        ]
        return list(self._handles)

    def detach(self) -> None:
        """Remove the hooks and disarm every thread."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._local = threading.local()

    def arm(self) -> Captures:
        """Capture, in this thread, the calls made at the current depth of athooks' own runs.

        Returns:
            The store the taps fill until :meth:`disarm`.
        """
        store = Captures(internal_depth())
        self._local.store = store
        return store

    def disarm(self) -> None:
        """Stop capturing in this thread."""
        self._local.store = None

    def armed(self) -> Captures | None:
        """The store being filled in this thread, if the set is armed."""
        store: Captures | None = getattr(self._local, "store", None)
        return store

    def end_forward(self, store: Captures) -> None:
        """The model's forward returned: check each captured output for in-place overwrites."""
        for index, cap in store.items():
            self.taps[index].end_forward(cap)

    def collect(
        self, store: Captures, indices: Sequence[int], *, grad_enabled: bool = False
    ) -> list[dict[AttentionMapping, Tensor]]:
        """The maps of the given taps from one step, checked.

        Args:
            store: The step's captures on this side.
            indices: One tap index per pair, in pair order.
            grad_enabled: Whether the step's forward had gradient enabled (student side).

        Returns:
            One ``{mapping: map}`` per index.

        Raises:
            CaptureError: If a tap did not fire, fired only as a ``DataParallel`` replica, or
                (student side) its output was overwritten in place without a copy, or its maps
                have no gradient although they should.
        """
        out = []
        for index in indices:
            tap = self.taps[index]
            cap = store.get(index)
            if cap is None:
                raise CaptureError(self._not_fired_message(tap, store))
            if tap.student:
                self._check_student_capture(tap, cap, grad_enabled)
            out.append(cap.values)
        return out

    def _check_student_capture(self, tap: Tap, cap: Capture, grad_enabled: bool) -> None:
        if cap.overwritten:
            raise CaptureError(
                f"the output of student layer {tap.name!r} was overwritten in place after "
                "athooks captured it (e.g. ReLU(inplace=True) or `x += ...`), which the "
                "first forward did not do, so no copy was kept and its attention map cannot "
                "be differentiated. Use Distiller(..., copy_outputs='always')"
            )
        if not grad_enabled:
            return
        if not cap.grad_enabled:
            raise CaptureError(
                f"student layer {tap.name!r} ran with gradient disabled inside the "
                "student's forward, so its attention map has no gradient: reentrant "
                "gradient checkpointing (torch.utils.checkpoint with use_reentrant=True) or "
                "torch.no_grad() inside the model. Use checkpoint(..., use_reentrant=False) "
                "or tap a layer outside the checkpointed segment"
            )
        if any(v.requires_grad for v in cap.values.values()):
            return
        # one tensor of a multi-output module (an FPN body's '0') may come from its frozen
        # part while later parts train: only a whole output with trainable parameters is wrong
        reads_output = tap.layer.select is None and tap.layer.of == "output"
        if reads_output and any(p.requires_grad for p in tap.module.parameters()):
            raise CaptureError(
                f"the attention map of student layer {tap.name!r} carries no gradient "
                "although the layer has trainable parameters; something detaches its output "
                "(.detach(), .data, a no_grad block). Tap a layer whose output is part of the "
                "autograd graph"
            )
        if not tap.warned_no_grad:
            tap.warned_no_grad = True
            warnings.warn(
                f"the attention map of student layer {tap.name!r} carries no gradient: nothing "
                "trainable runs before it (a frozen backbone?), so its transfer term does not "
                "train the student. Tap a layer after the trainable part",
                stacklevel=4,
            )

    def _not_fired_message(self, tap: Tap, store: Captures) -> str:
        if tap.name in store.replicas:
            return (
                f"{tap.where} ran only as DataParallel replicas (copies of the module on each "
                "GPU), which athooks does not capture from. Use DistributedDataParallel (one "
                "process per GPU), or DataParallel on a single device"
            )
        if not tap.student:
            return (
                f"teacher layer {tap.name!r} did not fire when athooks ran the teacher; the "
                "layer is not on the teacher's forward path for this input (a wrong branch, or "
                "a model that calls its stages directly)"
            )
        head = f"student layer {tap.name!r} did not fire during the student's last forward"
        if compiled(self.model) and not store:
            return (
                f"{head}, nor did any other tapped layer: the student runs code that "
                "torch.compile made without athooks' hooks (before this Distiller added them, "
                "through a compiled model that wraps the student, or for another model of the "
                "same class while torch._dynamo.config.skip_nnmodule_hook_guards was set to "
                "True inside the block). athooks recompiles the student's own code when it "
                "attaches and turns those guards on while attached; call torch._dynamo.reset() "
                "after creating the Distiller to recompile everything, and leave "
                "skip_nnmodule_hook_guards as athooks sets it inside the block"
            )
        children = list(tap.module.named_children())
        if children and any(
            getattr(m, "grad_checkpointing", False) is True for m in self.model.modules()
        ):
            last = f"{tap.module_name}.{children[-1][0]}"
            return (
                f"{head}: timm's set_grad_checkpointing(True) runs the blocks of "
                f"{tap.module_name!r} one by one, so the hook on {tap.module_name!r} itself "
                "never fires. "
                f"Tap its last block instead ({last!r}, the same output; checkpointed blocks "
                "give correct values and gradients), or call set_grad_checkpointing(False)"
            )
        return (
            f"{head}. Likely causes: the student was compiled with torch.compile before the "
            "Distiller was made (make the Distiller first), gradient checkpointing that "
            "bypasses the module, or a branch the forward did not take"
        )

    def copy_state(self) -> dict[str, bool]:
        """Each student tap's decision of its first forward: copy its output or not."""
        return {tap.name: tap.copy for tap in self.taps if tap.student and not tap.probing}

    def load_copy_state(self, state: dict[str, bool]) -> list[str]:
        """Restore :meth:`copy_state`; returns the names that match no tap of this set."""
        taps = {tap.name: tap for tap in self.taps if tap.student}
        for name, copy in state.items():
            if name in taps:
                taps[name].copy, taps[name].probing = bool(copy), False
        return [name for name in state if name not in taps]


class PairedTaps:
    """The taps of a teacher/student pairing: a :class:`TapSet` per model, and each pair's taps.

    Args:
        teacher: The teacher model.
        student: The student model.
        resolved: The layer pairs (:func:`athooks.layers.resolve_pairs`).
        mappings: The mappings every tap computes.
        copy: The student's ``copy_outputs`` policy.
        embedding: The pair of layers that give the pre-logit vectors, for losses on
            embeddings (tapped with ``embedding_mapping`` only), or ``None``.
        embedding_mapping: What the embedding taps compute (an ``Embedding`` mapping).

    Attributes:
        teacher: The teacher's taps.
        student: The student's taps.
        pairs: The ``(teacher_name, student_name)`` pairs, in order.
        embedding_pair: The embedding's ``(teacher_name, student_name)``, or ``None``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        resolved: Sequence[ResolvedPair],
        mappings: Sequence[AttentionMapping],
        copy: str = "auto",
        *,
        embedding: ResolvedPair | None = None,
        embedding_mapping: AttentionMapping | None = None,
    ) -> None:
        self.teacher = TapSet("teacher", teacher, mappings)
        self.student = TapSet("student", student, mappings, copy=copy)
        self.pairs = [(p.teacher_label, p.student_label) for p in resolved]
        self._indices = [
            (
                self.teacher.add(p.teacher_name, p.teacher_module, p.teacher_layer),
                self.student.add(p.student_name, p.student_module, p.student_layer),
            )
            for p in resolved
        ]
        self._warned: set[int] = set()
        self.embedding_pair: tuple[str, str] | None = None
        self._embedding: tuple[int, int, AttentionMapping] | None = None
        if embedding is not None and embedding_mapping is not None:
            e = embedding
            self.embedding_pair = (e.teacher_label, e.student_label)
            self._embedding = (
                self.teacher.add(
                    e.teacher_name, e.teacher_module, e.teacher_layer, [embedding_mapping]
                ),
                self.student.add(
                    e.student_name, e.student_module, e.student_layer, [embedding_mapping]
                ),
                embedding_mapping,
            )

    def _warn_one_cell(
        self,
        index: int,
        t_vals: dict[AttentionMapping, Tensor],
        s_vals: dict[AttentionMapping, Tensor],
    ) -> None:
        """Warn (once per pair) when a spatial attention map has a single cell."""
        if index in self._warned:
            return
        for side, vals in (("teacher", t_vals), ("student", s_vals)):
            for mapping, value in vals.items():
                if mapping.is_attention_map and value.dim() >= 2 and value.shape[1:].numel() == 1:
                    self._warned.add(index)
                    t_name, s_name = self.pairs[index]
                    warnings.warn(
                        f"the {side}'s attention map of pair (teacher {t_name!r}, student "
                        f"{s_name!r}) has a single cell (1x1 at this input size): normalised, it "
                        "is the same for every image, so this pair's term is constant and trains "
                        "nothing. Tap a layer of larger resolution, or feed larger inputs "
                        '(layers="auto" never pairs such maps)',
                        stacklevel=4,
                    )
                    return

    def attach(self) -> list[RemovableHandle]:
        """Put both sets' hooks in place; returns their handles."""
        if not self.pairs and self._embedding is None:
            return []
        return self.teacher.attach() + self.student.attach()

    def embeddings(
        self, teacher_store: Captures | None, student_store: Captures | None, *, grad_enabled: bool
    ) -> list[tuple[Tensor, Tensor]] | None:
        """The step's ``(teacher, student)`` pre-logit vectors, or ``None`` without an embedding.

        Raises:
            CaptureError: As :meth:`TapSet.collect`, or if the two batch sizes differ.
        """
        if self._embedding is None or teacher_store is None or student_store is None:
            return None
        t_index, s_index, mapping = self._embedding
        t_vec = self.teacher.collect(teacher_store, [t_index])[0][mapping]
        s_vec = self.student.collect(student_store, [s_index], grad_enabled=grad_enabled)[0][
            mapping
        ]
        if t_vec.device != s_vec.device:
            t_vec = t_vec.to(s_vec.device)
        if t_vec.shape[0] != s_vec.shape[0]:
            assert self.embedding_pair is not None
            raise CaptureError(
                f"the embeddings (teacher {self.embedding_pair[0]!r}, student "
                f"{self.embedding_pair[1]!r}) differ in batch size: {t_vec.shape[0]} and "
                f"{s_vec.shape[0]}; the teacher must see the same batch as the student"
            )
        return [(t_vec, s_vec)]

    def detach(self) -> None:
        """Remove both sets' hooks."""
        self.teacher.detach()
        self.student.detach()

    def values(
        self,
        teacher_store: Captures | None,
        student_store: Captures | None,
        *,
        grad_enabled: bool,
        student_output: Any = None,
        finite: bool = False,
    ) -> tuple[list[dict[AttentionMapping, Tensor]], list[dict[AttentionMapping, Tensor]]]:
        """The teacher's and the student's maps of one step, per pair, checked.

        The teacher's maps are moved to the student's device (a teacher kept elsewhere).

        Args:
            teacher_store: The step's teacher captures.
            student_store: The step's student captures.
            grad_enabled: Whether the student's forward had gradient enabled.
            student_output: What the student returned (for the batch size without pairs).
            finite: Also check that every map is finite (:func:`check_finite`).

        Returns:
            The teacher's and the student's ``{mapping: map}`` of each pair.

        Raises:
            CaptureError: As :meth:`TapSet.collect`, for an empty batch, or a non-finite map.
        """
        t_values: list[dict[AttentionMapping, Tensor]] = []
        s_values: list[dict[AttentionMapping, Tensor]] = []
        if self.pairs and teacher_store is not None and student_store is not None:
            t_values = self.teacher.collect(teacher_store, [t for t, _ in self._indices])
            s_values = self.student.collect(
                student_store, [s for _, s in self._indices], grad_enabled=grad_enabled
            )
        for i, (t_vals, s_vals) in enumerate(zip(t_values, s_values, strict=True)):
            self._warn_one_cell(i, t_vals, s_vals)
            device = next((v.device for v in s_vals.values()), None)
            if device is not None and any(v.device != device for v in t_vals.values()):
                t_values[i] = {m: v.to(device) for m, v in t_vals.items()}
        first = next((v for vals in s_values for v in vals.values()), None)
        if first is None:
            first = first_tensor(student_output)
        if first is not None and first.dim() and first.shape[0] == 0:
            raise CaptureError(
                "the student's last batch was empty (0 samples); a transfer loss over no "
                "samples is undefined. Skip empty batches before calling the student (e.g. "
                "DataLoader(..., drop_last=True) or `if len(x) == 0: continue`)"
            )
        if finite:
            check_finite(self.pairs, t_values, s_values)
        return t_values, s_values


def compiled(model: nn.Module) -> bool:
    """Whether the model (or a wrapper of it) went through ``torch.compile``.

    Args:
        model: The model.

    Returns:
        ``True`` if it is an ``OptimizedModule``, was compiled in place, or its class's forward
        has compiled code.
    """
    while True:
        if getattr(model, "_compiled_call_impl", None) is not None:
            return True
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module):
            return True
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # pragma: no cover - older or trimmed builds
        return False
    code = getattr(type(model).forward, "__code__", None)
    return code is not None and bool(_debug_get_cache_entry_list(code))


def check_finite(
    pairs: Sequence[tuple[str, str]],
    teacher_values: Sequence[dict[AttentionMapping, Tensor]],
    student_values: Sequence[dict[AttentionMapping, Tensor]],
) -> None:
    """Raise naming the first layer whose attention map holds a NaN or an infinity.

    One device synchronisation for all the maps.

    Args:
        pairs: The ``(teacher_name, student_name)`` pairs.
        teacher_values: The teacher's maps per pair.
        student_values: The student's maps per pair.

    Raises:
        CaptureError: If a map is not finite.
    """
    where: list[tuple[str, str]] = []
    flags: list[Tensor] = []
    for (t_name, s_name), t_vals, s_vals in zip(pairs, teacher_values, student_values, strict=True):
        for side, name, vals in (("teacher", t_name, t_vals), ("student", s_name, s_vals)):
            for value in vals.values():
                where.append((side, name))
                flags.append(torch.isfinite(value.detach()).all())
    if not flags:
        return
    ok = torch.stack([f.to(flags[0].device) for f in flags])
    if bool(ok.all()):
        return
    side, name = where[int((~ok).nonzero()[0, 0])]
    raise CaptureError(
        f"the attention map of {side} layer {name!r} holds NaN or infinite values in this "
        "step, so the transfer loss would be NaN. Its feature map was already non-finite: "
        "check the input batch, the learning rate, and (for float16 autocast) overflow in "
        "the model; bfloat16 autocast or a GradScaler avoids most fp16 overflows"
    )
