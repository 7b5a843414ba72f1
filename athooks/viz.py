"""See the attention: attention maps of any model, drawn over the images they came from.

* :func:`attention_maps` runs a model on images and returns ``{layer: (B, H, W)}`` attention maps,
  with the layers chosen as :class:`athooks.Distiller` chooses them (``"auto"``, ``"blocks"``,
  names or patterns). 1-D signals ``(B, C, T)`` give ``(B, T)`` maps, videos ``(B, C, T, H, W)``
  give ``(B, T, H, W)``.
* :func:`plot_maps` draws them: one row per image, one panel per layer, each map upsampled to the
  image and drawn over it; a 1-D map as a heat strip behind the signal's curves; a video map
  frame by frame, a row of frames per video and layer.
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
from athooks.layers import (
    ALL_TENSORS,
    Layer,
    expand_deferred,
    layer_label,
    match_modules,
    resolve_pairs,
    unwrap,
)
from athooks.mappings import as_mapping
from athooks.plan import output_keys
from athooks.taps import TapSet, refuse_tokens

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
        stride: Input height divided by the map's height (``None`` if unknown); the length's
            ratio for 1-D maps, the frames' height's for videos.
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
    """``{layer: (B, *S)}`` attention maps, in layer order, with :attr:`info` for titles.

    ``(B, H, W)`` for images, ``(B, T)`` for 1-D signals, ``(B, T, H, W)`` for videos; a layer
    read at several keys of its output has one entry per key, ``"fpn['0']"``.

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


_INPUTS = "(B, C, H, W) or (C, H, W) images, (B, C, T) signals or (B, C, T, H, W) videos"


def _first_conv_is_1d(model: nn.Module | None) -> bool:
    for m in model.modules() if model is not None else ():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return isinstance(m, nn.Conv1d)
    return False


def _as_images(images: Tensor, model: nn.Module | None = None, *, signals: bool = False) -> Tensor:
    """A batch: images ``(B, C, H, W)``, signals ``(B, C, T)`` or videos ``(B, C, T, H, W)``.

    A 3-D tensor is one image ``(C, H, W)``, unless ``signals`` is set or the model's first
    convolution is 1-D: then it is a batch of signals.
    """
    if not isinstance(images, Tensor):
        raise ConfigurationError(f"images must be a tensor: {_INPUTS}; got {type(images).__name__}")
    if images.dim() == 3 and not (signals or _first_conv_is_1d(model)):
        images = images[None]
    if images.dim() not in (3, 4, 5):
        raise ConfigurationError(
            f"images must be a tensor: {_INPUTS}; got shape {tuple(images.shape)}"
        )
    return images


