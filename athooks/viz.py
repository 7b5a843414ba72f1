"""See the attention: attention maps of any model, drawn over the images they came from.

* :func:`attention_maps` runs a model on images and returns ``{layer: (B, H, W)}`` attention maps,
  with the layers chosen as :class:`athooks.Distiller` chooses them (``"auto"``, ``"blocks"``,
  names or patterns).
* :func:`plot_maps` draws them: one row per image, one panel per layer, each map upsampled to the
  image and drawn over it.
* :func:`compare` draws a teacher's maps next to one or more students' at the paired stages.
* :func:`overlay` blends one map over one image and returns the picture as an array.

Maps are upsampled bilinearly to the image size and min-max scaled to [0, 1] per panel before
they are coloured with a perceptually uniform colour map (``viridis`` by default), so a panel shows
where a layer looks, not how strongly compared with another panel.

matplotlib is needed only to draw (:func:`plot_maps`, :func:`compare`, :func:`overlay`); it is
imported by those functions, never by :mod:`athooks` itself. Install it with the ``viz`` extra:
``pip install "athooks[viz]"``.

Example:
    ```python
    import torch
    import torchvision
    import athooks.viz

    model = torchvision.models.resnet18(num_classes=10)
    images = torch.rand(2, 3, 64, 64)
    maps = athooks.viz.attention_maps(model, images, layers="auto", mapping="sum_p", p=2)
    print({name: tuple(m.shape) for name, m in maps.items()})
    fig = athooks.viz.plot_maps(images, maps)  # 2 rows x 4 panels
    ```
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from athooks.context import internal_run
from athooks.discovery import (
    auto_pairs,
    conversion,
    metadata_modules,
    probe,
    stage_blocks,
    stage_layers,
)
from athooks.errors import CaptureError, ConfigurationError
from athooks.layers import Layer, match_modules, resolve_pairs, unwrap
from athooks.mappings import as_mapping
from athooks.taps import TapSet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "AttentionMaps",
    "MapInfo",
    "attention_maps",
    "compare",
    "load_image",
    "overlay",
    "plot_across_p",
    "plot_maps",
    "upsample",
]

#: Height and width of one panel, in inches.
PANEL_INCHES = 2.0


@dataclass(frozen=True)
class MapInfo:
    """Where a map comes from, for titles.

    Attributes:
        layer: The module's name in the (unwrapped) model.
        stride: Input height divided by the map's height (``None`` if unknown).
        mapping: The mapping, as it prints (``sum_p(p=2)``).
    """

    layer: str
    stride: int | None
    mapping: str

    def title(self) -> str:
        """``layer3 · stride 16 · sum_p(p=2)``."""
        stride = f" · stride {self.stride}" if self.stride else ""
        return f"{self.layer}{stride} · {self.mapping}"


class AttentionMaps(dict[str, Tensor]):
    """``{layer: (B, H, W)}`` attention maps, in layer order, with :attr:`info` for titles.

    A plain :class:`dict` in every other respect.

    Attributes:
        info: ``{layer: MapInfo}``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.info: dict[str, MapInfo] = {}


def _require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "athooks.viz needs matplotlib to draw; install it with: pip install 'athooks[viz]' "
            "(or pip install matplotlib)"
        ) from None
    return matplotlib


def _as_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor):
        raise ConfigurationError(
            f"images must be a tensor (B, C, H, W) or (C, H, W), got {type(images).__name__}"
        )
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4:
        raise ConfigurationError(
            f"images must be a tensor (B, C, H, W) or (C, H, W), got shape {tuple(images.shape)}"
        )
    return images


@dataclass(frozen=True)
class _Converted:
    """A layer's own transform, or else the conversion the model's metadata implies (tokens)."""

    model: nn.Module
    transform: Any = None

    def __call__(self, features: Tensor) -> Tensor:
        if self.transform is not None:
            out: Tensor = self.transform(features)
            return out
        convert = conversion(self.model, features) if features.dim() != 4 else None
        return convert(features) if convert is not None else features


