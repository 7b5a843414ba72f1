"""The ``ltpa`` mapping: an LTPA head's attention as an athooks attention map.

A mapping sees one feature map ``(B, C, H, W)`` when a tapped layer fires, but LTPA's attention
also needs the global descriptor ``g``, which the model computes later in the same forward. Two
cases, both giving exactly the head's own ``head.attention_maps``:

* ``compatibility="pc"`` with ``normalise="softmax"``: ``<u, l_i + g> = <u, l_i> + <u, g>``; the
  second term is the same at every position, so it cancels in the softmax over positions. The map
  is computed at capture from the feature map alone (exact, differentiable).
* ``"dp"`` or ``"sigmoid"``: ``g`` does not cancel. The mapping returns a placeholder that the head
  fills in place when the forward reaches ``g`` (the head computes its attention there). This
  needs the head's own hooks to run in the same forward, which they do whenever the tapped model
  is the head or its model; read the map after the forward returns (as athooks' losses and
  ``Distiller.loss()`` do). A placeholder that was never filled reads NaN.

The mapping recognises the head's layers by a mark its :class:`athooks.Layer` transforms put on
the feature map (:attr:`athooks_ltpa.LTPAHead.layers`). Feature maps without the mark (the
student's, in a Distiller from an LTPA teacher to a plain student) get the ``fallback`` mapping,
or a clear error when none is given.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

import athooks
from athooks import CaptureError, ConfigurationError
from athooks.plugin import Mapping

__all__ = ["LTPAMapping"]


class LTPAMapping(Mapping):
    """An LTPA head's attention at its local layers; ``fallback`` on any other layer.

    Args:
        fallback: The mapping for feature maps that do not come from an LTPA head's layers
            (tapped through :attr:`athooks_ltpa.LTPAHead.layers`): a registered name such as
            ``"sum_p"``, a mapping object, or ``None`` (default) to raise an error there.
        **fallback_options: Options of a fallback given by name (``p=2``).

    Example:
        ```python
        import torch
        import athooks
        import athooks_ltpa

        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
        )
        head = athooks_ltpa.attach(net, layers="1", input_size=(3, 8, 8))
        ltpa = athooks.mapping("ltpa", fallback="sum_p")
        print(ltpa, head.layers)
        ```
    """

    name = "ltpa"

    def __init__(self, fallback: Any = None, **fallback_options: Any) -> None:
        super().__init__()
        self.fallback: Any = None
        if fallback_options and not isinstance(fallback, str):
            raise ConfigurationError(
                f"ltpa: options {sorted(fallback_options)} are for a fallback mapping given by "
                f"name, e.g. fallback='sum_p', p=2; got fallback={fallback!r}"
            )
        if isinstance(fallback, str):
            fallback = athooks.mapping(fallback, **fallback_options)
        elif fallback is not None and not callable(fallback):
            raise ConfigurationError(
                "ltpa: fallback must be a mapping name (e.g. 'sum_p'), a mapping, a callable "
                f"(B, C, H, W) -> (B, H, W), or None; got {type(fallback).__name__}"
            )
        self.fallback = fallback

    def forward(self, features: Tensor) -> Tensor:
        """The head's attention ``(B, H, W)`` for a marked feature map, else the fallback's map."""
        from athooks_ltpa.head import TAG

        mark = getattr(features, TAG, None)
        if mark is None:
            if self.fallback is not None:
                out: Tensor = self.fallback(features)
                return out
            raise CaptureError(
                "ltpa: this feature map does not come from an LTPA head's local layer, so it has "
                "no LTPA attention. Tap the head through head.layers (athooks.Layer objects "
                "that mark the head's features), and give the other model's layers a fallback: "
                "athooks.mapping('ltpa', fallback='sum_p')"
            )
        head_ref, index = mark
        head = head_ref()
        if head is None:
            raise CaptureError("ltpa: the LTPA head these layers belong to no longer exists")
        amap: Tensor = head.map_of(index, features)
        return amap

    def extra_repr(self) -> str:
        """The fallback, for ``repr``."""
        return f"fallback={self.fallback!r}"
