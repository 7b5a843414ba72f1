"""The plugin: two mappings registered through athooks' public hookspecs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from athooks import CaptureError
from athooks.plugin import Mapping, MappingSpec, hookimpl


class CBAMSpatial(Mapping):
    """CBAM's spatial attention from the channel-wise mean and max maps.

    ``learned=False``: ``(mean_c |A| + max_c |A|) / 2``, on any layout ``(B, C, *S)`` (1-D
    signals, images, videos). ``learned=True``: CBAM's spatial gate without its batch norm,
    ``sigmoid(conv_kxk([mean_c A; max_c A]))``, a 2-D convolution: images ``(B, C, H, W)`` only.

    Args:
        learned: Whether to use the learned gate.
        kernel_size: Its convolution's size (odd).
    """

    name = "cbam_spatial"

    def __init__(self, learned: bool = False, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"cbam_spatial: kernel_size must be odd and positive, got {kernel_size}"
            )
        self.learned = bool(learned)
        self.gate = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2) if learned else None

    def forward(self, features: Tensor) -> Tensor:
        """The spatial map ``(B, *S)``."""
        a = features.float()
        if self.gate is None:
            mag = a.abs()
            return (mag.mean(dim=1) + mag.amax(dim=1)) / 2
        if a.dim() != 4:
            raise CaptureError(
                f"cbam_spatial(learned=True) convolves 2-D maps, so it needs image feature maps "
                f"(B, C, H, W); got shape {tuple(features.shape)}. Use learned=False (any "
                "layout), or tap image layers"
            )
        stacked = torch.stack([a.mean(dim=1), a.amax(dim=1)], dim=1)
        return torch.sigmoid(self.gate(stacked.to(self.gate.weight.dtype))).squeeze(1)

    def extra_repr(self) -> str:
        """Options, for ``repr``."""
        return f"learned={self.learned}"


class SEChannel(Mapping):
    """SE's squeeze: the per-channel global average, a ``(B, C)`` channel descriptor.

    The average runs over every spatial dimension of ``(B, C, *S)``: time for a 1-D signal,
    height and width for an image, time, height and width for a video.
    """

    name = "se_channel"
    is_attention_map = False  # (B, C), not a spatial map: never resized, shapes must agree

    def forward(self, features: Tensor) -> Tensor:
        """Global average per channel."""
        return features.float().mean(dim=tuple(range(2, features.dim())))


@hookimpl
def athooks_mappings() -> list[MappingSpec]:
    """The mappings of this package."""
    return [
        MappingSpec("cbam_spatial", CBAMSpatial, "CBAM spatial map from channel mean and max"),
        MappingSpec("se_channel", SEChannel, "SE squeeze: per-channel global average (B, C)"),
    ]
