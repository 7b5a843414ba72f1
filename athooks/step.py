"""The step lifecycle: the teacher's freeze, one step per student forward, and model re-runs.

* :class:`TeacherGuard` freezes a teacher for every Distiller that uses it, reference-counted: the
  first user records and freezes, the last one to let go restores, whatever the order, also when a
  Distiller is garbage-collected while attached. Only what is the teacher's alone is frozen: a
  module or parameter that is part of an attached Distiller's student (a shared stem, tied
  weights, a chain's middle model) keeps what the student needs, and is put in eval mode only for
  the duration of each teacher run.
* :class:`StepRecorder` turns the student's forwards into steps. A step is the outermost call of
  the student by the user's own code in one thread, with gradient enabled (or under ``no_grad``
  with ``no_grad="capture"``): the teacher runs first, then the student's taps capture until the
  forward ends. Other calls pass through untouched: athooks' own runs (probes, teacher runs, a
  loss's re-run), the recompute of a checkpointed segment during backward, forwards under
  ``no_grad``/``inference_mode`` (by default), and nested calls of the student inside its own
  forward (part of the enclosing step). Steps are per thread. A forward interrupted by any
  exception, ``KeyboardInterrupt`` included, never leaves a stale step behind.
* :class:`TeacherRunner` and :class:`ModelRunner` run the teacher, and the models again for the
  losses that need it, as athooks' own runs.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from athooks._compile import eager, forget_compiled, hold_hook_guards
from athooks.context import in_backward, internal_depth, internal_run
from athooks.errors import CaptureError, ConfigurationError
from athooks.layers import unwrap
from athooks.taps import Captures, InertHook, StopForward, TapSet, is_replica
from athooks.teacher import TeacherOptions, float32_outputs
from athooks.tensors import (
    adapted_input,
    all_tensors,
    device_type,
    first_tensor,
    image_list_length,
    lone_tensor,
    non_tensor_input,
)

__all__ = [
    "Attachment",
    "ModelRunner",
    "NoGradPolicy",
    "StepRecord",
    "StepRecorder",
    "TeacherGuard",
    "TeacherRunner",
    "check_pair",
    "check_per_image",
    "refuse_data_parallel",
    "register_student",
]

NoGradPolicy = Literal["skip", "capture"]

# ---------------------------------------------------------------------------- the teacher's freeze

_lock = threading.RLock()
_guards: dict[int, TeacherGuard] = {}  # id(teacher) -> its guard, while some Distiller holds it
_students: dict[int, tuple[nn.Module, int]] = {}  # id(student) -> (student, attached Distillers)


def _student_owned() -> set[int]:
    """Ids of every module and parameter of the attached Distillers' students."""
    owned: set[int] = set()
    for student, _ in _students.values():
        owned.update(id(m) for m in student.modules())
        owned.update(id(p) for p in student.parameters())
    return owned


def _refresh_guards() -> None:
    owned = _student_owned()
    for guard in list(_guards.values()):
        guard._apply(owned)


def register_student(student: nn.Module) -> Callable[[], None]:
    """Count ``student`` as attached (what it owns is never frozen by a teacher's guard).

    Args:
        student: The student model.

    Returns:
        The release function (idempotent); the registration lasts until it is called.
    """
    with _lock:
        entry = _students.get(id(student))
        _students[id(student)] = (student, (entry[1] if entry else 0) + 1)
        _refresh_guards()
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        with _lock:
            model, count = _students[id(student)]
            if count > 1:
                _students[id(student)] = (model, count - 1)
            else:
                del _students[id(student)]
            _refresh_guards()

    return release


