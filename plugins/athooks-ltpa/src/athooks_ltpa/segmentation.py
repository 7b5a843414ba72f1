"""Weakly supervised segmentation: an attention map binarised into a mask at image resolution.

The paper uses LTPA's attention maps, learned from image labels only, as weakly supervised
segmentations of the object (the reference file lists this use without the thresholding rule).
:func:`segment` makes that explicit with a documented rule: the map is first resized to the
image (bilinear, ``align_corners=False``), then binarised per image by one of

* ``"otsu"`` (default, no parameter): Otsu's threshold, the split of the map's values into two
  classes that maximises the between-class variance ``w0 * w1 * (mu0 - mu1)^2`` (``w`` the class
  sizes, ``mu`` their means), searched over a ``bins``-bin histogram between the image's smallest
  and largest value; the mask is the upper class;
* ``"fraction"``: the positions whose value is at least ``fraction`` times the image's largest
  value (``fraction=0.5`` by default);
* ``"mass"``: the fewest highest-valued positions that together hold at least ``mass`` of the
  map's total (for non-negative maps such as softmax attention; ``mass=0.5`` by default).

A constant map (no position stands out) gives an empty mask under ``"otsu"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from athooks import ConfigurationError

__all__ = ["otsu_threshold", "segment"]

Rule = Literal["otsu", "fraction", "mass"]


def _otsu_split(values: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row of ``values`` (N, P): bin index of each value, the best split, lo and bin width."""
    lo = values.amin(dim=1, keepdim=True)
    hi = values.amax(dim=1, keepdim=True)
    width = (hi - lo) / bins
    safe = torch.where(width > 0, width, torch.ones_like(width))
    idx = ((values - lo) / safe).floor().clamp(0, bins - 1).long()
    n = values.shape[0]
    counts = torch.zeros(n, bins, dtype=values.dtype, device=values.device)
    counts.scatter_add_(1, idx, torch.ones_like(values))
    sums = torch.zeros(n, bins, dtype=values.dtype, device=values.device)
    sums.scatter_add_(1, idx, values)
    w0 = counts.cumsum(1)[:, :-1]
    s0 = sums.cumsum(1)[:, :-1]
    total, total_sum = counts.sum(1, keepdim=True), sums.sum(1, keepdim=True)
    w1 = total - w0
    valid = (w0 > 0) & (w1 > 0)
    mu0 = s0 / w0.clamp_min(1)
    mu1 = (total_sum - s0) / w1.clamp_min(1)
    between = torch.where(valid, w0 * w1 * (mu0 - mu1) ** 2, torch.full_like(w0, -1.0))
    best = between.argmax(dim=1)  # the first best split
    best = torch.where(width.squeeze(1) > 0, best, torch.full_like(best, bins - 1))
    return idx, best, lo.squeeze(1), width.squeeze(1)


def otsu_threshold(values: Tensor, bins: int = 256) -> Tensor:
    """Otsu's threshold of each row of ``values``: values ``>=`` it form the upper class.

    Args:
        values: ``(N, P)``: ``N`` sets of ``P`` values (or one set ``(P,)``).
        bins: Histogram bins between each row's smallest and largest value.

    Returns:
        ``(N,)`` thresholds (a scalar for one set); ``+inf`` for a constant row.

    Example:
        ```python
        import torch
        from athooks_ltpa import otsu_threshold

        v = torch.tensor([0.0, 0.1, 0.2, 0.9, 1.0])
        print(float(otsu_threshold(v)))  # between 0.2 and 0.9
        ```
    """
    one = values.dim() == 1
    rows = values.reshape(1, -1) if one else values.flatten(1)
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    _, best, lo, width = _otsu_split(rows, bins)
    t = lo + (best + 1).to(rows.dtype) * width
    t = torch.where(width > 0, t, torch.full_like(t, float("inf")))
    return t[0] if one else t


def segment(
    attention: Tensor,
    size: Sequence[int],
    *,
    rule: Rule = "otsu",
    fraction: float = 0.5,
    mass: float = 0.5,
    bins: int = 256,
) -> Tensor:
    """Binarise attention maps into masks at image resolution (see the module docs for rules).

    Args:
        attention: ``(B, h, w)`` maps (or one ``(h, w)`` map), e.g. a value of
            ``head.attention_maps``.
        size: The image size ``(H, W)`` to resize to before thresholding.
        rule: ``"otsu"``, ``"fraction"`` or ``"mass"``.
        fraction: For ``"fraction"``: the share of the largest value, in ``(0, 1]``.
        mass: For ``"mass"``: the share of the map's total to cover, in ``(0, 1]``.
        bins: For ``"otsu"``: histogram bins.

    Returns:
        Boolean masks ``(B, H, W)`` (``(H, W)`` for one map), ``True`` on the attended region.

    Raises:
        ConfigurationError: For an unknown rule or an out-of-range parameter.

    Example:
        ```python
        import torch
        from athooks_ltpa import segment

        a = torch.zeros(1, 4, 4)
        a[0, 1:3, 1:3] = 1.0
        mask = segment(a, (32, 32))
        print(mask.shape, int(mask.sum()))  # the centre, at image resolution
        ```
    """
    if rule not in ("otsu", "fraction", "mass"):
        raise ConfigurationError(
            f"segment: rule must be 'otsu', 'fraction' or 'mass', got {rule!r}"
        )
    if not 0 < fraction <= 1 or not 0 < mass <= 1:
        raise ConfigurationError(
            f"segment: fraction and mass must be in (0, 1], got fraction={fraction}, mass={mass}"
        )
    if len(size) != 2:
        raise ConfigurationError(f"segment: size must be (H, W), got {tuple(size)}")
    one = attention.dim() == 2
    maps = attention.unsqueeze(0) if one else attention
    if maps.dim() != 3:
        raise ConfigurationError(
            f"segment: attention must be (B, h, w) or (h, w), got shape {tuple(attention.shape)}"
        )
    maps = maps.detach().to(torch.promote_types(maps.dtype, torch.float32))
    h, w = int(size[0]), int(size[1])
    if maps.shape[1:] != (h, w):
        maps = F.interpolate(maps.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)
        maps = maps.squeeze(1)
    flat = maps.flatten(1)
    if rule == "otsu":
        idx, best, _, width = _otsu_split(flat, bins)
        mask = (idx > best[:, None]) & (width[:, None] > 0)
    elif rule == "fraction":
        mask = flat >= fraction * flat.amax(dim=1, keepdim=True)
    else:
        if (flat < 0).any():
            raise ConfigurationError(
                "segment: rule='mass' needs non-negative maps (attention weights); use 'otsu' "
                "or 'fraction' for maps with negative values"
            )
        ordered, order = flat.sort(dim=1, descending=True)
        before = ordered.cumsum(1) - ordered  # the mass of the higher-valued positions
        keep_sorted = before < mass * flat.sum(dim=1, keepdim=True)
        mask = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    out = mask.reshape(-1, h, w)
    return out[0] if one else out
