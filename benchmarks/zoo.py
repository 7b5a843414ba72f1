"""Zoo benchmark: does ``layers="auto"`` give a right, differentiable loss on every kind of model?

The coverage run of issue 15. Cases, all with random weights (seeded) and small inputs:

- ``timm``: the smallest model of every timm family (see ``zoo_timm.py`` for the rule), as a
  self-pair (against a second instance of itself) and as teacher of a torchvision resnet18;
- ``torchvision``: every torchvision classifier, self-paired (against resnet18 when it has over
  100M parameters);
- ``detection``, ``segmentation``, ``video``, ``flow``: torchvision's task models, each as teacher
  of a smaller model of its kind where one is natural (``fasterrcnn_resnet50_fpn`` ->
  ``fasterrcnn_mobilenet_v3_large_320_fpn``), else self-paired; detectors in training take
  ``(images, targets)`` (the teacher gets the images only);
- ``homemade``: the models of ``zoo_models.py`` (1-D signals, tokens, keyword-only forward, dict
  output, U-Net, two inputs), a wider teacher for a narrower student.

Each case runs one training step of the student inside ``with Distiller(teacher, student,
layers="auto") as d:`` (the student in train mode, the teacher given as built) and records:

- ok: ``d.loss()`` is finite and its gradient alone (``torch.autograd.grad``) reaches the
  student's parameters with a non-zero value; else the error (exception type, first line);
- the pairs (``d.pairs``, shapes and strides from ``d.pairing``) and the warnings raised;
- suspicious pairs, judged here, independently of athooks (see :func:`judge_pair`): a stem paired
  with a deep stage, a head or logits map, an input-independent map (the paired modules are
  tapped and run on two inputs), a map of one cell, a mismatched relative depth, a batch that is
  not the input's. A suspicious case is *warned* when athooks raised a warning of its own in it.

A case whose model cannot run its own step without athooks either (the benchmark's input does
not suit it) is a *model error*: reported, but left out of ok%.

Run: python benchmarks/zoo.py [--groups timm,torchvision,...] [--limit N] [--match REGEX]
         [--json PATH] [--smoke] [--threads 1] [--timeout 60] [--require-ok 0.97]
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import pathlib
import re
import signal
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import zoo_models

import athooks
from athooks import Distiller

GROUPS = ("timm", "torchvision", "detection", "segmentation", "video", "flow", "homemade")
BATCH = 2
CLASSES = 10  # classifiers' class count: no stage of any zoo model has 10 channels
SEG_CLASSES = 7
DET_CLASSES = 5
ATHOOKS_DIR = str(pathlib.Path(athooks.__file__).resolve().parent)

# ----------------------------------------------------------------------------------- the rules

STEM_RE = re.compile(
    r"^(?:(?:backbone|body|encoder|model|trunk|features|base|net)\.)*"
    r"(?:stem\w*|patch_embed\w*|conv_stem|conv1|bn1|act1|relu|maxpool|conv_proj|pos_embed\w*|"
    r"patch_embedding|embed\w*|cls_token|pos_drop|0)(?:\.|$)"
)
HEAD_WORDS = re.compile(
    r"^(?:heads?|head_\w+|classifier|aux_classifier|fc|logits|final_conv|aux_logits|"
    r"aux_head|box_predictor|box_head|cls_logits|bbox_pred|predictor|mask_predictor|"
    r"keypoint_predictor|pre_logits)$"
)
ATTENTION_WORDS = re.compile(
    r"^(?:attn|attention|self_attn|cross_attn|qkv|[qkv]|[qkv]_norm|[qkv]_proj|query|key|value|"
    r"attn_drop|proj_drop|rel_pos\w*)$"
)
STEM_DEPTH, DEEP_DEPTH, DEPTH_GAP = 0.10, 0.70, 0.35
HEAD_DEPTH = 0.5  # num_classes channels make a logits map only past half the forward


def is_stem(name: str, rel_depth: float | None) -> bool:
    """A stem or patch embedding: named like one, or in the first 10% of the modules that ran."""
    return bool(STEM_RE.match(name)) or (rel_depth is not None and rel_depth <= STEM_DEPTH)


def is_head(
    name: str, channels: int | None, classes: int | None, rel_depth: float | None = None
) -> bool:
    """A head or logits map: a name part like head/classifier/fc/logits, or num_classes channels
    in the second half of the forward (a stem of 10 channels, as dpn48b's, is no logits map)."""
    if any(HEAD_WORDS.match(part) for part in name.split(".")):
        return True
    late = rel_depth is None or rel_depth > HEAD_DEPTH
    return channels is not None and classes is not None and channels == classes and late


@dataclass
class Side:
    """What the benchmark saw of one side of a pair (from its own hooks, and d.pairing)."""

    name: str
    rel_depth: float | None = None  # forward order (last completion) / modules that ran
    map_shape: tuple[int, ...] | None = None  # (C, *S) of the attention map's input
    batch: int | None = None  # first dim of the tapped tensor
    input_dependent: bool | None = None  # None: not measured
    all_zero: bool = False  # the tapped output is zero everywhere (a dead ReLU, say)
    classes: int | None = None


def spatial_cells(map_shape: tuple[int, ...] | None) -> int | None:
    """Cells of a ``(C, *S)`` map: the product of S (1 for a map without spatial axes)."""
    if map_shape is None:
        return None
    return math.prod(map_shape[1:]) if len(map_shape) > 1 else 1


def judge_pair(t: Side, s: Side, batch: int | None = BATCH) -> list[str]:
    """Why a pair is suspicious (empty: it is not), by the benchmark's own rules.

    Example:
        >>> judge_pair(Side("stem", 0.02, (32, 32, 32)), Side("layer4", 0.9, (512, 4, 4)))
        ['stem paired with a deep stage: stem (depth 0.02) - layer4 (depth 0.90)', \
'mismatched relative depth: 0.02 vs 0.90']
    """
    reasons = []
    for a, b in ((t, s), (s, t)):
        if (
            is_stem(a.name, a.rel_depth)
            and b.rel_depth is not None
            and b.rel_depth >= DEEP_DEPTH
            and not is_stem(b.name, b.rel_depth)
        ):
            reasons.append(
                f"stem paired with a deep stage: {a.name} (depth {a.rel_depth or 0:.2f}) - "
                f"{b.name} (depth {b.rel_depth:.2f})"
            )
            break
    for role, side in (("teacher", t), ("student", s)):
        channels = side.map_shape[0] if side.map_shape else None
        if is_head(side.name, channels, side.classes, side.rel_depth):
            reasons.append(f"head or logits map: {role} {side.name} {_fmt(side.map_shape)}")
        if any(ATTENTION_WORDS.match(part) for part in side.name.split(".")):
            reasons.append(f"inside an attention layer: {role} {side.name} {_fmt(side.map_shape)}")
        if side.input_dependent is False:
            why = "zero for both inputs" if side.all_zero else "the same output for two inputs"
            reasons.append(f"input-independent map: {role} {side.name} ({why})")
        if side.map_shape and len(side.map_shape) >= 3 and side.map_shape[-1] != side.map_shape[-2]:
            reasons.append(  # every input of the zoo is square
                f"map not square, from a square input: {role} {side.name} "
                f"{_fmt(side.map_shape)} (a channels-last or token layout read as NCHW?)"
            )
        if spatial_cells(side.map_shape) == 1:
            reasons.append(f"map of one cell: {role} {side.name} {_fmt(side.map_shape)}")
        if batch is not None and side.batch is not None and side.batch != batch:
            reasons.append(
                f"not the input's batch: {role} {side.name} has {side.batch}, input {batch}"
            )
    if (
        t.rel_depth is not None
        and s.rel_depth is not None
        and abs(t.rel_depth - s.rel_depth) > DEPTH_GAP
    ):
        reasons.append(f"mismatched relative depth: {t.rel_depth:.2f} vs {s.rel_depth:.2f}")
    return reasons


def _fmt(shape: tuple[int, ...] | None) -> str:
    return "x".join(map(str, shape)) if shape else "-"


# ------------------------------------------------------------------------- the benchmark's taps


def tensors_of(value: Any) -> list[Tensor]:
    """Every tensor in a module's output, depth first, in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_of(v)]
    return []


@dataclass
class Observation:
    """One run of a model with a hook on every module."""

    order: dict[str, int]  # module name -> rank of its last completion (1-based)
    outputs: dict[str, list[Tensor]]  # the watched modules' output tensors


def split_label(label: str) -> tuple[str, int | str | None]:
    """A pair label's module name and output key: ``backbone['0']`` -> ``("backbone", "0")``.

    Example:
        >>> split_label("backbone['0']"), split_label("lstm[0]"), split_label("layer3")
        (('backbone', '0'), ('lstm', 0), ('layer3', None))
    """
    found = re.fullmatch(r"(.*)\[('[^']*'|\d+)\]", label)
    if found is None:
        return label, None
    return found.group(1), ast.literal_eval(found.group(2))


def select_key(value: Any, key: int | str | None) -> Any:
    """The part of a module's output a label's key names (the whole output without a key)."""
    if key is None:
        return value
    try:
        return value[key]
    except (KeyError, IndexError, TypeError):
        return None


def observe(model: nn.Module, call: Callable[[], Any], watch: set[str]) -> Observation:
    """Run ``call()`` with a forward hook on every module of ``model``, under no_grad.

    ``watch`` holds pair labels (a module name, with an output key for one tensor of a dict or
    tuple output: ``backbone['0']``); their output tensors are kept, under the label.
    """
    done: list[str] = []
    outputs: dict[str, list[Tensor]] = {}
    labels: dict[str, list[tuple[str, int | str | None]]] = {}
    for label in watch:
        name, key = split_label(label)
        labels.setdefault(name, []).append((label, key))
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
            done.append(name)
            for label, key in labels.get(name, ()):
                part = select_key(out, key)
                outputs[label] = [t.detach().float().clone() for t in tensors_of(part)]

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    last = {name: i for i, name in enumerate(done)}
    ranked = sorted(last, key=last.__getitem__)
    order = {name: i + 1 for i, name in enumerate(ranked)}
    for label in watch:  # a label's depth is its module's
        name, _ = split_label(label)
        if name in order:
            order.setdefault(label, order[name])
    return Observation(order, outputs)


def same_outputs(a: list[Tensor], b: list[Tensor]) -> bool:
    """Whether two runs' outputs of one module are identical, bit for bit (it ignores its input).

    Bit for bit: a module that ignores its input (a positional embedding, a ReLU held at zero)
    gives exactly the same tensor, while the deep maps of a randomly initialised network in eval
    mode can collapse to nearly the same values (differences of 1e-7) without being independent
    of the input, which is the random weights' doing, not the pairing's.
    """
    if not a or len(a) != len(b):
        return False
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------- the cases


@dataclass
class Task:
    """How one case's student is run: its inputs, its task loss, the teacher's input."""

    inputs: Callable[[torch.Generator], tuple[tuple[Any, ...], dict[str, Any]]]
    loss: Callable[[Any, tuple[Any, ...], dict[str, Any]], Tensor]
    teacher_input: Callable[..., Any] | None = None


@dataclass
class Case:
    """One teacher/student pair of the zoo."""

    group: str
    name: str
    teacher: str
    student: str
    build: Callable[[], tuple[nn.Module, nn.Module, Task]]
    classes: tuple[int | None, int | None] = (CLASSES, CLASSES)
    timeout: int | None = None  # seconds; None: --timeout


def first_tensor(out: Any) -> Tensor:
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    found = tensors_of(out)
    if not found:
        raise TypeError(f"the model returned no tensor ({type(out).__name__})")
    return found[0]


def classify_loss(out: Any, *_: Any) -> Tensor:
    """Cross-entropy on (B, K) logits against fixed labels; the mean square of anything else."""
    logits = first_tensor(out)
    if logits.dim() == 2:
        labels = torch.arange(logits.shape[0]) % logits.shape[1]
        return F.cross_entropy(logits.float(), labels)
    return logits.float().pow(2).mean()


def image_task(size: tuple[int, ...]) -> Task:
    def inputs(g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (torch.randn(BATCH, *size, generator=g),), {}

    return Task(inputs, classify_loss)


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode())


def runs_at(model: nn.Module, size: tuple[int, ...]) -> bool:
    """Whether ``model`` runs on one ``size`` input (eval, no_grad): the size check of a build."""
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(1, *size))
        return True
    except Exception:
        return False
    finally:
        model.train(was)


SIZES: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {}  # model -> (input size, kwargs)


def timm_build(name: str, student: str) -> Callable[[], tuple[nn.Module, nn.Module, Task]]:
    def build() -> tuple[nn.Module, nn.Module, Task]:
        import timm
        import torchvision

        cfg = timm.get_pretrained_cfg(name)
        default = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
        torch.manual_seed(seed_of(name))
        teacher, size, kwargs = None, default, {}
        if name in SIZES:  # decided by the other case of this model
            size, kwargs = SIZES[name]
            teacher = timm.create_model(name, num_classes=CLASSES, **kwargs)
        elif cfg is not None and cfg.fixed_input_size:  # built for one size: build it for 128 (112)
            for side in (128, 112):
                with contextlib.suppress(Exception):
                    torch.manual_seed(seed_of(name))
                    teacher = timm.create_model(name, num_classes=CLASSES, img_size=side)
                    if runs_at(teacher, (default[0], side, side)):
                        size, kwargs = (default[0], side, side), {"img_size": side}
                        break
                    teacher = None
            if teacher is None:
                torch.manual_seed(seed_of(name))
                teacher = timm.create_model(name, num_classes=CLASSES)
        else:
            teacher = timm.create_model(name, num_classes=CLASSES)
            if runs_at(teacher, (default[0], 128, 128)):
                size = (default[0], 128, 128)
        SIZES[name] = (size, kwargs)
        torch.manual_seed(seed_of(name) + 1)
        if student == "self":
            stud = timm.create_model(name, num_classes=CLASSES, **kwargs)
        else:
            stud = torchvision.models.resnet18(num_classes=CLASSES)
            if size[0] != 3:
                stud.conv1 = nn.Conv2d(size[0], 64, 7, 2, 3, bias=False)
        return teacher, stud, image_task(size)

    return build


def timm_cases() -> list[Case]:
    from zoo_timm import smallest_per_family

    cases = []
    for fam, info in sorted(smallest_per_family().items()):
        model = info["model"]
        for student in ("self", "resnet18"):
            cases.append(
                Case(
                    "timm",
                    f"{fam}/{model}->{student}",
                    model,
                    model if student == "self" else "resnet18",
                    timm_build(model, student),
                    (CLASSES, CLASSES),
                    timeout=60 + int((info["params"] or 0) / 1e6),  # 400M parameters: 460 s
                )
            )
    return cases


# others: 128, or 224 when 128 does not run (in eval: inception_v3's aux head, run in training
# only, needs its native 299)
TV_SIZES = {"vit_h_14": 112, "inception_v3": 299}


def tv_build(name: str, student: str) -> Callable[[], tuple[nn.Module, nn.Module, Task]]:
    def build() -> tuple[nn.Module, nn.Module, Task]:
        import torchvision

        kwargs: dict[str, Any] = {"weights": None, "num_classes": CLASSES}
        if name.startswith("vit_"):
            kwargs["image_size"] = TV_SIZES.get(name, 128)
        if name in ("inception_v3", "googlenet"):
            kwargs["init_weights"] = True
        torch.manual_seed(seed_of(name))
        teacher = torchvision.models.get_model(name, **kwargs)
        side = TV_SIZES.get(name, 128)
        size = (3, side, side) if runs_at(teacher, (3, side, side)) else (3, 224, 224)
        torch.manual_seed(seed_of(name) + 1)
        if student == "self":
            stud = torchvision.models.get_model(name, **kwargs)
        else:
            stud = torchvision.models.resnet18(num_classes=CLASSES)
        return teacher, stud, image_task(size)

    return build


def tv_params(name: str) -> int:
    import torchvision

    try:
        return int(next(iter(torchvision.models.get_model_weights(name))).meta["num_params"])
    except Exception:
        return 0


def torchvision_cases() -> list[Case]:
    import torchvision

    cases = []
    for name in torchvision.models.list_models(module=torchvision.models):
        params = tv_params(name)
        student = "resnet18" if params > 100_000_000 else "self"
        cases.append(
            Case(
                "torchvision",
                f"{name}->{student}",
                name,
                name if student == "self" else "resnet18",
                tv_build(name, student),
                timeout=60 + params // 1_000_000,  # 600M parameters: 660 s
            )
        )
    return cases


# detection: teacher -> student ("self": a second instance)
DETECTION = {
    "fasterrcnn_resnet50_fpn": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_resnet50_fpn_v2": "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "self",
    "retinanet_resnet50_fpn_v2": "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn": "self",
    "fcos_resnet50_fpn": "self",
    "ssd300_vgg16": "ssdlite320_mobilenet_v3_large",
    "ssdlite320_mobilenet_v3_large": "self",
    "maskrcnn_resnet50_fpn_v2": "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn": "self",
    "keypointrcnn_resnet50_fpn": "self",
}
DET_SIZE = 128


def detector(name: str) -> nn.Module:
    import torchvision

    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None}
    kwargs["num_classes"] = 2 if name.startswith("keypoint") else DET_CLASSES
    if name.startswith("keypoint"):
        kwargs["num_keypoints"] = 5
    if not name.startswith("ssd"):
        kwargs["min_size"], kwargs["max_size"] = DET_SIZE, DET_SIZE
    return torchvision.models.get_model(name, **kwargs)


def detection_task(teacher: str, student: str) -> Task:
    masks = student.startswith("mask")
    keypoints = student.startswith("keypoint")
    classes = 2 if keypoints else DET_CLASSES

    def inputs(g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
        images = [torch.rand(3, DET_SIZE, DET_SIZE, generator=g) for _ in range(BATCH)]
        targets = []
        for _ in range(BATCH):
            n = 3
            xy = torch.rand(n, 2, generator=g) * (DET_SIZE / 2)
            wh = 8 + torch.rand(n, 2, generator=g) * (DET_SIZE / 2 - 8)
            boxes = torch.cat([xy, xy + wh], 1)
            target = {"boxes": boxes, "labels": torch.randint(1, classes, (n,), generator=g)}
            if masks:
                m = torch.zeros(n, DET_SIZE, DET_SIZE, dtype=torch.uint8)
                for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                    m[i, y0:y1, x0:x1] = 1
                target["masks"] = m
            if keypoints:
                kx = xy[:, None, 0] + torch.rand(n, 5, generator=g) * wh[:, None, 0]
                ky = xy[:, None, 1] + torch.rand(n, 5, generator=g) * wh[:, None, 1]
                target["keypoints"] = torch.stack([kx, ky, torch.ones(n, 5)], -1)
            targets.append(target)
        return (images, targets), {}

    def loss(out: Any, *_: Any) -> Tensor:
        return sum(v for v in out.values())  # type: ignore[return-value]

    return Task(inputs, loss, teacher_input=lambda images, targets=None: (images,))


def det_build(name: str, student: str) -> Callable[[], tuple[nn.Module, nn.Module, Task]]:
    def build() -> tuple[nn.Module, nn.Module, Task]:
        torch.manual_seed(seed_of(name))
        teacher = detector(name)
        torch.manual_seed(seed_of(name) + 1)
        stud_name = name if student == "self" else student
        return teacher, detector(stud_name), detection_task(name, stud_name)

    return build


def detection_cases() -> list[Case]:
    cases = []
    for teacher, student in DETECTION.items():
        s = teacher if student == "self" else student
        cases.append(
            Case(
                "detection",
                f"{teacher}->{student}",
                teacher,
                s,
                det_build(teacher, student),
                (None, None),
                timeout=120,
            )
        )
    return cases


SEGMENTATION = {
    "deeplabv3_resnet101": "deeplabv3_resnet50",
    "deeplabv3_resnet50": "deeplabv3_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large": "lraspp_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large": "self",
    "fcn_resnet101": "fcn_resnet50",
    "fcn_resnet50": "deeplabv3_mobilenet_v3_large",
}
SEG_SIZE = 96


def segmenter(name: str) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(
        name, weights=None, weights_backbone=None, num_classes=SEG_CLASSES
    )


def seg_loss(out: Any, *_: Any) -> Tensor:
    logits = out["out"]
    target = torch.arange(logits.shape[-1]).remainder(SEG_CLASSES)
    target = target.expand(logits.shape[0], logits.shape[-2], -1)
    return F.cross_entropy(logits, target)


def seg_build(name: str, student: str) -> Callable[[], tuple[nn.Module, nn.Module, Task]]:
    def build() -> tuple[nn.Module, nn.Module, Task]:
        torch.manual_seed(seed_of(name))
        teacher = segmenter(name)
        torch.manual_seed(seed_of(name) + 1)
        stud = segmenter(name if student == "self" else student)
        task = image_task((3, SEG_SIZE, SEG_SIZE))
        return teacher, stud, Task(task.inputs, seg_loss)

    return build


def segmentation_cases() -> list[Case]:
    return [
        Case(
            "segmentation",
            f"{t}->{s}",
            t,
            t if s == "self" else s,
            seg_build(t, s),
            (SEG_CLASSES, SEG_CLASSES),
        )
        for t, s in SEGMENTATION.items()
    ]


# video: teacher -> (student, input size (C, T, H, W))
VIDEO = {
    "r3d_18": ("mc3_18", (3, 4, 64, 64)),
    "mc3_18": ("r3d_18", (3, 4, 64, 64)),
    "r2plus1d_18": ("r3d_18", (3, 4, 64, 64)),
    "s3d": ("self", (3, 16, 224, 224)),  # its final pool is 2x7x7 at stride 8x32x32
    "mvit_v1_b": ("mvit_v2_s", (3, 16, 224, 224)),  # fixed input size
    "mvit_v2_s": ("self", (3, 16, 224, 224)),
    "swin3d_b": ("swin3d_t", (3, 4, 64, 64)),
    "swin3d_s": ("swin3d_t", (3, 4, 64, 64)),
    "swin3d_t": ("self", (3, 4, 64, 64)),
}


def vid_build(name: str, student: str, size: tuple[int, ...]) -> Callable[..., Any]:
    def build() -> tuple[nn.Module, nn.Module, Task]:
        import torchvision

        torch.manual_seed(seed_of(name))
        teacher = torchvision.models.get_model(name, weights=None, num_classes=CLASSES)
        torch.manual_seed(seed_of(name) + 1)
        stud = torchvision.models.get_model(
            name if student == "self" else student, weights=None, num_classes=CLASSES
        )
        return teacher, stud, image_task(size)

    return build


def video_cases() -> list[Case]:
    return [
        Case(
            "video",
            f"{t}->{s}",
            t,
            t if s == "self" else s,
            vid_build(t, s, size),
            timeout=(480 if t.startswith("mvit") else 240) if size[-1] > 100 else None,
        )
        for t, (s, size) in VIDEO.items()
    ]


FLOW = {"raft_large": "raft_small", "raft_small": "self"}
FLOW_SIZE = 128  # RAFT needs feature maps of 16 at stride 8


def flow_build(name: str, student: str) -> Callable[[], tuple[nn.Module, nn.Module, Task]]:
    def build() -> tuple[nn.Module, nn.Module, Task]:
        import torchvision

        torch.manual_seed(seed_of(name))
        teacher = torchvision.models.get_model(name, weights=None)
        torch.manual_seed(seed_of(name) + 1)
        stud = torchvision.models.get_model(name if student == "self" else student, weights=None)

        def inputs(g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
            a = torch.rand(BATCH, 3, FLOW_SIZE, FLOW_SIZE, generator=g) * 2 - 1
            b = torch.rand(BATCH, 3, FLOW_SIZE, FLOW_SIZE, generator=g) * 2 - 1
            return (a, b), {"num_flow_updates": 2}

        def loss(out: Any, *_: Any) -> Tensor:
            return out[-1].abs().mean()

        return teacher, stud, Task(inputs, loss)

    return build


def flow_cases() -> list[Case]:
    return [
        Case("flow", f"{t}->{s}", t, t if s == "self" else s, flow_build(t, s), (None, None))
        for t, s in FLOW.items()
    ]


def homemade_build(kind: str) -> Callable[[], tuple[nn.Module, nn.Module, Task]]:
    def build() -> tuple[nn.Module, nn.Module, Task]:
        cls = getattr(zoo_models, kind)
        torch.manual_seed(seed_of(kind))
        teacher = cls(width=32)
        torch.manual_seed(seed_of(kind) + 1)
        student = cls(width=16)
        if kind == "Conv1dNet":
            task = image_task((2, 128))
        elif kind == "TokenTransformer":
            task = image_task((24, 16))
        elif kind == "KeywordOnlyNet":

            def inputs(g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
                return (), {"image": torch.randn(BATCH, 3, 64, 64, generator=g)}

            task = Task(inputs, classify_loss)
        elif kind == "TwoInputNet":

            def inputs(g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
                a = torch.randn(BATCH, 3, 64, 64, generator=g)
                return (a, torch.randn(BATCH, 3, 64, 64, generator=g)), {}

            task = Task(inputs, classify_loss)
        elif kind == "UNet":
            task = Task(image_task((3, 64, 64)).inputs, lambda out, *_: out.pow(2).mean())
        else:
            task = image_task((3, 64, 64))
        return teacher, student, task

    return build


HOMEMADE = ("Conv1dNet", "TokenTransformer", "KeywordOnlyNet", "DictOutputNet", "UNet",
            "TwoInputNet")  # fmt: skip


def homemade_cases() -> list[Case]:
    return [
        Case(
            "homemade",
            f"{k}(32)->{k}(16)",
            f"{k}(width=32)",
            f"{k}(width=16)",
            homemade_build(k),
            (3, 3) if k == "UNet" else (CLASSES, CLASSES),
        )
        for k in HOMEMADE
    ]


CASES: dict[str, Callable[[], list[Case]]] = {
    "timm": timm_cases,
    "torchvision": torchvision_cases,
    "detection": detection_cases,
    "segmentation": segmentation_cases,
    "video": video_cases,
    "flow": flow_cases,
    "homemade": homemade_cases,
}
SMOKE = {  # a handful of quick cases of every group
    "timm": r"^(resnet:resnet/|mobilenetv3:mobilenetv/|vision_transformer:vit/)",
    "torchvision": r"^(resnet18|mobilenet_v3_small|squeezenet1_1)->",
    "detection": r"^fasterrcnn_mobilenet_v3_large_320_fpn->",
    "segmentation": r"^lraspp_mobilenet_v3_large->",
    "video": r"^r3d_18->",
    "flow": r"^raft_small->",
    "homemade": r".",
}

# ------------------------------------------------------------------------------- running a case


class CaseTimeoutError(Exception):
    """A case ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def on_alarm(_signum: int, _frame: Any) -> None:
        raise CaseTimeoutError(f"the case ran over its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class WarningRecord:
    message: str
    category: str
    athooks: bool  # raised by athooks' own code


@contextlib.contextmanager
def record_warnings() -> Iterator[list[WarningRecord]]:
    """Every warning raised inside, with whether athooks' own code raised it.

    The origin is the frame that called ``warnings.warn`` (found on the stack while the warning
    is shown, whatever ``stacklevel`` it was given); athooks' if that frame's file is in the
    athooks package.
    """
    log: list[WarningRecord] = []

    def show(message: Any, category: type[Warning], *_: Any, **__: Any) -> None:
        frame = sys._getframe(1)
        while frame is not None and (
            frame.f_code.co_filename == __file__ or frame.f_code.co_filename.endswith("warnings.py")
        ):
            frame = frame.f_back
        origin = frame.f_code.co_filename if frame is not None else ""
        own = str(pathlib.Path(origin).resolve()).startswith(ATHOOKS_DIR) if origin else False
        log.append(WarningRecord(str(message).splitlines()[0][:300], category.__name__, own))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield log


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def pair_sides(d: Distiller, pairs: list[tuple[str, str]]) -> list[tuple[Side, Side]]:
    """Sides from athooks' own report (names, map shapes), before the benchmark's measurements.

    ``d.pairs[i]`` takes its shapes from ``d.pairing.pairs[i]`` when the two name the same
    modules, else from the first pairing entry of those names (a Layer selecting several dict
    keys may give several pairs of one module pair); none when ``d.pairing`` does not list it.
    """
    pairing = d.pairing
    listed = [] if pairing is None else list(pairing.pairs)
    by_names: dict[tuple[str, str], Any] = {}
    for p in listed:
        by_names.setdefault((p.teacher.name, p.student.name), p)
    sides = []
    for i, (t, s) in enumerate(pairs):
        names = (split_label(t)[0], split_label(s)[0])
        p = listed[i] if i < len(listed) else None
        if p is None or (p.teacher.name, p.student.name) not in ((t, s), names):
            p = by_names.get((t, s)) or by_names.get(names)
        ts = p.teacher.map_shape if p is not None else None
        ss = p.student.map_shape if p is not None else None
        sides.append(
            (
                Side(str(t), map_shape=tuple(ts) if ts else None),
                Side(str(s), map_shape=tuple(ss) if ss else None),
            )
        )
    return sides


def measure_side(
    model: nn.Module,
    sides: list[Side],
    calls: tuple[Callable[[], Any], Callable[[], Any]],
    classes: int | None,
) -> None:
    """Fill in relative depth, batch, input dependence (and a map shape) from two runs."""
    watch = {s.name for s in sides}
    runs = []
    for call in calls:
        torch.manual_seed(1234)  # the same dropout masks in both runs
        runs.append(observe(model, call, watch))
    first, second = runs
    for side in sides:
        side.classes = classes
        rank = first.order.get(side.name)
        modules = len({split_label(n)[0] for n in first.order})
        side.rel_depth = rank / modules if rank is not None and modules else None
        outs = first.outputs.get(side.name)
        if outs:
            side.batch = outs[0].shape[0] if outs[0].dim() else None
            side.input_dependent = not same_outputs(outs, second.outputs.get(side.name, []))
            side.all_zero = all(not bool(t.any()) for t in outs)
            if side.map_shape is None and outs[0].dim() >= 2:
                side.map_shape = tuple(outs[0].shape[1:])


def run_case(case: Case, timeout: int) -> dict[str, Any]:
    """One case end to end; never raises (a failure is recorded)."""
    result: dict[str, Any] = {
        "group": case.group,
        "name": case.name,
        "teacher": case.teacher,
        "student": case.student,
        "ok": False,
        "error": None,
        "stage": None,
        "pairs": [],
        "warnings": [],
        "suspicious": [],
    }
    start = time.perf_counter()
    teacher = student = task = d = None
    stage = "build"
    log: list[WarningRecord] = []
    try:
        with time_limit(max(case.timeout or 0, timeout)), record_warnings() as log:
            teacher, student, task = case.build()
            student.train()
            params = [p for p in student.parameters() if p.requires_grad]
            gen = torch.Generator().manual_seed(seed_of(case.name))
            args, kwargs = task.inputs(gen)
            stage = "distill"
            try:
                with Distiller(
                    teacher, student, layers="auto", teacher_input=task.teacher_input
                ) as d:
                    out = student(*args, **kwargs)
                    transfer = d.loss()
                    total = transfer + task.loss(out, args, kwargs)
                    grads = (
                        torch.autograd.grad(transfer, params, retain_graph=True, allow_unused=True)
                        if transfer.requires_grad
                        else []  # no graph to the student at all: NoGradient below
                    )
                    if total.requires_grad:
                        total.backward()
                    pairs = [(str(p[0]), str(p[1])) for p in d.pairs]
                    sides = pair_sides(d, pairs)
                    pairing = d.pairing
            except CaseTimeoutError:
                raise
            except Exception as exc:
                with contextlib.suppress(Exception):
                    result["pairs"] = [list(p) for p in d.pairs]  # type: ignore[union-attr]
                # the model's own step without athooks: if it fails too, the input does not suit it
                try:
                    student.zero_grad(set_to_none=True)
                    plain = student(*args, **kwargs)
                    task.loss(plain, args, kwargs).backward()
                except Exception as plain_exc:
                    result["model_error"] = first_line(plain_exc)
                    stage = "model"
                raise exc from None
            result["loss"] = float(transfer.detach())
            result["pairs"] = [list(p) for p in pairs]
            if pairing is not None:
                result["pairing"] = [
                    {
                        "teacher": p.teacher.name,
                        "teacher_shape": list(p.teacher.map_shape or ()),
                        "teacher_stride": p.teacher.stride,
                        "student": p.student.name,
                        "student_shape": list(p.student.map_shape or ()),
                        "student_stride": p.student.stride,
                    }
                    for p in pairing.pairs
                ]
            finite = bool(torch.isfinite(transfer.detach()).all())
            reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
            if not pairs:
                result["error"] = "NoPairs: auto found no pair"
            elif not finite:
                result["error"] = f"NonFinite: d.loss() = {float(transfer.detach())}"
            elif not reached:
                result["error"] = "NoGradient: no gradient of d.loss() reached the student"
            else:
                result["ok"] = True
            result["stage"] = None if result["ok"] else "result"
            stage = "judge"  # the benchmark's own judgement of the pairs
            if pairs:
                judge_case(case, teacher, student, task, sides, result)
        result["warnings"] = [dataclasses.asdict(w) for w in log]
    except Exception as exc:
        if stage == "judge":
            result["judge_error"] = first_line(exc)
        else:
            result["error"] = first_line(exc)
            result["stage"] = stage
        result["warnings"] = [dataclasses.asdict(w) for w in log]
    finally:
        del teacher, student, task, d
        gc.collect()
    result["warned"] = any(w["athooks"] for w in result["warnings"])
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def judge_case(
    case: Case, teacher: nn.Module, student: nn.Module, task: Task, sides: list, result: dict
) -> None:
    """Measure both models' paired modules (two inputs each) and apply the rules."""
    g1 = torch.Generator().manual_seed(seed_of(case.name) + 101)
    g2 = torch.Generator().manual_seed(seed_of(case.name) + 202)
    a1, k1 = task.inputs(g1)
    a2, k2 = task.inputs(g2)

    def teacher_call(args: tuple, kwargs: dict) -> Callable[[], Any]:
        if task.teacher_input is not None:
            t_args = task.teacher_input(*args, **kwargs)
            t_args = t_args if isinstance(t_args, tuple) else (t_args,)
            return lambda: teacher(*t_args)
        return lambda: teacher(*args, **kwargs)

    teacher_mode = teacher.training
    teacher.eval()  # as athooks runs it
    try:
        measure_side(
            teacher,
            [t for t, _ in sides],
            (teacher_call(a1, k1), teacher_call(a2, k2)),
            case.classes[0],
        )
    finally:
        teacher.train(teacher_mode)
    measure_side(
        student,
        [s for _, s in sides],
        (lambda: student(*a1, **k1), lambda: student(*a2, **k2)),
        case.classes[1],
    )
    result["suspicious"] = judgement(sides)
    result["pair_sides"] = [[dataclasses.asdict(t), dataclasses.asdict(s)] for t, s in sides]


def judgement(sides: list[tuple[Side, Side]]) -> list[str]:
    """Every reason of every pair, as ``"teacher - student: reason"``."""
    return [f"{t.name} - {s.name}: {reason}" for t, s in sides for reason in judge_pair(t, s)]


# -------------------------------------------------------------------------------------- reporting

COLUMNS = ("group", "cases", "ok", "error", "model-err", "susp-warned", "susp-unwarned", "ok%")


def summarise(results: list[dict]) -> list[dict[str, Any]]:
    """One row per group and a total: counts, and ok% = ok / (cases - model errors)."""
    rows = []
    groups = [g for g in GROUPS if any(r["group"] == g for r in results)]
    for group in [*groups, "total"]:
        rs = [r for r in results if group in ("total", r["group"])]
        model_err = sum(r["stage"] == "model" for r in rs)
        ok = sum(r["ok"] for r in rs)
        susp = [r for r in rs if r["suspicious"]]
        counted = len(rs) - model_err
        rows.append(
            {
                "group": group,
                "cases": len(rs),
                "ok": ok,
                "error": len(rs) - ok - model_err,
                "model-err": model_err,
                "susp-warned": sum(r["warned"] for r in susp),
                "susp-unwarned": sum(not r["warned"] for r in susp),
                "ok%": round(100 * ok / counted, 1) if counted else 0.0,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in COLUMNS]
    lines = [
        "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(COLUMNS, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(
                str(r[c]).rjust(w) if i else str(r[c]).ljust(w)
                for i, (c, w) in enumerate(zip(COLUMNS, widths, strict=True))
            )
        )
    return "\n".join(lines)


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of a table printed by :func:`format_table` (the first one found in ``text``)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["group", "cases"])
    rows = []
    for line in lines[start + 2 :]:
        cells = line.split()
        if len(cells) != len(COLUMNS):
            break
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return rows


def error_kind(result: dict) -> str:
    """An error's type and the first clause of its message, names and numbers elided.

    Example:
        >>> error_kind({"stage": "distill", "error": "E: no stride 'x' shared (stride 4): fix"})
        "E: no stride '…' shared"
    """
    kind, _, message = (result["error"] or "").partition(": ")
    clause = re.split(r"[:;(]", message, maxsplit=1)[0].strip()
    clause = re.sub(r"\d+(\.\d+)?", "…", re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", clause))
    return ("(model) " if result["stage"] == "model" else "") + f"{kind}: {clause}"[:110]


def report(results: list[dict]) -> str:
    out = [format_table(summarise(results)), ""]
    failures = [r for r in results if not r["ok"]]
    if failures:
        out.append("errors by kind (names and numbers elided):")
        for kind, count in collections.Counter(error_kind(r) for r in failures).most_common():
            out.append(f"  {count:4d}  {kind}")
        out.append("")
        out.append(f"failures ({len(failures)}):")
        for r in failures:
            tag = "model" if r["stage"] == "model" else r["stage"]
            out.append(f"  [{r['group']}] {r['name']} ({tag}): {r['error']}")
        out.append("")
    rules = collections.Counter(
        rule
        for r in results
        for rule in {reason.split(": ")[1] for reason in r["suspicious"] if ": " in reason}
    )
    if rules:
        out.append("suspicious cases by rule (a case may break several):")
        for rule, count in rules.most_common():
            out.append(f"  {count:4d}  {rule}")
        out.append("")
    unwarned = [r for r in results if r["suspicious"] and not r["warned"]]
    if unwarned:
        out.append(f"suspicious, not warned ({len(unwarned)}):")
        for r in unwarned:
            out.append(f"  [{r['group']}] {r['name']}: pairs {r['pairs']}")
            for reason in r["suspicious"]:
                out.append(f"      {reason}")
        out.append("")
    warned = [r for r in results if r["suspicious"] and r["warned"]]
    if warned:
        out.append(f"suspicious, warned ({len(warned)}):")
        for r in warned:
            first = next(w["message"] for w in r["warnings"] if w["athooks"])
            out.append(f"  [{r['group']}] {r['name']}: {r['suspicious'][0]}  | warning: {first}")
        out.append("")
    return "\n".join(out)


def select_cases(
    groups: list[str], match: str | None, limit: int | None, smoke: bool
) -> list[Case]:
    cases = []
    for group in groups:
        found = CASES[group]()
        if smoke:
            found = [c for c in found if re.search(SMOKE[group], c.name)]
        if match:
            found = [c for c in found if re.search(match, c.name)]
        cases += found[:limit] if limit else found
    return cases


def git_head(where: str | pathlib.Path) -> str:
    """The short commit of the checkout holding ``where``; ``+dirty`` if it has changes there."""
    try:

        def git(*cmd: str) -> str:
            return subprocess.run(
                ["git", *cmd], capture_output=True, text=True, cwd=where, check=True
            ).stdout.strip()

        head = git("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--", ".") else "")
    except Exception:
        return "unknown"


def versions() -> str:
    """Where athooks and the benchmark come from, at which commits, with which libraries."""
    import timm
    import torchvision

    return (
        f"athooks {athooks.__version__} from {ATHOOKS_DIR} (commit {git_head(ATHOOKS_DIR)}), "
        f"benchmark commit {git_head(pathlib.Path(__file__).parent)}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, timm {timm.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=",".join(GROUPS), help="comma-separated groups")
    parser.add_argument("--limit", type=int, default=None, help="at most N cases per group")
    parser.add_argument("--match", default=None, help="only cases whose name matches REGEX")
    parser.add_argument("--json", default=None, help="write per-case results to PATH")
    parser.add_argument("--smoke", action="store_true", help="a handful of cases of every group")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--timeout", type=int, default=60, help="seconds per case, at least (big models get more)"
    )
    parser.add_argument(
        "--require-ok", type=float, default=None, help="exit 1 below this ok fraction"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    parser.add_argument("--shard", default=None, help="I/N: run the I-th of N shares of the cases")
    parser.add_argument("--reverse", action="store_true", help="run the cases last first")
    parser.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="PATH",
        help="no run: report the results saved in these --json files (merged, first wins)",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        merged: dict[tuple[str, str], dict] = {}
        for path in args.from_json:
            for r in json.loads(pathlib.Path(path).read_text())["cases"]:
                merged.setdefault((r["group"], r["name"]), r)
        results = sorted(merged.values(), key=lambda r: (GROUPS.index(r["group"]), r["name"]))
        for r in results:  # judged again by today's rules, from the saved measurements
            if r.get("pair_sides"):
                r["suspicious"] = judgement([(Side(**t), Side(**s)) for t, s in r["pair_sides"]])
        print(f"zoo benchmark, {len(results)} cases from {', '.join(args.from_json)}")
        print(report(results))
        if args.json:
            write_json(args.json, results, args, time.perf_counter())
        return exit_code(results, args.require_ok)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {', '.join(GROUPS)}")
    torch.set_num_threads(args.threads)
    cases = select_cases(groups, args.match, args.limit, args.smoke)
    if args.shard:
        index, count = (int(v) for v in args.shard.split("/"))
        cases = [c for c in cases if seed_of(c.name) % count == index]  # mixes heavy and light
    if args.reverse:
        cases.reverse()
    results = []
    started = time.perf_counter()
    for i, case in enumerate(cases, 1):
        result = run_case(case, args.timeout)
        results.append(result)
        if not args.quiet:
            state = "ok" if result["ok"] else f"ERROR ({result['stage']}) {result['error']}"
            susp = (
                f" SUSPICIOUS{'' if result['warned'] else ' unwarned'}"
                if result["suspicious"]
                else ""
            )
            print(
                f"[{i}/{len(cases)}] {case.group} {case.name}: {state}{susp} "
                f"({result['seconds']} s)",
                file=sys.stderr,
                flush=True,
            )
        if args.json:  # after every case: a killed run keeps what it measured
            write_json(args.json, results, args, started)
    print(
        f"zoo benchmark: {len(cases)} cases in {time.perf_counter() - started:.0f} s; {versions()}"
    )
    print(report(results))
    if args.json:
        write_json(args.json, results, args, started)
    return exit_code(results, args.require_ok)


def exit_code(results: list[dict], require_ok: float | None) -> int:
    """0, or 1 when ``--require-ok`` is given and the total ok fraction is below it."""
    rows = summarise(results)
    if require_ok is not None and rows and rows[-1]["ok%"] < 100 * require_ok:
        return 1
    return 0


def write_json(path: str, results: list[dict], args: argparse.Namespace, started: float) -> None:
    import timm
    import torchvision

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "athooks_commit": git_head(ATHOOKS_DIR),
        "benchmark_commit": git_head(pathlib.Path(__file__).parent),
        "athooks": athooks.__version__,
        "athooks_dir": ATHOOKS_DIR,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "threads": args.threads,
        "argv": sys.argv[1:],
        "seconds": round(time.perf_counter() - started),
    }
    payload = {"meta": meta, "summary": summarise(results), "cases": results}
    pathlib.Path(path).write_text(json.dumps(payload, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
