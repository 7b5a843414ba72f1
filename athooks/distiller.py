"""The Distiller: attention transfer inside the user's own training loop."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from athooks._compile import eager
from athooks.discovery import AUTO_MODES, Pairing, auto_pairs
from athooks.errors import CaptureError, ConfigurationError
from athooks.layers import ResolvedPair, resolve_pairs, unwrap
from athooks.losses.base import Loss, Step
from athooks.mappings import Mapping
from athooks.taps import Tap

__all__ = ["Distiller"]

CopyPolicy = Literal["auto", "always"]
ResizePolicy = Literal["student", "teacher", "error"]


@dataclass
class _StepState:
    """The bookkeeping of one student forward."""

    grad_enabled: bool
    complete: bool = False
    consumed: bool = False
    student_output: Any = None
    teacher_output: Any = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_where: tuple[str, Any] | None = None  # where the tensor input sits in args/kwargs


class _Internal:
    """How many models athooks itself is running right now (a teacher, or a loss's re-run).

    Shared by every Distiller, so that one Distiller's runs are invisible to the others: with two
    Distillers on one student (two teachers), or a chain (a model that is one's student and the
    other's teacher), a model that athooks runs never starts a step of another Distiller.
    """

    depth = 0


@dataclass
class _TeacherState:
    training: bool
    requires_grad: list[tuple[nn.Parameter, bool]]


class _RootHook:
    """A hook on the student's root module (held weakly, deep-copy safe).

    ``stage`` is ``"start"`` (forward pre-hook), ``"end"`` (forward hook, called only when the
    forward returned) or ``"exit"`` (forward hook called always, also when the forward raised).
    """

    __slots__ = ("__weakref__", "_owner", "_stage")

    def __init__(self, owner: Distiller, stage: str) -> None:
        self._owner = weakref.ref(owner)
        self._stage = stage

    @eager  # the teacher runs eagerly, outside the student's compiled graph
    def __call__(self, module: nn.Module, args: Any, kwargs: Any, *rest: Any) -> Any:
        owner = self._owner()
        if owner is None or module is not owner.student or _Internal.depth:
            return None
        if self._stage == "start":
            return owner._on_student_start(args, kwargs)
        if self._stage == "end":
            owner._on_student_end(rest[0] if rest else None)
        else:
            owner._on_student_exit()
        return None

    def __deepcopy__(self, memo: dict[int, Any]) -> _RootHook:
        return self

    def __reduce__(self) -> tuple[type, tuple[()]]:
        from athooks.taps import _InertHook

        return (_InertHook, ())


def _remove_handles(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class Distiller:
    """Attention transfer from a teacher to a student, inside your own training loop.

    Inside the ``with`` block, every call of ``student(...)`` first runs the teacher on the same
    input (in eval mode, under ``torch.no_grad()``, parameters frozen), then the student; forward
    hooks on the chosen layers reduce each feature map to the attention maps the losses need as it
    is produced. ``d.loss()`` then returns the transfer loss of that step.

    Args:
        teacher: The teacher model.
        student: The student model (the module you call in the training loop).
        layers: Which layers to pair. ``"auto"`` (default) pairs the stage outputs of both
            models by stride; ``"blocks"`` pairs every block of those stages when both have the
            same block layout (see :func:`athooks.describe`). Otherwise a name or pattern used
            on both models (``"layer?"``), a list of names/patterns or ``(teacher, student)``
            tuples, or a dict teacher name -> student name. Patterns: ``*`` and ``?`` stay
            within one dotted part, ``**`` crosses parts, ``"re:..."`` is a full-match regular
            expression. Use :class:`athooks.Layer` to choose a tensor from a tuple/dict output
            or to transform it.
        losses: A loss name, a loss made by :func:`athooks.loss`, or a list of them.
        teacher_input: Optional callable that adapts the student's inputs for the teacher; it is
            called with the student's positional and keyword arguments and returns the teacher's
            input (a tuple is spread as positional arguments).
        resize: When the two maps of a pair differ in spatial size: ``"student"`` (default)
            resizes the teacher's attention map to the student's, ``"teacher"`` the other way
            round, ``"error"`` raises. Maps, not feature maps, are resized, before they are
            normalised.
        input_size: ``(C, H, W)`` of the dummy input used to find layers for ``"auto"`` and
            ``"blocks"``; by default each model's own (224x224 for most).
        copy_outputs: ``"auto"`` (default) copies a student layer's output only when something
            overwrites it in place later, which the first forward detects; ``"always"`` copies
            every tapped student output.
        check_finite: Check at every :meth:`loss` that each captured attention map is finite,
            and raise naming the first layer (teacher or student) with a NaN or an infinity.
            Off by default: the check waits for the device (one synchronisation per step);
            without it a NaN or infinity in a feature map makes the loss NaN.

    Example:
        ```python
        import torch
        import torch.nn.functional as F
        import torchvision
        from athooks import Distiller

        teacher = torchvision.models.resnet34(num_classes=10)
        student = torchvision.models.resnet18(num_classes=10)
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))

        with Distiller(teacher, student, layers="layer?") as d:
            out = student(x)
            loss = F.cross_entropy(out, y) + d.loss()
            opt.zero_grad(); loss.backward(); opt.step()
        print(d.pairs, {k: float(v) for k, v in d.terms.items()})
        ```
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        layers: Any = "auto",
        losses: str | Loss | Sequence[str | Loss] = "at",
        *,
        teacher_input: Callable[..., Any] | None = None,
        resize: ResizePolicy = "student",
        input_size: Sequence[int] | None = None,
        copy_outputs: CopyPolicy = "auto",
        check_finite: bool = False,
    ) -> None:
        for role, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, nn.Module):
                raise ConfigurationError(
                    f"{role} must be a torch.nn.Module, got {type(model).__name__}: "
                    f"{model!r:.80}; build the model first (e.g. timm.create_model('resnet18'))"
                )
        if teacher is student or unwrap(teacher)[0] is unwrap(student)[0]:
            raise ConfigurationError(
                "the teacher and the student are the same module; attention transfer needs two "
                "networks (a trained teacher and the student being trained)"
            )
        if teacher_input is not None and not callable(teacher_input):
            raise ConfigurationError(
                f"teacher_input must be a callable taking the student's inputs, got "
                f"{type(teacher_input).__name__}"
            )
        if resize not in ("student", "teacher", "error"):
            raise ConfigurationError(
                f"resize must be 'student' (resize the teacher's maps to the student's size), "
                f"'teacher' or 'error', got {resize!r}"
            )
        if copy_outputs not in ("auto", "always"):
            raise ConfigurationError(
                f"copy_outputs must be 'auto' or 'always', got {copy_outputs!r}"
            )
        if not isinstance(check_finite, bool):
            raise ConfigurationError(
                f"check_finite must be True or False, got {type(check_finite).__name__}"
            )
        self.check_finite = check_finite
        self.teacher = teacher
        self.student = student
        self.teacher_input = teacher_input
        self.resize: ResizePolicy = resize
        loss_list = _as_losses(losses)
        self._losses = nn.ModuleList(loss_list)
        self._labels = _unique_labels(loss_list)
        mappings = _unique_mappings(loss_list)

        self.pairing: Pairing | None = None
        if isinstance(layers, str) and layers in AUTO_MODES and mappings:
            self.pairing = auto_pairs(teacher, student, layers, input_size)
            layers = self.pairing.layers()
        resolved: list[ResolvedPair] = resolve_pairs(teacher, student, layers) if mappings else []
        self._pairs = [(p.teacher_name, p.student_name) for p in resolved]
        self._teacher_taps: list[Tap] = []
        self._student_taps: list[Tap] = []
        self._pair_taps: list[tuple[Tap, Tap]] = []
        t_index: dict[tuple[str, Any], Tap] = {}
        s_index: dict[tuple[str, Any], Tap] = {}
        for p in resolved:
            t_key = (p.teacher_name, p.teacher_layer)
            if t_key not in t_index:
                t_index[t_key] = Tap(
                    "teacher", p.teacher_name, p.teacher_module, p.teacher_layer, mappings
                )
                self._teacher_taps.append(t_index[t_key])
            s_key = (p.student_name, p.student_layer)
            if s_key not in s_index:
                s_index[s_key] = Tap(
                    "student",
                    p.student_name,
                    p.student_module,
                    p.student_layer,
                    mappings,
                    copy=copy_outputs,
                )
                self._student_taps.append(s_index[s_key])
            self._pair_taps.append((t_index[t_key], s_index[s_key]))

        self._needs_teacher_output = any(loss.needs_teacher_output for loss in loss_list)
        self._needs_input_grad = any(loss.needs_input_grad for loss in loss_list)
        self._losses_where: tuple[torch.device, torch.dtype] | None = None
        self._has_parameters = any(True for _ in self._losses.parameters()) or any(
            True for _ in self._losses.buffers()
        )
        self._handles: list[RemovableHandle] = []
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._teacher_state: _TeacherState | None = None
        self._state: _StepState | None = None
        self._in_student_forward = False
        self._terms: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ public API

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The resolved ``(teacher_name, student_name)`` layer pairs, in order."""
        return list(self._pairs)

    @property
    def losses(self) -> list[Loss]:
        """The loss objects, in the order given."""
        return list(self._losses)  # type: ignore[arg-type]

    @property
    def terms(self) -> dict[str, Tensor]:
        """The value of each loss term at the last :meth:`loss` call, detached, for logging."""
        return dict(self._terms)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The parameters of learnable mappings and losses, for the optimizer.

        Add them next to the student's: ``SGD([*student.parameters(), *d.parameters()])``.
        They follow the student's device and dtype (moved when the Distiller attaches and
        whenever the student has moved since). A learnable mapping is applied to the teacher's
        features too, but without gradient: it learns from the student's side only.

        Args:
            recurse: As for :meth:`torch.nn.Module.parameters`.

        Returns:
            An iterator over the parameters (empty for the built-ins).
        """
        self._follow_student()
        return self._losses.parameters(recurse)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Like :meth:`parameters`, with names such as ``"0.mapping.weight"`` (loss index first)."""
        self._follow_student()
        return self._losses.named_parameters()

    def state_dict(self) -> dict[str, Any]:
        """The Distiller's state, for checkpoints: learnable mappings and losses, tap modes.

        Keys ``"losses.*"`` hold the parameters and buffers of the losses (and their mappings);
        keys ``"taps.<student layer>.copy"`` the decision of each student tap's first forward
        (copy the output or not, see ``copy_outputs``), so that a resumed run builds the same
        autograd graph and continues bit for bit.

        Returns:
            A dict of tensors (loadable with ``torch.load(..., weights_only=True)``).
        """
        state: dict[str, Any] = {f"losses.{k}": v for k, v in self._losses.state_dict().items()}
        for tap in self._student_taps:
            if not tap.probing:
                state[f"taps.{tap.name}.copy"] = torch.tensor(tap.copy)
        return state

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned.

        Args:
            state_dict: The saved state.
            strict: Whether the keys must match exactly.

        Raises:
            ConfigurationError: With ``strict``, for a key this Distiller does not have.
        """
        taps = {tap.name: tap for tap in self._student_taps}
        losses: dict[str, Any] = {}
        for key, value in state_dict.items():
            if key.startswith("losses."):
                losses[key[len("losses.") :]] = value
            elif key.startswith("taps.") and key.endswith(".copy") and key[5:-5] in taps:
                tap = taps[key[5:-5]]
                tap.copy, tap.probing = bool(value), False
            elif strict:
                raise ConfigurationError(
                    f"unexpected key {key!r} in the Distiller's state dict; it has "
                    f"'losses.*' and 'taps.<student layer>.copy' for layers "
                    f"{', '.join(taps) or '(none)'}. Pass strict=False to ignore it"
                )
        self._losses.load_state_dict(losses, strict=strict)

    def _follow_student(self) -> None:
        """Move the losses' parameters and buffers to the student's device and dtype."""
        ref = next((p for p in self.student.parameters() if p.is_floating_point()), None)
        if ref is None:
            return
        where = (ref.device, ref.dtype)
        if where != self._losses_where:
            self._losses.to(device=ref.device, dtype=ref.dtype)
            self._losses_where = where

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place (inside the ``with`` block)."""
        return bool(self._handles)

    def attach(self) -> Distiller:
        """Put the hooks in place and freeze the teacher; what ``with Distiller(...)`` does.

        Returns:
            ``self``.

        Raises:
            ConfigurationError: If already attached.
        """
        if self._handles:
            raise ConfigurationError(
                "this Distiller is already attached; use it in one `with` block at a time"
            )
        self._follow_student()
        teacher = self.teacher
        self._teacher_state = _TeacherState(
            training=teacher.training,
            requires_grad=[(p, p.requires_grad) for p in teacher.parameters()],
        )
        teacher.eval()
        for param, _ in self._teacher_state.requires_grad:
            param.requires_grad_(False)
        handles = self._handles
        self._finalizer = weakref.finalize(self, _remove_handles, handles)
        try:
            for tap in (*self._teacher_taps, *self._student_taps):
                handles.append(tap.attach())
            student = self.student
            handles.append(
                student.register_forward_pre_hook(_RootHook(self, "start"), with_kwargs=True)
            )
            handles.append(student.register_forward_hook(_RootHook(self, "end"), with_kwargs=True))
            handles.append(
                student.register_forward_hook(
                    _RootHook(self, "exit"), with_kwargs=True, always_call=True
                )
            )
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook, restore the teacher's mode and ``requires_grad``, drop captures.

        Safe to call more than once; ``with`` calls it on exit, also when the block raises.
        """
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        for tap in (*self._teacher_taps, *self._student_taps):
            tap.detach()
        if self._teacher_state is not None:
            state = self._teacher_state
            self.teacher.train(state.training)
            for param, flag in state.requires_grad:
                param.requires_grad_(flag)
            self._teacher_state = None
        self._state = None
        self._in_student_forward = False

    def __enter__(self) -> Distiller:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def loss(self, target: Tensor | None = None) -> Tensor:
        """The transfer loss of the student's last forward: the sum of all loss terms.

        Captured data is released once used: call the student again before the next ``loss()``.

        Args:
            target: The batch's labels, for losses that need them.

        Returns:
            A scalar tensor (with gradient towards the student when the forward had one).

        Raises:
            CaptureError: If there was no new student forward, a layer did not fire, a layer's
                output was overwritten in place, or a student map carries no gradient.

        Example:
            ```python
            import torch
            import torchvision
            from athooks import Distiller

            t, s = torchvision.models.resnet34(), torchvision.models.resnet18()
            with Distiller(t, s, layers=[("layer3", "layer3"), ("layer4", "layer4")]) as d:
                s(torch.randn(2, 3, 64, 64))
                total = d.loss()
            assert torch.isclose(total, sum(d.terms.values()))
            ```
        """
        state = self._check_ready()
        try:
            t_values, s_values = self._collect_values(state)
            if _batch_size(s_values, state.student_output) == 0:
                raise CaptureError(
                    "the student's last batch was empty (0 samples); a transfer loss over no "
                    "samples is undefined. Skip empty batches before calling the student (e.g. "
                    "DataLoader(..., drop_last=True) or `if len(x) == 0: continue`)"
                )
            if self.check_finite:
                self._check_finite(t_values, s_values)
            step = Step(
                self._pairs,
                t_values,
                s_values,
                student_output=state.student_output,
                teacher_output=state.teacher_output,
                target=target,
                resize=self.resize,
                runner=_Runner(self, state),
            )
            terms: dict[str, Tensor] = {}
            for label, loss_fn in zip(self._labels, self._losses, strict=True):
                value = loss_fn(step)
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise CaptureError(
                        f"loss {label!r} returned {type(value).__name__}"
                        f"{tuple(value.shape) if isinstance(value, Tensor) else ''}; a loss must "
                        "return a scalar tensor"
                    )
                terms[label] = value.reshape(())
            values = list(terms.values())
            total = values[0]
            for value in values[1:]:
                total = total + value
            self._terms = {k: v.detach() for k, v in terms.items()}
            return total
        finally:
            state.consumed = True
            state.student_output = None
            state.teacher_output = None
            state.args, state.kwargs = (), {}
            for tap in (*self._teacher_taps, *self._student_taps):
                tap.capture = None

    # ------------------------------------------------------------------ hook callbacks

    def _on_student_start(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._in_student_forward:  # the student calling itself recursively: one step only
            return None
        state = self._state = _StepState(grad_enabled=torch.is_grad_enabled())
        if self.teacher_input is None:
            bad = _non_tensor_input(args, kwargs)
            if bad is not None:
                raise ConfigurationError(
                    f"the student was called with {bad} and no tensor; athooks runs the teacher "
                    "on the student's input, so it must hold a torch.Tensor. Convert it first "
                    "(torch.as_tensor(x) or a torchvision transform), or pass "
                    "Distiller(..., teacher_input=...) to build the teacher's input yourself"
                )
        if self._has_parameters:
            self._follow_student()
        for tap in self._student_taps:
            tap.capture = None
        if self._teacher_taps or self._needs_teacher_output:
            state.teacher_output = self._run_teacher(args, kwargs)
            if not self._needs_teacher_output:
                state.teacher_output = None
        replaced = None
        if self._needs_input_grad:
            args, kwargs, state.input_where = _input_requiring_grad(args, kwargs)
            state.args, state.kwargs = args, kwargs
            replaced = (args, kwargs)
        for tap in self._student_taps:
            tap.active = True
        self._in_student_forward = True
        return replaced

    def _on_student_end(self, output: Any) -> None:
        """The student's forward returned: the step is complete."""
        if not self._in_student_forward:
            return
        for tap in self._student_taps:
            tap.check_overwrite()
        if self._state is not None:
            self._state.student_output = output
            self._state.complete = True

    def _on_student_exit(self) -> None:
        """The student's forward ended, returned or raised: stop capturing."""
        self._in_student_forward = False
        for tap in self._student_taps:
            tap.active = False

    def _teacher_call_args(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.teacher.training:  # something called .train() on it (e.g. a parent module)
            self.teacher.eval()
        if self.teacher_input is None:
            return args, kwargs
        adapted = self.teacher_input(*args, **kwargs)
        return (adapted if isinstance(adapted, tuple) else (adapted,)), {}

    def _run_teacher(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        teacher = self.teacher
        t_args, t_kwargs = self._teacher_call_args(args, kwargs)
        for tap in self._teacher_taps:
            tap.capture = None
            tap.active = True
        _check_teacher_device(teacher, t_args, t_kwargs, self.teacher_input is not None)
        _Internal.depth += 1
        try:
            with torch.no_grad():
                return teacher(*t_args, **t_kwargs)
        except Exception as err:
            if hasattr(err, "add_note"):
                err.add_note(
                    "(raised while athooks ran the teacher on the student's input; adapt the "
                    "input with Distiller(..., teacher_input=...) if the teacher expects another)"
                )
            raise
        finally:
            _Internal.depth -= 1
            for tap in self._teacher_taps:
                tap.active = False

    # ------------------------------------------------------------------ checks

    def _check_ready(self) -> _StepState:
        if not self._handles:
            raise CaptureError(
                "the Distiller is not attached: call d.loss() inside `with Distiller(...) as d:` "
                "(or after d.attach())"
            )
        state = self._state
        if state is None:
            raise CaptureError(
                "d.loss() was called before any forward of the student inside the Distiller; "
                "call student(x) first, then d.loss()"
            )
        if state.consumed:
            raise CaptureError(
                "d.loss() was already called for the student's last forward and its captures "
                "were released; run student(x) again before the next d.loss() (the last values "
                "are in d.terms)"
            )
        if not state.complete:
            raise CaptureError(
                "the student's last forward did not finish (it raised, or d.loss() was called "
                "from inside it); call d.loss() after student(x) returns"
            )
        return state

    def _collect_values(
        self, state: _StepState
    ) -> tuple[list[dict[Mapping, Tensor]], list[dict[Mapping, Tensor]]]:
        t_values: list[dict[Mapping, Tensor]] = []
        s_values: list[dict[Mapping, Tensor]] = []
        for t_tap, s_tap in self._pair_taps:
            if t_tap.capture is None:
                raise CaptureError(
                    f"teacher layer {t_tap.name!r} did not fire when athooks ran the teacher; "
                    "the layer is not on the teacher's forward path for this input (a wrong "
                    "branch, or a model that calls its stages directly)"
                )
            if s_tap.capture is None:
                raise CaptureError(self._not_fired_message(s_tap))
            cap = s_tap.capture
            if cap.overwritten:
                raise CaptureError(
                    f"the output of student layer {s_tap.name!r} was overwritten in place after "
                    "athooks captured it (e.g. ReLU(inplace=True) or `x += ...`), which the "
                    "first forward did not do, so no copy was kept and its attention map cannot "
                    "be differentiated. Use Distiller(..., copy_outputs='always')"
                )
            if state.grad_enabled and not cap.grad_enabled:
                raise CaptureError(
                    f"student layer {s_tap.name!r} ran with gradient disabled inside the "
                    "student's forward, so its attention map has no gradient: reentrant "
                    "gradient checkpointing (torch.utils.checkpoint with use_reentrant=True) or "
                    "torch.no_grad() inside the model. Use checkpoint(..., use_reentrant=False) "
                    "or tap a layer outside the checkpointed segment"
                )
            if (
                state.grad_enabled
                and not any(v.requires_grad for v in cap.values.values())
                and _trainable_up_to(self.student, s_tap.module)
            ):
                raise CaptureError(
                    f"the attention map of student layer {s_tap.name!r} carries no gradient "
                    "although the student has trainable parameters up to that layer; something "
                    "detaches its output (.detach(), .data, a no_grad block). Tap a layer whose "
                    "output is part of the autograd graph"
                )
            t_vals = t_tap.capture.values
            device = next((v.device for v in cap.values.values()), None)
            if device is not None and any(v.device != device for v in t_vals.values()):
                # a teacher run on another device (teacher_input moved its input there)
                t_vals = {m: v.to(device) for m, v in t_vals.items()}
            t_values.append(t_vals)
            s_values.append(cap.values)
        return t_values, s_values

    def _not_fired_message(self, tap: Tap) -> str:
        head = f"student layer {tap.name!r} did not fire during the student's last forward"
        if _compiled(self.student) and all(t.capture is None for t in self._student_taps):
            return (
                f"{head}, nor did any other tapped layer: the student runs code that "
                "torch.compile made before this Distiller added its hooks, and compiled code "
                "does not see hooks added later. Create the Distiller first, then compile "
                "(`with Distiller(teacher, student) as d: model = torch.compile(student)`), or "
                "call torch._dynamo.reset() after creating the Distiller to recompile"
            )
        children = list(tap.module.named_children())
        if children and _timm_checkpointing(self.student):
            last = f"{tap.name}.{children[-1][0]}"
            return (
                f"{head}: timm's set_grad_checkpointing(True) runs the blocks of "
                f"{tap.name!r} one by one, so the hook on {tap.name!r} itself never fires. "
                f"Tap its last block instead ({last!r}, the same output; checkpointed blocks "
                "give correct values and gradients), or call set_grad_checkpointing(False)"
            )
        return (
            f"{head}. Likely causes: the student was compiled with torch.compile before the "
            "Distiller was made (make the Distiller first), gradient checkpointing that "
            "bypasses the module, or a branch the forward did not take"
        )

    def _check_finite(
        self, t_values: list[dict[Mapping, Tensor]], s_values: list[dict[Mapping, Tensor]]
    ) -> None:
        """Raise naming the first layer whose attention map holds a NaN or an infinity."""
        where: list[tuple[str, str]] = []
        flags: list[Tensor] = []
        for (t_name, s_name), t_vals, s_vals in zip(self._pairs, t_values, s_values, strict=True):
            for side, name, vals in (("teacher", t_name, t_vals), ("student", s_name, s_vals)):
                for value in vals.values():
                    where.append((side, name))
                    flags.append(torch.isfinite(value.detach()).all())
        if not flags:
            return
        ok = torch.stack([f.to(flags[0].device) for f in flags])
        if bool(ok.all()):  # the one synchronisation of the check
            return
        side, name = where[int((~ok).nonzero()[0, 0])]
        raise CaptureError(
            f"the attention map of {side} layer {name!r} holds NaN or infinite values in this "
            "step, so the transfer loss would be NaN. Its feature map was already non-finite: "
            "check the input batch, the learning rate, and (for float16 autocast) overflow in "
            "the model; bfloat16 autocast or a GradScaler avoids most fp16 overflows"
        )


def _find_tensor(value: Any, depth: int = 0) -> Tensor | None:
    """The first tensor in nested tuples, lists, dicts and dataclasses (None if there is none)."""
    if isinstance(value, Tensor):
        return value
    if depth > 4:
        return None
    items: Any
    if isinstance(value, MappingABC):
        items = value.values()
    elif isinstance(value, (tuple, list)):
        items = value
    elif is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, f.name) for f in fields(value)]
    else:
        return None
    for item in items:
        found = _find_tensor(item, depth + 1)
        if found is not None:
            return found
    return None


_PLAIN = (str, bytes, int, float, complex, bool, type(None))


def _non_tensor_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Describe an input that surely holds no tensor (plain data, NumPy arrays), else None."""
    if _find_tensor((args, kwargs)) is not None:
        return None

    def plain(value: Any, depth: int = 0) -> bool:
        if isinstance(value, _PLAIN) or type(value).__module__ == "numpy":
            return True
        if isinstance(value, MappingABC):
            return depth < 4 and all(plain(v, depth + 1) for v in value.values())
        if isinstance(value, (tuple, list)):
            return depth < 4 and all(plain(v, depth + 1) for v in value)
        return False  # an object of its own: it may hold tensors we cannot see

    if not plain((args, kwargs)):
        return None
    given = [type(a).__name__ for a in args]
    given += [f"{k}={type(v).__name__}" for k, v in kwargs.items()]
    return f"({', '.join(given)})" if given else "no arguments"


def _check_teacher_device(
    teacher: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], adapted: bool
) -> None:
    """Raise when the teacher's input is on another device than the teacher."""
    x = _find_tensor((args, kwargs))
    param = next(teacher.parameters(), None)
    if x is None or param is None or x.device == param.device:
        return
    if adapted:
        fix = "make teacher_input move the input to the teacher's device"
    else:
        fix = (
            f"move the teacher to the student's device (teacher.to({str(x.device)!r}); athooks "
            "never moves models), or keep it where it is and pass "
            f"teacher_input=lambda x: x.to({str(param.device)!r}) (its attention maps are "
            "then moved to the student's device, which costs little)"
        )
    raise ConfigurationError(
        f"the teacher's parameters are on {param.device} but its input is on {x.device}; {fix}"
    )


def _batch_size(s_values: list[dict[Mapping, Tensor]], student_output: Any) -> int | None:
    for values in s_values:
        for value in values.values():
            return int(value.shape[0]) if value.dim() else None
    out = _find_tensor(student_output)
    return int(out.shape[0]) if out is not None and out.dim() else None


def _compiled(model: nn.Module) -> bool:
    """Whether the model (or a wrapper of it) went through torch.compile."""
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


def _timm_checkpointing(model: nn.Module) -> bool:
    """Whether timm's ``set_grad_checkpointing(True)`` is on anywhere in the model."""
    return any(getattr(m, "grad_checkpointing", False) is True for m in model.modules())


def _input_requiring_grad(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], tuple[str, Any] | None]:
    """Make the first floating tensor input require grad (a detached leaf, if it did not)."""
    places: list[tuple[str, Any, Any]] = [("arg", i, a) for i, a in enumerate(args)]
    places += [("kw", k, v) for k, v in kwargs.items()]
    for kind, key, value in places:
        if isinstance(value, Tensor) and value.is_floating_point():
            if not value.requires_grad and torch.is_grad_enabled():
                value = value.detach().requires_grad_()
            if kind == "arg":
                args = (*args[:key], value, *args[key + 1 :])
            else:
                kwargs = {**kwargs, key: value}
            return args, kwargs, (kind, key)
    return args, kwargs, None


