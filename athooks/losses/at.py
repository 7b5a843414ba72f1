"""Activation-based attention transfer (Zagoruyko & Komodakis, ICLR 2017, section 3.1)."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor

from athooks.checks import NEGATIVE_WEIGHT, check_real
from athooks.context import functorch_active
from athooks.errors import ConfigurationError
from athooks.losses.base import Loss, Step
from athooks.mappings import Mapping, as_mapping

__all__ = ["AT"]

Distance = Literal["code", "paper"]

_EPS = 1e-12  # F.normalize's default eps, used for the maps


def _unit_rows(m: Tensor) -> Tensor:
    """``F.normalize(m, dim=1)``: the same operations and values, without its Python layers."""
    norms: Tensor = torch.linalg.vector_norm(m, 2, dim=1, keepdim=True)
    return m / norms.clamp_min(_EPS)


class AT(Loss):
    """Attention transfer: match the normalised attention maps of teacher and student.

    With ``Q = mapping(A)`` flattened per sample and ``q = Q / ||Q||_2`` (per sample, eps 1e-12),
    summed over the layer pairs ``j``:

    * ``distance="code"`` (default), the authors' reference code, which produced the published
      numbers: ``beta * sum_j mean_{batch, cells} (q_S^j - q_T^j)^2``, with ``beta = 1000``;
    * ``distance="paper"``, Eq. 2 of the paper: ``beta/2 * sum_j mean_batch ||q_S^j - q_T^j||_2``.

    The two differ in scale by orders of magnitude: pick ``beta`` for the form you use.

    With ``pair_weights`` (``athooks.loss("at", pair_weights=...)``) pair ``j``'s term is
    multiplied by ``w_j`` in the sum (:meth:`athooks.plugin.Loss.sum_pairs`).

    A teacher map that is zero for some sample (its norm at most the eps) normalises to zero,
    which makes the pair's term a constant without gradient; AT warns about it on each pair's
    first step.

    The maps may be of any layout a mapping gives, ``(B, *S)``: ``(B, H, W)`` for images,
    ``(B, T)`` for 1-D signals, ``(B, T, H, W)`` for videos; ``q`` is normalised over all the
    spatial cells of a sample (``H*W``, ``T`` or ``T*H*W`` of them), and maps of one pair that
    differ in size are resized over every spatial axis first (``Distiller(resize=...)``).

    Args:
        beta: The weight: a finite real number ``>= 0`` (``0`` turns the term off).
        mapping: A mapping name (``"sum_p"``, ``"sum"``, ``"max_p"``, or a plugin's), a mapping
            object, or a callable ``(B, C, *S) -> (B, *S)``.
        distance: ``"code"`` or ``"paper"``, as above.
        **mapping_options: Options of a mapping given by name, e.g. ``p=4``.

    Example:
        ```python
        import athooks

        at = athooks.loss("at", beta=1e3, mapping="max_p", p=4)
        paper = athooks.loss("at", distance="paper")
        print(at, paper)
        ```
    """

    name = "at"

    def __init__(
        self,
        beta: float = 1e3,
        mapping: Any = "sum_p",
        distance: Distance = "code",
        **mapping_options: Any,
    ) -> None:
        super().__init__()
        if distance not in ("code", "paper"):
            raise ConfigurationError(
                f"at: distance must be 'code' (the authors' code, default) or 'paper' (Eq. 2), "
                f"got {distance!r}"
            )
        self.beta = check_real(beta, owner="at", option="beta", minimum=0.0, reason=NEGATIVE_WEIGHT)
        self.distance: Distance = distance
        self.mapping: Mapping = as_mapping(mapping, **mapping_options)
        self._checked_pairs: set[tuple[str, str]] = set()  # pairs checked for a zero map

    def captures(self) -> tuple[Mapping, ...]:
        """AT needs one attention map per tapped layer."""
        return (self.mapping,)

    def forward(self, step: Step) -> Tensor:
        """The AT loss summed over all layer pairs."""
        maps = step.maps(self.mapping)
        self._check_vanishing(step, maps)
        pair_losses = [self.pair_loss(qt, qs) for qt, qs in maps]
        total = self.sum_pairs(pair_losses, step.pairs)
        scale = self.beta if self.distance == "code" else self.beta / 2
        return scale * total

    def _check_vanishing(self, step: Step, maps: list[tuple[Tensor, Tensor]]) -> None:
        """Warn, on each pair's first step, when the teacher's map is zero for some sample.

        A map whose norm is below the normalisation's eps (all zero, or features of ~1e-13
        from a collapsed or randomly initialised teacher in eval mode) normalises to ~0: the
        pair's term is then a constant that gives the student no gradient. Checked once per
        pair (the check reads a value back from the device), so a teacher that collapses later
        in training is not caught.
        """
        if functorch_active():  # no value can be read back under torch.func transforms
            return
        checked = self._checked_pairs
        for pair, (qt, _) in zip(step.pairs, maps, strict=True):
            if pair in checked or qt.numel() == 0:
                continue
            checked.add(pair)
            norms = torch.linalg.vector_norm(qt.detach().flatten(1).float(), dim=1)
            zero = int((norms <= _EPS).sum())
            if zero:
                warnings.warn(
                    f"at: the teacher's attention map of pair (teacher {pair[0]!r}, student "
                    f"{pair[1]!r}) is zero (norm <= {_EPS:g}) for {zero} of {qt.shape[0]} "
                    "samples: normalised, it is zero, so this pair's term is a constant that "
                    "gives the student no gradient. The teacher's features vanish at that "
                    "layer (a dead ReLU, collapsed or untrained weights); pair another layer, "
                    "or check the teacher's weights",
                    stacklevel=2,
                )

    def pair_loss(self, teacher_map: Tensor, student_map: Tensor) -> Tensor:
        """The unweighted loss of one pair of ``(B, *S)`` maps (of equal shape).

        Args:
            teacher_map: The teacher's attention map.
            student_map: The student's attention map.

        Returns:
            A scalar: mean squared difference (``"code"``) or mean per-sample L2 distance
            (``"paper"``) of the normalised maps.
        """
        dtype = torch.promote_types(student_map.dtype, torch.float32)
        qt = _unit_rows(teacher_map.flatten(1).to(dtype))
        qs = _unit_rows(student_map.flatten(1).to(dtype))
        diff = qs - qt
        if self.distance == "code":
            return diff.pow(2).mean()
        norms: Tensor = torch.linalg.vector_norm(diff, ord=2, dim=1)
        return norms.mean()

    def extra_repr(self) -> str:
        """Weight and distance, for ``repr``."""
        return f"beta={self.beta:g}, distance={self.distance!r}"
