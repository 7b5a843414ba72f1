"""Gradient-based attention transfer and its baselines (Zagoruyko & Komodakis, section 3.2).

The attention of a network is the gradient of its task loss with respect to its input,
``J = d CE(model(x), y) / dx``. Here the cross-entropy is *summed* over the batch, so that ``J_b``
is the gradient of sample ``b``'s own loss, whatever the batch size (exactly so when samples do
not interact, e.g. BatchNorm in eval mode). Norms are taken per sample over all input elements and
averaged over the batch.

* ``grad_at`` (Eq. 3-5): ``beta/2 * mean_b ||J_S - J_T||_2``;
* ``symmetry`` (Eq. 6): ``beta/2 * mean_b ||J_S(x) - flip(J_S(flip(x)))||_2``, student only,
  ``flip`` mirroring the last dimension of the input: the width of an image ``(B, C, H, W)`` or
  of a video's frames ``(B, C, T, H, W)``, and the time axis of a 1-D signal ``(B, C, T)`` (a
  time reversal, which is a symmetry of the task only for some signals);
* ``input_grad_l2`` ("min-l2", Drucker & LeCun 1992): ``beta * mean_b ||J_S||_2^2``.

None of them reads attention maps: they work on any input a model takes as one tensor (1-D
signals and videos included). The student terms need double backpropagation: the Distiller
makes the student's tensor input require grad before its forward and ``J_S`` is built with
``create_graph=True``. The teacher's ``J_T`` is computed by a separate teacher forward and
backward, without a graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from athooks.checks import NEGATIVE_WEIGHT, check_real
from athooks.errors import CaptureError
from athooks.losses.base import Loss, Step, logits_of
from athooks.mappings import at_least_float32

__all__ = ["GradAT", "InputGradL2", "Symmetry", "input_gradient"]


def input_gradient(
    step: Step, who: str, target: Tensor, loss_name: str, flip: bool = False
) -> Tensor:
    """``d CE_sum(model(x), y) / dx`` for the student (with a graph) or the teacher (without).

    Results are cached on the step, so several losses share one computation.

    Args:
        step: The step.
        who: ``"student"`` or ``"teacher"``.
        target: The labels.
        loss_name: The loss asking, for messages.
        flip: For the student: the gradient at the horizontally flipped input, flipped back.

    Returns:
        A tensor shaped like the student's input.

    Raises:
        CaptureError: If the Distiller did not prepare the input, or the forward had no graph.
    """
    key = f"{who}:{'flip' if flip else 'x'}"
    if key in step.cache:
        cached: Tensor = step.cache[key]
        return cached
    runner = step.runner
    if runner is None:
        raise CaptureError(
            f"loss {loss_name!r} needs the models' input gradients: use it through a Distiller"
        )
    x = runner.student_input()
    if who == "student" and not flip:
        if not x.requires_grad or not torch.is_grad_enabled():
            raise CaptureError(
                f"loss {loss_name!r} needs the gradient of the student's loss with respect to its "
                "input, but the student's forward ran without gradient (torch.no_grad() or an "
                "input that cannot require grad); run the training forward with gradient enabled"
            )
        x_in, output = x, step.student_output
    elif who == "student":
        x_in = x.detach().flip(-1).requires_grad_()
        output = runner.run_student_on(x_in)
    else:
        x_in = x.detach().requires_grad_()
        output = runner.run_teacher_on(x_in)
    logits = logits_of(output, who, loss_name)
    if target.shape[0] != logits.shape[0]:
        raise CaptureError(
            f"loss {loss_name!r}: the target has {target.shape[0]} labels for a batch of "
            f"{logits.shape[0]}"
        )
    with torch.enable_grad():
        ce = F.cross_entropy(at_least_float32(logits), target, reduction="sum")
        (grad,) = torch.autograd.grad(ce, x_in, create_graph=who == "student")
    if flip:
        grad = grad.flip(-1)
    step.cache[key] = grad
    return grad


def _per_sample_norm(t: Tensor) -> Tensor:
    norms: Tensor = torch.linalg.vector_norm(at_least_float32(t.flatten(1)), ord=2, dim=1)
    return norms


def _check_beta(beta: float, name: str) -> float:
    return check_real(beta, owner=name, option="beta", minimum=0.0, reason=NEGATIVE_WEIGHT)


class GradAT(Loss):
    """Gradient-based attention transfer: ``beta/2 * mean_b ||J_S - J_T||_2`` (paper Eq. 3-5).

    Needs the labels: ``d.loss(target=y)``.

    Args:
        beta: The weight: a finite real number ``>= 0``.

    Example:
        ```python
        import athooks

        print(athooks.loss("grad_at", beta=1.0))
        ```
    """

    name = "grad_at"
    needs_input_grad = True

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = _check_beta(beta, self.name)

    def forward(self, step: Step) -> Tensor:
        """The term of the step."""
        y = step.require_target(self.name)
        j_s = input_gradient(step, "student", y, self.name)
        j_t = input_gradient(step, "teacher", y, self.name)
        return self.beta / 2 * _per_sample_norm(j_s - j_t).mean()

    def extra_repr(self) -> str:
        """The weight, for ``repr``."""
        return f"beta={self.beta:g}"


class Symmetry(GradAT):
    """Symmetry norm: ``beta/2 * mean_b ||J_S(x) - flip(J_S(flip(x)))||_2`` (paper Eq. 6).

    The student alone: the Distiller runs the extra forward on the flipped input (in the
    student's current mode, so a training-mode BatchNorm updates its statistics twice).
    Needs the labels: ``d.loss(target=y)``.

    Args:
        beta: The weight: a finite real number ``>= 0``.
    """

    name = "symmetry"

    def forward(self, step: Step) -> Tensor:
        """The term of the step."""
        y = step.require_target(self.name)
        j = input_gradient(step, "student", y, self.name)
        j_flip = input_gradient(step, "student", y, self.name, flip=True)
        return self.beta / 2 * _per_sample_norm(j - j_flip).mean()


class InputGradL2(GradAT):
    """The "min-l2" baseline (Drucker & LeCun, 1992): ``beta * mean_b ||J_S||_2^2``.

    Needs the labels: ``d.loss(target=y)``.

    Args:
        beta: The weight: a finite real number ``>= 0``.
    """

    name = "input_grad_l2"

    def forward(self, step: Step) -> Tensor:
        """The term of the step."""
        y = step.require_target(self.name)
        j = input_gradient(step, "student", y, self.name)
        return self.beta * at_least_float32(j.flatten(1)).pow(2).sum(1).mean()
