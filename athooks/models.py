"""CIFAR-style wide residual networks (WRN-d-k), as in the authors' attention-transfer code.

``WRN-d-k``: depth ``d = 6n + 4`` (``n`` blocks per group), widths ``(16k, 32k, 64k)`` after a
16-channel 3x3 stem convolution, pre-activation basic blocks (BN-ReLU-conv, twice), a 1x1
convolution on the pre-activated input as shortcut when the width or stride changes, no dropout;
then BN-ReLU, global average pooling and a linear classifier. The three group outputs
(``layer1``, ``layer2``, ``layer3``, strides 1, 2 and 4, before the final BN-ReLU) are where the
authors' CIFAR code transfers attention; they are listed in ``feature_info`` so that
``layers="auto"`` picks exactly them.

Parameter counts match the paper: WRN-16-1 0.175M, WRN-16-2 0.69M, WRN-40-1 0.56M, WRN-40-2 2.24M.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from athooks.errors import ConfigurationError

__all__ = ["WRN", "PreActBlock", "create_model", "list_models", "wrn"]


class PreActBlock(nn.Module):
    """A pre-activation basic block: ``conv(relu(bn(conv(relu(bn(x)))))) + shortcut``.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the first convolution (and of the 1x1 shortcut).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if in_chs != out_chs or stride != 1:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        o1: Tensor = self.relu1(self.bn1(x))
        z: Tensor = self.conv2(self.relu2(self.bn2(self.conv1(o1))))
        shortcut: Tensor = self.shortcut(o1) if self.shortcut is not None else x
        return z + shortcut


class WRN(nn.Module):
    """A wide residual network WRN-depth-width for 32x32 inputs (any size works).

    Args:
        depth: ``6n + 4`` (16, 22, 28, 40, ...).
        width: The widening factor ``k``.
        num_classes: Classifier outputs.
        in_chans: Input channels.

    Example:
        ```python
        import torch
        from athooks.models import WRN

        net = WRN(16, 1, num_classes=10)
        print(net(torch.randn(2, 3, 32, 32)).shape, sum(p.numel() for p in net.parameters()))
        ```
    """

    def __init__(self, depth: int = 16, width: int = 1, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigurationError(
                f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}"
            )
        if width < 1:
            raise ConfigurationError(f"WRN width must be >= 1, got {width}")
        n = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.depth, self.width, self.num_classes = depth, width, num_classes
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        chs = 16
        groups = []
        for out_chs, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = [PreActBlock(chs, out_chs, stride)]
            blocks += [PreActBlock(out_chs, out_chs) for _ in range(n - 1)]
            groups.append(nn.Sequential(*blocks))
            chs = out_chs
        self.layer1, self.layer2, self.layer3 = groups
        self.bn = nn.BatchNorm2d(chs)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(chs, num_classes)
        self.feature_info = [
            {"module": f"layer{i + 1}", "num_chs": c, "reduction": r}
            for i, (c, r) in enumerate(zip(widths, (1, 2, 4), strict=True))
        ]
        self.pretrained_cfg = {"input_size": (in_chans, 32, 32)}
        self._init_weights()

    def _init_weights(self) -> None:
        # the authors' initialisation: kaiming-normal convs and classifier, BN weights U(0, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """The feature map after the last group's BN-ReLU."""
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out: Tensor = self.relu(self.bn(x))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        x = self.forward_features(x)
        logits: Tensor = self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return logits

    def extra_repr(self) -> str:
        """The architecture's name, for ``repr``."""
        return f"WRN-{self.depth}-{self.width}"


def wrn(depth: int, width: int, **kwargs: Any) -> WRN:
    """Build a WRN-depth-width (see :class:`WRN`).

    Args:
        depth: ``6n + 4``.
        width: The widening factor.
        **kwargs: ``num_classes``, ``in_chans``.

    Returns:
        The model, randomly initialised.
    """
    return WRN(depth, width, **kwargs)


_NAMES = {"wrn16_1": (16, 1), "wrn16_2": (16, 2), "wrn40_1": (40, 1), "wrn40_2": (40, 2)}


def list_models() -> list[str]:
    """Names of the models :func:`create_model` builds.

    Returns:
        The names, e.g. ``"wrn16_1"``.
    """
    return sorted(_NAMES)


def create_model(name: str, **kwargs: Any) -> WRN:
    """Build a model by name: ``"wrn16_1"``, ``"wrn40_2"``, ..., any ``"wrn<depth>_<width>"``.

    Args:
        name: The model name.
        **kwargs: ``num_classes``, ``in_chans``.

    Returns:
        The model.

    Raises:
        ConfigurationError: For an unknown name.

    Example:
        ```python
        from athooks.models import create_model

        print(create_model("wrn16_2", num_classes=10))
        ```
    """
    import re

    match = re.fullmatch(r"wrn(\d+)_(\d+)", name)
    if match is None:
        raise ConfigurationError(
            f"unknown athooks model {name!r}; athooks ships {', '.join(list_models())} "
            "(or any wrn<depth>_<width>)"
        )
    return WRN(int(match.group(1)), int(match.group(2)), **kwargs)
