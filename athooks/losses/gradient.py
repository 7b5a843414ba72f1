"""Gradient-based attention transfer and its baselines (Zagoruyko & Komodakis, section 3.2).

The attention of a network is the gradient of its task loss with respect to its input,
``J = d CE(model(x), y) / dx``. Here the cross-entropy is *summed* over the batch, so that ``J_b``
is the gradient of sample ``b``'s own loss, whatever the batch size (exactly so when samples do
not interact, e.g. BatchNorm in eval mode). Norms are taken per sample over all input elements and
averaged over the batch.

* ``grad_at`` (Eq. 3-5): ``beta/2 * mean_b ||J_S - J_T||_2``;
* ``symmetry`` (Eq. 6 and the text around it): ``beta/2 * mean_b ||J_S(x) - flip(J_S(flip(x)))||_2
  + output_beta/2 * mean_b ||z_S(x) - z_S(flip(x))||_2``, student only, ``z_S`` the student's
  logits, ``output_beta`` equal to ``beta`` unless given (``outputs=False``: Eq. 6 alone), and
  ``flip`` mirroring the last dimension of the input: the width of an image ``(B, C, H, W)`` or
  of a video's frames ``(B, C, T, H, W)``, and the time axis of a 1-D signal ``(B, C, T)`` (a
  time reversal, which is a symmetry of the task only for some signals). Both terms come from
  one extra student forward, on the flipped input;
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

from athooks.checks import NEGATIVE_WEIGHT, check_choice, check_real
from athooks.errors import CaptureError
from athooks.losses.base import Loss, Step, logits_of
from athooks.mappings import at_least_float32

__all__ = ["GradAT", "InputGradL2", "Symmetry", "flipped_student_logits", "input_gradient"]


def input_gradient(
    step: Step, who: str, target: Tensor, loss_name: str, flip: bool = False
) -> Tensor:
    """``d CE_sum(model(x), y) / dx`` for the student (with a graph) or the teacher (without).

    Results are cached on the step, so several losses share one computation. With ``flip``, the
    logits of the flipped forward are cached too (under ``"student:flip:logits"``, read by
    :func:`flipped_student_logits`), so a loss that also needs them runs no other forward.

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
    if who == "student" and _through_compiled_autograd(logits):
        raise CaptureError(
            f"loss {loss_name!r} differentiates the student's input gradient (double backward), "
            "but the student's forward ran through torch.compile's AOTAutograd (the inductor or "
            "aot_eager backend), which does not support double backward; run this student "
            "eagerly (without torch.compile or model.compile()), or compile it with "
            "backend='eager'"
        )
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
        step.cache[f"{key}:logits"] = logits
    step.cache[key] = grad
    return grad


