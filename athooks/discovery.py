"""Layer discovery: output shapes and strides of every module, and the automatic pairing.

``layers="auto"`` pairs the *stage outputs* of teacher and student by spatial stride (the paper's
"different depth" case):

* a model with timm-style metadata (a ``feature_info`` list naming modules and their reductions:
  every timm model, and :mod:`athooks.models`) contributes those modules, the last one per stride
  (names missing from ``named_modules()`` are skipped);
* any other model is probed once, on a dummy input, in eval mode under ``no_grad``; for each
  stride, the stage output is the last module of the shallowest level of the module tree that
  produces a feature map of that stride (1x1 outputs, global pooling, are ignored).

A leaf module (such as the ReLU after a ResNet's first convolution) is not taken as a stage when
the model has stages that are containers of blocks: the paper transfers attention at the outputs
of groups of blocks, so a ResNet pair gets its four groups, as in the authors' ImageNet code.

Only strides both models have are paired, in increasing stride. ``layers="blocks"`` pairs every
block of those stages (the children of each stage container that keep its stride: the paper's
"same depth" case), and needs both models to have the same number of blocks per stage.

Outputs that are not ``(B, C, H, W)`` are converted using the model's own metadata: tokens
``(B, N, C)`` of timm ViT-style models (``num_prefix_tokens`` and ``patch_embed.grid_size``) drop
their prefix tokens and are reshaped to the patch grid; NHWC outputs of timm models whose
``output_fmt`` is ``"NHWC"`` (Swin, for instance) are permuted to NCHW.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from athooks.context import internal_run
from athooks.errors import CaptureError, ConfigurationError, LayerResolutionError
from athooks.layers import Layer, unwrap
from athooks.tensors import adapted_input, first_tensor, slice_batch

__all__ = [
    "ChannelsLastToFirst",
    "LayerInfo",
    "PairInfo",
    "Pairing",
    "TokensToMap",
    "auto_pairs",
    "conversion",
    "default_input_size",
    "describe",
    "format_table",
    "metadata_modules",
    "pair_input_size",
    "probe",
    "stage_blocks",
    "stage_layers",
]

AUTO_MODES = ("auto", "blocks")


@dataclass(frozen=True)
class TokensToMap:
    """Turn ViT tokens ``(B, N, C)`` into a feature map ``(B, C, H, W)`` on the patch grid.

    Args:
        prefix: Number of leading non-patch tokens (class, distillation, register tokens).
        grid: The patch grid ``(H, W)``.

    Example:
        ```python
        import torch
        from athooks.discovery import TokensToMap

        to_map = TokensToMap(prefix=1, grid=(4, 4))
        assert to_map(torch.randn(2, 17, 192)).shape == (2, 192, 4, 4)
        ```
    """

    prefix: int
    grid: tuple[int, int]

    def __call__(self, tokens: Tensor) -> Tensor:
        """Drop the prefix tokens and reshape."""
        gh, gw = self.grid
        if tokens.dim() != 3 or tokens.shape[1] != self.prefix + gh * gw:
            raise CaptureError(
                f"expected ViT tokens (B, {self.prefix} + {gh}*{gw}, C), got shape "
                f"{tuple(tokens.shape)}; the input size differs from the one the model was built "
                "for (its patch grid is fixed): feed that size, or build the model with that "
                "img_size"
            )
        b, _, c = tokens.shape
        return tokens[:, self.prefix :].transpose(1, 2).reshape(b, c, gh, gw)


@dataclass(frozen=True)
class ChannelsLastToFirst:
    """Permute an NHWC feature map to NCHW.

    Example:
        ```python
        import torch
        from athooks.discovery import ChannelsLastToFirst

        assert ChannelsLastToFirst()(torch.randn(2, 7, 7, 96)).shape == (2, 96, 7, 7)
        ```
    """

    def __call__(self, features: Tensor) -> Tensor:
        """Permute dimensions (0, 3, 1, 2)."""
        return features.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class LayerInfo:
    """What the probe saw of one module.

    Attributes:
        name: The module's name in the (unwrapped) model.
        kind: The module's class name.
        shape: Its output shape without the batch dimension (the first tensor of the output).
        map_shape: ``(C, H, W)`` of the feature map attention is computed on, after conversion;
            ``None`` if the output is not a feature map.
        stride: The input height divided by the feature map's height; ``None`` if the output is
            not a feature map, or is 1x1 (a global descriptor, whose "stride" means nothing).
        transform: The conversion applied to the output (tokens, NHWC), or ``None``.
        order: When it (last) ran in the forward.
        calls: How many times it ran.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    map_shape: tuple[int, int, int] | None
    stride: int | None
    transform: Any = field(default=None, compare=False)
    order: int = 0
    calls: int = 1

    @property
    def depth(self) -> int:
        """The level in the module tree: 1 for a child of the root."""
        return self.name.count(".") + 1

    def layer(self) -> Layer:
        """The :class:`athooks.Layer` that taps this module, with its conversion."""
        return Layer(self.name, transform=self.transform)


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