def _stages(model: nn.Module, layers: Any, images: Tensor) -> list[tuple[str, Layer, int | None]]:
    """``(name, layer, stride)`` of every module to read, in the order given."""
    inner, _ = unwrap(model)
    if isinstance(layers, str) and layers in ("auto", "blocks"):
        infos = probe(inner, example=((images[:1],), {}))
        stages = stage_layers(inner, infos=infos)
        if layers == "blocks":
            by_name = {i.name: i for i in infos}
            listed = metadata_modules(inner)
            blocks = [b for s in stages for b in (stage_blocks(inner, s, by_name, listed) or [s])]
            stages = blocks
        return [(s.name, s.layer(), s.stride) for s in stages]
    specs = [layers] if isinstance(layers, (str, Layer)) else list(layers)
    out: list[tuple[str, Layer, int | None]] = []
    for spec in specs:
        if not isinstance(spec, (str, Layer)):
            raise ConfigurationError(
                f"layers: expected 'auto', 'blocks', a layer name or pattern, athooks.Layer, or a "
                f"list of them; got {type(spec).__name__}: {spec!r}"
            )
        layer = spec if isinstance(spec, Layer) else Layer(spec)
        out.extend((name, layer, None) for name, _ in match_modules(inner, layer.pattern))
    return out


@torch.no_grad()
def attention_maps(
    model: nn.Module,
    images: Tensor,
    layers: Any = "auto",
    mapping: Any = "sum_p",
    **mapping_options: Any,
) -> AttentionMaps:
    """Run ``model`` on ``images`` and return the attention maps of ``layers``.

    The model runs once, in eval mode under ``no_grad``, on its own device (each module's training
    flag is restored afterwards). Each map is computed as its layer's output is produced, so a
    later in-place operation cannot change it.

    Args:
        model: Any model (DataParallel, DDP and ``torch.compile`` wrappers are looked through).
        images: ``(B, C, H, W)`` or one image ``(C, H, W)``, prepared as the model expects.
        layers: ``"auto"`` (the stage outputs, one per stride, as :class:`athooks.Distiller`
            picks them), ``"blocks"`` (every block of those stages), a layer name or pattern, an
            :class:`athooks.Layer`, or a list of them.
        mapping: A registered mapping name (``"sum_p"``, ``"sum"``, ``"max_p"``, a plugin's), a
            :class:`athooks.Mapping`, or a callable ``(B, C, H, W) -> (B, H, W)``.
        **mapping_options: Options of a named mapping, e.g. ``p=4``.

    Returns:
        ``{layer: (B, H, W)}`` as float32 CPU tensors at the layer's own resolution, in layer
        order; its ``info`` gives each layer's stride and mapping.

    Raises:
        ConfigurationError: If the images or the layers argument are malformed.
        LayerResolutionError: If a pattern matches no module.
        CaptureError: If a layer did not run or its output is not a feature map.

    Example:
        ```python
        import torch
        import torchvision
        from athooks.viz import attention_maps

        model = torchvision.models.resnet18()
        maps = attention_maps(model, torch.rand(1, 3, 64, 64), layers="layer[34]", p=4)
        assert maps["layer3"].shape == (1, 4, 4)
        print(maps.info["layer4"].title())  # layer4 · stride 32 · sum_p(p=4)
        ```
    """
    images = _as_images(images)
    inner, _ = unwrap(model)
    amap = as_mapping(mapping, **mapping_options)
    size = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    param = next(inner.parameters(), None)
    device = param.device if param is not None else images.device
    dtype = param.dtype if param is not None and param.is_floating_point() else images.dtype
    images = images.to(device=device, dtype=dtype)
    stages = _stages(inner, layers, images)
    amap = amap.to(device)
    taps = TapSet("model", inner, [amap])
    indices = [
        taps.add(name, inner.get_submodule(name), Layer(name, layer.select, _Converted(inner, t)))
        for name, layer, _ in stages
        for t in (layer.transform,)
    ]
    flags = [(m, m.training) for m in inner.modules()]
    taps.attach()
    try:
        for module, _ in flags:
            module.training = False
        with internal_run():
            store = taps.arm()
            inner(images)
    finally:
        taps.detach()
        for module, flag in flags:
            module.training = flag
    captured = {
        name: store[i].values[amap]
        for (name, _, _), i in zip(stages, indices, strict=True)
        if i in store
    }
    label = str(amap).removesuffix("()")  # "sum_p(p=2)", "sum"
    maps = AttentionMaps()
    for name, _, stride in stages:
        if name not in captured:
            raise CaptureError(
                f"layer {name!r} did not run in the model's forward, so it has no attention map; "
                "pick layers that run (see `athooks layers <model>`)"
            )
        # moved to the CPU only now: a mapping may complete its map later in the same forward
        got = captured[name].float().cpu()
        if stride is None and got.dim() == 3 and got.shape[1] > 0:
            stride = max(1, round(size[1] / got.shape[1]))
        maps[name] = got
        maps.info[name] = MapInfo(name, stride, label)
    return maps


