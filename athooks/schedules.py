"""Loss weights over time: schedules, functions of the training step that multiply a loss's term.

A :data:`Schedule` is any callable ``int -> float`` of the training step (0-based: the number
of training steps before this one, see ``Distiller.step``). Give one to a loss with
``athooks.loss(name, ..., schedule=S)`` (or ``loss.schedule = S``): its term is multiplied by
``S(step)`` at every ``d.loss()``. A number means a constant.

The presets below are small frozen dataclasses with a readable ``repr``, checked when made
(finite values ``>= 0``, whole numbers of steps ``> 0``). Every preset that ends (``warmup``,
``linear``, ``cosine``) can be chained with :meth:`Preset.then`; ``per_epoch`` turns a schedule
of epochs into one of steps.

This module imports only :mod:`athooks.errors` and :mod:`athooks.checks`.

Example:
    ```python
    import math
    from athooks.schedules import cosine, per_epoch, step_decay, warmup

    s = warmup(500).then(cosine(1.0, 0.0, 10_000))  # 0 -> 1 in 500 steps, then cosine to 0
    assert s(0) == 0.0 and s(250) == 0.5 and s(500) == 1.0 and s(20_000) == 0.0
    assert math.isclose(s(500 + 5_000), 0.5)
    print(s)  # warmup(steps=500, value=1).then(cosine(start=1, end=0, steps=10000), at=500)

    drops = per_epoch(step_decay(1e3, milestones=(60, 120, 160), gamma=0.2), steps_per_epoch=391)
    assert drops(0) == 1e3 and math.isclose(drops(60 * 391), 200.0)
    ```
"""

from __future__ import annotations

import bisect
import itertools
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

from athooks.checks import NEGATIVE_WEIGHT, check_real
from athooks.errors import ConfigurationError

__all__ = [
    "Chain",
    "Constant",
    "Cosine",
    "Linear",
    "PerEpoch",
    "Preset",
    "Schedule",
    "StepDecay",
    "Warmup",
    "as_schedule",
    "check_steps",
    "constant",
    "cosine",
    "linear",
    "per_epoch",
    "step_decay",
    "value_at",
    "warmup",
]

#: A schedule: a callable of the training step (0-based) that returns a finite number ``>= 0``.
Schedule: TypeAlias = Callable[[int], float]