def _through_compiled_autograd(t: Tensor) -> bool:
    """Whether ``t``'s autograd graph has a node of AOTAutograd's compiled backward."""
    seen: set[int] = set()
    todo = [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "CompiledFunctionBackward":
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


def flipped_student_logits(step: Step, target: Tensor, loss_name: str) -> Tensor:
    """The student's logits on the flipped input, from the forward that gives ``J_S(flip(x))``.

    Runs :func:`input_gradient` with ``flip=True`` if no loss of the step has yet, and returns the
    logits that forward produced (with their graph to the student's weights), not flipped back:
    they are class scores.

    Args:
        step: The step.
        target: The labels (the flipped gradient needs them).
        loss_name: The loss asking, for messages.

    Returns:
        The logits ``(B, classes)``.

    Raises:
        CaptureError: As :func:`input_gradient`.

    Example:
        ```python
        import torch
        from athooks import Distiller
        from athooks.losses.gradient import flipped_student_logits
        from athooks.plugin import Loss

        class FlipKL(Loss):  # a plugin loss on the flipped logits: no forward of its own
            name = "flip_kl"
            needs_input_grad = True

            def forward(self, step):
                z = step.student_output
                z_flip = flipped_student_logits(step, step.target, self.name)
                return torch.nn.functional.kl_div(
                    z_flip.log_softmax(1), z.log_softmax(1), log_target=True, reduction="batchmean"
                )

        teacher, student = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
        with Distiller(teacher, student, losses=[FlipKL(), "symmetry"]) as d:
            student(torch.randn(4, 6))
            d.loss(target=torch.tensor([0, 1, 2, 0])).backward()  # one flipped forward for both
        ```
    """
    input_gradient(step, "student", target, loss_name, flip=True)
    logits: Tensor = step.cache["student:flip:logits"]
    return logits


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
    """Symmetry norm (paper Eq. 6 and the text around it): the flip invariance of the student.

    The paper: "we propagate horizontally flipped images as well as originals, backpropagate and
    flip gradient attention maps back. We then add l2 losses on the obtained attentions and
    outputs, and do second backpropagation". With ``J`` the student's input gradient and ``z`` its
    logits::

        beta/2 * mean_b ||J(x) - flip(J(flip(x)))||_2          (Eq. 6, the attentions)
        + output_beta/2 * mean_b ||z(x) - z(flip(x))||_2        (the outputs, if outputs=True)

    both norms per sample (the logits are class scores, so they are not flipped back). The paper
    gives one weight: ``output_beta=None`` uses ``beta``. ``outputs=False`` gives Eq. 6 alone.

    The student alone: the Distiller runs one extra forward on the flipped input, which gives
    both ``J(flip(x))`` and ``z(flip(x))`` (in the student's current mode, so a training-mode
    BatchNorm updates its statistics twice). Needs the labels: ``d.loss(target=y)``.

    Args:
        beta: The weight of the attention term: a finite real number ``>= 0``.
        outputs: Whether to add the output term (``True`` or ``False``).
        output_beta: The weight of the output term: a finite real number ``>= 0``, or ``None``
            for ``beta`` (read at each step, so a later ``loss.beta = ...`` moves both).

    Raises:
        ConfigurationError: If a weight is not a finite real number ``>= 0``, or ``outputs`` is
            not a ``bool``.

    Example:
        ```python
        import torch
        import torch.nn.functional as F
        import athooks
        from athooks import Distiller
        from athooks.models import create_model

        torch.manual_seed(0)
        teacher, student = create_model("wrn16_2"), create_model("wrn16_1")
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
        sym = athooks.loss("symmetry", beta=1.0)  # attentions and outputs, one weight
        print(sym)  # Symmetry(beta=1, outputs=True, output_beta=beta)
        with Distiller(teacher, student, losses=sym) as d:
            out = student(x)
            (F.cross_entropy(out, y) + d.loss(target=y)).backward()
        assert athooks.loss("symmetry", outputs=False).outputs is False  # Eq. 6 alone
        ```
    """

    name = "symmetry"

    def __init__(
        self, beta: float = 1.0, outputs: bool = True, output_beta: float | None = None
    ) -> None:
        super().__init__(beta)
        check_choice(f"{self.name}: outputs", outputs, (True, False), "True or False")
        self.outputs = outputs
        self.output_beta = (
            None
            if output_beta is None
            else check_real(
                output_beta,
                owner=self.name,
                option="output_beta",
                minimum=0.0,
                reason=NEGATIVE_WEIGHT,
            )
        )

    def forward(self, step: Step) -> Tensor:
        """The term of the step."""
        y = step.require_target(self.name)
        j = input_gradient(step, "student", y, self.name)
        j_flip = input_gradient(step, "student", y, self.name, flip=True)
        term = self.beta / 2 * _per_sample_norm(j - j_flip).mean()
        if not self.outputs:
            return term
        z = at_least_float32(logits_of(step.student_output, "student", self.name))
        z_flip = at_least_float32(flipped_student_logits(step, y, self.name))
        weight = self.beta if self.output_beta is None else self.output_beta
        return term + weight / 2 * _per_sample_norm(z - z_flip).mean()

    def extra_repr(self) -> str:
        """The weights and whether the output term is on, for ``repr``."""
        if not self.outputs:
            return f"beta={self.beta:g}, outputs=False"
        out = "beta" if self.output_beta is None else f"{self.output_beta:g}"
        return f"beta={self.beta:g}, outputs=True, output_beta={out}"


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