def upsample(amap: Tensor, size: Sequence[int]) -> Tensor:
    """Upsample maps ``(H, W)`` or ``(B, H, W)`` bilinearly to ``size`` (no corner alignment).

    Args:
        amap: The map(s).
        size: ``(H, W)`` of the image.

    Returns:
        The map(s) at ``size``, float32.

    Example:
        ```python
        import torch
        from athooks.viz import upsample

        assert upsample(torch.rand(4, 4), (32, 32)).shape == (32, 32)
        ```
    """
    one = amap.dim() == 2
    batch = amap[None] if one else amap
    out = F.interpolate(
        batch[:, None].float(),
        size=tuple(int(s) for s in size),
        mode="bilinear",
        align_corners=False,
    )[:, 0]
    return out[0] if one else out


def load_image(path: str | Path, size: Sequence[int], channels: int = 3) -> Tensor:
    """Read an image file as a ``(C, H, W)`` float tensor in [0, 1], resized to ``size``.

    The whole image is resized (no cropping, so nothing the model sees is hidden from the figure).

    Args:
        path: A file Pillow can read (PNG, JPEG, ...).
        size: ``(H, W)``.
        channels: 1 (converted to grey) or 3 (RGB).

    Returns:
        ``(channels, H, W)`` float32.

    Raises:
        ConfigurationError: If the file cannot be read or ``channels`` is not 1 or 3.

    Example:
        ```python
        import tempfile
        import numpy as np
        from PIL import Image
        from athooks.viz import load_image

        with tempfile.TemporaryDirectory() as folder:
            Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(f"{folder}/x.png")
            assert load_image(f"{folder}/x.png", (32, 32)).shape == (3, 32, 32)
        ```
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ConfigurationError(f"channels must be 1 or 3, got {channels}")
    try:
        with Image.open(path) as img:
            picture = img.convert("L" if channels == 1 else "RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise ConfigurationError(
            f"cannot read image {str(path)!r}: {type(err).__name__}: {err}"
        ) from None
    h, w = int(size[0]), int(size[1])
    picture = picture.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(picture, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(arr.copy())
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return np.asarray(x.detach().float().cpu().numpy())
    return np.asarray(x, dtype=np.float32)


def _image_hwc(image: Any) -> np.ndarray:
    """An image as (H, W, 3) float in [0, 1], min-max scaled (undoes any normalisation's range)."""
    arr = _to_numpy(image).astype(np.float32)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = np.transpose(arr, (1, 2, 0))  # (C, H, W), a tensor's layout
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ConfigurationError(
            f"image must be (H, W), (C, H, W) or (H, W, C) with 1 or 3 channels, got shape "
            f"{tuple(_to_numpy(image).shape)}"
        )
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _scaled(amap: np.ndarray) -> np.ndarray:
    lo, hi = float(amap.min()), float(amap.max())
    return (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)


def overlay(image: Any, amap: Any, *, cmap: str = "viridis", alpha: float = 0.5) -> np.ndarray:
    """Blend an attention map over an image: the map as a heat map, the image shining through.

    The map is upsampled bilinearly to the image's size, min-max scaled to [0, 1] and coloured
    with ``cmap``; the image is min-max scaled (so a normalised input tensor displays as well).

    Args:
        image: ``(C, H, W)`` with 1 or 3 channels (a tensor's layout), ``(H, W, C)`` or ``(H, W)``.
        amap: The attention map ``(h, w)`` at any resolution.
        cmap: A matplotlib colour map name; perceptually uniform ones (``viridis``, ``magma``,
            ``inferno``) show intensity faithfully.
        alpha: Weight of the heat map; ``1`` hides the image.

    Returns:
        ``(H, W, 3)`` float32 RGB in [0, 1], ready for ``plt.imshow`` or saving.

    Raises:
        ConfigurationError: If a shape is wrong.
        ImportError: If matplotlib is not installed.

    Example:
        ```python
        import torch
        from athooks.viz import overlay

        picture = overlay(torch.rand(3, 32, 32), torch.rand(8, 8))
        assert picture.shape == (32, 32, 3)
        ```
    """
    matplotlib = _require_matplotlib()
    if not 0.0 <= alpha <= 1.0:
        raise ConfigurationError(f"alpha must be in [0, 1], got {alpha}")
    base = _image_hwc(image)
    heat = torch.as_tensor(_to_numpy(amap))
    if heat.dim() != 2:
        raise ConfigurationError(
            f"amap must be one map (H, W), got shape {tuple(heat.shape)}; index the batch first"
        )
    heat_np = _scaled(upsample(heat, base.shape[:2]).numpy())
    coloured = np.asarray(matplotlib.colormaps[cmap](heat_np))[:, :, :3]
    out = (1.0 - alpha) * base + alpha * coloured
    return out.astype(np.float32)


@dataclass
class _Panel:
    image: Any
    amap: Tensor | None
    title: str


def _draw(rows: Sequence[Sequence[_Panel]], *, cmap: str, alpha: float, dpi: int) -> Figure:
    """A figure of ``PANEL_INCHES`` square panels, one per entry of ``rows``."""
    _require_matplotlib()
    from matplotlib.figure import Figure

    nrows = len(rows)
    ncols = max((len(r) for r in rows), default=0)
    if nrows == 0 or ncols == 0:
        raise ConfigurationError("nothing to draw: no images or no maps")
    fig = Figure(figsize=(ncols * PANEL_INCHES, nrows * PANEL_INCHES), dpi=dpi)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.set_axis_off()
            if j >= len(row):
                continue
            panel = row[j]
            if panel.amap is None:
                ax.imshow(_image_hwc(panel.image))
            else:
                ax.imshow(overlay(panel.image, panel.amap, cmap=cmap, alpha=alpha))
            ax.set_title(panel.title, fontsize=7)
    fig.tight_layout(pad=0.3)
    return fig


def _titles(maps: dict[str, Tensor]) -> Iterator[tuple[str, Tensor, str]]:
    info = getattr(maps, "info", {})
    for key, value in maps.items():
        title = info[key].title() if key in info else key
        yield key, value, title


def plot_maps(
    images: Tensor,
    maps: dict[str, Tensor],
    *,
    cmap: str = "viridis",
    alpha: float = 0.5,
    dpi: int = 100,
) -> Figure:
    """Draw attention maps over their images: one row per image, one panel per layer.

    Args:
        images: The images the maps were computed from, ``(B, C, H, W)`` (or ``(C, H, W)``).
        maps: ``{layer: (B, h, w)}``, as :func:`attention_maps` returns; its ``info`` (if any)
            titles each panel with layer, stride and mapping, else the key does.
        cmap: The colour map.
        alpha: Weight of the heat map over the image.
        dpi: Resolution of the figure; each panel is 2 inches square.

    Returns:
        A matplotlib ``Figure`` (``fig.savefig("maps.png")`` or ``"maps.pdf"``). It is not
        registered with pyplot, so it needs no closing.

    Raises:
        ConfigurationError: If the maps' batch size differs from the images'.

    Example:
        ```python
        import torch
        import torchvision
        from athooks.viz import attention_maps, plot_maps

        images = torch.rand(2, 3, 64, 64)
        maps = attention_maps(torchvision.models.resnet18(), images)
        fig = plot_maps(images, maps)
        assert len(fig.axes) == 2 * 4
        ```
    """
    images = _as_images(images)
    entries = list(_titles(maps))
    for key, value, _ in entries:
        if value.dim() != 3 or value.shape[0] != images.shape[0]:
            raise ConfigurationError(
                f"maps[{key!r}] has shape {tuple(value.shape)}; expected "
                f"({images.shape[0]}, h, w), one map per image"
            )
    rows = [
        [_Panel(images[i], value[i], title) for _, value, title in entries]
        for i in range(images.shape[0])
    ]
    return _draw(rows, cmap=cmap, alpha=alpha, dpi=dpi)


def compare(
    teacher: nn.Module,
    student: nn.Module | dict[str, nn.Module],
    images: Tensor,
    layers: Any = "auto",
    mapping: Any = "sum_p",
    *,
    models_as: str = "rows",
    display: Tensor | None = None,
    cmap: str = "viridis",
    alpha: float = 0.5,
    dpi: int = 100,
    **mapping_options: Any,
) -> Figure:
    """Draw a teacher's attention next to one or more students' at the paired layers.

    For each image, one row for the teacher and one per student, and one column per layer pair
    (``models_as="rows"``); or one row per layer pair and one column per model
    (``models_as="columns"``). The pairs are chosen as :class:`athooks.Distiller` chooses them.

    Args:
        teacher: The teacher.
        student: A student, or ``{label: student}`` for several (e.g. a baseline and an AT
            student); each is paired with the teacher separately.
        images: ``(B, C, H, W)`` images both models accept.
        layers: As for :class:`athooks.Distiller`: ``"auto"``, ``"blocks"``, a pattern for both,
            or ``(teacher, student)`` pairs.
        mapping: The mapping name or object.
        models_as: ``"rows"`` or ``"columns"``: how the models are laid out.
        display: The images to draw under the maps (e.g. before normalisation); default
            ``images``.
        cmap: The colour map.
        alpha: Weight of the heat map over the image.
        dpi: Resolution of the figure; each panel is 2 inches square.
        **mapping_options: Options of a named mapping, e.g. ``p=2``.

    Returns:
        A matplotlib ``Figure``.

    Raises:
        ConfigurationError: If ``models_as`` or ``display`` is wrong.

    Example:
        ```python
        import torch
        import torchvision
        from athooks.viz import compare

        teacher = torchvision.models.resnet34()
        resnet18 = torchvision.models.resnet18
        students = {"student": resnet18(), "other": resnet18()}
        fig = compare(teacher, students, torch.rand(1, 3, 64, 64))
        assert len(fig.axes) == 3 * 4  # (teacher + 2 students) x 4 stages
        ```
    """
    images = _as_images(images)
    if models_as not in ("rows", "columns"):
        raise ConfigurationError(f"models_as must be 'rows' or 'columns', got {models_as!r}")
    students = student if isinstance(student, dict) else {"student": student}
    size = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    columns: list[str] = []
    chosen: dict[str, list[tuple[str, str]]] = {}  # label -> [(teacher layer, its layer)]
    t_layers: dict[str, Layer] = {}
    s_layers: dict[str, dict[str, Layer]] = {}
    for label, model in students.items():
        if isinstance(layers, str) and layers in ("auto", "blocks"):
            pairing = auto_pairs(teacher, model, layers, input_size=size)
            pairs = [
                (p.teacher.name, p.teacher.layer(), p.student.name, p.student.layer())
                for p in pairing.pairs
            ]
        else:
            pairs = [
                (p.teacher_name, p.teacher_layer, p.student_name, p.student_layer)
                for p in resolve_pairs(teacher, model, layers)
            ]
        chosen[label] = [(tn, sn) for tn, _, sn, _ in pairs]
        s_layers[label] = {}
        for tn, tl, sn, sl in pairs:
            if tn not in t_layers:
                t_layers[tn] = Layer(tn, select=tl.select, transform=tl.transform)
                columns.append(tn)
            s_layers[label][sn] = Layer(sn, select=sl.select, transform=sl.transform)
    t_maps = attention_maps(teacher, images, list(t_layers.values()), mapping, **mapping_options)
    s_maps = {
        label: attention_maps(
            model, images, list(s_layers[label].values()), mapping, **mapping_options
        )
        for label, model in students.items()
    }
    shown = _display(images, display)
    rows: list[list[_Panel]] = []
    for i in range(images.shape[0]):
        block = [
            [
                _Panel(shown[i], t_maps[tn][i], f"teacher\n{t_maps.info[tn].title()}")
                for tn in columns
            ]
        ]
        for label in students:
            by_teacher = dict(chosen[label])
            row = []
            for tn in columns:
                paired = by_teacher.get(tn)
                if paired is None:
                    row.append(_Panel(shown[i], None, f"{label}\nno layer paired with {tn}"))
                else:
                    maps = s_maps[label]
                    title = f"{label}\n{maps.info[paired].title()}"
                    row.append(_Panel(shown[i], maps[paired][i], title))
            block.append(row)
        rows.extend(
            block if models_as == "rows" else [list(col) for col in zip(*block, strict=True)]
        )
    return _draw(rows, cmap=cmap, alpha=alpha, dpi=dpi)


def _display(images: Tensor, display: Tensor | None) -> Tensor:
    shown = images if display is None else _as_images(display)
    if shown.shape[0] != images.shape[0]:
        raise ConfigurationError(
            f"display has {shown.shape[0]} images but images has {images.shape[0]}; give one "
            "picture per input"
        )
    return shown


def plot_across_p(
    model: nn.Module,
    images: Tensor,
    ps: Sequence[float] | None = (1, 2, 4),
    layers: Any = "auto",
    mapping: Any = "sum_p",
    *,
    display: Tensor | None = None,
    cmap: str = "viridis",
    alpha: float = 0.5,
    dpi: int = 100,
    **mapping_options: Any,
) -> Figure:
    """The paper's Figure 4 for any model: maps across layers (columns) and ``p`` (rows).

    Args:
        model: The model.
        images: ``(B, C, H, W)`` input, prepared (normalised) as the model expects.
        ps: The exponents, one row per image and ``p``; ``None`` for one row per image with the
            mapping's own options (for mappings without ``p``, such as ``"sum"``).
        layers: As for :func:`attention_maps`.
        mapping: A mapping name with a ``p`` option (``"sum_p"``, ``"max_p"``), or any mapping
            when ``ps`` is ``None``.
        display: The images to draw under the maps (e.g. before normalisation); default
            ``images``.
        cmap: The colour map.
        alpha: Weight of the heat map over the image.
        dpi: Resolution of the figure; each panel is 2 inches square.
        **mapping_options: Other options of the mapping.

    Returns:
        A matplotlib ``Figure`` with ``B * len(ps)`` rows and one column per layer.

    Example:
        ```python
        import torch
        import torchvision
        from athooks.viz import plot_across_p

        fig = plot_across_p(torchvision.models.resnet18(), torch.rand(1, 3, 64, 64), ps=(1, 2, 4))
        assert len(fig.axes) == 3 * 4
        ```
    """
    images = _as_images(images)
    shown = _display(images, display)
    options: list[dict[str, Any]] = [{}] if ps is None else [{"p": p} for p in ps]
    if not options:
        raise ConfigurationError("ps is empty; give at least one p, or None")
    all_maps = [
        attention_maps(model, images, layers, mapping, **opt, **mapping_options) for opt in options
    ]
    rows = [
        [_Panel(shown[i], value[i], title) for _, value, title in _titles(maps)]
        for i in range(images.shape[0])
        for maps in all_maps
    ]
    return _draw(rows, cmap=cmap, alpha=alpha, dpi=dpi)