class TeacherGuard:
    """The freeze of one teacher, shared by every Distiller that uses it (see the module docs).

    Use :meth:`acquire` to get the teacher's guard (created on first use) and :meth:`release` when
    done; :meth:`run` wraps each forward athooks runs on the teacher.

    Example:
        ```python
        import torchvision
        from athooks.step import TeacherGuard

        teacher = torchvision.models.resnet18()
        first, second = TeacherGuard.acquire(teacher), TeacherGuard.acquire(teacher)
        assert first is second and not teacher.training
        first.release()
        assert not teacher.training  # still held
        second.release()
        assert teacher.training and all(p.requires_grad for p in teacher.parameters())
        ```
    """

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher
        self.users = 0
        self._modules: list[nn.Module] = []
        self._shared: set[nn.Module] = set()
        self._modes: dict[nn.Module, bool] = {}  # teacher-only module -> its flag before
        self._grads: dict[nn.Parameter, bool] = {}  # teacher-only parameter -> its flag before
        self._grads_by_name: dict[str, bool] = {}

    @classmethod
    def acquire(cls, teacher: nn.Module) -> TeacherGuard:
        """The guard of ``teacher``, held once more (the first hold freezes the teacher).

        Args:
            teacher: The teacher model.

        Returns:
            The guard; call :meth:`release` exactly once for each :meth:`acquire`.
        """
        with _lock:
            guard = _guards.get(id(teacher))
            if guard is None:
                guard = _guards[id(teacher)] = cls(teacher)
            guard.users += 1
            if guard.users == 1:
                guard._apply(_student_owned())
            return guard

    def release(self) -> None:
        """Let go of one hold; the last one restores every flag the guard changed."""
        with _lock:
            self.users -= 1
            if self.users > 0:
                return
            _guards.pop(id(self.teacher), None)
            owned = _student_owned()
            for module, flag in self._modes.items():
                module.training = flag
            for param, flag in self._grads.items():
                param.requires_grad_(flag)
            for name, param in self.teacher.named_parameters():  # parameters replaced meanwhile
                if (
                    name in self._grads_by_name
                    and param not in self._grads
                    and id(param) not in owned
                ):
                    param.requires_grad_(self._grads_by_name[name])
            self._modes, self._grads, self._grads_by_name = {}, {}, {}
            self._modules, self._shared = [], set()

    @property
    def shares_modules(self) -> bool:
        """Whether some of the teacher's modules belong to an attached student."""
        return bool(self._shared)

    def _apply(self, owned: set[int]) -> None:
        """Freeze what is the teacher's alone; give back what a student now owns."""
        if self.users == 0:
            return
        self._modules = list(self.teacher.modules())
        self._shared = set()
        for module in self._modules:
            if id(module) in owned:
                self._shared.add(module)
                if module in self._modes:
                    module.training = self._modes.pop(module)
            elif module not in self._modes:
                self._modes[module] = module.training
                module.training = False
        for name, param in self.teacher.named_parameters():
            if id(param) in owned:
                if param in self._grads:
                    param.requires_grad_(self._grads.pop(param))
            elif param not in self._grads:
                self._grads[param] = param.requires_grad
                self._grads_by_name.setdefault(name, param.requires_grad)
                param.requires_grad_(False)

    @contextmanager
    def run(self) -> Iterator[None]:
        """The teacher in eval mode for one forward, shared modules included; restored after."""
        flipped = [m for m in self._modules if m.training]
        for module in flipped:
            module.training = False
        try:
            yield
        finally:
            for module in flipped:
                if module in self._shared:
                    module.training = True


def check_pair(teacher: Any, student: Any) -> None:
    """Check that the teacher and the student are two different modules.

    Args:
        teacher: What was given as the teacher.
        student: What was given as the student.

    Raises:
        ConfigurationError: If one is not an ``nn.Module``, or both are the same model.
    """
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