@dataclass(frozen=True)
class _Converted:
    """A layer's own transform, or else the conversion the model's metadata implies (tokens)."""

    model: nn.Module
    transform: Any = None
    module: nn.Module | None = None
    where: str = ""

    def __call__(self, features: Tensor) -> Tensor:
        if self.transform is not None:
            out: Tensor = self.transform(features)
            return out
        convert = conversion(self.model, features) if features.dim() != 4 else None
        if convert is not None:
            converted: Tensor = convert(features)
            return converted
        if self.module is not None:
            refuse_tokens(self.module, features, self.where)
        return features


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
        found = [name for name, _ in match_modules(inner, layer.pattern)]
        keys: dict[str, list[int | str] | None] = {}
        if layer.select == ALL_TENSORS:
            keys = output_keys(inner, found, (images[:1],), {})
        for name in found:
            if layer.select == ALL_TENSORS and keys.get(name) is None:
                raise ConfigurationError(
                    f"layers: Layer({layer.pattern!r}, select='*') reads every tensor of a dict, "
                    f"tuple or list output, but layer {name!r} returned a single tensor; drop "
                    "select='*' for it"
                )
            out.extend((name, one, None) for one in layer.expand(keys.get(name)))
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
        images: ``(B, C, H, W)`` or one image ``(C, H, W)``, prepared as the model expects; or
            1-D signals ``(B, C, T)`` (a 3-D input is read as signals when the model's first
            convolution is an ``nn.Conv1d``, else as one image) or videos ``(B, C, T, H, W)``.
        layers: ``"auto"`` (the stage outputs, one per stride, as :class:`athooks.Distiller`
            picks them), ``"blocks"`` (every block of those stages), a layer name or pattern, an
            :class:`athooks.Layer`, or a list of them.
        mapping: A registered mapping name (``"sum_p"``, ``"sum"``, ``"max_p"``, a plugin's), a
            :class:`athooks.Mapping`, or a callable ``(B, C, *S) -> (B, *S)``.
        **mapping_options: Options of a named mapping, e.g. ``p=4``.

    Returns:
        ``{layer: (B, *S)}`` as float32 CPU tensors at the layer's own resolution, in layer
        order (``(B, H, W)`` for images, ``(B, T)`` for signals, ``(B, T, H, W)`` for videos;
        a layer read at several keys gives one entry per key, ``"fpn['0']"``); its ``info``
        gives each layer's stride and mapping.

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
        net1d = torch.nn.Sequential(torch.nn.Conv1d(2, 8, 3, stride=2), torch.nn.ReLU())
        assert attention_maps(net1d, torch.rand(4, 2, 33), layers="1")["1"].shape == (4, 16)
        ```
    """
    inner, _ = unwrap(model)
    images = _as_images(images, inner)
    amap = as_mapping(mapping, **mapping_options)
    size = tuple(int(n) for n in images.shape[1:])
    param = next(inner.parameters(), None)
    device = param.device if param is not None else images.device
    dtype = param.dtype if param is not None and param.is_floating_point() else images.dtype
    images = images.to(device=device, dtype=dtype)
    stages = _stages(inner, layers, images)
    amap = amap.to(device)
    taps = TapSet("model", inner, [amap])
    labels = [layer_label(name, layer) for name, layer, _ in stages]
    indices = [
        taps.add(
            name,
            module,
            Layer(
                name, layer.select, _Converted(inner, layer.transform, module, f"layer {label!r}")
            ),
        )
        for (name, layer, _), label in zip(stages, labels, strict=True)
        for module in (inner.get_submodule(name),)
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
        key: store[i].values[amap] for key, i in zip(labels, indices, strict=True) if i in store
    }
    label = str(amap).removesuffix("()")  # "sum_p(p=2)", "sum"
    maps = AttentionMaps()
    for key, (name, _, stride) in zip(labels, stages, strict=True):
        if key not in captured:
            raise CaptureError(
                f"layer {name!r} did not run in the model's forward, so it has no attention map; "
                "pick layers that run (see `athooks layers <model>`)"
            )
        # moved to the CPU only now: a mapping may complete its map later in the same forward
        got = captured[key].float().cpu()
        # the height's ratio (images, video frames), the length's for 1-D maps
        axis = -2 if got.dim() >= 3 else -1
        if stride is None and got.dim() >= 2 and got.shape[axis] > 0 and len(size) >= 2:
            stride = max(1, round(size[axis] / got.shape[axis]))
        maps[key] = got
        maps.info[key] = MapInfo(key, stride, label)
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


#: The most channels of a 1-D signal drawn as curves in one panel.
MAX_CURVES = 8


def _draw_signal(ax: Any, signal: Tensor, amap: Tensor | None, *, cmap: str, alpha: float) -> None:
    """A 1-D map as a heat strip across the panel, behind the signal's channels as curves."""
    sig = _to_numpy(signal)
    if sig.ndim == 1:
        sig = sig[None]
    length = sig.shape[-1]
    curves = sig[:MAX_CURVES]
    lo, hi = float(curves.min()), float(curves.max())
    pad = (hi - lo) * 0.05 or 0.5
    if amap is not None:
        heat = F.interpolate(
            torch.as_tensor(_to_numpy(amap))[None, None].float(),
            size=length,
            mode="linear",
            align_corners=False,
        )[0]
        ax.imshow(
            _scaled(heat.numpy()),
            aspect="auto",
            cmap=cmap,
            alpha=alpha,
            extent=(0.0, float(length), lo - pad, hi + pad),
            vmin=0.0,
            vmax=1.0,
        )
    t = np.arange(length) + 0.5
    for curve in curves:
        ax.plot(t, curve, color="black", linewidth=0.8)
    ax.set_xlim(0.0, float(length))
    ax.set_ylim(lo - pad, hi + pad)


def _frames(
    video: Tensor, amap: Tensor | None, title: str, shown: int | None = None
) -> list[_Panel]:
    """A video ``(C, T, H, W)`` and its map ``(t, h, w)`` as one panel per frame.

    The map is resized along time to the video's frames (linear, ``align_corners=False``); each
    frame's map is then drawn over the frame as an image's is.
    """
    frames = int(video.shape[1])
    if amap is not None and amap.shape[0] != frames:
        amap = F.interpolate(
            amap[None, None].float(),
            size=(frames, int(amap.shape[1]), int(amap.shape[2])),
            mode="trilinear",
            align_corners=False,
        )[0, 0]
    count = frames if shown is None else min(frames, shown)
    return [
        _Panel(video[:, k], None if amap is None else amap[k], f"{title}\nframe {k}")
        for k in range(count)
    ]


def _layout(rows: Sequence[Sequence[_Panel]]) -> list[list[_Panel]]:
    """Rows of panels as drawn: a video's panel becomes a row of its frames."""
    out: list[list[_Panel]] = []
    for row in rows:
        if any(isinstance(p.image, Tensor) and p.image.dim() == 4 for p in row):
            out.extend(_frames(p.image, p.amap, p.title) for p in row)
        else:
            out.append(list(row))
    return out


def _draw(rows: Sequence[Sequence[_Panel]], *, cmap: str, alpha: float, dpi: int) -> Figure:
    """A figure of ``PANEL_INCHES`` square panels, one per entry of ``rows``."""
    _require_matplotlib()
    from matplotlib.figure import Figure

    rows = _layout(rows)
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
            if isinstance(panel.image, Tensor) and panel.image.dim() <= 2:  # a 1-D signal
                ax.set_axis_on()
                ax.set_xticks([])
                ax.set_yticks([])
                _draw_signal(ax, panel.image, panel.amap, cmap=cmap, alpha=alpha)
            elif panel.amap is None:
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

    1-D signals ``(B, C, T)`` with maps ``(B, t)``: one row per signal, one panel per layer, the
    map as a heat strip (upsampled linearly to ``T``) behind the signal's channels (at most
    :data:`MAX_CURVES`) drawn as curves. Videos ``(B, C, T, H, W)`` with maps ``(B, t, h, w)``:
    one row per video and layer, one panel per frame, the map resized along time to the ``T``
    frames and drawn over each frame as over an image.

    Args:
        images: The inputs the maps were computed from: images ``(B, C, H, W)`` (or one
            ``(C, H, W)``), signals ``(B, C, T)`` or videos ``(B, C, T, H, W)``.
        maps: ``{layer: (B, *s)}``, as :func:`attention_maps` returns; its ``info`` (if any)
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
        signals = torch.rand(3, 2, 40)  # (B, C, T): 3 rows, 1 panel each
        net1d = torch.nn.Sequential(torch.nn.Conv1d(2, 8, 5, stride=2))
        fig = plot_maps(signals, attention_maps(net1d, signals, layers="0"))
        assert len(fig.axes) == 3 and len(fig.axes[0].lines) == 2
        ```
    """
    entries = list(_titles(maps))
    signals = images.dim() == 3 if isinstance(images, Tensor) else False
    signals = signals and any(value.dim() == 2 for _, value, _ in entries)
    images = _as_images(images, signals=signals)
    want = {3: "t", 4: "h, w", 5: "t, h, w"}[images.dim()]
    for key, value, _ in entries:
        if value.dim() != images.dim() - 1 or value.shape[0] != images.shape[0]:
            raise ConfigurationError(
                f"maps[{key!r}] has shape {tuple(value.shape)}; expected "
                f"({images.shape[0]}, {want}), one map per input of shape "
                f"{tuple(images.shape[1:])}"
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
        images: ``(B, C, H, W)`` images both models accept, or ``(B, C, T)`` signals or
            ``(B, C, T, H, W)`` videos (drawn as :func:`plot_maps` draws them).
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
    images = _as_images(images, unwrap(student if isinstance(student, nn.Module) else teacher)[0])
    if models_as not in ("rows", "columns"):
        raise ConfigurationError(f"models_as must be 'rows' or 'columns', got {models_as!r}")
    students = student if isinstance(student, dict) else {"student": student}
    size = tuple(int(n) for n in images.shape[1:])
    columns: list[str] = []
    chosen: dict[str, list[tuple[str, str]]] = {}  # label -> [(teacher layer, its layer)]
    t_layers: dict[str, Layer] = {}
    s_layers: dict[str, dict[str, Layer]] = {}
    for label, model in students.items():
        if isinstance(layers, str) and layers in ("auto", "blocks"):
            # images as before (a dummy input of their size); signals and videos: the first one
            pairing = (
                auto_pairs(teacher, model, layers, input_size=size)
                if len(size) == 3
                else auto_pairs(teacher, model, layers, example=((images[:1],), {}))
            )
            pairs = [
                (p.teacher.name, p.teacher.layer(), p.student.name, p.student.layer())
                for p in pairing.pairs
            ]
        else:
            resolved = resolve_pairs(teacher, model, layers)
            if any(p.deferred for p in resolved):  # select="*": the keys of these outputs
                first = (images[:1],)
                t_keys = output_keys(teacher, [p.teacher_name for p in resolved], first, {})
                s_keys = output_keys(model, [p.student_name for p in resolved], first, {})
                resolved = expand_deferred(resolved, t_keys, s_keys)
            pairs = [
                (p.teacher_name, p.teacher_layer, p.student_name, p.student_layer) for p in resolved
            ]
        chosen[label] = [(layer_label(tn, tl), layer_label(sn, sl)) for tn, tl, sn, sl in pairs]
        s_layers[label] = {}
        for tn, tl, sn, sl in pairs:
            t_key = layer_label(tn, tl)
            if t_key not in t_layers:
                t_layers[t_key] = Layer(tn, select=tl.select, transform=tl.transform)
                columns.append(t_key)
            s_layers[label][layer_label(sn, sl)] = Layer(
                sn, select=sl.select, transform=sl.transform
            )
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
    shown = images if display is None else _as_images(display, signals=images.dim() == 3)
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
    images = _as_images(images, unwrap(model)[0])
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
