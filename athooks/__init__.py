"""athooks: attention transfer for any PyTorch teacher/student pair, inside your own training loop.

Example:
    ```python
    import torch
    import torch.nn.functional as F
    import torchvision
    import athooks

    teacher = torchvision.models.resnet34(num_classes=10)
    student = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    with athooks.Distiller(teacher, student, layers="layer?") as d:
        loss = F.cross_entropy(student(x), y) + d.loss()
        loss.backward()
    ```
"""

import importlib
from typing import Any

from athooks import schedules
from athooks.discovery import describe
from athooks.distiller import Distiller
from athooks.errors import (
    AthooksError,
    CaptureError,
    ConfigurationError,
    LayerResolutionError,
    PairingWarning,
    PluginError,
    UnknownNameError,
)
from athooks.layers import Layer, list_layers
from athooks.losses import Loss, Step
from athooks.losses.base import loss
from athooks.mappings import Mapping, mapping
from athooks.registry import get_plugin_manager, list_losses, list_mappings
from athooks.version import __version__


def __getattr__(name: str) -> Any:
    # athooks.viz is loaded on first use, so `import athooks` stays light (no numpy plotting,
    # and matplotlib is imported only when something is drawn).
    if name == "viz":
        return importlib.import_module("athooks.viz")
    raise AttributeError(f"module 'athooks' has no attribute {name!r}")


__all__ = [
    "AthooksError",
    "CaptureError",
    "ConfigurationError",
    "Distiller",
    "Layer",
    "LayerResolutionError",
    "Loss",
    "Mapping",
    "PairingWarning",
    "PluginError",
    "Step",
    "UnknownNameError",
    "__version__",
    "describe",
    "get_plugin_manager",
    "list_layers",
    "list_losses",
    "list_mappings",
    "loss",
    "mapping",
    "schedules",
    "viz",
]
