"""Reading a module's output as a feature map: its layout, its conversion, its stride.

:mod:`athooks.discovery` records what every module of a model returns on a real input and asks
this module what each output *is*:

* its **layout**: ``NCHW`` (images), ``NHWC`` (channels last: Swin), ``tokens`` (a ViT's
  ``(B, prefix + H*W, C)``, laid on the patch grid; MViT's ``(B, prefix + T*H*W, C)``),
  ``NCL`` (1-D signals, ``(B, C, T)``), ``NLC`` (token sequences, ``(B, T, C)``), ``NCTHW``
  (video), ``NTHWC`` (channels-last video: Swin3D), or none (not a feature map);
* the **conversion** (a :class:`athooks.Layer` transform) that turns it into ``(B, C, *S)``:
  :class:`TokensToMap`, :class:`ChannelsLastToFirst`, or none;
* its **stride**: the input's size over the map's, along the height (the only axis of a 1-D
  map), rounded to the nearest power of two, so that maps of odd sizes (Inception's 13x13 at
  128 px: 9.8) read as the strides they stand for (8).

Layouts are read from the tensor and the model's own modules: timm metadata first
(``num_prefix_tokens`` and ``patch_embed.grid_size``, ``output_fmt="NHWC"``), else the channel
counts the model's modules declare (a ``LayerNorm``'s or ``Linear``'s width in the last
dimension means channels last, a convolution's or ``BatchNorm``'s in the second means channels
first), the module that produced the output (a ``Permute``, a ``LayerNorm``), and the input:
tokens of an image model lie on a grid of the image's aspect ratio, with up to 8 prefix tokens
(class, distillation, register tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from athooks.errors import CaptureError
from athooks.layers import unwrap
from athooks.tensors import first_tensor, slice_batch

__all__ = [
    "ChannelsLastToFirst",
    "Example",
    "InputGeometry",
    "conversion",
    "default_input_size",
    "metadata_modules",
    "pair_input_size",
    "ModelGeometry",
    "OutputLayout",
    "TokensToMap",
    "batch_of",
    "detector_input",
    "input_geometry",
    "is_image_list",
    "map_strides",
    "pow2_stride",
    "read_layout",
    "samples_differ",
    "two_samples",
]

Example = tuple[tuple[Any, ...], dict[str, Any]]

MAX_PREFIX = 8

_FIRST_KINDS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_LAST_KINDS = ("LayerNorm", "Linear", "Permute", "RMSNorm", "MultiheadAttention", "Embedding")


@dataclass(frozen=True)
class TokensToMap:
    """Turn ViT tokens ``(B, N, C)`` into a feature map ``(B, C, *grid)`` on the patch grid.

    Args:
        prefix: Number of leading non-patch tokens (class, distillation, register tokens).
        grid: The patch grid: ``(H, W)`` for images, ``(T, H, W)`` for video tokens.

    Example:
        ```python
        import torch
        from athooks.discovery import TokensToMap

        to_map = TokensToMap(prefix=1, grid=(4, 4))
        assert to_map(torch.randn(2, 17, 192)).shape == (2, 192, 4, 4)
        assert TokensToMap(1, (2, 4, 4))(torch.randn(2, 33, 96)).shape == (2, 96, 2, 4, 4)
        ```
    """

    prefix: int
    grid: tuple[int, ...]

    def __call__(self, tokens: Tensor) -> Tensor:
        """Drop the prefix tokens and reshape."""
        cells = math.prod(self.grid)
        if tokens.dim() != 3 or tokens.shape[1] != self.prefix + cells:
            raise CaptureError(
                f"expected ViT tokens (B, {self.prefix} + {'*'.join(map(str, self.grid))}, C), "
                f"got shape {tuple(tokens.shape)}; the input size differs from the one the "
                "model was built for (its patch grid is fixed): feed that size, or build the "
                "model with that img_size"
            )
        b, _, c = tokens.shape
        return tokens[:, self.prefix :].transpose(1, 2).reshape(b, c, *self.grid)


@dataclass(frozen=True)
class ChannelsLastToFirst:
    """Move the channels of a channels-last map to dimension 1: ``(B, *S, C)`` to ``(B, C, *S)``.

    NHWC images (Swin) become NCHW; token sequences ``(B, T, C)`` become ``(B, C, T)``.

    Example:
        ```python
        import torch
        from athooks.discovery import ChannelsLastToFirst

        assert ChannelsLastToFirst()(torch.randn(2, 7, 7, 96)).shape == (2, 96, 7, 7)
        assert ChannelsLastToFirst()(torch.randn(2, 10, 64)).shape == (2, 64, 10)
        ```
    """

    def __call__(self, features: Tensor) -> Tensor:
        """Move the last dimension to dimension 1."""
        return features.movedim(-1, 1)


def pow2_stride(size_in: int, size: int) -> int | None:
    """The stride a map of ``size`` cells stands for, for an input of ``size_in``.

    ``size_in / size`` rounded to the nearest power of two in log scale: 128 px over 13 cells
    (9.8) is 8, over 6 cells (21.3) is 16. ``None`` for a map larger than the input (an
    upsampled output, whose stride means nothing here).

    Args:
        size_in: The input's size along the axis (pixels, time steps, tokens).
        size: The map's size along it.

    Returns:
        The stride (1, 2, 4, ...), or ``None``.

    Example:
        ```python
        from athooks.geometry import pow2_stride

        assert [pow2_stride(128, n) for n in (61, 28, 13, 6)] == [2, 4, 8, 16]
        assert pow2_stride(224, 7) == 32 and pow2_stride(32, 64) is None
        ```
    """
    if size <= 0 or size_in <= 0:
        return None
    ratio = size_in / size
    if ratio < 1 / math.sqrt(2):
        return None
    return int(2 ** max(0, round(math.log2(ratio))))


@dataclass(frozen=True)
class InputGeometry:
    """What the probe's input is: its kind, batch size and spatial size.

    Attributes:
        kind: ``"image"`` ``(B, C, H, W)``, ``"video"`` ``(B, C, T, H, W)``, ``"signal"``
            ``(B, C, T)``, ``"sequence"`` (token ids ``(B, T)`` or embeddings ``(B, T, C)``),
            or ``"none"`` (no tensor to measure against).
        batch: The batch size (the number of images of a list input).
        spatial: The spatial size ``S`` (``(H, W)``, ``(T, H, W)``, ``(T,)``).
    """

    kind: str
    batch: int
    spatial: tuple[int, ...] = ()


@dataclass
class ModelGeometry:
    """The channel counts a model's modules declare, to tell channels-first from channels-last.

    Attributes:
        first: Widths of convolutions and batch/group norms (channels in dimension 1).
        last: Widths of ``LayerNorm``, ``Linear``, ``Embedding`` (channels in the last dim).
        prefix: timm's ``num_prefix_tokens``, if the model says.
        grid: timm's ``patch_embed.grid_size``, if the model says.
        nhwc: Whether timm metadata says the model's features are NHWC.
        conv_dims: The spatial dimensionality of the model's first convolution (0: none).
        conv_in: Its input channel count.
    """

    first: set[int] = field(default_factory=set)
    last: set[int] = field(default_factory=set)
    prefix: int | None = None
    grid: tuple[int, int] | None = None
    nhwc: bool = False
    conv_dims: int = 0
    conv_in: int = 0

    @classmethod
    def of(cls, model: nn.Module) -> ModelGeometry:
        """Read the geometry of ``model`` (the unwrapped model).

        Args:
            model: The model.

        Returns:
            Its geometry.
        """
        geo = cls()
        for module in model.modules():
            if isinstance(module, _FIRST_KINDS):
                width = getattr(module, "out_channels", None)
                width = width or getattr(module, "num_features", None)
                width = width or getattr(module, "num_channels", None)
                if isinstance(width, int):
                    geo.first.add(width)
                if not geo.conv_dims and isinstance(module, nn.modules.conv._ConvNd):
                    geo.conv_dims = len(module.kernel_size)
                    geo.conv_in = int(module.in_channels)
            elif isinstance(module, nn.LayerNorm):
                geo.last.add(int(module.normalized_shape[-1]))
            elif isinstance(module, nn.Linear):
                geo.last.update((int(module.out_features), int(module.in_features)))
            elif isinstance(module, nn.Embedding):
                geo.last.add(int(module.embedding_dim))
            elif isinstance(module, nn.MultiheadAttention):
                geo.last.add(int(module.embed_dim))
        prefix = getattr(model, "num_prefix_tokens", None)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if isinstance(prefix, int) and grid is not None:
            geo.prefix, geo.grid = prefix, (int(grid[0]), int(grid[1]))
        geo.nhwc = getattr(model, "output_fmt", None) in ("NHWC", "nhwc")
        return geo


@dataclass(frozen=True)
class OutputLayout:
    """How one output is read as a feature map.

    Attributes:
        layout: ``"NCHW"``, ``"NHWC"``, ``"tokens"``, ``"NCL"``, ``"NLC"``, ``"NCTHW"``.
        map_shape: ``(C, *S)`` after conversion.
        transform: The conversion (``None``: already ``(B, C, *S)``).
    """

    layout: str
    map_shape: tuple[int, ...]
    transform: Any = None


def _grid(tokens: int, aspect: float, fixed: tuple[int, int] | None) -> tuple[int, int] | None:
    if fixed is not None:
        return fixed if fixed[0] * fixed[1] == tokens else None
    if tokens < 2:
        return None
    gh = max(1, round(math.sqrt(tokens * aspect)))
    for h in (gh, gh - 1, gh + 1):
        if h >= 1 and tokens % h == 0:
            w = tokens // h
            if abs(math.log((h / w) / aspect)) < 0.35:
                return (h, w)
    return None


def _tokens(n: int, c: int, geo: ModelGeometry, source: InputGeometry) -> OutputLayout | None:
    """Tokens ``(B, n, c)`` of an image model laid on its grid, or ``None``."""
    if geo.prefix is not None and geo.grid is not None:
        gh, gw = geo.grid
        if n == geo.prefix + gh * gw:
            return OutputLayout("tokens", (c, gh, gw), TokensToMap(geo.prefix, (gh, gw)))
        return None
    h_in, w_in = source.spatial[-2:]
    aspect = h_in / w_in
    for prefix in range(MAX_PREFIX + 1):
        grid = _grid(n - prefix, aspect, None)
        if grid is not None and grid[0] > 1 and grid[0] <= h_in:
            return OutputLayout("tokens", (c, *grid), TokensToMap(prefix, grid))
    return None


def _video_tokens(n: int, c: int, source: InputGeometry) -> OutputLayout | None:
    """Video tokens ``(B, prefix + t*h*w, C)`` (MViT): ``t`` the input's T halved, or not."""
    t_in, h_in, w_in = source.spatial
    for prefix in range(MAX_PREFIX + 1):
        t = t_in
        while t >= 1:
            if (n - prefix) % t == 0:
                grid = _grid((n - prefix) // t, h_in / w_in, None)
                if grid is not None and 1 < grid[0] <= h_in:
                    cells = (t, *grid)
                    return OutputLayout("tokens", (c, *cells), TokensToMap(prefix, cells))
            t //= 2
    return None


def read_layout(
    shape: Sequence[int],
    geo: ModelGeometry,
    source: InputGeometry,
    producer: str = "",
) -> OutputLayout | None:
    """Read an output of ``shape`` (batch first) as a feature map, or ``None`` if it is not one.

    Args:
        shape: The output's shape, with the batch dimension.
        geo: The model's geometry.
        source: The probe's input.
        producer: The class name of the module that produced it (the module itself, or the
            last leaf module that ran in it): ``Permute``, ``LayerNorm`` and ``Linear`` mean
            channels last.

    Returns:
        The layout, or ``None``.

    Example:
        ```python
        import torch
        from athooks.geometry import InputGeometry, ModelGeometry, read_layout

        geo = ModelGeometry.of(torch.nn.Sequential(torch.nn.LayerNorm(96)))
        image = InputGeometry("image", 1, (64, 64))
        assert read_layout((1, 16, 16, 96), geo, image).layout == "NHWC"
        assert read_layout((1, 1 + 16, 96), geo, image).map_shape == (96, 4, 4)
        ```
    """
    dims = len(shape) - 1
    last_hint = producer in _LAST_KINDS
    if source.kind in ("image", "none") and dims == 3:
        c, h, w = (int(v) for v in shape[1:])
        first_ok, last_ok = c in geo.first, w in geo.last
        if geo.nhwc and not (first_ok and w not in geo.last | geo.first):
            return OutputLayout("NHWC", (w, c, h), ChannelsLastToFirst())
        if last_ok and (not first_ok or last_hint):
            return OutputLayout("NHWC", (w, c, h), ChannelsLastToFirst())
        return OutputLayout("NCHW", (c, h, w))
    if source.kind == "image" and dims == 2:
        return _tokens(int(shape[1]), int(shape[2]), geo, source)
    if source.kind == "video":
        if dims == 4:
            c, *rest = (int(v) for v in shape[1:])
            last = rest[-1]
            if last in geo.last and (c not in geo.first or last_hint):  # Swin3D: (B, T, H, W, C)
                return OutputLayout("NTHWC", (last, c, *rest[:-1]), ChannelsLastToFirst())
            return OutputLayout("NCTHW", (c, *rest))
        if dims == 2:
            return _video_tokens(int(shape[1]), int(shape[2]), source)
        return None
    if source.kind in ("signal", "sequence") and dims == 2:
        a, d = int(shape[1]), int(shape[2])
        if source.kind == "signal":
            channels_last = d in geo.last and a not in geo.first and last_hint
        else:
            channels_last = not (a in geo.first and d not in geo.first and not last_hint)
        if channels_last:
            return OutputLayout("NLC", (d, a), ChannelsLastToFirst())
        return OutputLayout("NCL", (a, d))
    return None


def map_strides(map_shape: Sequence[int], source: InputGeometry) -> tuple[int | None, ...]:
    """The stride of each spatial axis of a map ``(C, *S)`` against the input, or ``()``.

    Args:
        map_shape: ``(C, *S)``.
        source: The probe's input.

    Returns:
        One stride per axis of ``S`` (``None`` where the map is larger than the input), or
        ``()`` when the map's axes do not correspond to the input's.
    """
    spatial = tuple(map_shape[1:])
    if not source.spatial or len(spatial) != len(source.spatial):
        return ()
    return tuple(pow2_stride(i, s) for i, s in zip(source.spatial, spatial, strict=True))


# ------------------------------------------------------------------ the probe's input


def detector_input(example: Example) -> Example:
    """A detector's probe input: the images only (in eval, no targets).

    Args:
        example: ``(args, kwargs)`` of a detector call, e.g. ``((images, targets), {})``.

    Returns:
        ``((images,), {})`` (an ``images=`` keyword is kept).
    """
    args, kwargs = example
    return args[:1], {k: v for k, v in kwargs.items() if k in ("images",)}


def is_image_list(value: Any) -> bool:
    """Whether ``value`` is a non-empty list of tensors (a detector's images)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, Tensor) for v in value)


def batch_of(example: Example) -> int:
    """The batch size of an input: a list of images' length, else the first tensor's dim 0.

    Args:
        example: ``(args, kwargs)`` of a call.

    Returns:
        The batch size (0 when the input holds no tensor).
    """
    args, kwargs = example
    for value in (*args, *kwargs.values()):
        if is_image_list(value):
            return len(value)
        t = first_tensor(value)
        if t is not None:
            return int(t.shape[0]) if t.dim() else 0
    return 0


def two_samples(example: Example) -> Example | None:
    """The input cut to two samples, or one sample and its mirror image; ``None`` if no batch.

    Two different samples tell which outputs depend on the input (see
    :func:`athooks.discovery.probe`).

    Args:
        example: ``(args, kwargs)`` of a call.

    Returns:
        ``(args, kwargs)`` with a batch of two, or ``None``.

    Example:
        ```python
        import torch
        from athooks.geometry import two_samples

        (x,), _ = two_samples(((torch.randn(8, 3, 4, 4),), {}))
        assert x.shape == (2, 3, 4, 4)
        (images,), _ = two_samples((([torch.randn(3, 4, 5)],), {}))
        assert torch.equal(images[1], images[0].flip(-1))
        ```
    """
    batch = batch_of(example)
    if batch < 1:
        return None

    def cut(value: Any) -> Any:
        if is_image_list(value):
            if len(value) == batch:
                return value[:2] if batch >= 2 else [value[0], value[0].flip(-1)]
            return value
        if batch >= 2:
            return slice_batch(value, batch, keep=2)
        if isinstance(value, Tensor):
            return (
                torch.cat([value, value.flip(-1)]) if value.dim() and value.shape[0] == 1 else value
            )
        if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
            return type(value)(cut(v) for v in value)
        if type(value) is dict:
            return {k: cut(v) for k, v in value.items()}
        return value

    args, kwargs = example
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def input_geometry(example: Example, geo: ModelGeometry) -> InputGeometry:
    """What the probe's input is (see :class:`InputGeometry`).

    A float ``(B, C, T)`` is a 1-D signal when the model's first convolution is a ``Conv1d``
    taking ``C`` channels, else a sequence of embeddings ``(B, T, C)``.

    Args:
        example: ``(args, kwargs)`` of a call.
        geo: The model's geometry.

    Returns:
        The input's geometry.

    Example:
        ```python
        import torch
        from athooks.geometry import ModelGeometry, input_geometry

        geo = ModelGeometry.of(torch.nn.Conv1d(2, 4, 3))
        signal = input_geometry(((torch.randn(2, 2, 50),), {}), geo)
        assert (signal.kind, signal.spatial) == ("signal", (50,))
        ids = input_geometry(((torch.zeros(2, 7, dtype=torch.long),), {}), geo)
        assert (ids.kind, ids.spatial) == ("sequence", (7,))
        ```
    """
    args, kwargs = example
    batch = batch_of(example)
    for value in (*args, *kwargs.values()):
        if is_image_list(value) and value[0].dim() == 3:
            return InputGeometry("image", len(value), tuple(value[0].shape[-2:]))
        t = first_tensor(value)
        if t is None or not t.dim():
            continue
        if t.is_floating_point():
            if t.dim() == 4:
                return InputGeometry("image", batch, tuple(t.shape[2:]))
            if t.dim() == 5:
                return InputGeometry("video", batch, tuple(t.shape[2:]))
            if t.dim() == 3:
                if geo.conv_dims == 1 and int(t.shape[1]) == geo.conv_in:
                    return InputGeometry("signal", batch, (int(t.shape[2]),))
                return InputGeometry("sequence", batch, (int(t.shape[1]),))
        elif t.dim() == 2:
            return InputGeometry("sequence", batch, (int(t.shape[1]),))
    return InputGeometry("none", batch)


def samples_differ(example: Example) -> bool:
    """Whether the first two samples of an input differ (else input dependence is not tested).

    Args:
        example: ``(args, kwargs)`` of a call.

    Returns:
        Whether they differ (``False`` for a batch of one).
    """
    args, kwargs = example
    for value in (*args, *kwargs.values()):
        if (
            isinstance(value, list)
            and len(value) >= 2
            and all(isinstance(v, Tensor) for v in value)
        ):
            return value[0].shape != value[1].shape or not torch.equal(value[0], value[1])
        t = first_tensor(value)
        if t is not None and t.dim() and t.shape[0] >= 2:
            return not torch.equal(t[0], t[1])
    return False


# ------------------------------------------------------------------ input sizes, metadata


def _in_chans(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return 3


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The input size ``(C, H, W)`` used to probe ``model`` when none is given.

    A fixed patch-embedding size (timm ViTs) first, then the model's ``pretrained_cfg`` input
    size, else 224x224 with the channel count of the first convolution.

    Args:
        model: The model.

    Returns:
        ``(C, H, W)``.

    Example:
        ```python
        import timm
        from athooks.discovery import default_input_size

        vit = timm.create_model("vit_tiny_patch16_224", img_size=64)
        assert default_input_size(vit) == (3, 64, 64)
        ```
    """
    inner, _ = unwrap(model)
    chans = _in_chans(inner)
    patch_embed = getattr(inner, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(img_size):
        return (chans, int(img_size[0]), int(img_size[1]))
    cfg = getattr(inner, "pretrained_cfg", None) or getattr(inner, "default_cfg", None)
    if isinstance(cfg, dict):
        size = cfg.get("input_size")
        if isinstance(size, (tuple, list)) and len(size) == 3:
            return (int(size[0]), int(size[1]), int(size[2]))
    return (chans, 224, 224)


def conversion(model: nn.Module, out: Tensor) -> Any:
    """The conversion of one output of ``model`` to ``(B, C, H, W)`` its metadata implies, if any.

    Tokens ``(B, N, C)`` of a timm ViT-style model (``num_prefix_tokens`` and
    ``patch_embed.grid_size``) become :class:`TokensToMap`; a 4-D output of a model whose
    ``output_fmt`` is ``"NHWC"`` becomes :class:`ChannelsLastToFirst`.

    Args:
        model: The (unwrapped) model.
        out: One module's output tensor.

    Returns:
        The conversion, or ``None``.
    """
    prefix = getattr(model, "num_prefix_tokens", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if out.dim() == 3 and isinstance(prefix, int) and grid is not None:
        gh, gw = int(grid[0]), int(grid[1])
        if out.shape[1] == prefix + gh * gw:
            return TokensToMap(prefix, (gh, gw))
        return None
    if out.dim() == 4 and getattr(model, "output_fmt", None) in ("NHWC", "nhwc"):
        return ChannelsLastToFirst()
    return None


def _fixed_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    dynamic = getattr(model, "dynamic_img_size", False)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(img_size) and not dynamic:
        return (_in_chans(model), int(img_size[0]), int(img_size[1]))
    return None


def pair_input_size(teacher: nn.Module, student: nn.Module) -> tuple[int, int, int]:
    """One probe input size for both models, since at run time both see the same input.

    A model with a fixed input size (a timm ViT's patch grid) decides, the teacher first;
    otherwise the student's :func:`default_input_size`.

    Args:
        teacher: The teacher model.
        student: The student model.

    Returns:
        ``(C, H, W)``.
    """
    t_inner, _ = unwrap(teacher)
    s_inner, _ = unwrap(student)
    fixed = _fixed_input_size(t_inner) or _fixed_input_size(s_inner)
    return fixed or default_input_size(s_inner)


def metadata_modules(model: nn.Module) -> list[str] | None:
    """The module names a model's timm-style ``feature_info`` lists, or ``None``."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not info:
        return None
    names: list[str] = []
    for entry in info:
        name = entry.get("module") if isinstance(entry, dict) else None
        if isinstance(name, str) and name:
            names.append(name)
    return names or None