def check_per_image(
    pairs: Sequence[tuple[str, str]],
    teacher_values: Sequence[dict[Any, Tensor]],
    student_values: Sequence[dict[Any, Tensor]],
    images: int | None,
    batch: int | None = None,
) -> None:
    """Refuse maps that are not one per image: those of a detector's ROI heads.

    A detector's ROI heads run once per region proposal (or detection): their batch is the
    number of regions, which differs between the models and between steps, and even when the
    counts agree, region ``i`` of the teacher is not region ``i`` of the student. Such maps must
    not be paired; only per-image layers (the backbone, the FPN levels) can be.

    For a model called with a list of images (torchvision's detectors), every map must have one
    entry per image. For a tensor input of batch ``batch``, maps of another batch are allowed
    (a video model folding time into the batch has ``B * T``), but a pair whose two maps differ
    in batch and neither has the input's is refused here (a ``teacher_input`` that changed the
    batch is reported by the loss).

    Args:
        pairs: The ``(teacher, student)`` layer names, in order.
        teacher_values: The teacher's ``{mapping: map}`` of each pair.
        student_values: The student's, likewise.
        images: The number of images of the step's input, ``None`` when it was not a list of
            images.
        batch: The leading size of the step's tensor input, when it was not a list of images.

    Raises:
        CaptureError: If a pair's maps are per region, naming the fix.
    """
    if images is None and batch is None:
        return
    for (t_name, s_name), t_vals, s_vals in zip(pairs, teacher_values, student_values, strict=True):
        t_batch = next((int(v.shape[0]) for v in t_vals.values() if v.dim()), None)
        s_batch = next((int(v.shape[0]) for v in s_vals.values() if v.dim()), None)
        if t_batch is None or s_batch is None:
            continue
        if images is not None:
            per_region = t_batch != images or s_batch != images
            given = f"a step of {images} images"
        else:
            per_region = t_batch != s_batch and batch not in (t_batch, s_batch)
            given = f"a batch of {batch}"
        if per_region:
            raise CaptureError(
                f"layer pair (teacher {t_name!r}, student {s_name!r}) gives maps of batch "
                f"{t_batch} (teacher) and {s_batch} (student) for {given}: "
                "the layer runs once per region (a module of a detector's ROI heads, whose batch "
                "is the number of proposals or detections, not of images), so its maps cannot "
                "be paired image by image. Name a per-image layer instead: a backbone or FPN "
                "level, e.g. athooks.Layer('backbone', select='0')"
            )


