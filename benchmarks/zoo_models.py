"""Home-made models for the zoo benchmark: the input and output layouts no model zoo covers.

Each builder takes ``width`` (a teacher is built wider than its student) and ``num_classes``, and
each model has a stage structure a researcher would recognise (groups of blocks that change the
resolution), so ``layers="auto"`` has something right to find:

- :class:`Conv1dNet`: a 1-D signal ``(B, C, T)`` through three strided stages.
- :class:`TokenTransformer`: a token sequence ``(B, T, C)`` through transformer encoder blocks.
- :class:`KeywordOnlyNet`: a CNN whose forward takes its image as a keyword-only argument.
- :class:`DictOutputNet`: a CNN returning ``{"logits": ..., "features": ...}``.
- :class:`UNet`: an encoder-decoder returning a per-pixel map at the input's size.
- :class:`TwoInputNet`: two images in, one prediction out (a siamese encoder on both).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _conv_block(cin: int, cout: int, stride: int, dim: int = 2) -> nn.Sequential:
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    norm = nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d
    return nn.Sequential(
        conv(cin, cout, 3, stride=stride, padding=1, bias=False),
        norm(cout),
        nn.ReLU(),
        conv(cout, cout, 3, padding=1, bias=False),
        norm(cout),
        nn.ReLU(),
    )


class _Encoder(nn.Module):
    """stem, then three stages at strides 2, 4, 8 (of the stem's output)."""

    def __init__(self, cin: int, width: int, dim: int = 2) -> None:
        super().__init__()
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        self.stem = conv(cin, width, 3, padding=1)
        self.stage1 = _conv_block(width, width, 2, dim)
        self.stage2 = _conv_block(width, 2 * width, 2, dim)
        self.stage3 = _conv_block(2 * width, 4 * width, 2, dim)
        self.out_channels = 4 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.stage3(self.stage2(self.stage1(self.stem(x))))


class Conv1dNet(nn.Module):
    """A 1-D CNN on signals ``(B, C, T)``: stem, three strided stages, pooled classifier."""

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 2) -> None:
        super().__init__()
        self.encoder = _Encoder(in_channels, width, dim=1)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(self.encoder.out_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.encoder(x)).flatten(1))


class TokenTransformer(nn.Module):
    """Transformer encoder blocks on token sequences ``(B, T, C)`` (already embedded)."""

    def __init__(
        self, width: int = 32, num_classes: int = 10, in_features: int = 16, depth: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(
            *(
                nn.TransformerEncoderLayer(
                    width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True
                )
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


class KeywordOnlyNet(nn.Module):
    """A CNN whose forward takes its image as a keyword-only argument: ``model(image=x)``."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.encoder = _Encoder(3, width)
        self.fc = nn.Linear(self.encoder.out_channels, num_classes)

    def forward(self, *, image: Tensor) -> Tensor:
        return self.fc(self.encoder(image).mean((2, 3)))


class DictOutputNet(nn.Module):
    """A CNN returning a dict: ``{"logits": (B, K), "features": (B, C, h, w)}``."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.encoder = _Encoder(3, width)
        self.fc = nn.Linear(self.encoder.out_channels, num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.encoder(x)
        return {"logits": self.fc(features.mean((2, 3))), "features": features}


class UNet(nn.Module):
    """An encoder-decoder with skip connections; returns ``(B, K, H, W)`` per-pixel logits."""

    def __init__(self, width: int = 16, num_classes: int = 3) -> None:
        super().__init__()
        w = width
        self.enc1 = _conv_block(3, w, 1)
        self.enc2 = _conv_block(w, 2 * w, 2)
        self.enc3 = _conv_block(2 * w, 4 * w, 2)
        self.bottleneck = _conv_block(4 * w, 8 * w, 2)
        self.up3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, stride=2)
        self.dec3 = _conv_block(8 * w, 4 * w, 1)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _conv_block(4 * w, 2 * w, 1)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = _conv_block(2 * w, w, 1)
        self.final_conv = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        b = self.bottleneck(e3)
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.final_conv(d1)


class TwoInputNet(nn.Module):
    """Two images in (``model(a, b)``), one prediction out: a shared encoder on each, fused."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.encoder = _Encoder(3, width)
        self.fuse = _conv_block(2 * self.encoder.out_channels, self.encoder.out_channels, 1)
        self.fc = nn.Linear(self.encoder.out_channels, num_classes)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        fused = self.fuse(torch.cat([self.encoder(a), self.encoder(b)], 1))
        return self.fc(fused.mean((2, 3)))
