"""Opt-in ways to run the teacher cheaper: compiled, lower precision, channels-last, cut short.

The teacher is frozen, in eval mode and runs under ``no_grad``: the easiest part of a step to make
cheap. None of these options changes the user's teacher (its parameters, dtype, memory format and
hooks stay as they are); each changes only how athooks calls it:

* ``compile``: athooks calls ``torch.compile(teacher, **options)`` (compiled once, on the first
  step), so the teacher's taps are traced into the teacher's own graph. The student's graph is
  not affected.
* ``dtype``: the teacher's forward runs under :func:`torch.autocast` with that dtype (``bfloat16``
  or ``float16``); its taps turn off autocast and compute the maps from a float32 copy of the
  features, and the teacher's outputs are given to the losses in float32.
* ``channels_last``: the teacher's 4-D floating inputs are given to it in the channels-last memory
  format (a copy), which convolutions propagate. Convert the teacher's weights yourself
  (``teacher.to(memory_format=torch.channels_last)``) to save their per-call reorder as well.
* ``truncate``: the teacher's forward stops right after its last tapped layer, when no loss needs
  the teacher's output (attention transfer alone needs no teacher logits). The first step runs it
  whole and counts the taps' calls; later steps stop at the same count. This assumes the teacher
  runs the same layers for every input, as vision backbones do; a step whose calls differ from
  the first step's raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from athooks.errors import ConfigurationError

__all__ = ["TeacherOptions", "float32_outputs", "teacher_options"]

_LOW = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TeacherOptions:
    """How athooks runs the teacher (see the module docs); the defaults run it as it is.

    Attributes:
        compile: Compile the teacher (``torch.compile``) once, on the first step.
        compile_options: Keyword arguments for ``torch.compile`` (``{"mode": "max-autotune"}``).
        dtype: Run the teacher under autocast with this dtype, or ``None``.
        channels_last: Give the teacher its 4-D inputs in the channels-last memory format.
        truncate: Stop the teacher's forward after its last tapped layer.
    """

    compile: bool = False
    compile_options: Mapping[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    channels_last: bool = False
    truncate: bool = False

    @property
    def default(self) -> bool:
        """Whether the teacher runs as it is (no option set)."""
        return not (self.compile or self.dtype or self.channels_last or self.truncate)


def teacher_options(
    compile: bool | Mapping[str, Any] = False,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    truncate: bool = False,
    *,
    needs_output: bool = False,
    losses: str = "",
) -> TeacherOptions:
    """Check the Distiller's ``teacher_*`` arguments and gather them.

    Args:
        compile: ``True``, or the keyword arguments of ``torch.compile``.
        dtype: ``torch.bfloat16``, ``torch.float16``, or ``None``/``torch.float32``.
        channels_last: Whether to give the teacher channels-last inputs.
        truncate: Whether to stop the teacher after its last tapped layer.
        needs_output: Whether a loss reads the teacher's output (then ``truncate`` is refused).
        losses: The losses' labels, for the message.

    Returns:
        The options.

    Raises:
        ConfigurationError: If a value has the wrong type, or ``truncate`` is asked while a loss
            needs the teacher's output.

    Example:
        ```python
        import torch
        from athooks.teacher import teacher_options

        options = teacher_options(compile={"mode": "reduce-overhead"}, dtype=torch.bfloat16)
        assert options.compile and options.compile_options["mode"] == "reduce-overhead"
        assert teacher_options().default
        ```
    """
    if isinstance(compile, Mapping):
        compile_options, compile = dict(compile), True
    elif isinstance(compile, bool):
        compile_options = {}
    else:
        raise ConfigurationError(
            f"teacher_compile must be True/False or a dict of torch.compile arguments, got "
            f"{type(compile).__name__}; e.g. teacher_compile={{'mode': 'max-autotune'}}"
        )
    if dtype == torch.float32:
        dtype = None
    if dtype is not None and dtype not in _LOW:
        raise ConfigurationError(
            f"teacher_dtype must be torch.bfloat16, torch.float16 or None (float32), got "
            f"{dtype!r}; athooks runs the teacher under torch.autocast with it"
        )
    for name, value in (("teacher_channels_last", channels_last), ("truncate_teacher", truncate)):
        if not isinstance(value, bool):
            raise ConfigurationError(f"{name} must be True or False, got {type(value).__name__}")
    if truncate and needs_output:
        raise ConfigurationError(
            f"truncate_teacher=True stops the teacher after its last tapped layer, but a loss "
            f"of this Distiller ({losses}) reads the teacher's output (its logits), which would "
            "then never be computed. Drop truncate_teacher, or use only losses on the tapped "
            "layers (e.g. 'at')"
        )
    return TeacherOptions(compile, compile_options, dtype, channels_last, truncate)


def float32_outputs(output: Any) -> Any:
    """The teacher's output with its bfloat16/float16 tensors in float32, for the losses.

    Tuples (named tuples included), lists and dicts are rebuilt; other containers are returned
    as they are.

    Args:
        output: What the teacher returned under autocast.

    Returns:
        The same structure, low-precision floating tensors converted.

    Example:
        ```python
        import torch
        from athooks.teacher import float32_outputs

        out = float32_outputs({"logits": torch.ones(2, dtype=torch.bfloat16), "n": 3})
        assert out["logits"].dtype == torch.float32 and out["n"] == 3
        ```
    """
    if isinstance(output, torch.Tensor):
        return output.float() if output.dtype in _LOW else output
    if isinstance(output, tuple):
        items = [float32_outputs(v) for v in output]
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    if isinstance(output, list):
        return [float32_outputs(v) for v in output]
    if isinstance(output, dict):
        converted = {k: float32_outputs(v) for k, v in output.items()}
        try:
            return type(output)(converted)
        except TypeError:  # a dict subclass with another constructor
            return converted
    return output