def refuse_data_parallel(model: nn.Module, role: str) -> None:
    """Raise if ``model`` holds an ``nn.DataParallel`` over several devices.

    Its replicas are other module objects, made anew at every forward on each device, which
    athooks' taps do not capture from.

    Args:
        model: The teacher or the student.
        role: ``"teacher"`` or ``"student"``, for the message.

    Raises:
        ConfigurationError: For a multi-device ``DataParallel``.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.DataParallel) and len(module.device_ids) > 1:
            where = f" ({name})" if name else ""
            raise ConfigurationError(
                f"the {role}{where} is an nn.DataParallel over {len(module.device_ids)} devices; "
                "its replicas are copies of the model made at every forward, which athooks' "
                "taps do not capture from. Use DistributedDataParallel (one process per GPU, "
                "see the how-to 'Distributed, mixed precision and compile'), or DataParallel on "
                "one device"
            )


# ---------------------------------------------------------------------------- running the teacher


_NULL = nullcontext()  # stateless: one object serves every call


def _check_teacher_device(
    teacher: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], adapted: bool
) -> None:
    x = lone_tensor(args, kwargs)
    if x is None:
        x = first_tensor((args, kwargs))
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


class TeacherRunner:
    """Runs the teacher on the student's input as athooks' own run: frozen, eval, ``no_grad``.

    Args:
        teacher: The teacher model.
        teacher_input: The user's adapter of the student's inputs, or ``None``.
        options: How to run it (:mod:`athooks.teacher`); the default runs it as it is.
    """

    def __init__(
        self,
        teacher: nn.Module,
        teacher_input: Callable[..., Any] | None,
        options: TeacherOptions | None = None,
    ) -> None:
        self.teacher = teacher
        self.teacher_input = teacher_input
        self.options = options if options is not None else TeacherOptions()
        self.taps: TapSet | None = None
        self.guard: TeacherGuard | None = None
        self._compiled: Callable[..., Any] | None = None
        self._prepared: TapSet | None = None  # the tap set the options were applied to
        self._calls: dict[int, int] | None = None  # tap index -> calls in a whole forward

    def _callable(self) -> Callable[..., Any]:
        if not self.options.compile:
            return self.teacher
        if self._compiled is None:
            self._compiled = torch.compile(self.teacher, **self.options.compile_options)
        return self._compiled

    def _prepare(self, taps: TapSet) -> None:
        """Apply the options to the teacher's taps (once per tap set)."""
        if self._prepared is taps:
            return
        for tap in taps.taps:
            tap.float_maps = self.options.dtype is not None
        taps.stop_after = None
        self._calls = None
        self._prepared = taps

    def _arguments(
        self, t_args: tuple[Any, ...], t_kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not self.options.channels_last:
            return t_args, t_kwargs

        def convert(value: Any) -> Any:
            if isinstance(value, Tensor) and value.dim() == 4 and value.is_floating_point():
                return value.contiguous(memory_format=torch.channels_last)
            return value

        return tuple(convert(a) for a in t_args), {k: convert(v) for k, v in t_kwargs.items()}

    def _autocast(self, t_args: tuple[Any, ...], t_kwargs: dict[str, Any]) -> Any:
        dtype = self.options.dtype
        if dtype is None:
            return _NULL
        return torch.autocast(device_type((t_args, t_kwargs)), dtype=dtype)

    def _check_calls(self, store: Captures | None, stopped: bool) -> None:
        """``truncate``: learn the calls of a whole forward, then check each cut one."""
        taps = self.taps
        if store is None or taps is None or not self.options.truncate:
            return
        calls = {index: cap.calls for index, cap in store.items()}
        if self._calls is None:
            self._calls = calls
            taps.stop_after = store.calls if calls else None
            return
        if calls != self._calls or (not stopped and taps.stop_after is not None):
            names = ", ".join(taps.taps[i].name for i in sorted(set(calls) ^ set(self._calls)))
            raise CaptureError(
                "truncate_teacher=True cuts the teacher's forward after as many calls of its "
                f"tapped layers as the first step made ({store.calls} of {self._calls}), but "
                f"this step's calls differ ({calls}{'; ' + names if names else ''}): the "
                "teacher runs other layers for other inputs. Drop truncate_teacher for this "
                "teacher"
            )

    def call_args(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The teacher's arguments for the student's (through ``teacher_input``)."""
        return adapted_input(self.teacher_input, args, kwargs)

    def run(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, capture: bool, grad: bool = False
    ) -> tuple[Any, Captures | None]:
        """Run the teacher on the student's ``args``/``kwargs``.

        Args:
            args: The student's positional arguments.
            kwargs: Its keyword arguments.
            capture: Whether the teacher's taps capture this run.
            grad: Run with gradient enabled (for input gradients) instead of under ``no_grad``.

        Returns:
            The teacher's output and its captures (``None`` without ``capture``).
        """
        t_args, t_kwargs = self.call_args(args, kwargs)
        _check_teacher_device(self.teacher, t_args, t_kwargs, self.teacher_input is not None)
        lone = lone_tensor(args, kwargs)
        found = [lone] if lone is not None else all_tensors((args, kwargs))
        inputs = [t for t in found if not t.is_inference()]
        versions = [t._version for t in inputs]
        store = None
        options = self.options
        stopped = False
        guard = self.guard.run() if self.guard is not None else _NULL
        with internal_run(), guard:
            taps = self.taps if capture else None
            if taps is not None:
                self._prepare(taps)
                store = taps.arm()
            if options.default:
                teacher: Callable[..., Any] = self.teacher
            else:
                t_args, t_kwargs = self._arguments(t_args, t_kwargs)
                teacher = self._callable() if not grad else self.teacher
            saved_stop = taps.stop_after if taps is not None else None
            if taps is not None and grad:
                taps.stop_after = None  # a run for input gradients needs the whole output
            try:
                with torch.set_grad_enabled(grad), self._autocast(t_args, t_kwargs):
                    output = teacher(*t_args, **t_kwargs)
            except StopForward:
                output, stopped = None, True
            except Exception as err:
                if hasattr(err, "add_note"):
                    err.add_note(
                        "(raised while athooks ran the teacher on the student's input; adapt the "
                        "input with Distiller(..., teacher_input=...) if the teacher expects "
                        "another)"
                    )
                raise
            finally:
                if taps is not None:
                    taps.stop_after = saved_stop
                    taps.disarm()
        if not options.default:
            self._check_calls(store, stopped)
            if options.dtype is not None:
                output = float32_outputs(output)
        if any(t._version != v for t, v in zip(inputs, versions, strict=True)):
            raise CaptureError(
                "the teacher modified its input in place (e.g. `x.sub_(mean)` in its forward), "
                "and that tensor is the student's input too: the student would see the edited "
                "values. Give the teacher its own copy: "
                "Distiller(..., teacher_input=lambda x: x.clone())"
            )
        return output, store


# ---------------------------------------------------------------------------- one step


@dataclass
class StepRecord:
    """What one step recorded: its captures, and what the losses may need of its forward."""

    grad_enabled: bool
    teacher: Captures | None = None
    student: Captures | None = None
    complete: bool = False
    consumed: bool = False
    student_output: Any = None
    teacher_output: Any = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_where: tuple[str, Any] | None = None  # where the tensor input sits in args/kwargs
    images: int | None = None  # the number of images of a list-of-images input (a detector's)
    batch: int | None = None  # else the leading size of its first tensor, if any


@dataclass
class _Call:
    """One call of the student in a thread: its ``_call_impl`` frame, and its step if any."""

    frame: FrameType | None
    record: StepRecord | None = None


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.last: StepRecord | None = None  # the step d.loss() answers for
        self.skipped = 0  # forwards passed through under no_grad since the last step
        self.replica = False  # the student ran as DataParallel replicas


def _call_frame() -> FrameType | None:
    """The frame of ``nn.Module._call_impl`` that is running the hook's caller."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        if frame.f_code.co_name == "_call_impl":
            return frame
        frame = frame.f_back
    return None


def _running(frame: FrameType | None) -> bool:
    """Whether ``frame`` is still executing (it is on the current thread's stack)."""
    if frame is None:
        return False
    current: FrameType | None = sys._getframe(1)
    while current is not None:
        if current is frame:
            return True
        current = current.f_back
    return False


class _RootHook:
    """A hook on the student's root module (holding its recorder weakly, deep-copy safe)."""

    __slots__ = ("__weakref__", "_recorder", "_stage")

    def __init__(self, recorder: StepRecorder, stage: str) -> None:
        self._recorder = weakref.ref(recorder)
        self._stage = stage

    @eager  # the teacher runs eagerly, outside the student's compiled graph
    def __call__(self, module: nn.Module, args: Any, kwargs: Any, *rest: Any) -> Any:
        recorder = self._recorder()
        if recorder is None:
            return None
        if module is not recorder.student:
            if is_replica(module, recorder.student):
                recorder._state.replica = True
            return None
        if self._stage == "start":
            return recorder._start(args, kwargs)
        if self._stage == "end":
            recorder._end(rest[0] if rest else None)
        else:
            recorder._exit()
        return None

    def __deepcopy__(self, memo: dict[int, Any]) -> _RootHook:
        return self

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (InertHook, ())


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


class StepRecorder:
    """The student's forwards, turned into steps (see the module docs for which calls count).

    Args:
        student: The student model.
        teacher: Runs the teacher.
        needs_teacher_output: Keep the teacher's output for the losses.
        needs_input_grad: Make the student's tensor input require grad before its forward.
        no_grad: ``"skip"`` (forwards without gradient pass through) or ``"capture"``.
        prepare: Called with the first step's inputs before anything runs (the first-call
            resolution of ``layers="auto"``); ``None`` once done.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: TeacherRunner,
        *,
        needs_teacher_output: bool,
        needs_input_grad: bool,
        no_grad: NoGradPolicy,
        prepare: Callable[[tuple[Any, ...], dict[str, Any]], None] | None = None,
    ) -> None:
        self.student = student
        self.teacher = teacher
        self.student_taps: TapSet | None = None
        self.needs_teacher_output = needs_teacher_output
        self.needs_input_grad = needs_input_grad
        self.no_grad = no_grad
        self.prepare = prepare
        self.on_start: Callable[[], None] | None = None
        self._state = _ThreadState()
        self._active: set[int] = set()  # threads inside a step
        self._active_lock = threading.Lock()

    def attach(self) -> list[RemovableHandle]:
        """Put the hooks on the student's root module; returns their handles."""
        student = self.student
        return [
            student.register_forward_pre_hook(_RootHook(self, "start"), with_kwargs=True),
            student.register_forward_hook(_RootHook(self, "end"), with_kwargs=True),
            student.register_forward_hook(
                _RootHook(self, "exit"), with_kwargs=True, always_call=True
            ),
        ]

    def reset(self) -> None:
        """Forget every thread's steps (at detach)."""
        self._state = _ThreadState()
        with self._active_lock:
            self._active.clear()

    # -------------------------------------------------------------- the student's hooks

    def _start(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        state = self._state
        frame = _call_frame()
        if state.calls and not _running(state.calls[0].frame):
            self._abandon(state)  # a forward interrupted by a BaseException: start afresh
        call = _Call(frame)
        nested = bool(state.calls)
        state.calls.append(call)  # popped by the exit hook, which runs even if this raises
        if nested or in_backward() or internal_depth():
            return None
        grad = torch.is_grad_enabled()
        if not grad and self.no_grad == "skip":
            state.skipped += 1
            return None
        return self._begin(call, args, kwargs, grad)

    def _begin(
        self, call: _Call, args: tuple[Any, ...], kwargs: dict[str, Any], grad: bool
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        lone = lone_tensor(args, kwargs)
        if self.teacher.teacher_input is None and lone is None:
            bad = non_tensor_input(args, kwargs)
            if bad is not None:
                raise ConfigurationError(
                    f"the student was called with {bad} and no tensor; athooks runs the teacher "
                    "on the student's input, so it must hold a torch.Tensor. Convert it first "
                    "(torch.as_tensor(x) or a torchvision transform), or pass "
                    "Distiller(..., teacher_input=...) to build the teacher's input yourself"
                )
        if self.prepare is not None:
            self.prepare(args, kwargs)
        self._enter_thread()
        images = image_list_length(args, kwargs)
        first = lone if lone is not None or images is not None else first_tensor((args, kwargs))
        batch = int(first.shape[0]) if first is not None and first.dim() else None
        record = StepRecord(grad_enabled=grad, images=images, batch=batch)
        self._state.last = record
        self._state.skipped = 0
        call.record = record
        try:
            if self.on_start is not None:
                self.on_start()
            if self.teacher.taps is not None or self.needs_teacher_output:
                output, record.teacher = self.teacher.run(
                    args, kwargs, capture=self.teacher.taps is not None
                )
                if self.needs_teacher_output:
                    record.teacher_output = output
            replaced = None
            if self.needs_input_grad:
                args, kwargs, record.input_where = _input_requiring_grad(args, kwargs)
                record.args, record.kwargs = args, kwargs
                replaced = (args, kwargs)
            if self.student_taps is not None:
                record.student = self.student_taps.arm()
        except BaseException:
            call.record = None
            self._leave_thread()
            raise
        return replaced

    def _end(self, output: Any) -> None:
        calls = self._state.calls
        record = calls[-1].record if calls else None
        if record is None:
            return
        if self.student_taps is not None and record.student is not None:
            self.student_taps.end_forward(record.student)
        record.student_output = output
        record.complete = True

    def _exit(self) -> None:
        calls = self._state.calls
        if not calls:
            return
        call = calls.pop()
        if call.record is not None:
            if self.student_taps is not None:
                self.student_taps.disarm()
            self._leave_thread()

    def _abandon(self, state: _ThreadState) -> None:
        if any(call.record is not None for call in state.calls):
            if self.student_taps is not None:
                self.student_taps.disarm()
            self._leave_thread()
        state.calls.clear()

    def _enter_thread(self) -> None:
        me = threading.get_ident()
        with self._active_lock:
            others = self._active - {me}
            guard = self.teacher.guard
            if others and guard is not None and guard.shares_modules:
                raise CaptureError(
                    "the student was called from two threads at once while the teacher and the "
                    "student share modules: athooks switches the shared modules to eval mode "
                    "while the teacher runs, which the other thread's forward would see. Call "
                    "the student from one thread at a time, or give the teacher its own copy "
                    "of the shared modules"
                )
            self._active.add(me)

    def _leave_thread(self) -> None:
        with self._active_lock:
            self._active.discard(threading.get_ident())

    # -------------------------------------------------------------- for d.loss()

    def ready(self) -> StepRecord:
        """The calling thread's last step, complete and not yet used.

        Raises:
            CaptureError: Naming what is missing: a step, a finished forward, a fresh one.
        """
        state = self._state
        record = state.last
        skipped = ""
        if state.skipped:
            skipped = (
                f" The student's last {state.skipped} forward(s) ran with gradient disabled "
                "(torch.no_grad(), torch.inference_mode(), or checkpoint(student, x, "
                "use_reentrant=True), which runs it without gradient), where athooks does not "
                'run the teacher; pass Distiller(..., no_grad="capture") to compute the '
                "transfer loss there too, or checkpoint with use_reentrant=False"
            )
        if state.replica and record is None:
            raise CaptureError(
                "the student ran only as DataParallel replicas (copies of the model on each "
                "GPU), which athooks does not capture from. Use DistributedDataParallel (one "
                "process per GPU), or DataParallel on a single device"
            )
        if record is None:
            raise CaptureError(
                "d.loss() was called before any forward of the student inside the Distiller; "
                "call student(x) first, then d.loss() (a call through a model compiled before "
                "the Distiller was made, which wraps the student, runs code without athooks' "
                f"hooks: call torch._dynamo.reset() after creating the Distiller).{skipped}"
            )
        if record.consumed:
            raise CaptureError(
                "d.loss() was already called for the student's last forward and its captures "
                "were released; run student(x) again before the next d.loss() (the last values "
                f"are in d.terms).{skipped}"
            )
        if not record.complete:
            raise CaptureError(
                "the student's last forward did not finish (it raised or was interrupted, or "
                "d.loss() was called from inside it); call d.loss() after student(x) returns"
            )
        return record

    def release(self, record: StepRecord) -> None:
        """Drop what the step held (its captures, outputs and inputs)."""
        record.consumed = True
        record.student_output = record.teacher_output = None
        record.args, record.kwargs = (), {}
        record.teacher = record.student = None


class Attachment:
    """What an attached Distiller holds: its hooks, the teacher's guard, the student's registration.

    Made by :meth:`attach`, which refuses multi-device ``DataParallel`` models, counts the student
    as attached, holds the teacher's :class:`TeacherGuard` and puts the recorder's hooks on the
    student; :meth:`release` undoes all of it, once (also from a finalizer: it holds no
    reference to the Distiller).
    """

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []
        self._releases: list[Callable[[], None]] = []

    @classmethod
    def attach(cls, recorder: StepRecorder) -> Attachment:
        """Hold ``recorder``'s teacher and student and hook the student.

        Raises:
            ConfigurationError: For a multi-device ``DataParallel`` teacher or student.
        """
        refuse_data_parallel(recorder.teacher.teacher, "teacher")
        refuse_data_parallel(recorder.student, "student")
        made = cls()
        try:
            made._releases.append(hold_hook_guards())  # compiled code sees the hooks
            forget_compiled([recorder.student, recorder.teacher.teacher])
            made._releases.append(register_student(recorder.student))
            guard = TeacherGuard.acquire(recorder.teacher.teacher)
            made._releases.append(guard.release)
            recorder.teacher.guard = guard
            made.handles += recorder.attach()
        except BaseException:
            made.release()
            raise
        return made

    def release(self) -> None:
        """Remove the hooks, let go of the guard and the registration (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        while self._releases:
            self._releases.pop()()


class ModelRunner:
    """Lets the losses of one step reach the student's input and run the models again.

    Every run is one of athooks' own: it starts no step and captures nothing.

    Args:
        record: The step.
        student: The student model.
        teacher: The step's teacher runner.
    """

    def __init__(self, record: StepRecord, student: nn.Module, teacher: TeacherRunner) -> None:
        self._record = record
        self._student = student
        self._teacher = teacher
        self._args = record.args
        self._kwargs = record.kwargs

    def _where(self) -> tuple[str, Any]:
        where = self._record.input_where
        if where is None:
            raise CaptureError(
                "this loss needs the student's input tensor, but the student's last forward "
                "received no floating-point tensor argument"
            )
        return where

    def _substitute(self, x: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kind, key = self._where()
        if kind == "arg":
            return (*self._args[:key], x, *self._args[key + 1 :]), self._kwargs
        return self._args, {**self._kwargs, key: x}

    def student_input(self) -> Tensor:
        """The tensor input of the student's last forward (made to require grad if needed)."""
        kind, key = self._where()
        value: Tensor = self._args[key] if kind == "arg" else self._kwargs[key]
        return value

    def run_student_on(self, x: Tensor) -> Any:
        """Run the student again on ``x`` in place of its tensor input, capturing nothing."""
        args, kwargs = self._substitute(x)
        with internal_run(), torch.enable_grad():
            return self._student(*args, **kwargs)

    def run_teacher_on(self, x: Tensor) -> Any:
        """Run the teacher on ``x`` (frozen, eval mode, gradient enabled), capturing nothing."""
        output, _ = self._teacher.run(*self._substitute(x), capture=False, grad=True)
        return output
