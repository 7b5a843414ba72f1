"""The Distiller: attention transfer inside the user's own training loop (a thin facade).

The work is done by the modules below it: :mod:`athooks.taps` (capture), :mod:`athooks.step` (the
teacher's freeze and the step lifecycle), :mod:`athooks.losses` (the losses of a step) and
:mod:`athooks.discovery` (``layers="auto"``).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from athooks.checks import check_choice
from athooks.discovery import Pairing
from athooks.errors import CaptureError, ConfigurationError
from athooks.layers import find_classifier
from athooks.losses.base import Loss, Step
from athooks.losses.lossset import LossSet
from athooks.plan import LayerPlan
from athooks.schedules import check_steps
from athooks.step import (
    Attachment,
    ModelRunner,
    NoGradPolicy,
    StepRecorder,
    TeacherRunner,
    check_pair,
    check_per_image,
)
from athooks.taps import PairedTaps
from athooks.teacher import teacher_options

__all__ = ["Distiller"]

#: The key of the step counter in the Distiller's state dict.
_STEP_KEY = "schedule.step"

CopyPolicy = Literal["auto", "always"]
ResizePolicy = Literal["student", "teacher", "error"]


class Distiller:
    """Attention transfer from a teacher to a student, inside your own training loop.

    Inside the ``with`` block, every call of ``student(...)`` with gradient enabled first runs the
    teacher on the same input (in eval mode, under ``torch.no_grad()``, its own parameters
    frozen), then the student; forward hooks on the chosen layers reduce each feature map to the
    attention maps the losses need as it is produced. ``d.loss()`` then returns the transfer loss
    of that step. Steps are per thread. See "How athooks works" for the whole lifecycle.

    Args:
        teacher: The teacher model.
        student: The student model (the module you call in the training loop).
        layers: Which layers to pair. ``"auto"`` (default) pairs the stage outputs of both
            models by stride, found on the student's first call from its real input (or now,
            from a dummy input, with ``input_size``); ``"blocks"`` pairs every block of those
            stages. Otherwise a name or pattern used on both models (``"layer?"``), a module, a
            list of names/patterns/modules or ``(teacher, student)`` tuples, or a dict teacher
            -> student. Use :class:`athooks.Layer` to choose a tensor from a tuple/dict output or
            to transform it.
        losses: A loss name, a loss made by :func:`athooks.loss`, or a list of them.
        teacher_input: Optional callable that adapts the student's inputs for the teacher; called
            with the student's positional and keyword arguments, it returns the teacher's input
            (a tuple is spread as positional arguments).
        resize: When the two maps of a pair differ in spatial size: ``"student"`` (default)
            resizes the teacher's map to the student's, ``"teacher"`` the other way, ``"error"``
            raises.
        input_size: ``(C, H, W)`` of a dummy input to resolve ``"auto"``/``"blocks"`` now
            instead of on the first call.
        copy_outputs: ``"auto"`` (default) copies a student layer's output only when something
            overwrites it in place later, which the first forward detects; ``"always"`` copies
            every tapped student output.
        check_finite: Check at every :meth:`loss` that each map is finite, naming the first
            layer with a NaN or an infinity (one device synchronisation per step).
        no_grad: ``"skip"`` (default): a student forward under ``torch.no_grad()`` or
            ``torch.inference_mode()`` runs as if no Distiller were there (a validation loop
            costs nothing); ``"capture"``: the teacher runs there too and :meth:`loss` returns
            the transfer loss, without gradient.
        embedding: For losses on embeddings (``needs_embedding``, e.g. CRD, RKD): the layer
            whose output is each model's pre-logit vector ``(B, D)``. ``"auto"`` (default): the
            input of each model's classifier (:meth:`athooks.Layer.pre_logits`); else a name, a
            :class:`athooks.Layer` (``Layer("head.fc", of="input")``), a module, or a
            ``(teacher, student)`` tuple of them.
        teacher_compile: Compile the teacher once, on the first step (``True``, or a dict of
            ``torch.compile`` arguments such as ``{"mode": "max-autotune"}``); the teacher
            module itself is not changed.
        teacher_dtype: ``torch.bfloat16`` or ``torch.float16``: run the teacher under
            ``torch.autocast`` with it; its maps and outputs reach the losses in float32.
        teacher_channels_last: Give the teacher its 4-D inputs in the channels-last memory
            format (convert its weights yourself for the whole gain).
        truncate_teacher: Stop the teacher's forward after its last tapped layer (refused when
            a loss needs the teacher's output, e.g. KD). See "Performance" for what each of
            these four saves and how close its maps stay to the float32 eager teacher's.

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

        with Distiller(teacher, student) as d:
            loss = F.cross_entropy(student(x), y) + d.loss()
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
        no_grad: NoGradPolicy = "skip",
        embedding: Any = "auto",
        teacher_compile: bool | Mapping[str, Any] = False,
        teacher_dtype: torch.dtype | None = None,
        teacher_channels_last: bool = False,
        truncate_teacher: bool = False,
    ) -> None:
        check_pair(teacher, student)
        if teacher_input is not None and not callable(teacher_input):
            raise ConfigurationError(
                f"teacher_input must be a callable taking the student's inputs, got "
                f"{type(teacher_input).__name__}"
            )
        resize_meaning = "'student' (resize the teacher's maps to the student's size), 'teacher'"
        check_choice(
            "resize", resize, ("student", "teacher", "error"), f"{resize_meaning} or 'error'"
        )
        check_choice("copy_outputs", copy_outputs, ("auto", "always"), "'auto' or 'always'")
        check_choice("no_grad", no_grad, ("skip", "capture"), "'skip' or 'capture'")
        if not isinstance(check_finite, bool):
            raise ConfigurationError(
                f"check_finite must be True or False, got {type(check_finite).__name__}"
            )
        self.teacher, self.student = teacher, student
        self.teacher_input, self.resize, self.check_finite = teacher_input, resize, check_finite
        self._losses = LossSet(losses)
        if not self._losses.needs_embedding and not (
            isinstance(embedding, str) and embedding == "auto"
        ):
            raise ConfigurationError(
                f"embedding={embedding!r} is given, but none of the losses "
                f"({', '.join(self._losses.labels)}) reads embeddings; drop it, or add a loss "
                "on embeddings (e.g. 'rkd', 'crd' from athooks-zoo)"
            )
        self._classifiers = (
            (find_classifier(teacher, "teacher")[1], find_classifier(student, "student")[1])
            if self._losses.needs_classifier
            else None
        )
        options = teacher_options(
            teacher_compile,
            teacher_dtype,
            teacher_channels_last,
            truncate_teacher,
            needs_output=self._losses.needs_teacher_output,
            losses=", ".join(self._losses.labels),
        )
        self._runner = TeacherRunner(teacher, teacher_input, options)
        self._recorder = StepRecorder(
            student,
            self._runner,
            needs_teacher_output=self._losses.needs_teacher_output,
            needs_input_grad=self._losses.needs_input_grad,
            no_grad=no_grad,
        )
        if self._losses.has_state:
            self._recorder.on_start = functools.partial(self._losses.follow, student)
        self._hold: Attachment | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._terms: dict[str, Tensor] = {}
        self._step = 0
        self._plan = LayerPlan(
            teacher,
            student,
            layers,
            self._losses.mappings,
            copy_outputs,
            input_size=input_size,
            teacher_input=teacher_input,
            embedding=embedding if self._losses.needs_embedding else None,
        )
        use_taps = weakref.WeakMethod(self._use_taps)  # no reference cycle through the plan

        def resolved(taps: PairedTaps) -> None:
            method = use_taps()
            if method is not None:
                method(taps)

        self._plan.on_resolved = resolved
        if self._plan.taps is not None:
            self._use_taps(self._plan.taps)
        else:  # "auto"/"blocks" from the student's first real call
            self._recorder.prepare = self._plan.resolve_on

    def _use_taps(self, taps: PairedTaps) -> None:
        self._recorder.prepare = None
        self._losses.setup(taps.pairs)
        if taps.pairs or taps.embedding_pair is not None:
            self._runner.taps, self._recorder.student_taps = taps.teacher, taps.student
            if self._hold is not None:
                self._hold.handles += taps.attach()

    @property
    def pairing(self) -> Pairing | None:
        """What ``"auto"``/``"blocks"`` found: names, shapes and strides (``None`` otherwise)."""
        return self._plan.pairing

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The resolved ``(teacher_name, student_name)`` layer pairs, in order.

        Raises:
            ConfigurationError: For ``"auto"``/``"blocks"`` before the student's first call.
        """
        return self._plan.pairs()

    # ------------------------------------------------------------------ losses and state

    @property
    def losses(self) -> list[Loss]:
        """The loss objects, in the order given."""
        return list(self._losses)

    @property
    def terms(self) -> dict[str, Tensor]:
        """Each loss term of the last successful :meth:`loss` call, detached, for logging."""
        return dict(self._terms)

    @property
    def step(self) -> int:
        """The number of training steps so far: the schedules' step (0 before the first).

        It counts the :meth:`loss` calls whose student forward had gradient enabled (a
        validation forward under ``no_grad`` is not a step, also with ``no_grad="capture"``);
        each loss's :attr:`~athooks.plugin.Loss.schedule` is read at it, then it goes up by
        one. Under gradient accumulation every micro-batch's ``d.loss()`` counts. It is saved
        in :meth:`state_dict`, so a resumed run continues its schedules; set it by hand
        (``d.step = 1000``) to start a schedule elsewhere.

        Raises:
            ConfigurationError: When set to something other than a whole number ``>= 0``.
        """
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = check_steps(value, owner="Distiller", option="step", minimum=0)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The parameters of learnable mappings and losses, for the optimizer.

        Add them next to the student's: ``SGD([*student.parameters(), *d.parameters()])``. They
        follow the student's device and dtype. A learnable mapping is applied to the teacher's
        features too, but without gradient: it learns from the student's side only.

        Connectors (the adapters of losses such as FitNet) are in it before the first step, as
        placeholders that the first step builds in place; one connector per layer pair needs
        the pairs, so with ``layers="auto"`` call this after the student's first call inside the
        block, or give ``input_size``.

        Args:
            recurse: As for :meth:`torch.nn.Module.parameters`.

        Returns:
            An iterator over the parameters (empty for the built-ins).

        Raises:
            ConfigurationError: If a loss has one connector per pair and the pairs are not
                known yet.
        """
        self._hand_out()
        return self._losses.modules.parameters(recurse)

    def _hand_out(self) -> None:
        self._losses.hand_out(self._plan.layers)
        self._losses.follow(self.student)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Like :meth:`parameters`, with names such as ``"0.mapping.weight"`` (loss index first)."""
        self._hand_out()
        return self._losses.modules.named_parameters()

    def state_dict(self) -> dict[str, Any]:
        """The Distiller's state, for checkpoints: learnable mappings and losses, tap modes.

        Keys ``"losses.*"`` hold the parameters and buffers of the losses (and their mappings);
        keys ``"taps.<student layer>.copy"`` the decision of each student tap's first forward
        (copy the output or not, see ``copy_outputs``), so that a resumed run builds the same
        autograd graph and continues bit for bit; ``"schedule.step"`` the step counter
        (:attr:`step`, an int64 scalar), so that the losses' schedules continue where they were.

        Returns:
            A dict of tensors (loadable with ``torch.load(..., weights_only=True)``).
        """
        state: dict[str, Any] = {f"losses.{k}": v for k, v in self._losses.state_dict().items()}
        step = {_STEP_KEY: torch.tensor(self._step, dtype=torch.int64)}
        return {**state, **self._plan.state_dict(), **step}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned.

        Args:
            state_dict: The saved state.
            strict: Whether the keys must match: every ``"losses.*"`` key of this Distiller
                given, no other key, and tap keys only for its student layers.
                ``"schedule.step"`` is optional (a state dict saved before it existed loads;
                :attr:`step` is then left as it is).

        Raises:
            ConfigurationError: With ``strict``, naming the missing or unexpected keys; or if
                ``"schedule.step"`` is not a whole number ``>= 0``.
        """
        step = None  # checked first, so that a bad one loads nothing
        if _STEP_KEY in state_dict:
            saved = state_dict[_STEP_KEY]
            number = saved.item() if isinstance(saved, Tensor) and saved.numel() == 1 else saved
            step = check_steps(number, owner="Distiller state dict", option=_STEP_KEY, minimum=0)
        losses = {k[len("losses.") :]: v for k, v in state_dict.items() if k.startswith("losses.")}
        rest = {
            k: v for k, v in state_dict.items() if not k.startswith("losses.") and k != _STEP_KEY
        }
        other = self._plan.load_state_dict(rest, strict)
        if strict and other:
            taps = self._plan.taps
            names = ", ".join(n for _, n in taps.pairs) if taps else "(not resolved yet)"
            keys = f"key{'s' if len(other) > 1 else ''} {', '.join(map(repr, other))}"
            raise ConfigurationError(
                f"unexpected {keys} in the Distiller's state dict; it has 'losses.*' and "
                f"'taps.<student layer>.copy' for layers {names}. Pass strict=False to ignore them"
            )
        self._losses.load_state_dict(losses, strict=strict)
        if step is not None:
            self._step = step

    # ------------------------------------------------------------------ lifecycle

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place (inside the ``with`` block)."""
        return self._finalizer is not None and self._finalizer.alive

    def attach(self) -> Distiller:
        """Put the hooks in place and freeze the teacher; what ``with Distiller(...)`` does.

        Only what is the teacher's alone is frozen and put in eval mode: modules and parameters
        it shares with an attached Distiller's student are left as the student needs them.

        Returns:
            ``self``.

        Raises:
            ConfigurationError: If already attached, or a model is a multi-device DataParallel.
        """
        if self.attached:
            raise ConfigurationError(
                "this Distiller is already attached; use it in one `with` block at a time"
            )
        self._losses.follow(self.student)
        hold = self._hold = Attachment.attach(self._recorder)
        self._finalizer = weakref.finalize(self, hold.release)
        try:
            if self._plan.taps is not None:
                hold.handles += self._plan.taps.attach()
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook, give the teacher back as it was, drop what was captured.

        Safe to call more than once; ``with`` calls it on exit, also when the block raises.
        """
        if self._finalizer is not None:
            self._finalizer()
        self._finalizer = self._hold = self._runner.guard = None
        if self._plan.taps is not None:
            self._plan.taps.detach()
        self._recorder.reset()

    def __enter__(self) -> Distiller:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def loss(self, target: Tensor | None = None, **extras: Any) -> Tensor:
        """The transfer loss of this thread's last student forward: the sum of all loss terms.

        Captured data is released once used: call the student again before the next ``loss()``.

        Args:
            target: The batch's labels, for losses that need them.
            **extras: What other losses need of the batch, by name: ``index=`` (the samples'
                dataset indices) for a contrastive memory bank (``crd``).

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
        if not self.attached:
            raise CaptureError(
                "the Distiller is not attached: call d.loss() inside `with Distiller(...) as d:` "
                "(or after d.attach())"
            )
        record = self._recorder.ready()
        self._terms = {}
        try:
            taps = self._plan.taps
            assert taps is not None  # a step resolves the layers first
            t_values, s_values = taps.values(
                record.teacher,
                record.student,
                grad_enabled=record.grad_enabled,
                student_output=record.student_output,
                finite=self.check_finite,
            )
            check_per_image(self.pairs, t_values, s_values, record.images, record.batch)
            step = Step(
                self.pairs,
                t_values,
                s_values,
                student_output=record.student_output,
                teacher_output=record.teacher_output,
                target=target,
                resize=self.resize,
                runner=ModelRunner(record, self.student, self._runner),
                embeddings=taps.embeddings(
                    record.teacher, record.student, grad_enabled=record.grad_enabled
                ),
                classifiers=self._classifiers,
                extras=extras,
            )
            self._losses.replicate()
            total, terms = self._losses.evaluate(step, at=self._step, train=record.grad_enabled)
            self._losses.warn_unused_parameters()
            self._terms = {k: v.detach() for k, v in terms.items()}
            if record.grad_enabled:  # a training step: the schedules move on
                self._step += 1
            return total
        finally:
            self._recorder.release(record)