class _Runner:
    """Lets the losses of one step reach the student's input and run the models again."""

    def __init__(self, owner: Distiller, state: _StepState) -> None:
        self._owner = owner
        self._state = state

    def _where(self) -> tuple[str, Any]:
        where = self._state.input_where
        if where is None:
            raise CaptureError(
                "this loss needs the student's input tensor, but the student's last forward "
                "received no floating-point tensor argument"
            )
        return where

    def _substitute(self, x: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        state = self._state
        kind, key = self._where()
        if kind == "arg":
            return (*state.args[:key], x, *state.args[key + 1 :]), state.kwargs
        return state.args, {**state.kwargs, key: x}

    def student_input(self) -> Tensor:
        kind, key = self._where()
        value: Tensor = self._state.args[key] if kind == "arg" else self._state.kwargs[key]
        return value

    def _run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        _Internal.depth += 1
        try:
            with torch.enable_grad():
                return model(*args, **kwargs)
        finally:
            _Internal.depth -= 1

    def run_student_on(self, x: Tensor) -> Any:
        args, kwargs = self._substitute(x)
        return self._run(self._owner.student, args, kwargs)

    def run_teacher_on(self, x: Tensor) -> Any:
        args, kwargs = self._owner._teacher_call_args(*self._substitute(x))
        return self._run(self._owner.teacher, args, kwargs)


def _trainable_up_to(model: nn.Module, module: nn.Module) -> bool:
    """Whether any parameter registered up to and including ``module`` requires grad."""
    inner, _ = unwrap(model)
    for _, mod in inner.named_modules():
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            return True
        if mod is module:
            return any(p.requires_grad for p in module.parameters())
    return False


def _as_losses(losses: Any) -> list[Loss]:
    from athooks.registry import loss as make_loss

    items = [losses] if isinstance(losses, (str, Loss)) else losses
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise ConfigurationError(
            f"losses must be a loss name, a loss from athooks.loss(...), or a list of them; got "
            f"{type(losses).__name__}"
        )
    out: list[Loss] = []
    for item in items:
        if isinstance(item, str):
            out.append(make_loss(item))
        elif isinstance(item, Loss):
            out.append(item)
        else:
            raise ConfigurationError(
                f"losses: expected a loss name or athooks.loss(...), got {type(item).__name__}: "
                f"{item!r:.80}"
            )
    if not out:
        raise ConfigurationError("losses is empty; give at least one, e.g. losses='at'")
    return out


def _unique_labels(losses: Sequence[Any]) -> list[str]:
    labels: list[str] = []
    for loss_fn in losses:
        label = loss_fn.name
        n = 2
        while label in labels:
            label = f"{loss_fn.name}_{n}"
            n += 1
        labels.append(label)
    return labels


def _unique_mappings(losses: Sequence[Any]) -> list[Mapping]:
    seen: list[Mapping] = []
    for loss_fn in losses:
        for mapping in loss_fn.captures():
            if not any(mapping is m for m in seen):
                seen.append(mapping)
    return seen