Example = tuple[tuple[Any, ...], dict[str, Any]]


def _input_height(example: Example) -> int | None:
    """The height of the first image-like tensor (``(B, C, H, W)`` or more) of an input."""
    args, kwargs = example
    for value in (*args, *kwargs.values()):
        t = first_tensor(value)
        if t is not None and t.dim() >= 4 and t.is_floating_point():
            return int(t.shape[-2])
    return None


def probe(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    side: str = "model",
    example: Example | None = None,
) -> list[LayerInfo]:
    """Run ``model`` once and record every module's output shape and stride.

    The model runs in eval mode under ``no_grad`` on its own device, as one of athooks' own
    runs (invisible to attached Distillers); each module's training flag is restored afterwards.
    It runs on ``example``, a real input, when given, else on a random batch of one of
    ``input_size``. Strides are the input's height over each map's height; for an input without
    an image-like tensor (token ids, say), the height of the model's largest map is used instead.

    Args:
        model: The model (wrappers are looked through).
        input_size: ``(C, H, W)`` of the dummy input; default :func:`default_input_size`.
        side: How to call the model in error messages.
        example: ``(args, kwargs)`` to call the model with instead of a dummy input.

    Returns:
        One :class:`LayerInfo` per module that ran, in module order.

    Raises:
        ConfigurationError: If the forward fails.

    Example:
        ```python
        import torchvision
        from athooks.discovery import probe

        infos = {i.name: i for i in probe(torchvision.models.resnet18())}
        assert infos["layer3"].stride == 16 and infos["layer3"].map_shape == (256, 14, 14)
        ```
    """
    inner, _ = unwrap(model)
    param = next(inner.parameters(), None)
    if example is None:
        size = tuple(int(s) for s in (input_size or default_input_size(inner)))
        if len(size) != 3:
            raise ConfigurationError(f"input_size must be (C, H, W), got {size}")
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        x = torch.randn((1, *size), generator=torch.Generator().manual_seed(0)).to(device, dtype)
        example = ((x,), {})
        what = f"a dummy input of shape {(1, *size)}"
        fix = (
            "Pass input_size=(C, H, W) that the model accepts (or, to athooks.describe, "
            "example=a real input for models that take something else), or name the layers "
            "explicitly"
        )
    else:
        what = "its real input"
        fix = (
            "athooks runs each model once, in eval mode under no_grad, to find its stage "
            "outputs; name the layers explicitly (layers=[...], see `athooks layers <model>`) "
            "to skip this"
        )
    seen: dict[str, tuple[int, int, tuple[int, ...], Any]] = {}
    counter = [0]

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            counter[0] += 1
            out = first_tensor(output)
            calls = seen[name][1] + 1 if name in seen else 1
            shape = tuple(out.shape[1:]) if out is not None else ()
            convert = conversion(inner, out) if out is not None else None
            seen[name] = (counter[0], calls, shape, convert)

        return hook

    named = [(n, m) for n, m in inner.named_modules() if n]
    flags = [(m, m.training) for m in inner.modules()]
    handles = [m.register_forward_hook(make_hook(n)) for n, m in named]
    try:
        for module, _ in flags:
            module.training = False
        args, kwargs = example
        with internal_run(), torch.no_grad():
            inner(*args, **kwargs)
    except Exception as err:
        raise ConfigurationError(
            f"probing the {side} with {what} failed: {type(err).__name__}: "
            f"{str(err).rstrip('.')}. {fix}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    raw = []
    for name, module in named:
        if name not in seen:
            continue
        order, calls, shape, transform = seen[name]
        map_shape: tuple[int, int, int] | None = None
        if transform is not None and isinstance(transform, TokensToMap):
            map_shape = (shape[-1], *transform.grid)
        elif transform is not None and len(shape) == 3:
            map_shape = (shape[2], shape[0], shape[1])
        elif len(shape) == 3:
            map_shape = (shape[0], shape[1], shape[2])
        raw.append((name, module, shape, map_shape, transform, order, calls))
    in_h = _input_height(example)
    if in_h is None:
        in_h = max((m[1] for _, _, _, m, _, _, _ in raw if m is not None), default=1)
    infos = []
    for name, module, shape, map_shape, transform, order, calls in raw:
        stride = None
        if map_shape is not None and map_shape[1] * map_shape[2] > 1:
            stride = max(1, round(in_h / map_shape[1]))
        infos.append(
            LayerInfo(
                name, type(module).__name__, shape, map_shape, stride, transform, order, calls
            )
        )
    return infos


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


def stage_layers(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    infos: Sequence[LayerInfo] | None = None,
    side: str = "model",
) -> list[LayerInfo]:
    """The stage outputs of ``model``, one per stride, in increasing stride.

    Args:
        model: The model.
        input_size: The probe's input size ``(C, H, W)``.
        infos: A probe result to reuse.
        side: How to call the model in error messages.

    Returns:
        The stage layers (see the module docs for the rule).

    Raises:
        LayerResolutionError: If no module produces a usable feature map.

    Example:
        ```python
        import torchvision
        from athooks.discovery import stage_layers

        stages = stage_layers(torchvision.models.resnet18())
        assert [s.name for s in stages] == ["layer1", "layer2", "layer3", "layer4"]
        ```
    """
    inner, _ = unwrap(model)
    infos = list(infos) if infos is not None else probe(inner, input_size, side=side)
    usable = [
        i
        for i in infos
        if i.map_shape is not None and i.stride is not None and i.map_shape[1] * i.map_shape[2] > 1
    ]
    by_name = {i.name: i for i in usable}
    chosen: dict[int, LayerInfo] = {}
    listed = metadata_modules(inner)
    if listed is not None:
        for name in listed:
            info = by_name.get(name)
            if info is not None and info.stride is not None:
                chosen[info.stride] = info  # the last listed module of each stride
    if not chosen:
        for info in usable:
            assert info.stride is not None
            best = chosen.get(info.stride)
            if best is None or (info.depth, -info.order) < (best.depth, -best.order):
                chosen[info.stride] = info
    # A leaf module (a stem activation) is not a stage when the model has container stages:
    # the paper transfers at the outputs of groups of blocks.
    containers = {
        stride: info
        for stride, info in chosen.items()
        if next(iter(inner.get_submodule(info.name).children()), None) is not None
    }
    if containers:
        chosen = containers
    if not chosen:
        raise LayerResolutionError(
            f"found no module of the {side} that produces a feature map (B, C, H, W) larger "
            "than 1x1; name the layers explicitly, with athooks.Layer(name, transform=...) for "
            "outputs of another layout"
        )
    return [chosen[s] for s in sorted(chosen)]


def stage_blocks(
    inner: nn.Module, stage: LayerInfo, infos: dict[str, LayerInfo], listed: list[str] | None
) -> list[LayerInfo]:
    """The blocks of a stage, or an empty list when the stage has none.

    Args:
        inner: The (unwrapped) model.
        stage: The stage, as :func:`stage_layers` found it.
        infos: The probe's infos, by name.
        listed: :func:`metadata_modules` of the model.

    Returns:
        The blocks' infos, in order.


    Blocks are, in order of preference: the modules the model's metadata lists at this stride
    when it lists several (a ViT lists each block); else the children of the stage (or of its
    child named ``blocks``, timm's convention) that keep the stage's stride, which must all be
    containers of the same class.

    Raises:
        LayerResolutionError: If the stage's children are of mixed kinds (no clear blocks).
    """
    if listed is not None:
        same_stride = [infos[n] for n in listed if n in infos and infos[n].stride == stage.stride]
        if len(same_stride) > 1:
            return same_stride
    module = inner.get_submodule(stage.name)
    prefix = stage.name
    inner_blocks = getattr(module, "blocks", None)
    if isinstance(inner_blocks, nn.Module) and next(inner_blocks.children(), None) is not None:
        module, prefix = inner_blocks, f"{stage.name}.blocks"
    kids = []
    for child_name, child in module.named_children():
        info = infos.get(f"{prefix}.{child_name}")
        if info is None or info.stride != stage.stride or info.map_shape is None:
            continue
        kids.append((child, info))
    containers = [(c, i) for c, i in kids if next(c.children(), None) is not None]
    if not containers:
        return []
    kinds = sorted({type(c).__name__ for c, _ in containers})
    if len(kinds) > 1:
        raise LayerResolutionError(
            f"layers='blocks' cannot tell the blocks of stage {stage.name!r}: its children are "
            f"of different kinds ({', '.join(kinds)}). Name the layer pairs explicitly, e.g. "
            "layers=[('stage.0', 'stage.0'), ...], or use layers='auto'"
        )
    return [i for _, i in containers]


@dataclass(frozen=True)
class PairInfo:
    """One teacher/student pair chosen by discovery, with what the probe saw."""

    teacher: LayerInfo
    student: LayerInfo


@dataclass
class Pairing:
    """The pairs ``"auto"`` (or ``"blocks"``) picks, printable as a table.

    Attributes:
        mode: ``"auto"`` or ``"blocks"``.
        pairs: The pairs, in increasing stride.
        teacher_strides: Strides of the teacher's stages.
        student_strides: Strides of the student's stages.
    """

    mode: str
    pairs: list[PairInfo]
    teacher_strides: list[int]
    student_strides: list[int]

    def layers(self) -> list[tuple[Layer, Layer]]:
        """The pairs as a ``layers`` argument for :class:`athooks.Distiller`."""
        return [(p.teacher.layer(), p.student.layer()) for p in self.pairs]

    def __str__(self) -> str:
        rows = [("teacher layer", "shape", "stride", "student layer", "shape")]
        for p in self.pairs:
            rows.append(
                (
                    p.teacher.name,
                    _fmt_shape(p.teacher.map_shape),
                    str(p.teacher.stride),
                    p.student.name,
                    _fmt_shape(p.student.map_shape),
                )
            )
        return format_table(rows, widths=(22, 14, 6, 22, 14))

    __repr__ = __str__


def _fmt_shape(shape: Sequence[int] | None) -> str:
    return "x".join(str(s) for s in shape) if shape else "-"


def _elide(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    keep = width - 1
    return text[: keep // 2] + "…" + text[len(text) - (keep - keep // 2) :]


def format_table(rows: Sequence[Sequence[str]], widths: Sequence[int]) -> str:
    """Format rows as a plain-text table within the given column widths (80 columns in all).

    Args:
        rows: The header row first, then the data rows.
        widths: The maximum width of each column; long cells are elided in the middle.

    Returns:
        The table.
    """
    actual = [min(max(len(row[i]) for row in rows), widths[i]) for i in range(len(widths))]
    lines = []
    for k, row in enumerate(rows):
        cells = [_elide(cell, actual[i]).ljust(actual[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in actual))
    return "\n".join(lines)


def _probe_pair(
    teacher: nn.Module,
    student: nn.Module,
    example: Example,
    teacher_input: Callable[..., Any] | None,
) -> tuple[list[LayerInfo], list[LayerInfo]]:
    """Probe both models on a real input: a batch of one sliced from it, else the whole batch."""
    first = first_tensor(example)
    batch = int(first.shape[0]) if first is not None and first.dim() else 0
    if batch > 1:  # a batch of one first; a model that cannot run on one sample, the whole batch
        try:
            return _probe_both(teacher, student, slice_batch(example, batch), teacher_input)
        except ConfigurationError:
            pass
    return _probe_both(teacher, student, example, teacher_input)


def _probe_both(
    teacher: nn.Module,
    student: nn.Module,
    example: Example,
    teacher_input: Callable[..., Any] | None,
) -> tuple[list[LayerInfo], list[LayerInfo]]:
    t_example = adapted_input(teacher_input, *example)
    return (
        probe(teacher, side="teacher", example=t_example),
        probe(student, side="student", example=example),
    )


def auto_pairs(
    teacher: nn.Module,
    student: nn.Module,
    mode: str = "auto",
    input_size: Sequence[int] | None = None,
    *,
    example: Example | None = None,
    teacher_input: Callable[..., Any] | None = None,
) -> Pairing:
    """The teacher/student layer pairs of ``layers="auto"`` or ``layers="blocks"``.

    Both models are probed (see :func:`probe`) on ``example`` when given, a real input of the
    student (a batch of one is sliced from it; the whole batch is tried if that fails), passed
    through ``teacher_input`` for the teacher; otherwise on a dummy input of ``input_size``.
    Maps of one cell (after global pooling) are never paired.

    Args:
        teacher: The teacher model.
        student: The student model.
        mode: ``"auto"`` (stage outputs by stride) or ``"blocks"`` (every block of those stages).
        input_size: The dummy input's size ``(C, H, W)``, used for both models; by default
            :func:`pair_input_size`. Ignored with ``example``.
        example: ``(args, kwargs)`` of a real call of the student.
        teacher_input: The Distiller's ``teacher_input``, applied to ``example`` for the teacher.

    Returns:
        The pairing.

    Raises:
        LayerResolutionError: If the models share no stride, or (``"blocks"``) their block
            layouts differ.

    Example:
        ```python
        import torchvision
        from athooks.discovery import auto_pairs

        pairing = auto_pairs(torchvision.models.resnet34(), torchvision.models.resnet18())
        print(pairing)
        ```
    """
    if mode not in AUTO_MODES:
        raise ConfigurationError(f"mode must be 'auto' or 'blocks', got {mode!r}")
    t_inner, _ = unwrap(teacher)
    s_inner, _ = unwrap(student)
    if example is not None:
        t_infos, s_infos = _probe_pair(t_inner, s_inner, example, teacher_input)
    else:
        size = tuple(input_size) if input_size is not None else pair_input_size(t_inner, s_inner)
        t_infos = probe(t_inner, size, side="teacher")
        s_infos = probe(s_inner, size, side="student")
    t_stages = stage_layers(t_inner, infos=t_infos, side="teacher")
    s_stages = stage_layers(s_inner, infos=s_infos, side="student")
    t_by_stride = {s.stride: s for s in t_stages}
    s_by_stride = {s.stride: s for s in s_stages}
    shared = sorted(set(t_by_stride) & set(s_by_stride), key=lambda v: v or 0)
    t_strides = [int(s.stride or 0) for s in t_stages]
    s_strides = [int(s.stride or 0) for s in s_stages]
    if not shared:
        raise LayerResolutionError(
            f"the teacher and the student share no stride: teacher stages "
            f"{_stage_list(t_stages)}, student stages {_stage_list(s_stages)}. Name the pairs "
            "explicitly (layers=[(teacher_name, student_name), ...]); maps of different sizes "
            "are resized (resize='student')"
        )
    pairs: list[PairInfo] = []
    if mode == "auto":
        pairs = [PairInfo(t_by_stride[s], s_by_stride[s]) for s in shared]
    else:
        t_map = {i.name: i for i in t_infos}
        s_map = {i.name: i for i in s_infos}
        t_listed, s_listed = metadata_modules(t_inner), metadata_modules(s_inner)
        t_layout, s_layout, same = [], [], True
        for s in shared:
            t_blocks = stage_blocks(t_inner, t_by_stride[s], t_map, t_listed)
            s_blocks = stage_blocks(s_inner, s_by_stride[s], s_map, s_listed)
            if not t_blocks and not s_blocks:
                continue  # a stage without blocks (a stem): nothing to pair
            t_layout.append(f"{t_by_stride[s].name}: {len(t_blocks)}")
            s_layout.append(f"{s_by_stride[s].name}: {len(s_blocks)}")
            same = same and len(t_blocks) == len(s_blocks)
            if same:
                pairs.extend(PairInfo(t, st) for t, st in zip(t_blocks, s_blocks, strict=True))
        if not same or not pairs:
            raise LayerResolutionError(
                "layers='blocks' needs the same number of blocks per stage in both models "
                "(the paper's same-depth case); blocks per stage, teacher: "
                f"{', '.join(t_layout) or 'none'}; student: {', '.join(s_layout) or 'none'}. "
                "Use layers='auto' to pair the stage outputs instead"
            )
    return Pairing(mode, pairs, t_strides, s_strides)


def _stage_list(stages: Sequence[LayerInfo]) -> str:
    return ", ".join(f"{s.name} (stride {s.stride})" for s in stages)


def describe(
    teacher: nn.Module,
    student: nn.Module,
    layers: str = "auto",
    input_size: Sequence[int] | None = None,
    *,
    example: Any = None,
    teacher_input: Callable[..., Any] | None = None,
) -> Pairing:
    """The layer pairs ``layers="auto"`` (or ``"blocks"``) would use, with shapes and strides.

    Prints as a table that fits 80 columns (in a notebook, the cell's value shows it). The
    models are probed on a dummy input of ``input_size``, or on ``example``, an input of the
    student as you would call it (a tensor, or a tuple of positional arguments): give the
    batch you train with to see the pairs a Distiller picks on its first call.

    Args:
        teacher: The teacher model.
        student: The student model.
        layers: ``"auto"`` or ``"blocks"``.
        input_size: The dummy input's size ``(C, H, W)``.
        example: A real input of the student instead of the dummy.
        teacher_input: As for :class:`athooks.Distiller`, applied to ``example``.

    Returns:
        The pairing.

    Example:
        ```python
        import torchvision
        import athooks

        print(athooks.describe(torchvision.models.resnet34(), torchvision.models.resnet18()))
        ```
    """
    if example is None:
        return auto_pairs(teacher, student, layers, input_size)
    args = example if isinstance(example, tuple) else (example,)
    return auto_pairs(teacher, student, layers, example=(args, {}), teacher_input=teacher_input)
