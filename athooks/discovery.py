"""Layer discovery: what every module produces, the stage outputs, and the automatic pairing.

``layers="auto"`` pairs the *stage outputs* of teacher and student by spatial stride (the paper's
"different depth" case). Both models are probed (run once, in eval mode under ``no_grad``) on two
samples of the real input, and every module's output is read as a feature map when it is one
(:mod:`athooks.geometry`: NCHW, NHWC, ViT tokens on their grid, 1-D signals and sequences,
video). A module's output is a *stage candidate* when it

* depends on the input (the two samples give different outputs: xcit's ``pos_embed`` does not),
* has the input's batch size (per-ROI tensors of a detection head do not),
* is a spatial map of more than one cell whose axes are those of the input,
* is not a classifier or logits head (modules named ``head``, ``classifier``, ``fc``,
  ``final_conv``, ``logits``, ``aux_classifier``, ``mask_predictor``...; a map at the end of
  the network with as many channels as the model has classes), and not inside an attention
  module (``attn``, ``q``, ``k``, ``v``, ``k_norm``, softmax).

Then:

* a model with timm-style metadata (a ``feature_info`` list naming modules) contributes the
  candidates it lists, the last one per stride;
* any other model: for each stride, the last candidate of the shallowest level of the module
  tree, among containers of blocks if the model has any (so a ResNet pair gets its four groups,
  as in the authors' ImageNet code); a stem or patch embedding (by its name) gives way to a
  later candidate of its stride (Swin3D's first stage); a candidate at a stride the model had
  already produced, after a map of larger stride, is a decoder's (U-Net) and is not a stage;
* a torchvision detector (a ``GeneralizedRCNNTransform`` and a ``backbone`` returning FPN
  levels) contributes each level of its backbone (``Layer("backbone", select="0")``...), with
  strides measured on the images as resized inside the model.

Strides are rounded to powers of two. Stages of equal stride are paired; the rest are paired by
relative depth when their strides differ by one octave only (Inception's last map, 2x2 at 128
px, reads as stride 64, and pairs with a ResNet's stride-32 ``layer4``). Two detectors are paired
by level name. ``layers="blocks"`` pairs every block of the paired stages (the paper's "same
depth" case), and needs the same number of blocks per stage in both models.

Suspicious pairs (a stem with a deep stage, stages at very different relative depths, and
what named layers may bring: heads, input-independent or one-cell maps) are listed in
:attr:`Pairing.warnings`, which a Distiller emits as :class:`athooks.errors.PairingWarning`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from athooks.context import internal_run
from athooks.errors import ConfigurationError, LayerResolutionError
from athooks.geometry import (
    ChannelsLastToFirst,
    Example,
    InputGeometry,
    ModelGeometry,
    TokensToMap,
    batch_of,
    conversion,
    default_input_size,
    detector_input,
    input_geometry,
    map_strides,
    metadata_modules,
    pair_input_size,
    read_layout,
    samples_differ,
    two_samples,
)
from athooks.layers import Layer, unwrap
from athooks.tensors import adapted_input, first_tensor

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
    "is_detector",
    "metadata_modules",
    "pair_input_size",
    "pair_warnings",
    "probe",
    "stage_blocks",
    "stage_layers",
]

AUTO_MODES = ("auto", "blocks")


@dataclass(frozen=True)
class LayerInfo:
    """What the probe saw of one module (or of one level of a module's dict output).

    Attributes:
        name: The module's name in the (unwrapped) model.
        kind: The module's class name.
        shape: Its output shape without the batch dimension (the first tensor of the output,
            or the level's tensor).
        map_shape: ``(C, *S)`` of the feature map attention is computed on, after conversion
            (``(C, H, W)`` for images, ``(C, T, H, W)`` for video, ``(C, T)`` for 1-D signals
            and token sequences); ``None`` if the output is not a feature map.
        stride: The input's size over the map's, along the height (the time axis of a 1-D map),
            rounded to a power of two; ``None`` if the output is not a feature map, is one
            cell (a global descriptor, whose "stride" means nothing), or its axes are not the
            input's.
        transform: The conversion applied to the output (tokens, NHWC), or ``None``.
        order: When it (last) ran in the forward.
        calls: How many times it ran.
        select: The key of a dict output's level (``Layer(name, select=key)``), else ``None``.
        layout: How the output was read: ``"NCHW"``, ``"NHWC"``, ``"tokens"``, ``"NCL"``,
            ``"NLC"``, ``"NCTHW"``, or ``""`` (not a feature map).
        note: Why the output is not a stage candidate (``None``: it is one).
        start: When it started running in the forward.
        position: Its relative depth: its rank among the modules that ran, by when they
            ended, over their number (from 0 to 1).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    map_shape: tuple[int, ...] | None
    stride: int | None
    transform: Any = field(default=None, compare=False)
    order: int = 0
    calls: int = 1
    select: str | None = None
    layout: str = ""
    note: str | None = None
    start: int = 0
    position: float = 0.0

    @property
    def depth(self) -> int:
        """The level in the module tree: 1 for a child of the root."""
        return self.name.count(".") + 1

    @property
    def label(self) -> str:
        """The name, with the level of a dict output: ``backbone['0']``."""
        return self.name if self.select is None else f"{self.name}[{self.select!r}]"

    def layer(self) -> Layer:
        """The :class:`athooks.Layer` that taps this module, with its level and conversion."""
        return Layer(self.name, select=self.select, transform=self.transform)


_HEAD = re.compile(
    r"^(?:heads?|head_\w+|classifier|aux_classifier|fc|logits|final_conv|aux_logits|auxlogits|"
    r"aux_head|box_predictor|box_head|cls_logits|bbox_pred|predictor|mask_predictor|"
    r"keypoint_predictor|pre_logits)$"
)
_ATTN_WORDS = frozenset(
    {"attn", "attention", "self_attn", "self_attention", "q", "k", "v", "qkv", "q_norm", "k_norm"}
    | {"q_proj", "k_proj", "v_proj", "softmax", "attn_drop"}
)
_STEM = re.compile(
    r"^(?:(?:backbone|body|encoder|model|trunk|features|base|net)\.)*"
    r"(?:stem\w*|patch_embed\w*|conv_stem|conv1|bn1|act1|relu|maxpool|conv_proj|pos_embed\w*|"
    r"patch_embedding|embed\w*|0)(?:\.|$)"
)
_STEM_DEPTH, _DEEP_DEPTH, _DEPTH_GAP = 0.10, 0.70, 0.35


def is_detector(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision detector (Faster/Mask R-CNN, RetinaNet, FCOS, SSD).

    Those take a list of images (and targets in training), resize them inside (a
    ``GeneralizedRCNNTransform``), and have a ``backbone`` returning a dict of FPN levels.

    Args:
        model: The (unwrapped) model.

    Returns:
        Whether it is one.
    """
    transform = getattr(model, "transform", None)
    return type(transform).__name__ == "GeneralizedRCNNTransform" and hasattr(model, "backbone")


def _num_classes(model: nn.Module, infos: Sequence[LayerInfo]) -> tuple[int | None, int]:
    """The model's ``num_classes``, else the width of its last Linear with a vector output.

    Also returns when a logits map may start: anywhere for the attribute; after that Linear
    otherwise (a map that feeds a Linear classifier is not the logits).
    """
    value = getattr(model, "num_classes", None)
    if isinstance(value, int) and value > 0:
        return value, 0
    linears = [i for i in infos if i.kind == "Linear" and len(i.shape) == 1]
    if not linears:
        return None, 0
    last = max(linears, key=lambda i: i.order)
    return int(last.shape[0]), last.order


def _words(name: str) -> set[str]:
    return {part.lower() for part in name.split(".")}


def _attention_modules(model: nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if name
        and (
            type(module).__name__.endswith(("Attention", "Attn"))
            or isinstance(module, (nn.MultiheadAttention, nn.Softmax))
        )
    ]


@dataclass
class _Seen:
    start: int
    end: int
    calls: int
    kind: str
    producer: str
    levels: list[tuple[str | None, tuple[int, ...], bool | None]]


def _record(output: Any, batch: int) -> list[tuple[str | None, tuple[int, ...], bool | None]]:
    """``(key, shape, varies)`` of the first tensor of an output, or of every level of a dict."""
    items: list[tuple[str | None, Tensor]] = []
    if isinstance(output, MappingABC) and not isinstance(output, Tensor):
        items = [(str(k), v) for k, v in output.items() if isinstance(v, Tensor)]
    if not items:
        out = first_tensor(output)
        items = [(None, out)] if out is not None else []
    levels = []
    for key, t in items:
        varies = None
        if batch >= 2 and t.dim() and t.shape[0] == batch:
            varies = not torch.equal(t[0], t[1])
        levels.append((key, tuple(t.shape), varies))
    return levels


def probe(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    side: str = "model",
    example: Example | None = None,
) -> list[LayerInfo]:
    """Run ``model`` once and record every module's output: its layout, shape and stride.

    The model runs in eval mode under ``no_grad`` on its own device, as one of athooks' own
    runs (invisible to attached Distillers); each module's training flag is restored afterwards.
    It runs on ``example``, a real input, when given (a detector gets its images only), else on
    a random batch of two of ``input_size``. Strides are measured against the input (for a
    detector, the images as resized inside it; for an input without spatial axes, the model's
    largest map); a batch of two different samples tells which outputs depend on the input.

    Args:
        model: The model (wrappers are looked through).
        input_size: ``(C, H, W)`` of the dummy input; default :func:`default_input_size`.
        side: How to call the model in error messages.
        example: ``(args, kwargs)`` to call the model with instead of a dummy input.

    Returns:
        One :class:`LayerInfo` per module that ran (per level of a dict output), in module
        order.

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
        x = torch.randn((2, *size), generator=torch.Generator().manual_seed(0)).to(device, dtype)
        example = ([*x],) if is_detector(inner) else (x,), {}
        what = f"a dummy input of shape {(2, *size)}"
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
    if is_detector(inner):
        example = detector_input(example)
    geo = ModelGeometry.of(inner)
    batch = batch_of(example)
    varies_in = samples_differ(example)
    seen: dict[str, _Seen] = {}
    counter = [0]
    last_leaf: list[tuple[int, str]] = [(0, "")]
    resized: list[tuple[int, ...]] = []

    def make_pre(name: str) -> Any:
        def pre(module: nn.Module, args: Any) -> None:
            counter[0] += 1
            if name in seen:
                seen[name].start = counter[0]
            else:
                seen[name] = _Seen(counter[0], 0, 0, type(module).__name__, "", [])

        return pre

    def make_hook(name: str, leaf: bool) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            counter[0] += 1
            entry = seen[name]
            entry.end, entry.calls = counter[0], entry.calls + 1
            kind = type(module).__name__
            entry.producer = last_leaf[0][1] if not leaf and last_leaf[0][0] > entry.start else kind
            if leaf:
                last_leaf[0] = (counter[0], kind)
            if kind == "GeneralizedRCNNTransform" and output and hasattr(output[0], "tensors"):
                resized.append(tuple(output[0].tensors.shape))
            entry.levels = _record(output, batch if varies_in else 0)

        return hook

    named = [(n, m) for n, m in inner.named_modules() if n]
    flags = [(m, m.training) for m in inner.modules()]
    handles = []
    for n, m in named:
        handles.append(m.register_forward_pre_hook(make_pre(n)))
        handles.append(m.register_forward_hook(make_hook(n, next(m.children(), None) is None)))
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
    source = input_geometry(example, geo)
    if resized:
        source = InputGeometry("image", resized[0][0], tuple(resized[0][2:]))
    if source.kind in ("none", "sequence"):
        # an input without an image (token ids, embeddings) that the model turns into 2-D maps
        # (reshaped onto a grid): those maps are its stages, measured against the largest one
        heights = [
            (s.levels[0][1][2], s.levels[0][1][3])
            for s in seen.values()
            if s.levels and len(s.levels[0][1]) == 4 and s.levels[0][1][0] == source.batch
        ]
        if heights:
            source = InputGeometry("image", source.batch, max(heights))
    return _infos(inner, named, seen, source, geo)


def _infos(
    inner: nn.Module,
    named: list[tuple[str, nn.Module]],
    seen: dict[str, Any],
    source: InputGeometry,
    geo: ModelGeometry,
) -> list[LayerInfo]:
    """Read each recorded output as a feature map and say whether it is a stage candidate."""
    attention = _attention_modules(inner)
    ran = sorted((e.end, n) for n, e in seen.items() if e.calls)
    rank = {n: k + 1 for k, (_, n) in enumerate(ran)}
    infos: list[LayerInfo] = []
    for name, _ in named:
        entry = seen.get(name)
        if entry is None or not entry.calls:
            continue
        for key, shape, varies in entry.levels:
            read = read_layout(shape, geo, source, entry.producer) if len(shape) > 1 else None
            map_shape = read.map_shape if read is not None else None
            strides = map_strides(map_shape, source) if map_shape is not None else ()
            stride = strides[-2] if len(strides) >= 2 else (strides[0] if strides else None)
            words = _words(name)
            note = None
            if map_shape is None:
                note = "not a feature map"
            elif shape[0] != source.batch:
                note = f"batch {shape[0]}, not the input's {source.batch}"
            elif math.prod(map_shape[1:]) <= 1:
                note = "one cell"
            elif not strides or any(s is None for s in strides) or _uneven(strides):
                note = "its axes are not the input's"
            elif varies is False:
                note = "does not depend on the input"
            elif words & _ATTN_WORDS or any(name.startswith(f"{a}.") for a in attention):
                note = "inside an attention module"
            elif name in attention:
                note = "an attention module"
            elif any(_HEAD.match(word) for word in words):
                note = "a classifier head"
            if note in ("not a feature map", "one cell", "its axes are not the input's"):
                stride = None
            infos.append(
                LayerInfo(
                    name,
                    entry.kind,
                    shape[1:],
                    map_shape,
                    stride,
                    read.transform if read is not None else None,
                    entry.end,
                    entry.calls,
                    key,
                    read.layout if read is not None else "",
                    note,
                    entry.start,
                    rank[name] / max(len(ran), 1),
                )
            )
    return _mark_heads(infos, _num_classes(inner, infos))


def _uneven(strides: Sequence[int | None]) -> bool:
    """Whether H and W are reduced by factors more than 2 apart: then it is no map of the image.

    coat's crpe gives ``(B, heads, 1 + N, C / heads)``, which read as NCHW is 65x19 from a
    128x128 input.
    """
    hw = [s for s in strides[-2:] if s is not None]
    return len(hw) == 2 and max(hw) > 2 * min(hw)


def _mark_heads(infos: list[LayerInfo], classes: tuple[int | None, int]) -> list[LayerInfo]:
    """A map with ``num_classes`` channels after which no map of other width runs is a head."""
    num_classes, after = classes
    if num_classes is None:
        return infos
    out = list(infos)
    later_other = False
    for k in sorted(range(len(out)), key=lambda k: -out[k].order):
        info = out[k]
        if info.map_shape is None or info.note is not None:
            continue
        if info.map_shape[0] == num_classes and not later_other and info.start > after:
            out[k] = _with(info, note="a logits map (num_classes channels)", stride=None)
        elif info.map_shape[0] != num_classes:
            later_other = True
    return out


def _with(info: LayerInfo, **changes: Any) -> LayerInfo:
    values = {f: getattr(info, f) for f in info.__dataclass_fields__}
    values.update(changes)
    return LayerInfo(**values)


def stage_layers(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    infos: Sequence[LayerInfo] | None = None,
    side: str = "model",
) -> list[LayerInfo]:
    """The stage outputs of ``model``, one per stride, in increasing stride.

    A detector's stages are its backbone's levels, in the order it returns them.

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
    usable = [i for i in infos if i.note is None and i.stride is not None]
    if is_detector(inner):
        levels = [i for i in usable if i.name == "backbone" and i.select is not None]
        if levels:
            return levels
    chosen: dict[int, LayerInfo] = {}
    listed = metadata_modules(inner)
    if listed is not None:
        by_name = {i.name: i for i in usable if i.select is None}
        for name in listed:
            info = by_name.get(name)
            if info is not None and info.stride is not None:
                chosen[info.stride] = info  # the last listed module of each stride
    if not chosen:
        encoder = [i for i in usable if not _decoder(i, usable)]
        containers = [i for i in encoder if i.select is not None or _has_children(inner, i)]
        pool = containers or encoder
        for info in pool:
            assert info.stride is not None
            best = chosen.get(info.stride)
            # levels of one dict output (a segmenter's backbone: 'aux' = layer3, 'out' = layer4)
            # tie: the later key, produced last, is the stage
            tie = best is not None and (info.depth, info.order, info.name) == (
                best.depth,
                best.order,
                best.name,
            )
            if best is None or tie or (info.depth, -info.order) < (best.depth, -best.order):
                chosen[info.stride] = info
        for stride, best in list(chosen.items()):
            # a stem (patch embedding) is not the stage when a stage of its stride follows it
            later = [
                i
                for i in pool
                if i.stride == stride and i.order > best.order and not i.name.startswith(best.name)
            ]
            if _STEM.match(best.name) and later:
                chosen[stride] = min(later, key=lambda i: (i.depth, -i.order))
    # A leaf module (a stem activation) is not a stage when the model has container stages:
    # the paper transfers at the outputs of groups of blocks.
    containers_by_stride = {
        stride: info
        for stride, info in chosen.items()
        if info.select is not None or _has_children(inner, info)
    }
    if containers_by_stride:
        chosen = containers_by_stride
    if not chosen:
        seen = sorted({i.note for i in infos if i.note and i.map_shape is not None})
        why = f" (maps seen: {'; '.join(seen)})" if seen else ""
        raise LayerResolutionError(
            f"found no module of the {side} that produces a feature map (B, C, H, W) larger "
            f"than 1x1{why}; name the layers explicitly, with athooks.Layer(name, "
            "transform=...) for outputs of another layout"
        )
    return [chosen[s] for s in sorted(chosen)]


def _decoder(info: LayerInfo, usable: Sequence[LayerInfo]) -> bool:
    """A map at a stride the encoder had already produced, after a map of larger stride."""
    for early in usable:
        if early.stride == info.stride and early.order < info.start:
            between = (early.order, info.start)
            return any(
                o.stride is not None
                and o.stride > (info.stride or 0)
                and between[0] < o.order < between[1]
                for o in usable
            )
    return False


def _has_children(inner: nn.Module, info: LayerInfo) -> bool:
    return next(iter(inner.get_submodule(info.name).children()), None) is not None


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
        if info is None or info.stride != stage.stride or info.note is not None:
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
        warnings: Why some pairs look suspicious (see :func:`pair_warnings`); a Distiller emits
            each as an :class:`athooks.errors.PairingWarning` when it resolves the layers.
    """

    mode: str
    pairs: list[PairInfo]
    teacher_strides: list[int]
    student_strides: list[int]
    warnings: list[str] = field(default_factory=list)

    def layers(self) -> list[tuple[Layer, Layer]]:
        """The pairs as a ``layers`` argument for :class:`athooks.Distiller`."""
        return [(p.teacher.layer(), p.student.layer()) for p in self.pairs]

    def __str__(self) -> str:
        rows = [("teacher layer", "shape", "stride", "student layer", "shape")]
        for p in self.pairs:
            rows.append(
                (
                    p.teacher.label,
                    _fmt_map(p.teacher),
                    _fmt_stride(p.teacher, p.student),
                    p.student.label,
                    _fmt_map(p.student),
                )
            )
        text = format_table(rows, widths=(16, 16, 6, 16, 16))
        for message in self.warnings:
            text += "\n" + _wrap(f"warning: {message}", 80)
        return text

    __repr__ = __str__


def _fmt_shape(shape: Sequence[int] | None) -> str:
    return "x".join(str(s) for s in shape) if shape else "-"


def _fmt_map(info: LayerInfo) -> str:
    """``(C, *S)`` of the map, with the layout it was read from when it is not channels first."""
    shape = _fmt_shape(info.map_shape)
    return f"{shape} {info.layout}" if info.layout in ("NHWC", "NLC", "NTHWC", "tokens") else shape


def _fmt_stride(teacher: LayerInfo, student: LayerInfo) -> str:
    if teacher.stride == student.stride:
        return str(teacher.stride)
    return f"{teacher.stride}/{student.stride}"


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "  " + word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


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
    """Probe both models on a real input: two samples of it, else the whole batch.

    Two different samples (two sliced from the batch, or one and its mirror image) tell which
    outputs depend on the input; a model that cannot run on them is probed on the whole batch.
    """
    two = two_samples(example)
    if two is not None:
        try:
            return _probe_both(teacher, student, two, teacher_input)
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


def _pair_stages(
    t_stages: Sequence[LayerInfo], s_stages: Sequence[LayerInfo], by_level: bool
) -> list[PairInfo]:
    """Equal strides first; the rest by relative depth, one octave apart at most.

    Two detectors (``by_level``) pair the levels of the same name.
    """
    if by_level:
        s_levels = {s.select: s for s in s_stages}
        pairs = [PairInfo(t, s_levels[t.select]) for t in t_stages if t.select in s_levels]
        if pairs:
            return pairs
    t_by = {int(t.stride or 0): t for t in t_stages}
    s_by = {int(s.stride or 0): s for s in s_stages}
    shared = sorted(set(t_by) & set(s_by))
    chosen = {t_by[v].label: PairInfo(t_by[v], s_by[v]) for v in shared}
    used = {p.student.label for p in chosen.values()}
    for t in t_stages:
        if t.label in chosen:
            continue
        tv = int(t.stride or 0)
        lo = max((v for v in shared if v < tv), default=0)
        hi = min((v for v in shared if v > tv), default=1 << 30)
        options = [
            s
            for s in s_stages
            if s.label not in used
            and lo < int(s.stride or 0) < hi
            and abs(math.log2(int(s.stride or 1) / max(tv, 1))) <= 1
        ]
        if options:
            best = min(options, key=lambda s: abs(s.position - t.position))
            chosen[t.label] = PairInfo(t, best)
            used.add(best.label)
    order = {t.label: k for k, t in enumerate(t_stages)}
    pairs = sorted(chosen.values(), key=lambda p: order[p.teacher.label])
    # keep the student's stages in increasing order along the teacher's
    kept: list[PairInfo] = []
    for p in pairs:
        if not kept or p.student.order >= kept[-1].student.order:  # levels: one order
            kept.append(p)
    return kept


def _is_stem(info: LayerInfo) -> bool:
    """Named like a stem or patch embedding, or in the first tenth of the forward."""
    return bool(_STEM.match(info.name)) or info.position <= _STEM_DEPTH


def pair_warnings(pairs: Sequence[PairInfo]) -> list[str]:
    """Why some pairs look suspicious: what a researcher would not call a pair of stages.

    A stem or patch embedding paired with a deep stage (one that ends after 70% of the
    forward); stages at very different relative depths (how far through the forward each one
    ends: more than 35% of it apart); a
    head or logits map, a map that does not depend on the input, or a map of one cell (which
    ``"auto"`` never picks, but a metadata listing may).

    Args:
        pairs: The pairs.

    Returns:
        One message per suspicious pair, each saying why and how to override.

    Example:
        ```python
        import torchvision
        from athooks.discovery import auto_pairs, pair_warnings

        pairing = auto_pairs(torchvision.models.resnet34(), torchvision.models.resnet18())
        assert pair_warnings(pairing.pairs) == []
        ```
    """
    messages = []
    for p in pairs:
        t, s = p.teacher, p.student
        why = None
        for side, info in (("teacher", t), ("student", s)):
            if info.note is not None:
                why = f"the {side}'s {info.label} is {info.note}"
            elif info.map_shape is not None and math.prod(info.map_shape[1:]) <= 1:
                why = f"the {side}'s {info.label} is a map of one cell"
        if (
            why is None
            and _is_stem(t) != _is_stem(s)
            and max(t.position, s.position) >= _DEEP_DEPTH
        ):
            stem, deep = (t, s) if _is_stem(t) else (s, t)
            why = f"the stem or patch embedding {stem.label} is paired with the deep {deep.label}"
        if why is None and abs(t.position - s.position) > _DEPTH_GAP:
            why = (
                f"{t.label} ends {t.position:.0%} through the teacher's forward, {s.label} "
                f"{s.position:.0%} through the student's"
            )
        if why is not None:
            messages.append(
                f"layers='auto' paired teacher {t.label} with student {s.label}: {why}. To "
                "choose yourself, name the pairs: layers=[(teacher_name, student_name), ...] "
                "(athooks.Layer(name, select=..., transform=...) for levels and layouts; see "
                "athooks.describe)"
            )
    return messages


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
    student (two samples are sliced from it; the whole batch is tried if that fails), passed
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
        The pairing, with :attr:`Pairing.warnings` for suspicious pairs.

    Raises:
        LayerResolutionError: If no stages pair up, or (``"blocks"``) the block layouts differ.

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
    t_strides = [int(s.stride or 0) for s in t_stages]
    s_strides = [int(s.stride or 0) for s in s_stages]
    stage_pairs = _pair_stages(t_stages, s_stages, is_detector(t_inner) and is_detector(s_inner))
    if not stage_pairs:
        raise LayerResolutionError(
            f"the teacher and the student share no stride: teacher stages "
            f"{_stage_list(t_stages)}, student stages {_stage_list(s_stages)}. Name the pairs "
            "explicitly (layers=[(teacher_name, student_name), ...]); maps of different sizes "
            "are resized (resize='student')"
        )
    pairs: list[PairInfo] = []
    if mode == "auto":
        pairs = stage_pairs
    else:
        t_map = {i.name: i for i in t_infos if i.select is None}
        s_map = {i.name: i for i in s_infos if i.select is None}
        t_listed, s_listed = metadata_modules(t_inner), metadata_modules(s_inner)
        t_layout, s_layout, same = [], [], True
        for stage in stage_pairs:
            t_blocks = stage_blocks(t_inner, stage.teacher, t_map, t_listed)
            s_blocks = stage_blocks(s_inner, stage.student, s_map, s_listed)
            if not t_blocks and not s_blocks:
                continue  # a stage without blocks (a stem): nothing to pair
            t_layout.append(f"{stage.teacher.name}: {len(t_blocks)}")
            s_layout.append(f"{stage.student.name}: {len(s_blocks)}")
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
    return Pairing(mode, pairs, t_strides, s_strides, pair_warnings(stage_pairs))


def _stage_list(stages: Sequence[LayerInfo]) -> str:
    return ", ".join(f"{s.label} (stride {s.stride})" for s in stages)


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
