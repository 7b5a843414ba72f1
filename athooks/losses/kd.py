"""Knowledge distillation (Hinton et al., 2015) as in the attention-transfer authors' code."""

from __future__ import annotations

import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from athooks.checks import NEGATIVE_WEIGHT, check_real
from athooks.errors import ConfigurationError
from athooks.losses.base import Loss, Step, logits_of
from athooks.mappings import at_least_float32

__all__ = ["KD"]


class KD(Loss):
    """Knowledge distillation on the two models' outputs.

    ``weight * T^2 * KL(softmax(z_T / T) || softmax(z_S / T))``, summed over classes and averaged
    over the batch, where ``z_S`` is what the student's forward returned and ``z_T`` what the
    teacher returned on the same input. With ``weight = alpha`` and the task loss scaled by
    ``1 - alpha`` it equals the authors' ``distillation`` function:
    ``loss = (1 - alpha) * F.cross_entropy(out, y) + d.loss()``; AT + KD adds the AT term.

    Args:
        weight: The factor ``alpha`` (0.9 in the authors' code): finite, ``>= 0``.
        temperature: ``T`` (4 in the authors' code): finite, ``> 0``.

    Example:
        ```python
        import athooks

        kd = athooks.loss("kd", weight=0.9, temperature=4.0)
        print(kd)
        ```
    """

    name = "kd"
    needs_teacher_output = True

    def __init__(self, weight: float = 0.9, temperature: float = 4.0) -> None:
        super().__init__()
        self.weight = check_real(
            weight, owner="kd", option="weight", minimum=0.0, reason=NEGATIVE_WEIGHT
        )
        self.temperature = check_real(
            temperature,
            owner="kd",
            option="temperature",
            minimum=0.0,
            strict=True,
            reason=" (the logits are divided by it; the authors' code uses 4)",
        )

    def forward(self, step: Step) -> Tensor:
        """The KD term of the step."""
        z_s = logits_of(step.student_output, "student", self.name)
        z_t = logits_of(step.teacher_output, "teacher", self.name).detach()
        if z_s.shape != z_t.shape:
            raise ConfigurationError(
                f"kd: the student's logits have shape {tuple(z_s.shape)} and the teacher's "
                f"{tuple(z_t.shape)}; KD needs the same classes on both models"
            )
        t = self.temperature
        log_p_s = F.log_softmax(at_least_float32(z_s) / t, dim=1)
        p_t = F.softmax(at_least_float32(z_t) / t, dim=1)
        kl = F.kl_div(log_p_s, p_t, reduction="sum") / z_s.shape[0]
        return self.weight * t * t * kl

    def extra_repr(self) -> str:
        """Weight and temperature, for ``repr``."""
        return f"weight={self.weight:g}, temperature={self.temperature:g}"
