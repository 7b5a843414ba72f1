"""Full-activation transfer (F-ActT), the paper's comparison to attention transfer (Table 1)."""

from __future__ import annotations

from torch import Tensor

from athooks.checks import NEGATIVE_WEIGHT, check_real
from athooks.errors import CaptureError
from athooks.losses.base import Loss, Step
from athooks.mappings import Features, Mapping, at_least_float32

__all__ = ["FActT"]


class FActT(Loss):
    """Match the tapped feature maps themselves: ``beta/2 * sum_j mean_b ||A_S^j - A_T^j||_2^2``.

    The squared L2 distance of the whole feature maps, per sample, averaged over the batch and
    summed over the layer pairs; any layout ``(B, C, *S)`` (1-D signals, images, videos). Unlike
    attention maps, feature maps keep their channels, so each pair must have exactly the same
    shape (same width and resolution); attention transfer needs only the spatial sizes to agree
    because a mapping collapses the channels.

    With ``pair_weights``, pair ``j``'s term is multiplied by ``w_j`` in the sum.

    Args:
        beta: The weight: a finite real number ``>= 0``.

    Example:
        ```python
        import athooks

        print(athooks.loss("fact", beta=1e-3))
        ```
    """

    name = "fact"

    def __init__(self, beta: float = 1e-3) -> None:
        super().__init__()
        self.beta = check_real(
            beta, owner="fact", option="beta", minimum=0.0, reason=NEGATIVE_WEIGHT
        )
        self.features = Features()

    def captures(self) -> tuple[Mapping, ...]:
        """F-ActT keeps the feature maps whole."""
        return (self.features,)

    def forward(self, step: Step) -> Tensor:
        """The term of the step."""
        terms = []
        for (t_name, s_name), (a_t, a_s) in zip(
            step.pairs, step.features(self.features), strict=True
        ):
            if a_t.shape != a_s.shape:
                raise CaptureError(
                    f"fact compares whole feature maps, which must have the same shape; pair "
                    f"(teacher {t_name!r}, student {s_name!r}) has teacher {tuple(a_t.shape)} and "
                    f"student {tuple(a_s.shape)}. Attention transfer ('at') does not need equal "
                    "widths, since its maps sum over channels; for F-ActT pair layers of equal "
                    "shape"
                )
            diff = (at_least_float32(a_s) - at_least_float32(a_t)).flatten(1)
            terms.append(diff.pow(2).sum(1).mean())
        return self.beta / 2 * self.sum_pairs(terms, step.pairs)

    def extra_repr(self) -> str:
        """The weight, for ``repr``."""
        return f"beta={self.beta:g}"
