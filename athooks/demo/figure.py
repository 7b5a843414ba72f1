"""The demo's figure: attention maps of the teacher, the baseline student and the AT student.

Drawn with :func:`athooks.viz.compare`; matplotlib is needed (the ``viz`` extra).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

__all__ = ["attention_figure"]


def attention_figure(
    teacher: nn.Module,
    baseline: nn.Module,
    with_at: nn.Module,
    images: Tensor,
    path: str | Path,
    device: str = "cpu",
    layers: str | list[tuple[str, str]] = "auto",
    dpi: int = 80,
) -> Path:
    """Write a figure: for each image, a row per model (teacher, student, student + AT).

    Args:
        teacher: The teacher.
        baseline: The student trained without attention transfer.
        with_at: The student trained with it.
        images: A few test images ``(N, C, H, W)``.
        path: Where to write the figure (``.png`` or ``.pdf``).
        device: Where the models are.
        layers: The layers to draw, as for :class:`athooks.Distiller` (default: every stage).
        dpi: Resolution; a panel is 2 inches square.

    Returns:
        The path written.
    """
    from athooks.viz import compare

    fig = compare(
        teacher,
        {"student": baseline, "student + AT": with_at},
        images.to(device),
        layers,
        "sum_p",
        p=2,
        display=images.cpu(),
        dpi=dpi,
    )
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path
