"""The demo's figure: attention maps of the teacher, the baseline student and the AT student."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from athooks.registry import mapping as make_mapping

__all__ = ["attention_figure", "layer_maps"]


@torch.no_grad()
def layer_maps(model: nn.Module, images: Tensor, layer: str, device: str = "cpu") -> Tensor:
    """Normalised ``sum_c A^2`` maps of ``layer`` for ``images``, upsampled to the image size."""
    captured: list[Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, a, out: captured.append(out.detach())
    )
    try:
        model.eval()
        model(images.to(device))
    finally:
        handle.remove()
    q = make_mapping("sum_p", p=2)(captured[-1]).cpu()
    q = q / q.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return F.interpolate(q[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[
        :, 0
    ]


def attention_figure(
    teacher: nn.Module,
    baseline: nn.Module,
    with_at: nn.Module,
    images: Tensor,
    path: str | Path,
    device: str = "cpu",
    layer: str = "layer2",
) -> Path:
    """Write a PNG: one row per image, columns image, teacher, baseline student, AT student.

    Args:
        teacher: The teacher.
        baseline: The student trained without attention transfer.
        with_at: The student trained with it.
        images: A few test images ``(N, 1, H, W)``.
        path: Where to write the PNG.
        device: Where the models are.
        layer: The layer whose attention is drawn (``layer2``: stride 2, 16x16).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("teacher", teacher), ("student", baseline), ("student + AT", with_at)]
    maps = [layer_maps(model, images, layer, device) for _, model in columns]
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n), squeeze=False)
    for i in range(n):
        img = images[i, 0].numpy()
        axes[i][0].imshow(img, cmap="gray")
        for j, (title, _) in enumerate(columns, start=1):
            axes[i][j].imshow(img, cmap="gray")
            axes[i][j].imshow(maps[j - 1][i].numpy(), cmap="viridis", alpha=0.6, vmin=0, vmax=1)
            if i == 0:
                axes[i][j].set_title(f"{title}\n{layer}, sum_p p=2", fontsize=9)
        if i == 0:
            axes[i][0].set_title("test image", fontsize=9)
        for ax in axes[i]:
            ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