def check_steps(value: Any, *, owner: str, option: str, minimum: int = 1) -> int:
    """Check a whole number of steps (or epochs) and return it as an ``int``.

    Args:
        value: What the user gave.
        owner: Who takes it, for the message (``"warmup"``, ``"Distiller"``).
        option: The option's name (``"steps"``).
        minimum: The smallest value allowed.

    Returns:
        ``int(value)``.

    Raises:
        ConfigurationError: If ``value`` is not an integer (a ``bool`` is not one) or is below
            ``minimum``.

    Example:
        ```python
        from athooks.schedules import check_steps

        assert check_steps(500, owner="warmup", option="steps") == 500
        ```
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigurationError(
            f"{owner}: {option} must be a whole number >= {minimum} (of training steps, or "
            f"epochs under per_epoch), got {type(value).__name__} {value!r:.60}"
        )
    return int(value)


def _weight(value: Any, owner: str, option: str) -> float:
    return check_real(value, owner=owner, option=option, minimum=0.0, reason=NEGATIVE_WEIGHT)


def _num(x: float) -> str:
    """A number as short as it can be written without losing digits (``1``, ``0.2``, ``1e+03``)."""
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def as_schedule(value: Any, owner: str) -> Schedule:
    """What a loss's ``schedule`` option may be, as a schedule.

    Args:
        value: A number (a constant) or a callable of the step.
        owner: Who takes it, for the message (``"loss 'at'"``).

    Returns:
        A :class:`Constant`, or the callable itself.

    Raises:
        ConfigurationError: If ``value`` is none of these (or a number out of range).

    Example:
        ```python
        from athooks.schedules import as_schedule, constant

        assert as_schedule(0.5, "loss 'at'") == constant(0.5)
        ```
    """
    if isinstance(value, Preset):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return Constant(_weight(value, owner, "schedule"))
    if not callable(value):
        raise ConfigurationError(
            f"{owner}: schedule must be a number, a preset of athooks.schedules (warmup(...), "
            f"cosine(...), ...) or a callable of the training step that returns the weight, got "
            f"{type(value).__name__} {value!r:.60}"
        )
    return value  # type: ignore[no-any-return]


def value_at(schedule: Schedule, step: int, owner: str) -> float:
    """``schedule(step)``, checked: a finite real number ``>= 0``.

    Args:
        schedule: The schedule.
        step: The training step.
        owner: Whose schedule, for the message (``"loss 'at'"``).

    Returns:
        The value, as a Python ``float``.

    Raises:
        ConfigurationError: If the value is not a real number, is NaN or infinite, or is below 0.

    Example:
        ```python
        from athooks.schedules import value_at

        assert value_at(lambda step: 0.5 ** step, 3, "loss 'at'") == 0.125
        ```
    """
    value = schedule(step)
    good = isinstance(value, numbers.Real) and not isinstance(value, bool)
    number = float(value) if good else math.nan
    if not (math.isfinite(number) and number >= 0):
        raise ConfigurationError(
            f"{owner}: its schedule returned {type(value).__name__} {value!r:.60} at step {step}; "
            "a schedule must return a finite real number >= 0 (the term's weight at that "
            "step; for a tensor t, return t.item())"
        )
    return number


class Preset:
    """Base of the presets: a schedule that knows where it ends, and can be chained.

    Attributes:
        length: The number of steps after which the value no longer changes, or ``None``
            when it has no end (``constant``, ``step_decay``).
    """

    length: int | None = None

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        """The value at ``step``."""
        raise NotImplementedError

    def then(self, following: Schedule | float, at: int | None = None) -> Chain:
        """This schedule until step ``at``, then ``following`` (which counts its steps from ``at``).

        Args:
            following: The next schedule (a preset, a callable, or a number for a constant).
            at: The step (of this schedule) at which ``following`` takes over; default: where
                this one ends (:attr:`length`).

        Returns:
            A :class:`Chain`.

        Raises:
            ConfigurationError: If ``at`` is not given and this schedule has no end, or
                ``following`` is not a schedule.

        Example:
            ```python
            from athooks.schedules import constant, linear, warmup

            s = constant(0).then(warmup(100), at=1000)  # off for 1000 steps, then warm up
            assert s(999) == 0 and s(1050) == 0.5
            assert warmup(10).then(linear(1, 0, 10))(15) == 0.5
            ```
        """
        nxt = as_schedule(following, f"{self!r}.then")
        if at is None:
            if self.length is None:
                raise ConfigurationError(
                    f"{self!r}.then(...): this schedule has no end, so give the step at which "
                    "the next one starts: .then(next, at=STEP)"
                )
            at = self.length
        if isinstance(self, Chain):  # at counts from the chain's start, after its last switch
            start = check_steps(
                at, owner=f"{self!r}.then", option="at", minimum=self.starts[-1] + 1
            )
            return Chain((*self.parts, nxt), (*self.starts, start))
        return Chain((self, nxt), (0, check_steps(at, owner=f"{self!r}.then", option="at")))


@dataclass(frozen=True, repr=False)
class Constant(Preset):
    """The same value at every step (what a number given as ``schedule`` becomes)."""

    value: float

    def __call__(self, step: int) -> float:
        """``value``."""
        return self.value

    def __repr__(self) -> str:
        return f"constant({_num(self.value)})"


@dataclass(frozen=True, repr=False)
class Warmup(Preset):
    """Linear from 0 to ``value`` over ``steps`` steps, then ``value``."""

    steps: int
    value: float = 1.0

    @property
    def length(self) -> int:  # type: ignore[override]
        """Where the warm-up ends."""
        return self.steps

    def __call__(self, step: int) -> float:
        """``value * min(step, steps) / steps`` (0 before step 0)."""
        if step >= self.steps:
            return self.value
        return self.value * max(step, 0) / self.steps

    def __repr__(self) -> str:
        return f"warmup(steps={self.steps}, value={_num(self.value)})"


@dataclass(frozen=True, repr=False)
class Linear(Preset):
    """Linear from ``start`` to ``end`` over ``steps`` steps, then ``end``."""

    start: float
    end: float
    steps: int

    @property
    def length(self) -> int:  # type: ignore[override]
        """Where the ramp ends."""
        return self.steps

    def __call__(self, step: int) -> float:
        """``start * (1 - f) + end * f`` with ``f = min(step, steps) / steps``."""
        if step >= self.steps:
            return self.end
        f = max(step, 0) / self.steps
        return self.start * (1 - f) + self.end * f

    def __repr__(self) -> str:
        return f"linear(start={_num(self.start)}, end={_num(self.end)}, steps={self.steps})"


@dataclass(frozen=True, repr=False)
class Cosine(Preset):
    """Half a cosine from ``start`` to ``end`` over ``steps`` steps, then ``end``."""

    start: float
    end: float
    steps: int

    @property
    def length(self) -> int:  # type: ignore[override]
        """Where the decay ends."""
        return self.steps

    def __call__(self, step: int) -> float:
        """``start * c + end * (1 - c)``, ``c = (1 + cos(pi * min(step, steps) / steps)) / 2``."""
        if step >= self.steps:
            return self.end
        c = (1 + math.cos(math.pi * max(step, 0) / self.steps)) / 2
        return self.start * c + self.end * (1 - c)

    def __repr__(self) -> str:
        return f"cosine(start={_num(self.start)}, end={_num(self.end)}, steps={self.steps})"


@dataclass(frozen=True, repr=False)
class StepDecay(Preset):
    """``value``, multiplied by ``gamma`` at each milestone (as ``torch``'s ``MultiStepLR``)."""

    value: float
    milestones: tuple[int, ...]
    gamma: float

    def __call__(self, step: int) -> float:
        """``value * gamma ** (number of milestones <= step)``."""
        return float(self.value * self.gamma ** bisect.bisect_right(self.milestones, step))

    def __repr__(self) -> str:
        return (
            f"step_decay({_num(self.value)}, milestones={self.milestones}, "
            f"gamma={_num(self.gamma)})"
        )


@dataclass(frozen=True, repr=False)
class Chain(Preset):
    """Schedules one after another: ``parts[i]`` from step ``starts[i]``, counting from there.

    Made by :meth:`Preset.then`.
    """

    parts: tuple[Schedule, ...]
    starts: tuple[int, ...]

    @property
    def length(self) -> int | None:  # type: ignore[override]
        """Where the last part ends, if it does."""
        last = self.parts[-1]
        end = last.length if isinstance(last, Preset) else None
        return None if end is None else self.starts[-1] + end

    def __call__(self, step: int) -> float:
        """The value of the part in force at ``step``."""
        i = max(bisect.bisect_right(self.starts, step) - 1, 0)
        return self.parts[i](step - self.starts[i])

    def __repr__(self) -> str:
        text = repr(self.parts[0])
        for part, start in zip(self.parts[1:], self.starts[1:], strict=True):
            text += f".then({part!r}, at={start})"
        return text


@dataclass(frozen=True, repr=False)
class PerEpoch(Preset):
    """A schedule of epochs, read at ``step // steps_per_epoch`` (constant within an epoch)."""

    schedule: Schedule
    steps_per_epoch: int

    @property
    def length(self) -> int | None:  # type: ignore[override]
        """Where the schedule of epochs ends, in steps, if it does."""
        inner = self.schedule
        end = inner.length if isinstance(inner, Preset) else None
        return None if end is None else end * self.steps_per_epoch

    def __call__(self, step: int) -> float:
        """``schedule(step // steps_per_epoch)``."""
        return self.schedule(step // self.steps_per_epoch)

    def __repr__(self) -> str:
        return f"per_epoch({self.schedule!r}, steps_per_epoch={self.steps_per_epoch})"


def constant(value: float) -> Constant:
    """``value`` at every step.

    Args:
        value: A finite number ``>= 0``.

    Returns:
        The schedule.
    """
    return Constant(_weight(value, "constant", "value"))


def warmup(steps: int, value: float = 1.0) -> Warmup:
    """Linear warm-up: 0 at step 0, ``value`` from step ``steps`` on.

    Args:
        steps: The length of the warm-up, ``> 0``.
        value: The value reached, a finite number ``>= 0``.

    Returns:
        The schedule: ``value * min(step, steps) / steps``.

    Example:
        ```python
        from athooks.schedules import warmup

        assert [warmup(4)(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
        ```
    """
    return Warmup(
        check_steps(steps, owner="warmup", option="steps"), _weight(value, "warmup", "value")
    )


def linear(start: float, end: float, steps: int) -> Linear:
    """From ``start`` to ``end`` in a straight line over ``steps`` steps, then ``end``.

    Args:
        start: The value at step 0, finite, ``>= 0``.
        end: The value from step ``steps`` on, finite, ``>= 0``.
        steps: The length of the ramp, ``> 0``.

    Returns:
        The schedule.
    """
    return Linear(
        _weight(start, "linear", "start"),
        _weight(end, "linear", "end"),
        check_steps(steps, owner="linear", option="steps"),
    )


def cosine(start: float, end: float, steps: int) -> Cosine:
    """From ``start`` to ``end`` along half a cosine over ``steps`` steps, then ``end``.

    Args:
        start: The value at step 0, finite, ``>= 0``.
        end: The value from step ``steps`` on, finite, ``>= 0``.
        steps: The length of the decay, ``> 0``.

    Returns:
        The schedule: ``start * c + end * (1 - c)`` with
        ``c = (1 + cos(pi * min(step, steps) / steps)) / 2`` (1 at step 0, 0 at ``steps``).
    """
    return Cosine(
        _weight(start, "cosine", "start"),
        _weight(end, "cosine", "end"),
        check_steps(steps, owner="cosine", option="steps"),
    )


def step_decay(value: float, milestones: Iterable[int], gamma: float = 0.1) -> StepDecay:
    """``value``, multiplied by ``gamma`` at each milestone: drops like a step learning rate.

    At ``step == milestone`` the drop has happened (``torch.optim.lr_scheduler.MultiStepLR``'s
    rule). Under :func:`per_epoch` the milestones are epochs.

    Args:
        value: The value before the first milestone, finite, ``>= 0``.
        milestones: Increasing whole numbers ``>= 0`` (steps, or epochs under ``per_epoch``).
        gamma: The factor of each drop, finite, ``>= 0``.

    Returns:
        The schedule: ``value * gamma ** (number of milestones <= step)``.

    Raises:
        ConfigurationError: If the milestones are not increasing whole numbers ``>= 0``.

    Example:
        ```python
        from athooks.schedules import step_decay

        s = step_decay(1e3, milestones=(60, 120, 160), gamma=0.2)
        assert s(59) == 1e3 and s(60) == 200.0 and round(s(160), 6) == 8.0
        ```
    """
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
        raise ConfigurationError(
            "step_decay: milestones must be a list of increasing whole numbers >= 0 (steps, or "
            f"epochs under per_epoch), got {type(milestones).__name__} {milestones!r:.60}"
        )
    marks = tuple(
        check_steps(m, owner="step_decay", option="milestones", minimum=0) for m in milestones
    )
    if any(b <= a for a, b in itertools.pairwise(marks)):
        raise ConfigurationError(
            f"step_decay: milestones must be strictly increasing, got {marks}; list each drop "
            "once, in order"
        )
    return StepDecay(
        _weight(value, "step_decay", "value"), marks, _weight(gamma, "step_decay", "gamma")
    )


def per_epoch(schedule: Schedule, steps_per_epoch: int) -> PerEpoch:
    """A schedule of epochs as a schedule of steps: ``schedule(step // steps_per_epoch)``.

    For recipes written per epoch (DKD's 20-epoch warm-up, drops at epochs 60, 120 and 160);
    the value changes only at epoch boundaries. ``steps_per_epoch`` is the number of
    ``d.loss()`` calls with gradient per epoch: ``len(loader)`` with one ``d.loss()`` per batch,
    also under gradient accumulation (each micro-batch's ``d.loss()`` is a step).

    Args:
        schedule: A schedule of the epoch (0-based).
        steps_per_epoch: Training steps per epoch, ``> 0``.

    Returns:
        The schedule.

    Example:
        ```python
        from athooks.schedules import linear, per_epoch

        dkd = per_epoch(linear(0.05, 1.0, 19), steps_per_epoch=100)  # epoch e: min((e+1)/20, 1)
        assert dkd(0) == 0.05 and dkd(99) == 0.05 and round(dkd(100), 12) == 0.1
        assert dkd(19 * 100) == 1.0
        ```
    """
    return PerEpoch(
        as_schedule(schedule, "per_epoch"),
        check_steps(steps_per_epoch, owner="per_epoch", option="steps_per_epoch"),
    )
