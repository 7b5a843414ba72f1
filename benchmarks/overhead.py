"""What attention transfer costs on top of the floor: step time and peak memory, side by side.

Variants, each with its own copy of the same randomly initialised teacher and student:

* ``floor``: the teacher's forward under ``no_grad``, then the student's cross-entropy step, no
  transfer. No distillation step can cost less.
* ``reference``: hand-written AT as in the authors' code: the student and then the teacher (under
  ``no_grad``) are run block by block by hand and return the chosen block outputs directly (no
  hooks); the teacher's outputs are kept until the loss, ``at(x) = normalize(x.pow(2).mean(1))``,
  ``beta * sum(mean((at(s) - at(t))^2))``.
* ``athooks``: ``athooks.Distiller`` with the same layer pairs and its default AT loss (the same
  formula), attached once.
* ``torchdistill``: torchdistill's ``ForwardHookManager`` on both models plus its ``ATLoss``
  (``mode="code"``, each pair weighted by ``beta``), teacher first as in its distillation box;
  only when torchdistill is importable (a benchmark-only dependency, never a runtime one).
* ``athooks@LABEL``, with ``--baseline-src DIR``: the athooks of another checkout, used exactly
  as ``athooks`` is (public API, same layers), in the same timing rounds and memory children,
  with ratios athooks / baseline; see "Against another commit" below.

One step is forward, loss, backward and an SGD update (momentum 0.9, weight decay 5e-4, the
authors' optimiser) on a fixed random batch. Before timing, the variants' losses are checked to
agree on the same weights. Step times are measured in one process, interleaved (every round runs
each variant once, in an order rotated from round to round) after warm-up rounds; the table gives
the median step time, the median of the round-by-round ratios to the floor and their spread.
Peak memory is measured in a fresh process per variant doing 3 steps: peak RSS on CPU (run with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the system and RSS tracks live
tensors), ``torch.cuda.max_memory_allocated`` on CUDA. Settings:

* ``resnet34->resnet18`` (timm) at 64x64, ``wrn16_2->wrn16_1`` (athooks.models) at 32x32, the
  stage outputs, batch 32 and 128: time and memory;
* ``resnet50->resnet34`` at 128x128, batch 32, taps after all 16 residual blocks: memory;
* a sweep of the number of captured blocks (1 to all 16) on ``resnet50->resnet34`` at 64x64,
  batch 32: each variant's own transfer work (its forward-side code timed by wrapping it, the
  backward of the autograd nodes it adds from the profiler) and the end-to-end difference, with
  the cost per layer from a least-squares line;
* a breakdown of athooks' extra time per step (taps, ``d.loss()``, backward) at batch 32;
* with ``--gpu`` (for ``--device cuda``), the settings are resnet34->resnet18 and
  resnet50->resnet34 at 224x224, batch 64 and 128, and the heavy setting resnet50->resnet34 at
  224x224 with every block tapped;
* the options part (``--only options``, or any of its flags alone): the compiled student
  (``--compile``: ``floor+compile`` and ``athooks+compile``, backend ``--compile-backend``, with
  the graph count and graph breaks of ``torch._dynamo.explain``) and the opt-in teacher options
  (``--teacher-dtype bf16|fp16``, ``--teacher-compile``, ``--teacher-channels-last``,
  ``--truncate``: variants ``athooks+teacher_bf16`` and so on), each with its step time and
  memory against its floor and, for the teacher options, how far the teacher's normalised maps
  and the AT loss move from the float32 eager teacher's; at the smallest batch of each pair.

Run: python3 benchmarks/overhead.py [--out overhead.md] [--budget 75] [--rounds 40]
     [--device cpu|cuda] [--channels-last] [--bf16] [--threads 1]
     [--only timing memory sweep breakdown options] [--smoke]
     [--gpu] [--compile [--compile-backend inductor]] [--teacher-dtype bf16|fp16]
     [--teacher-compile] [--teacher-channels-last] [--truncate]
     [--baseline-src DIR [--baseline-label main]]

Against another commit (no regression in step time or peak memory against main, in one run):

    git worktree add --detach /tmp/athooks-main main
    python3 benchmarks/overhead.py --baseline-src /tmp/athooks-main --only timing memory
    git worktree remove /tmp/athooks-main

``DIR/athooks`` is copied to a temporary folder as package ``athooks_baseline``, its absolute
imports renamed, and imported next to today's ``athooks`` (see :func:`load_baseline`, which checks
that it runs only its own modules with its own plugin manager). It joins the loss check, the
step-time rounds (columns ``wall/CPU vs athooks@main``) and the memory children (every child then
imports both packages), and a last table puts athooks / baseline side by side per setting. In
such a run neither package loads entry-point plugins (``ATHOOKS_DISABLE_PLUGIN_AUTOLOAD=1``).
The sweep and the breakdown leave the baseline out: they wrap athooks internals by name, listed
in :func:`instrumentation_targets` (update it when they are renamed; a missing one is noted).
"""

from __future__ import annotations

import argparse
import ast
import atexit
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import pathlib
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import athooks
from athooks.models import create_model

VARIANTS = ("floor", "reference", "athooks", "torchdistill")
CONTROL = "floor (A/A)"
BETA = 1e3
MEMORY_STEPS = 3
MB = 1e6


def have_torchdistill() -> bool:
    return importlib.util.find_spec("torchdistill") is not None


# --------------------------------------------------------------------------- instrumentation

Label = str | Callable[[Any], str]


def instrumentation_targets() -> list[tuple[str, str, Label]]:
    """The athooks internals that the breakdown and the sweep's own-work timing wrap, by name.

    Each target is ``(owner, attribute, label)``: ``owner`` the dotted path of a class,
    ``attribute`` the method wrapped on it (its CPU time is accumulated while it runs), ``label``
    the breakdown row that time goes to, a string or a function of the instance called. These
    are internal names of athooks' step lifecycle: when it changes, update this table. A target
    that does not exist (any more) is left out with a note in the report, not a crash, and so is
    one that exists but is never called during the measured steps.
    """
    return [
        ("athooks.taps.Tap", "capture", lambda tap: f"{tap.side} taps: mapping at capture"),
        ("athooks.distiller.Distiller", "loss", "d.loss(): the AT loss on the maps"),
        ("athooks.step.StepRecorder", "_end", "end of the student's forward"),
    ]


Target = tuple[type, str, Callable[[Any], str]]


def _resolve(path: str) -> Any | None:
    """The object at a dotted path (``package.module.Class``), or None where there is none."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name, None)
            if obj is None:
                return None
        return obj
    return None


def resolve_targets(
    targets: Sequence[tuple[str, str, Label]],
) -> tuple[list[Target], list[str]]:
    """The targets that exist, ready for :func:`timed_methods`; a note for each that does not."""
    found: list[Target] = []
    missing: list[str] = []
    for owner_path, attribute, label in targets:
        owner = _resolve(owner_path)
        if not isinstance(owner, type):
            missing.append(f"`{owner_path}` does not exist (or is not a class)")
            continue
        if not inspect.isfunction(inspect.getattr_static(owner, attribute, None)):
            missing.append(f"`{owner_path}.{attribute}` does not exist (or is not a method)")
            continue
        label_of = label if callable(label) else (lambda _, text=label: text)
        found.append((owner, attribute, label_of))
    return found, missing


# --------------------------------------------------------------------------- baseline athooks

BASELINE_PACKAGE = "athooks_baseline"
AUTOLOAD_ENV = "ATHOOKS_DISABLE_PLUGIN_AUTOLOAD"
_baselines: dict[str, types.ModuleType] = {}  # real path of --baseline-src -> package


def rename_package(source: str, old: str = "athooks", new: str = BASELINE_PACKAGE) -> str:
    """``source`` with its absolute imports of package ``old`` and its ``"old.x"`` strings renamed.

    ``from old.x import y`` becomes ``from new.x import y``; ``import old`` becomes
    ``import new as old`` (the name ``old`` in that module is then the renamed package);
    ``import old.x`` becomes ``import new.x, new as old``; string literals that start with
    ``old.`` (module names for importlib) start with ``new.``. Relative imports need nothing.
    """

    def plain_import(m: re.Match[str]) -> str:
        indent, sub, alias = m.group(1), m.group(2), m.group(3)
        if alias:
            return f"{indent}import {new}{sub} as {alias}"
        if not sub:
            return f"{indent}import {new} as {old}"
        return f"{indent}import {new}{sub}, {new} as {old}"

    source = re.sub(rf"(?m)^([ \t]*)from {old}(?=[.\s])", rf"\1from {new}", source)
    source = re.sub(
        rf"(?m)^([ \t]*)import {old}((?:\.\w+)*)(?:[ \t]+as[ \t]+(\w+))?(?=[ \t]*(?:#|;|$))",
        plain_import,
        source,
    )
    return re.sub(rf"(?<=[\"']){old}\.(?=\w)", f"{new}.", source)


def leftover_references(source: str, old: str = "athooks") -> list[str]:
    """Where renamed code would still reach package ``old``: imports and importlib strings."""

    def is_old(name: str | None) -> bool:
        return name is not None and (name == old or name.startswith(old + "."))

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(is_old(a.name) for a in node.names):
            found.append(f"line {node.lineno}: import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and is_old(node.module):
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith(old + ".")
        ):
            found.append(f"line {node.lineno}: string {node.value[:40]!r}")
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if (
                name in ("import_module", "__import__", "find_spec")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
                and is_old(arg.value)
            ):
                found.append(f"line {node.lineno}: {name}({arg.value!r})")
    return found


def tree_digests(package_dir: str) -> dict[str, str]:
    """sha256 of every file of a package tree, by relative path (no ``__pycache__``)."""
    root = pathlib.Path(package_dir)
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def _is_main_athooks(name: object) -> bool:
    return isinstance(name, str) and (name == "athooks" or name.startswith("athooks."))


def check_baseline_isolated(package: types.ModuleType) -> None:
    """Raise unless the baseline package runs only its own code, with its own plugin manager.

    Every module of the package must come from its renamed copy, none may hold a module, class
    or function of today's athooks, and its plugin manager must be another object than today's,
    holding only plugins of the baseline package (and today's none of the baseline's).
    """
    name, root = package.__name__, os.path.dirname(os.path.realpath(package.__file__ or ""))
    problems = []
    for mod_name, module in list(sys.modules.items()):
        if mod_name != name and not mod_name.startswith(name + "."):
            continue
        file = getattr(module, "__file__", None)
        if file is None or not os.path.realpath(file).startswith(root + os.sep):
            problems.append(f"{mod_name} was loaded from {file}, not from {root}")
        for attr, value in vars(module).items():
            owner = value.__name__ if isinstance(value, types.ModuleType) else None
            owner = owner or getattr(value, "__module__", None)
            if _is_main_athooks(owner):
                problems.append(f"{mod_name}.{attr} is {owner}'s, today's athooks")
    own_pm, main_pm = package.get_plugin_manager(), athooks.get_plugin_manager()
    if own_pm is main_pm:
        problems.append("the baseline shares today's plugin manager")

    def module_of(plugin: Any) -> str:
        if isinstance(plugin, types.ModuleType):
            return plugin.__name__
        return type(plugin).__module__

    for plugin in own_pm.get_plugins():
        if not module_of(plugin).startswith(name + "."):
            problems.append(f"the baseline's plugin manager holds {module_of(plugin)}")
    for plugin in main_pm.get_plugins():
        if module_of(plugin).startswith(name + "."):
            problems.append(f"today's plugin manager holds the baseline's {module_of(plugin)}")
    if problems:
        raise RuntimeError(
            "the baseline athooks is not isolated from today's:\n  " + "\n  ".join(problems)
        )


def load_baseline(src: str) -> types.ModuleType:
    """Today's process gets a second athooks: ``src/athooks``, imported as ``athooks_baseline``.

    ``src`` is a checkout of another commit (say, a git worktree of main). Its ``athooks``
    package is copied into a temporary folder as ``athooks_baseline``, its absolute imports
    renamed (:func:`rename_package`; any reference left is an error), and imported from there:
    the baseline's code, under another name, next to today's ``athooks``. Each package keeps
    its own module-level plugin manager with its own built-ins. Entry-point plugins are not
    loaded into the baseline: installed plugins import today's ``athooks``, so their specs
    would be today's classes inside the baseline; the baseline's first lookup is made here with
    ``ATHOOKS_DISABLE_PLUGIN_AUTOLOAD=1`` (its registry reads that on the first lookup, and
    loads entry points only then). Loaded once per process and ``src``; a second ``src`` in the
    same process (the tests) is imported as ``athooks_baseline2``, and so on.
    """
    real = os.path.realpath(src)
    if real in _baselines:
        return _baselines[real]
    name = BASELINE_PACKAGE + (str(len(_baselines) + 1) if _baselines else "")
    if name in sys.modules:
        raise RuntimeError(f"{name} is already loaded from {sys.modules[name].__file__}")
    package_dir = os.path.join(real, "athooks")
    if not os.path.isfile(os.path.join(package_dir, "__init__.py")):
        raise FileNotFoundError(f"--baseline-src {src}: no athooks package in it ({package_dir})")
    folder = tempfile.mkdtemp(prefix="athooks-baseline-")
    atexit.register(shutil.rmtree, folder, True)
    target = os.path.join(folder, name)
    shutil.copytree(package_dir, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in sorted(pathlib.Path(target).rglob("*.py")):
        renamed = rename_package(path.read_text(encoding="utf-8"), new=name)
        left = leftover_references(renamed)
        if left:
            raise RuntimeError(
                f"{path.relative_to(folder)}: references to athooks that renaming missed: "
                + "; ".join(left)
            )
        path.write_text(renamed, encoding="utf-8")
    main_modules = {m for m in sys.modules if _is_main_athooks(m)}
    sys.path.insert(0, folder)
    importlib.invalidate_caches()
    with environment(AUTOLOAD_ENV, "1"):
        package = importlib.import_module(name)
        package.list_losses()  # the registry's first lookup: no entry points loaded
    reached = sorted({m for m in sys.modules if _is_main_athooks(m)} - main_modules)
    if reached:
        raise RuntimeError(f"importing the baseline imported today's {', '.join(reached)}")
    check_baseline_isolated(package)
    _baselines[real] = package
    return package


def describe_baseline(src: str, package: types.ModuleType) -> str:
    """One line for the report: where the baseline comes from, and how it differs from today's."""
    real = os.path.realpath(src)

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", real, *args], capture_output=True, text=True, check=False
            )
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--", "athooks"):
        commit += ", with uncommitted changes in athooks/"
    theirs = tree_digests(os.path.join(real, "athooks"))
    ours = tree_digests(os.path.dirname(os.path.realpath(athooks.__file__ or "")))
    changed = sorted(p for p in theirs.keys() | ours.keys() if theirs.get(p) != ours.get(p))
    if changed:
        shown = ", ".join(changed[:6]) + (
            f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        )
        differs = f"differs from today's athooks in {len(changed)} files ({shown})"
    else:
        differs = "identical to today's athooks (an A/A comparison: the resolution of the run)"
    version = getattr(package, "__version__", "?")
    where = f"`{src}` (git {commit})" if commit else f"`{src}` (not a git checkout)"
    return (
        f"athooks {version} from {where}, imported as `{package.__name__}` from "
        f"`{os.path.dirname(package.__file__ or '')}`; {differs}"
    )


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """Set an environment variable while the context is open."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


# --------------------------------------------------------------------------- settings and models


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmark configuration; ``taps`` is "stages", "blocks" or a number of blocks."""

    teacher: str  # "timm:resnet34" or "athooks:wrn16_2"
    student: str
    size: int
    batch: int
    taps: str | int = "stages"

    @property
    def label(self) -> str:
        t, s = self.teacher.split(":")[1], self.student.split(":")[1]
        taps = f"{self.taps} blocks" if isinstance(self.taps, int) else self.taps
        return f"{t}->{s} {self.size}x{self.size} b{self.batch} ({taps})"


def build_model(spec: str) -> nn.Module:
    kind, name = spec.split(":")
    if kind == "timm":
        model: nn.Module = timm.create_model(name, num_classes=10)
        return model
    if kind == "athooks":
        return create_model(name, num_classes=10)
    raise ValueError(f"unknown model spec {spec!r}; use timm:NAME or athooks:NAME")


def stages(model: nn.Module) -> list[nn.Sequential]:
    """The residual stages ``layer1``, ``layer2``, ... of a timm ResNet or an athooks WRN."""
    found = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no layer1..layer4 stages")
    return found


def block_names(model: nn.Module) -> list[str]:
    return [f"layer{i + 1}.{j}" for i, stage in enumerate(stages(model)) for j in range(len(stage))]


def tap_names(model: nn.Module, taps: str | int) -> list[str]:
    """The layers to tap: stage outputs, every block, or ``k`` blocks spread evenly."""
    if taps == "stages":
        return [f"layer{i + 1}" for i in range(len(stages(model)))]
    blocks = block_names(model)
    if taps == "blocks":
        return blocks
    k = int(taps)
    if not 1 <= k <= len(blocks):
        raise ValueError(f"taps={k}: the model has {len(blocks)} blocks")
    return [blocks[round((i + 1) * len(blocks) / k) - 1] for i in range(k)]


def _stem(model: nn.Module, x: Tensor) -> Tensor:
    if hasattr(model, "maxpool"):  # timm ResNet
        out: Tensor = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        return out
    out = model.conv1(x)  # athooks WRN
    return out


def _head(model: nn.Module, h: Tensor) -> Tensor:
    if hasattr(model, "forward_head"):  # timm
        out: Tensor = model.forward_head(h)
        return out
    out = model.fc(F.adaptive_avg_pool2d(model.relu(model.bn(h)), 1).flatten(1))  # athooks WRN
    return out


def staged_forward(
    model: nn.Module, x: Tensor, names: Sequence[str]
) -> tuple[Tensor, list[Tensor]]:
    """Run the model by hand; return its logits and the outputs of the named blocks/stages."""
    wanted = set(names)
    kept: dict[str, Tensor] = {}
    h = _stem(model, x)
    for i, stage in enumerate(stages(model)):
        for j, block in enumerate(stage):
            h = block(h)
            if f"layer{i + 1}.{j}" in wanted:
                kept[f"layer{i + 1}.{j}"] = h
        if f"layer{i + 1}" in wanted:
            kept[f"layer{i + 1}"] = h
    return _head(model, h), [kept[n] for n in names]


def at(x: Tensor) -> Tensor:
    """The authors' attention map: channel mean of squares, flattened, L2-normalised."""
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def at_loss(x: Tensor, y: Tensor) -> Tensor:
    """The authors' ``at_loss``: mean squared difference of the normalised maps."""
    return (at(x) - at(y)).pow(2).mean()


# --------------------------------------------------------------------------- variants


@dataclasses.dataclass
class Options:
    device: torch.device
    channels_last: bool = False
    bf16: bool = False
    threads: int = 1
    baseline_src: str | None = None  # another checkout whose athooks is variant athooks@LABEL
    baseline_label: str = "main"
    compile_backend: str = "inductor"  # for the "+compile" variants
    steps_per_round: int = 1  # consecutive steps of a variant timed together in a round

    @property
    def baseline(self) -> str | None:
        """The baseline's variant name, ``athooks@LABEL``, or None without a baseline."""
        return f"athooks@{self.baseline_label}" if self.baseline_src else None

    def argv(self) -> list[str]:
        """The command-line flags that recreate these options (for the memory children)."""
        flags = ["--device", str(self.device), "--threads", str(self.threads)]
        flags += ["--compile-backend", self.compile_backend]
        if self.baseline_src:
            flags += ["--baseline-src", self.baseline_src, "--baseline-label", self.baseline_label]
        return flags + ["--channels-last"] * self.channels_last + ["--bf16"] * self.bf16

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def place(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def batch(self, setting: Setting, seed: int = 0) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(setting.batch, 3, setting.size, setting.size, generator=g)
        y = torch.randint(0, 10, (setting.batch,), generator=g)
        x, y = x.to(self.device), y.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


Step = Callable[[Tensor, Tensor], Tensor]

#: The opt-in teacher options, as variant flags: ``athooks+teacher_bf16`` and so on.
TEACHER_FLAGS = ("teacher_bf16", "teacher_fp16", "teacher_compile", "teacher_cl", "truncate")


def teacher_option(flag: str, backend: str = "inductor") -> dict[str, Any]:
    """The Distiller arguments of a variant flag (``backend``: of ``teacher_compile``)."""
    options: dict[str, dict[str, Any]] = {
        "teacher_bf16": {"teacher_dtype": torch.bfloat16},
        "teacher_fp16": {"teacher_dtype": torch.float16},
        "teacher_compile": {
            "teacher_compile": True if backend == "inductor" else {"backend": backend}
        },
        "teacher_cl": {"teacher_channels_last": True},
        "truncate": {"truncate_teacher": True},
    }
    if flag not in options:
        raise ValueError(f"unknown variant flag {flag!r}; choose from compile, {TEACHER_FLAGS}")
    return options[flag]


def with_teacher_flags(
    teacher: nn.Module, flags: set[str], backend: str
) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher as the flags want it (NHWC weights for ``teacher_cl``), and the Distiller
    arguments of its flags (``compile``, the student's flag, is not one of them)."""
    if "teacher_cl" in flags:  # the Distiller gives the teacher NHWC inputs; its weights too
        teacher = teacher.to(memory_format=torch.channels_last)
    options: dict[str, Any] = {}
    for flag in flags - {"compile"}:
        options.update(teacher_option(flag, backend))
    return teacher, options


def split_variant(name: str) -> tuple[str, set[str]]:
    """``"athooks+compile+truncate"`` -> ``("athooks", {"compile", "truncate"})``."""
    base, *flags = name.split("+")
    return base, set(flags)


def with_module(step: Step, module: nn.Module) -> Step:
    """The step, knowing its (uncompiled) student: the graph-break count explains it."""
    step.module = module  # type: ignore[attr-defined]
    return step


def make_variant(
    name: str, teacher: nn.Module, student: nn.Module, names: Sequence[str], opts: Options
) -> tuple[Step, Callable[[Tensor], Tensor]]:
    """One variant on these models: a training step, and its transfer loss alone (for checks).

    The models are used as they are (the caller passes copies); the teacher is put in eval mode
    with frozen parameters, the student in train mode.
    """
    name, flags = split_variant(name)
    teacher, student = opts.place(teacher), opts.place(student)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    pairs = list(zip(names, names, strict=True))
    if flags and (name not in ("floor", "athooks") or (name == "floor" and flags != {"compile"})):
        raise ValueError(f"variant {name}+{'+'.join(sorted(flags))}: no such variant")
    teacher, options = with_teacher_flags(teacher, flags, opts.compile_backend)
    model = student  # what the step calls: the student, or the student compiled

    def update(loss: Tensor) -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    if name == "floor":
        if "compile" in flags:
            model = torch.compile(student, backend=opts.compile_backend)

        def floor_step(x: Tensor, y: Tensor) -> Tensor:
            with opts.autocast():
                with torch.no_grad():
                    teacher(x)
                loss = F.cross_entropy(model(x), y)
            return update(loss)

        def floor_transfer(x: Tensor) -> Tensor:
            return torch.zeros(())

        return with_module(floor_step, student), floor_transfer

    if name == "reference":

        def reference_loss(x: Tensor) -> tuple[Tensor, Tensor]:
            logits, s_feats = staged_forward(student, x, names)
            with torch.no_grad():
                _, t_feats = staged_forward(teacher, x, names)
            transfer = (
                BETA
                * torch.stack([at_loss(s, t) for s, t in zip(s_feats, t_feats, strict=True)]).sum()
            )
            return logits, transfer

        def reference_step(x: Tensor, y: Tensor) -> Tensor:
            with opts.autocast():
                logits, transfer = reference_loss(x)
                loss = F.cross_entropy(logits, y) + transfer
            return update(loss)

        return reference_step, lambda x: reference_loss(x)[1]

    if name == "athooks" or name == opts.baseline:
        # the baseline is another athooks package, used exactly as today's, public API only
        package = athooks if name == "athooks" else load_baseline(opts.baseline_src or "")
        d = package.Distiller(
            teacher, student, layers=pairs, losses=package.loss("at", beta=BETA), **options
        )
        d.attach()  # a training run attaches once
        if "compile" in flags:  # compiled after the Distiller, as the Performance page says
            model = torch.compile(student, backend=opts.compile_backend)

        def athooks_step(x: Tensor, y: Tensor) -> Tensor:
            with opts.autocast():
                loss = F.cross_entropy(model(x), y) + d.loss()
            return update(loss)

        def athooks_transfer(x: Tensor) -> Tensor:
            model(x)
            return d.loss()

        return with_module(athooks_step, student), athooks_transfer

    if name == "torchdistill":
        from torchdistill.core.forward_hook import ForwardHookManager
        from torchdistill.losses.mid_level import ATLoss

        t_hooks, s_hooks = ForwardHookManager(opts.device), ForwardHookManager(opts.device)
        for layer in names:
            t_hooks.add_hook(teacher, layer, requires_input=False, requires_output=True)
            s_hooks.add_hook(student, layer, requires_input=False, requires_output=True)
        criterion = ATLoss(
            {
                f"pair{i}": {
                    "teacher": {"io": "output", "path": layer},
                    "student": {"io": "output", "path": layer},
                    "weight": BETA,
                }
                for i, layer in enumerate(names)
            },
            mode="code",
        )

        def torchdistill_loss(x: Tensor) -> tuple[Tensor, Tensor]:
            with torch.no_grad():  # torchdistill runs a frozen teacher first, without grad
                teacher(x)
            logits = student(x)
            transfer: Tensor = criterion(s_hooks.pop_io_dict(), t_hooks.pop_io_dict())
            return logits, transfer

        def torchdistill_step(x: Tensor, y: Tensor) -> Tensor:
            with opts.autocast():
                logits, transfer = torchdistill_loss(x)
                loss = F.cross_entropy(logits, y) + transfer
            return update(loss)

        return torchdistill_step, lambda x: torchdistill_loss(x)[1]

    known = [*VARIANTS, *([opts.baseline] if opts.baseline else [])]
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(known)}")


def fresh_pair(setting: Setting, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher, student = build_model(setting.teacher), build_model(setting.student)
    with torch.no_grad():  # timm zero-initialises each block's last BN: give every map content
        for m in (*teacher.modules(), *student.modules()):
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return teacher, student


def build_variants(
    setting: Setting, variants: Sequence[str], opts: Options, control: bool = False
) -> tuple[dict[str, Step], list[str]]:
    """Every variant on its own copy of the same models; checks their transfer losses agree.

    With ``control``, a second, independent floor (``"floor (A/A)"``) is added: its ratio to the
    floor shows how finely the run can resolve differences.
    """
    teacher, student = fresh_pair(setting)
    names = tap_names(student, setting.taps)
    if tap_names(teacher, setting.taps) != names:
        raise ValueError(f"{setting.label}: teacher and student differ in block layout")
    steps: dict[str, Step] = {}
    x, _ = opts.batch(setting, seed=1)
    losses: dict[str, float] = {}
    for variant in variants:
        step, transfer = make_variant(
            variant, copy.deepcopy(teacher), copy.deepcopy(student), names, opts
        )
        steps[variant] = step
        if split_variant(variant)[0] != "floor":
            with opts.autocast():
                losses[variant] = float(transfer(x).detach())
    if control:
        steps[CONTROL], _ = make_variant(
            "floor", copy.deepcopy(teacher), copy.deepcopy(student), names, opts
        )
    if opts.baseline in variants:  # again: building and running it may import more modules
        check_baseline_isolated(load_baseline(opts.baseline_src or ""))
    if losses:
        ref = losses.get("reference", next(iter(losses.values())))
        for variant, value in losses.items():
            low = opts.bf16 or bool({"teacher_bf16", "teacher_fp16"} & split_variant(variant)[1])
            tol = 2e-2 if low else 1e-4
            if abs(value - ref) > tol * abs(ref):
                raise RuntimeError(
                    f"{setting.label}: {variant}'s transfer loss {value:.6g} differs from the "
                    f"reference's {ref:.6g}; the variants do not compute the same thing"
                )
    return steps, names


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass
class Timing:
    """Per-round step times of each variant: wall clock and this process's CPU time."""

    wall: dict[str, list[float]]  # seconds per measured round
    cpu: dict[str, list[float]]

    def _of(self, clock: str) -> dict[str, list[float]]:
        return self.wall if clock == "wall" else self.cpu

    def median(self, variant: str, clock: str = "wall") -> float:
        return statistics.median(self._of(clock)[variant])

    def ratios(self, variant: str, base: str = "floor", clock: str = "wall") -> list[float]:
        t = self._of(clock)
        return [a / b for a, b in zip(t[variant], t[base], strict=True)]

    def ratio(self, variant: str, base: str = "floor", clock: str = "wall") -> float:
        return statistics.median(self.ratios(variant, base, clock))

    def spread(self, variant: str, base: str = "floor", clock: str = "wall") -> tuple[float, float]:
        """The interquartile range of the round-by-round ratios."""
        r = sorted(self.ratios(variant, base, clock))
        if len(r) < 4:
            return r[0], r[-1]
        q = statistics.quantiles(r, n=4)
        return q[0], q[2]

    def fastest(self, variant: str, base: str = "floor", clock: str = "cpu") -> float:
        """Fastest step over fastest step: the run least disturbed by other processes."""
        t = self._of(clock)
        return min(t[variant]) / min(t[base])

    def extra(self, variant: str, base: str = "floor", clock: str = "wall") -> float:
        """Median of the round-by-round differences to ``base``, in seconds."""
        t = self._of(clock)
        return statistics.median(a - b for a, b in zip(t[variant], t[base], strict=True))


def interleaved(
    steps: dict[str, Step],
    x: Tensor,
    y: Tensor,
    device: torch.device,
    warmup: int,
    rounds: int,
    budget: float | None = None,
    min_rounds: int = 6,
    repeat: int = 1,
) -> Timing:
    """Run every variant once per round (order rotated each round); keep the measured rounds.

    With ``budget`` (seconds), the number of measured rounds is what fits in it at the pace of
    the last warm-up round, between ``min_rounds`` and ``rounds``. With ``repeat`` above 1 a
    variant runs that many steps in a row in each round and its time is their mean, as in a
    training loop, where a step follows a step of the same code (a single step after another
    variant's runs with that variant's code and data in the caches instead).
    """
    order = list(steps)
    wall: dict[str, list[float]] = {v: [] for v in order}
    cpu: dict[str, list[float]] = {v: [] for v in order}
    r = 0
    total = warmup + rounds
    while r < total:
        shift = r % len(order)
        round_start = time.perf_counter()
        for variant in order[shift:] + order[:shift]:
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(repeat):
                steps[variant](x, y)
            sync(device)
            elapsed = (time.perf_counter() - start) / repeat
            elapsed_cpu = (time.process_time() - start_cpu) / repeat
            if r >= warmup:
                wall[variant].append(elapsed)
                cpu[variant].append(elapsed_cpu)
        if budget is not None and r == warmup - 1:
            pace = time.perf_counter() - round_start
            total = warmup + max(min(min_rounds, rounds), min(rounds, int(budget / pace)))
        r += 1
    return Timing(wall, cpu)


# --------------------------------------------------------------------------- memory


def current_rss() -> int:
    """Resident set size now, in bytes (Linux), else the peak so far."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` keeps the
    peak of the process image before ``exec``, i.e. of the forked parent, which here is the
    benchmark's own large timing process.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux); whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_child(setting: Setting, variant: str, opts: Options) -> dict[str, Any]:
    """In a fresh process: build one variant, run 3 steps, return its peak memory.

    ``peak`` is the process's peak; ``steps`` the peak of each step on its own where the peak
    can be reset (Linux RSS, CUDA), else empty; ``before`` the memory just before the first step.
    """
    if opts.baseline_src:  # every child imports both athooks packages, whichever it runs
        load_baseline(opts.baseline_src)
    teacher, student = fresh_pair(setting)
    names = tap_names(student, setting.taps)
    step, _ = make_variant(variant, teacher, student, names, opts)
    x, y = opts.batch(setting)
    cuda = opts.device.type == "cuda"
    sync(opts.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(opts.device)
        before = torch.cuda.memory_allocated(opts.device)
    else:
        before = current_rss()
    peak = before if cuda else peak_rss()  # the setup's peak (imports, models)
    per_step: list[float] = []
    for _ in range(MEMORY_STEPS):
        resettable = reset_peak_rss() if not cuda else True
        step(x, y)
        sync(opts.device)
        if cuda:
            step_peak = torch.cuda.max_memory_allocated(opts.device)
            torch.cuda.reset_peak_memory_stats(opts.device)
        else:
            step_peak = peak_rss()
        peak = max(peak, step_peak)
        if resettable:
            per_step.append(float(step_peak))
    return {"peak": float(peak), "before": float(before), "steps": per_step}


def measure_memory(setting: Setting, variant: str, opts: Options) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    if opts.baseline_src:  # the baseline's and today's athooks alike: built-ins only
        env[AUTOLOAD_ENV] = "1"
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        json.dumps(dataclasses.asdict(setting)),
        variant,
        *opts.argv(),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {variant} {setting.label} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- report


class Report:
    """Prints as it goes and collects the markdown."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def progress(self, line: str) -> None:
        """Printed only, not part of the markdown."""
        print(f"  .. {line}", flush=True)

    def table(self, header: Sequence[str], rows: Iterator[Sequence[str]] | list[Sequence[str]]):
        self("| " + " | ".join(header) + " |")
        self("|" + "---|" * len(header))
        for row in rows:
            self("| " + " | ".join(row) + " |")
        self()


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _ratio_cell(timing: Timing, variant: str, clock: str, base: str = "floor") -> str:
    lo, hi = timing.spread(variant, base, clock)
    return f"{timing.ratio(variant, base, clock):.3f} [{lo:.3f}, {hi:.3f}]"


def timing_section(
    report: Report,
    settings: Sequence[Setting],
    variants: Sequence[str],
    opts: Options,
    warmup: int,
    rounds: int,
    budget: float | None = None,
) -> dict[str, Timing]:
    results: dict[str, Timing] = {}
    baseline = opts.baseline if opts.baseline in variants else None
    report(
        f"### Step time: {warmup} warm-up rounds, then measured rounds, interleaved, per setting"
        + (
            f"; {opts.steps_per_round} steps in a row per variant and round, timed together"
            if opts.steps_per_round > 1
            else ""
        )
    )
    report()
    report(
        "Ratios are medians of the round-by-round ratios (interquartile range in brackets); "
        "CPU is this process's CPU time, which leaves out the time the shared machine gave to "
        "other processes; fastest is the fastest step of the variant over the fastest floor step. "
        f"`{CONTROL}` is a second, independent floor: the resolution of the run."
    )
    report()
    rows: list[Sequence[str]] = []
    for setting in settings:
        steps, names = build_variants(setting, variants, opts, control=True)
        x, y = opts.batch(setting)
        start_load = load()
        timing = interleaved(
            steps, x, y, opts.device, warmup, rounds, budget=budget, repeat=opts.steps_per_round
        )
        n = len(timing.wall["floor"])
        results[setting.label] = timing
        for variant in steps:
            rows.append(
                (
                    setting.label,
                    variant,
                    f"{timing.median(variant) * 1e3:.1f}",
                    _ratio_cell(timing, variant, "wall"),
                    _ratio_cell(timing, variant, "cpu"),
                    f"{timing.fastest(variant):.3f}",
                    f"{timing.ratio(variant, 'reference', 'cpu'):.3f}"
                    if "reference" in steps
                    else "-",
                    *(
                        (
                            _ratio_cell(timing, variant, "wall", baseline),
                            _ratio_cell(timing, variant, "cpu", baseline),
                        )
                        if baseline
                        else ()
                    ),
                )
            )
            report.progress(" | ".join(rows[-1]))
        report(
            f"- {setting.label}: {n} rounds; taps {', '.join(names)}; load {start_load} -> {load()}"
        )
    report()
    report.table(
        (
            "setting",
            "variant",
            "median step (ms)",
            "wall vs floor",
            "CPU vs floor",
            "fastest CPU vs floor",
            "CPU vs reference",
            *((f"wall vs {baseline}", f"CPU vs {baseline}") if baseline else ()),
        ),
        rows,
    )
    return results


def memory_section(
    report: Report,
    settings: Sequence[Setting],
    variants: Sequence[str],
    opts: Options,
    jobs: int = 2,
) -> dict[str, dict[str, dict[str, Any]]]:
    cuda = opts.device.type == "cuda"
    what = "max allocated" if cuda else "peak RSS"
    report(f"### Peak memory: {what}, a fresh process per variant doing {MEMORY_STEPS} steps")
    report()
    report(
        "Step memory is the peak minus the memory just before the first step; step 1 is the "
        "peak of the first step alone (athooks probes its student taps for in-place overwrites "
        "there), steps 2+ the peak of the later steps (SGD's momentum buffers exist from the end "
        "of step 1 on)." + ("" if cuda else " Children run with `MALLOC_MMAP_THRESHOLD_=65536`.")
    )
    report()
    rows: list[Sequence[str]] = []
    results: dict[str, dict[str, dict[str, Any]]] = {}
    baseline = opts.baseline if opts.baseline in variants else None
    for setting in settings:
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {v: pool.submit(measure_memory, setting, v, opts) for v in variants}
            mem = {v: f.result() for v, f in futures.items()}
        for v in variants:
            report.progress(f"{setting.label} {v}: {json.dumps(mem[v])}")
        results[setting.label] = mem
        floor = mem["floor"]
        for variant in variants:
            m = mem[variant]
            per_step = m["steps"]
            first = "-"
            later = "-"
            if per_step and floor["steps"]:
                first = f"{per_step[0] / MB:,.0f} ({per_step[0] / floor['steps'][0]:.3f})"
                rest, floor_rest = max(per_step[1:]), max(floor["steps"][1:])
                later = f"{rest / MB:,.0f} ({rest / floor_rest:.3f})"
            rows.append(
                (
                    setting.label,
                    variant,
                    f"{m['peak'] / MB:,.0f}",
                    f"{m['peak'] / floor['peak']:.3f}",
                    f"{m['peak'] / mem['reference']['peak']:.3f}" if "reference" in mem else "-",
                    f"{(m['peak'] - m['before']) / MB:,.0f}",
                    first,
                    later,
                    *(memory_vs(m, mem[baseline]) if baseline else ()),
                )
            )
    report.table(
        (
            "setting",
            "variant",
            f"{what} (MB)",
            "vs floor",
            "vs reference",
            "step memory (MB)",
            "step 1 (vs floor)",
            "steps 2+ (vs floor)",
            *((f"vs {baseline}", f"step memory vs {baseline}") if baseline else ()),
        ),
        rows,
    )
    return results


class _TeacherMaps(athooks.Loss):
    """A loss of value 0 that keeps the teacher's AT maps of each step (for the agreement)."""

    name = "teacher_maps"

    def __init__(self) -> None:
        super().__init__()
        self.mapping = athooks.mapping("sum_p", p=2)
        self.seen: list[list[Tensor]] = []

    def captures(self) -> tuple[Any, ...]:
        return (self.mapping,)

    def forward(self, step: Any) -> Tensor:
        maps = step.maps(self.mapping)
        self.seen.append([t.detach().float() for t, _ in maps])
        return maps[0][1].sum() * 0


def teacher_agreement(setting: Setting, flags: set[str], opts: Options) -> tuple[float, float]:
    """How far the teacher options move the teacher's maps and the AT loss, at the 2nd step.

    Two Distillers on copies of the same models and batch, with and without the options; the
    maps are normalised per sample (``F.normalize`` of the flattened map, as AT does). Returns
    the largest absolute difference of a normalised map's element and the relative difference
    of the AT loss (the second step: truncation learns its cut on the first).
    """
    teacher, student = fresh_pair(setting)
    names = tap_names(student, setting.taps)
    pairs = list(zip(names, names, strict=True))
    x, _ = opts.batch(setting, seed=2)
    runs = []
    for chosen in (set(), flags):
        t, s = opts.place(copy.deepcopy(teacher)).eval(), opts.place(copy.deepcopy(student))
        t, options = with_teacher_flags(t, chosen, opts.compile_backend)
        spy = _TeacherMaps()
        losses = [athooks.loss("at"), spy]
        with athooks.Distiller(t, s, layers=pairs, losses=losses, **options) as d:
            for _ in range(2):
                s(x)
                loss = float(d.loss().detach())
        runs.append(([F.normalize(m.flatten(1), dim=1) for m in spy.seen[-1]], loss))
    (want_maps, want), (got_maps, got) = runs
    diff = max(float((a - b).abs().max()) for a, b in zip(got_maps, want_maps, strict=True))
    return diff, abs(got - want) / abs(want)


def graph_breaks(step: Step, x: Tensor) -> tuple[int, list[str]]:
    """The student's graph count and graph-break reasons under ``torch._dynamo.explain``."""
    out = torch._dynamo.explain(step.module)(x)  # type: ignore[attr-defined]
    return out.graph_count, [r.reason.splitlines()[0] for r in out.break_reasons]


def options_section(
    report: Report,
    settings: Sequence[Setting],
    variants: Sequence[str],
    opts: Options,
    warmup: int,
    rounds: int,
    budget: float | None,
    jobs: int,
) -> None:
    """The compiled student and the opt-in teacher options: time, memory, graph breaks, maps."""
    report("### The compiled student and the teacher options: step time, peak memory, graph breaks")
    report()
    report(
        "Variants: `+compile` compiles the student (`torch.compile`, backend "
        f"`{opts.compile_backend}`; after attaching, for athooks), the teacher eager; "
        "`floor+compile` is its floor. The teacher options (athooks only): `teacher_bf16` / "
        "`teacher_fp16` (`teacher_dtype=`), `teacher_compile`, `teacher_cl` "
        "(`teacher_channels_last=True`, the teacher's weights converted too) and `truncate` "
        "(`truncate_teacher=True`). Step time as above (interleaved rounds, median of the "
        "round-by-round ratios, interquartile range in brackets); memory from a fresh process per "
        "variant, steps 2+ (compilation happens in step 1). Graphs and breaks: "
        "`torch._dynamo.explain` on the student as the variant runs it. Maps: the largest "
        "difference of an element of the teacher's normalised AT maps, and the relative "
        "difference of the AT loss, against the float32 eager teacher, at the second step."
    )
    report()
    rows: list[Sequence[str]] = []
    for setting in settings:
        steps, names = build_variants(setting, variants, opts)
        x, y = opts.batch(setting)
        explained = {
            v: graph_breaks(steps[v], x) for v in variants if "compile" in split_variant(v)[1]
        }
        start_load = load()
        timing = interleaved(steps, x, y, opts.device, warmup, rounds, budget=budget)
        report(
            f"- {setting.label}: {len(timing.wall['floor'])} rounds; taps {', '.join(names)}; "
            f"load {start_load} -> {load()}"
        )
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {v: pool.submit(measure_memory, setting, v, opts) for v in variants}
            mem = {v: f.result() for v, f in futures.items()}
        for v in variants:
            flags = split_variant(v)[1]
            floor = "floor+compile" if "compile" in flags and "floor+compile" in steps else "floor"
            later = max(mem[v]["steps"][1:] or [mem[v]["peak"]])
            floor_later = max(mem[floor]["steps"][1:] or [mem[floor]["peak"]])
            graphs, reasons = explained.get(v, (0, []))
            teacher_flags = flags - {"compile"}
            maps = "-"
            if teacher_flags:
                diff, rel = teacher_agreement(setting, teacher_flags, opts)
                maps = f"{diff:.1e} / {rel:.1e}"
            rows.append(
                (
                    setting.label,
                    v,
                    floor,
                    f"{timing.median(v) * 1e3:.1f}",
                    _ratio_cell(timing, v, "wall", floor),
                    _ratio_cell(timing, v, "cpu", floor),
                    f"{timing.ratio(v, 'floor', 'cpu'):.3f}",
                    f"{later / floor_later:.3f}",
                    f"{graphs} / {len(reasons)}" if v in explained else "-",
                    "; ".join(dict.fromkeys(reasons)) or "-",
                    maps,
                )
            )
            report.progress(" | ".join(rows[-1]))
    report()
    report.table(
        (
            "setting",
            "variant",
            "its floor",
            "median step (ms)",
            "wall vs its floor",
            "CPU vs its floor",
            "CPU vs eager floor",
            "memory, steps 2+, vs its floor",
            "graphs / breaks",
            "break reasons",
            "maps / loss vs fp32 teacher",
        ),
        rows,
    )


def memory_vs(m: dict[str, Any], base: dict[str, Any]) -> tuple[str, str]:
    """Peak and step memory of one child over another's."""
    step, base_step = m["peak"] - m["before"], base["peak"] - base["before"]
    return f"{m['peak'] / base['peak']:.3f}", f"{step / base_step:.3f}" if base_step > 0 else "-"


def baseline_section(
    report: Report,
    baseline: str,
    timings: dict[str, Timing],
    memory: dict[str, dict[str, dict[str, Any]]],
) -> None:
    """athooks against the baseline, setting by setting: the acceptance table of a redesign."""
    report(f"### athooks against {baseline}: step time and peak memory, side by side")
    report()
    report(
        f"Each cell is athooks over {baseline}, measured in the runs above: step time as the "
        "median of the round-by-round ratios (interquartile range in brackets) of the same "
        f"interleaved rounds, and `{CONTROL}` over floor in the same rounds for comparison (how "
        "far a ratio strays from 1 without any change); memory as the ratio of the peaks, and "
        "of the step memory (peak minus the memory before the first step), of one fresh child "
        "process each. Above 1: athooks costs more than the baseline."
    )
    report()
    rows = []
    for label in list(dict.fromkeys([*timings, *memory])):
        t, mem = timings.get(label), memory.get(label)
        cells = ["-"] * 6
        if t is not None:
            cells[:4] = [
                _ratio_cell(t, "athooks", "wall", baseline),
                _ratio_cell(t, "athooks", "cpu", baseline),
                f"{t.fastest('athooks', baseline):.3f}",
                _ratio_cell(t, CONTROL, "cpu") if CONTROL in t.cpu else "-",
            ]
        if mem is not None:
            cells[4:] = memory_vs(mem["athooks"], mem[baseline])
        rows.append((label, *cells))
    report.table(
        (
            "setting",
            "step time, wall",
            "step time, CPU",
            "fastest CPU",
            f"CPU, {CONTROL} vs floor",
            "peak memory",
            "step memory",
        ),
        rows,
    )


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def transfer_backward(
    step: Step, floor_nodes: dict[str, tuple[float, int]], x: Tensor, y: Tensor
) -> float:
    """Seconds per step in the autograd nodes ``step`` runs beyond the floor's (profiler)."""
    nodes = backward_nodes(step, x, y)
    total = 0.0
    for key, (each, count) in nodes.items():
        added = count - floor_nodes.get(key, (0.0, 0))[1]
        if added > 0:
            total += each * added
    return total


def backward_nodes(
    step: Step, x: Tensor, y: Tensor, repeat: int = 2
) -> dict[str, tuple[float, int]]:
    """Per autograd node type: mean seconds per call and calls per step, under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeat):
            step(x, y)
    prefix = "autograd::engine::evaluate_function: "
    return {
        e.key[len(prefix) :]: (e.cpu_time_total / e.count / 1e6, e.count // repeat)
        for e in prof.key_averages()
        if e.key.startswith(prefix)
    }


def forward_work(
    variant: str,
    step: Step,
    x: Tensor,
    y: Tensor,
    repeat: int = 4,
    targets: Sequence[Target] | None = None,
) -> float:
    """CPU seconds per step spent in the variant's own transfer code on the forward side.

    athooks: the methods of :func:`instrumentation_targets` (its taps, i.e. maps at capture,
    ``d.loss()`` and the end-of-forward hook; ``targets`` if given, resolved already);
    reference: its ``at_loss`` calls (both maps and the loss). Timed by wrapping them, no
    profiler.
    """
    module = sys.modules[__name__]
    if variant == "athooks":
        if targets is None:
            targets, _ = resolve_targets(instrumentation_targets())
        with timed_methods([(cls, name, lambda _: "athooks") for cls, name, _ in targets]) as t:
            for _ in range(repeat):
                step(x, y)
        return t.seconds.get("athooks", 0.0) / repeat
    spent = 0.0
    original = module.at_loss

    def timed_at_loss(a: Tensor, b: Tensor) -> Tensor:
        nonlocal spent
        start = time.process_time()
        try:
            return original(a, b)
        finally:
            spent += time.process_time() - start

    module.at_loss = timed_at_loss  # type: ignore[attr-defined]
    try:
        for _ in range(repeat):
            step(x, y)
    finally:
        module.at_loss = original  # type: ignore[attr-defined]
    return spent / repeat


def sweep_section(
    report: Report,
    base: Setting,
    counts: Sequence[int],
    variants: Sequence[str],
    opts: Options,
    warmup: int,
    rounds: int,
) -> None:
    """Cost against the number of captured blocks: each variant's own work, and end to end."""
    steps: dict[str, Step] = {}
    for k in counts:
        setting = dataclasses.replace(base, taps=k)
        built, _ = build_variants(setting, [v for v in variants if v != "floor"], opts)
        steps.update({f"{v}@{k}": s for v, s in built.items()})
    floor, _ = build_variants(base, ["floor"], opts)
    steps["floor"] = floor["floor"]
    x, y = opts.batch(base)
    start_load = load()
    timing = interleaved(steps, x, y, opts.device, warmup, rounds)
    floor_ms = timing.median("floor", "cpu") * 1e3
    others = [v for v in variants if v != "floor" and v in ("reference", "athooks")]
    floor_nodes = backward_nodes(steps["floor"], x, y)
    own: dict[str, list[float]] = {v: [] for v in others}
    parts: dict[str, list[tuple[float, float]]] = {v: [] for v in others}
    targets, notes = resolve_targets(instrumentation_targets())
    for k in counts:
        for v in others:
            fwd = forward_work(v, steps[f"{v}@{k}"], x, y, targets=targets)
            bwd = transfer_backward(steps[f"{v}@{k}"], floor_nodes, x, y)
            parts[v].append((fwd * 1e3, bwd * 1e3))
            own[v].append((fwd + bwd) * 1e3)
    report(
        f"### Cost against the number of captured blocks: {base.label.split(' (')[0]}, "
        f"blocks spread evenly, {warmup} warm-up + {rounds} interleaved rounds"
    )
    report()
    report(
        "Own work: the CPU time per step in the variant's transfer code on the forward side "
        "(athooks: its taps, `d.loss()` and end-of-forward hook; reference: its `at_loss` calls), "
        "timed by wrapping it, plus the backward of the autograd nodes the variant adds to the "
        "floor's graph (profiler). End to end: median of the round-by-round CPU-time "
        "differences to the floor (ratio in brackets), which the noise of a shared machine "
        f"swamps at this size. Floor: {floor_ms:.1f} ms CPU, "
        f"{timing.median('floor') * 1e3:.1f} ms wall. Load {start_load} -> {load()}."
    )
    report()
    rows = []
    for i, k in enumerate(counts):
        row = [str(k)]
        for v in others:
            fwd, bwd = parts[v][i]
            row.append(f"{own[v][i]:.2f} ({fwd:.2f} + {bwd:.2f})")
        for v in others:
            key = f"{v}@{k}"
            extra, ratio = timing.extra(key, clock="cpu"), timing.ratio(key, clock="cpu")
            row.append(f"{extra * 1e3:+.1f} ({ratio:.3f})")
        rows.append(row)
    report.table(
        (
            "blocks",
            *(f"{v}: own work, ms (forward + backward)" for v in others),
            *(f"{v}: end to end, ms over floor" for v in others),
        ),
        rows,
    )
    for v in others:
        slope, intercept = fit_line([float(k) for k in counts], own[v])
        resid = max(abs(e - (slope * k + intercept)) for k, e in zip(counts, own[v], strict=True))
        report(
            f"- {v}: own work {slope:.3f} ms per captured block ({slope / floor_ms * 100:.3f}% "
            f"of the floor step) + {intercept:.2f} ms; largest deviation from the line "
            f"{resid:.2f} ms"
        )
    report()
    if "athooks" in others:
        instrumentation_notes(report, notes, "athooks' forward-side own work leaves them out")


@dataclasses.dataclass
class Timed:
    """What :func:`timed_methods` accumulated: CPU seconds by label, calls by target."""

    seconds: dict[str, float]
    calls: dict[str, int]  # "Owner.attribute" -> calls

    def uncalled(self, targets: Sequence[Target]) -> list[str]:
        """Notes for the targets that exist but were never called while timing."""
        return [
            f"`{cls.__module__}.{cls.__qualname__}.{name}` exists but was never called"
            for cls, name, _ in targets
            if not self.calls.get(f"{cls.__qualname__}.{name}")
        ]


@contextlib.contextmanager
def timed_methods(targets: Sequence[Target]) -> Iterator[Timed]:
    """Accumulate the CPU time spent in methods (by label) while the context is open.

    A label function that fails (say, an attribute it reads was renamed) gives the target's
    own name as the label instead.
    """
    acc = Timed({}, {})
    saved = []
    for cls, name, label_of in targets:
        orig = getattr(cls, name)
        saved.append((cls, name, orig))
        key = f"{cls.__qualname__}.{name}"

        def wrapper(
            self: Any,
            *a: Any,
            _orig: Any = orig,
            _label: Any = label_of,
            _key: str = key,
            **k: Any,
        ) -> Any:
            start = time.process_time()
            try:
                return _orig(self, *a, **k)
            finally:
                spent = time.process_time() - start
                try:
                    label = _label(self)
                except Exception:
                    label = _key
                acc.seconds[label] = acc.seconds.get(label, 0.0) + spent
                acc.calls[_key] = acc.calls.get(_key, 0) + 1

        setattr(cls, name, wrapper)
    try:
        yield acc
    finally:
        for cls, name, orig in saved:
            setattr(cls, name, orig)


def breakdown_section(
    report: Report,
    setting: Setting,
    opts: Options,
    warmup: int,
    rounds: int,
    budget: float | None = None,
) -> None:
    """What athooks adds to the floor's step, part by part (CPU time, one process)."""
    from torch.profiler import ProfilerActivity, profile

    steps, _ = build_variants(setting, ["floor", "athooks"], opts)
    x, y = opts.batch(setting)
    pace = sum(t[0] for t in interleaved(steps, x, y, opts.device, warmup, 1).wall.values())
    n = rounds if budget is None else max(min(6, rounds), min(rounds, int(budget / pace)))
    targets, notes = resolve_targets(instrumentation_targets())
    with timed_methods(targets) as timed:
        timing = interleaved(steps, x, y, opts.device, 0, n)
    notes += timed.uncalled(targets)
    acc = timed.seconds
    floor = timing.median("floor", "cpu")
    total = timing.extra("athooks", clock="cpu")
    # the backward of the transfer: autograd nodes the athooks step runs and the floor's does
    # not (by count), timed by the profiler (which slows every op a little)
    per_step: dict[str, dict[str, tuple[float, int]]] = {}
    for variant in ("floor", "athooks"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                steps[variant](x, y)
        per_step[variant] = {
            e.key: (e.cpu_time_total / e.count, e.count)
            for e in prof.key_averages()
            if e.key.startswith("autograd::engine::evaluate_function: ")
        }
    backward = 0.0
    nodes: list[tuple[float, str]] = []
    for key, (each, count) in per_step["athooks"].items():
        added = count - per_step["floor"].get(key, (0.0, 0))[1]
        if added > 0:
            cost = each * added / 3 / 1e6  # seconds per step
            backward += cost
            nodes.append((cost, key.split(": ", 1)[1]))
    report(
        f"### Where athooks' extra time goes: {setting.label}, {n} interleaved rounds "
        "(CPU time per step)"
    )
    report()
    rows = [
        (label, f"{v / n * 1e3:.2f}", f"{v / n / floor * 100:.2f}%")
        for label, v in sorted(acc.items())
    ]
    top = ", ".join(f"{name} {cost * 1e3:.2f}" for cost, name in sorted(nodes, reverse=True)[:4])
    rows.append(
        (
            f"backward of the transfer graph (profiler; largest: {top} ms)",
            f"{backward * 1e3:.2f}",
            f"{backward / floor * 100:.2f}%",
        )
    )
    rows.append(
        (
            "**athooks step minus floor step** (median of round-by-round differences)",
            f"{total * 1e3:.2f}",
            f"{total / floor * 100:.2f}%",
        )
    )
    report.table(("part", "ms per step", "of the floor step"), rows)
    report(
        f"Floor step: {floor * 1e3:.1f} ms CPU. The parts are measured separately (the "
        "profiler slows the ops it times), so they need not add up to the difference; what "
        "they leave out is mainly the accumulation of each tapped output's gradient from two "
        "paths (the network and the map), and noise."
    )
    report()
    instrumentation_notes(report, notes, "the table above has no rows for them")


def instrumentation_notes(report: Report, notes: Sequence[str], consequence: str) -> None:
    """Say which instrumentation targets were left out (see :func:`instrumentation_targets`)."""
    if not notes:
        return
    report(
        f"**Note: some athooks internals this benchmark times by name were left out** "
        f"({consequence}); update `instrumentation_targets()` in `benchmarks/overhead.py`:"
    )
    report()
    for note in notes:
        report(f"- {note}")
    report()


# --------------------------------------------------------------------------- main


def settings_for(smoke: bool, batches: Sequence[int], gpu: bool = False) -> dict[str, Any]:
    """The settings of each part: ``smoke`` (seconds), ``gpu`` (the GPU settings: 224x224) or
    the CPU default."""
    if gpu and not smoke:
        pairs = [("timm:resnet34", "timm:resnet18"), ("timm:resnet50", "timm:resnet34")]
        light = [Setting(t, s, 224, b) for t, s in pairs for b in batches]
        heavy = Setting("timm:resnet50", "timm:resnet34", 224, min(batches), taps="blocks")
        return {"light": light, "memory": [*light, heavy], "sweep": heavy, "counts": (1, 4, 16)}
    if smoke:
        light = [Setting("athooks:wrn16_2", "athooks:wrn16_1", 16, 2)]
        heavy = Setting("timm:resnet18", "timm:resnet18", 32, 2, taps="blocks")
        return {"light": light, "memory": [heavy], "sweep": heavy, "counts": (1, 8)}
    light = [
        Setting(t, s, size, b)
        for t, s, size in (
            ("timm:resnet34", "timm:resnet18", 64),
            ("athooks:wrn16_2", "athooks:wrn16_1", 32),
        )
        for b in batches
    ]
    heavy = Setting("timm:resnet50", "timm:resnet34", 128, 32, taps="blocks")
    sweep = Setting("timm:resnet50", "timm:resnet34", 64, 32, taps="blocks")
    return {
        "light": light,
        "memory": [*light, heavy],
        "sweep": sweep,
        "counts": (1, 2, 4, 8, 16),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--channels-last", action="store_true", help="NHWC models and input")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and loss")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on CPU: on a shared machine more threads make the "
        "OpenMP workers wait on each other and the timings unstable)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="at most this many measured rounds per setting (default 40)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of measured rounds per setting (default 75): the number of rounds is what "
        "fits at the pace of the warm-up, at least 6, at most --rounds",
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds")
    parser.add_argument(
        "--steps-per-round",
        type=int,
        default=1,
        help="eager step time: steps of a variant run in a row per round, timed together "
        "(default 1); more is closer to a training loop, where a step follows a step of the "
        "same code",
    )
    parser.add_argument("--sweep-rounds", type=int, default=None, help="rounds of the sweep")
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes of the timing settings (default 32 128; 64 128 with --gpu)",
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU settings: resnet34->resnet18 and resnet50->resnet34 at 224x224 (use with "
        "--device cuda)",
    )
    parser.add_argument(
        "--only",
        choices=("timing", "memory", "sweep", "breakdown", "options"),
        nargs="+",
        help="run only these parts ('options': the compiled student and the teacher options; "
        "without --only, the flags of the options part run that part alone)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="memory children run at once (each measures only itself; default 2)",
    )
    parser.add_argument("--no-torchdistill", action="store_true", help="skip torchdistill")
    parser.add_argument(
        "--baseline-src",
        metavar="DIR",
        help="another checkout (e.g. a git worktree of main): its DIR/athooks runs as variant "
        "athooks@LABEL next to today's athooks, in the same timing rounds and memory children, "
        "with athooks / baseline ratios; entry-point plugins are then off for both",
    )
    parser.add_argument(
        "--baseline-label", default="main", help="name of the baseline variant (default main)"
    )
    parser.add_argument(
        "--sweep-torchdistill", action="store_true", help="include torchdistill in the sweep"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the compiled student: floor+compile and athooks+compile (part 'options')",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (default inductor)"
    )
    parser.add_argument(
        "--teacher-dtype",
        choices=("bf16", "fp16"),
        help="athooks with teacher_dtype= (part 'options')",
    )
    parser.add_argument(
        "--teacher-compile", action="store_true", help="athooks with teacher_compile=True"
    )
    parser.add_argument(
        "--teacher-channels-last", action="store_true", help="athooks with teacher_channels_last"
    )
    parser.add_argument("--truncate", action="store_true", help="athooks with truncate_teacher")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads if args.threads is not None else 1
    if args.threads is not None or args.device == "cpu":
        torch.set_num_threads(threads)
    if not re.fullmatch(r"[\w.-]+", args.baseline_label):
        parser.error(f"--baseline-label {args.baseline_label!r}: letters, digits, _ . - only")
    if args.baseline_src and not os.path.isfile(
        os.path.join(args.baseline_src, "athooks", "__init__.py")
    ):
        parser.error(f"--baseline-src {args.baseline_src}: no athooks package in it")
    opts = Options(
        torch.device(args.device),
        args.channels_last,
        args.bf16,
        threads,
        os.path.abspath(args.baseline_src) if args.baseline_src else None,
        args.baseline_label,
        args.compile_backend,
        max(1, args.steps_per_round),
    )
    if opts.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    # with a baseline, neither athooks loads entry-point plugins (see load_baseline): the two
    # packages then run on the same footing, built-ins only, here and in the memory children
    with environment(AUTOLOAD_ENV, "1") if opts.baseline_src else contextlib.nullcontext():
        return run(args, opts, argv)


def options_variants(args: argparse.Namespace) -> list[str]:
    """The variants of the options part that the flags ask for (empty: no such flag)."""
    flags = [
        f
        for f, on in (
            (f"teacher_{args.teacher_dtype}", args.teacher_dtype),
            ("teacher_compile", args.teacher_compile),
            ("teacher_cl", args.teacher_channels_last),
            ("truncate", args.truncate),
        )
        if on
    ]
    if not flags and not args.compile:
        return []
    variants = ["floor", "athooks", *(f"athooks+{f}" for f in flags)]
    if args.compile:
        variants += ["floor+compile", "athooks+compile"]
    return variants


def run(args: argparse.Namespace, opts: Options, argv: Sequence[str] | None) -> int:
    """The benchmark itself, or one memory child, as ``args`` say."""
    if args.child:
        raw = json.loads(args.child[0])
        print(json.dumps(memory_child(Setting(**raw), args.child[1], opts)))
        return 0

    smoke = args.smoke
    rounds = args.rounds if args.rounds is not None else (2 if smoke else 40)
    budget = args.budget if args.budget is not None else (None if smoke else 75.0)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    sweep_rounds = args.sweep_rounds if args.sweep_rounds is not None else (2 if smoke else 8)
    option_variants = options_variants(args)
    default_parts = ("options",) if option_variants else ("timing", "memory", "sweep", "breakdown")
    parts = set(args.only or default_parts)
    if "options" in parts and not option_variants:
        option_variants = ["floor", "athooks", "floor+compile", "athooks+compile"] + [
            f"athooks+{f}" for f in TEACHER_FLAGS if f != "teacher_fp16"
        ]
    variants = [v for v in VARIANTS if v != "torchdistill"]
    if opts.baseline:
        variants.insert(variants.index("athooks") + 1, opts.baseline)
        about_baseline = describe_baseline(
            opts.baseline_src or "", load_baseline(opts.baseline_src or "")
        )
    if have_torchdistill() and not args.no_torchdistill:
        variants.append("torchdistill")
    batches = args.batches if args.batches is not None else ([64, 128] if args.gpu else [32, 128])
    cfg = settings_for(smoke, batches, gpu=args.gpu)

    report = Report()
    started = datetime.datetime.now(datetime.timezone.utc)
    command = "python3 benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    device = (
        torch.cuda.get_device_name(opts.device)
        if opts.device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads)"
    )
    extras = [n for n, on in (("channels_last", opts.channels_last), ("bf16", opts.bf16)) if on]
    versions = f"torch {torch.__version__}, timm {timm.__version__}"
    if "torchdistill" in variants:
        import torchdistill

        versions += f", torchdistill {torchdistill.__version__}"
    report(f"## athooks overhead benchmark{' (smoke)' if smoke else ''}")
    report()
    report(f"- date: {started:%Y-%m-%d %H:%M} UTC")
    report(f"- command: `{command.strip()}`")
    report(f"- device: {device}{'; ' + ', '.join(extras) if extras else ''}")
    report(f"- {versions}, Python {platform.python_version()}")
    report(f"- athooks {athooks.__version__} from `{os.path.dirname(athooks.__file__ or '')}`")
    if opts.baseline:
        report(
            f"- baseline `{opts.baseline}`: {about_baseline}; entry-point plugins off for both "
            f"(`{AUTOLOAD_ENV}=1`), and every memory child imports both packages"
        )
    report(f"- load average at start (1, 5, 15 min): {load()}")
    report()
    t0 = time.perf_counter()
    timings: dict[str, Timing] = {}
    memory: dict[str, dict[str, dict[str, Any]]] = {}
    if "timing" in parts:
        timings = timing_section(report, cfg["light"], variants, opts, warmup, rounds, budget)
    if "memory" in parts:
        memory = memory_section(report, cfg["memory"], variants, opts, jobs=args.jobs)
    if opts.baseline and (timings or memory):
        baseline_section(report, opts.baseline, timings, memory)
    if "sweep" in parts:
        sweep_variants = [
            v
            for v in variants
            if v != opts.baseline and (v != "torchdistill" or args.sweep_torchdistill)
        ]
        sweep_section(
            report, cfg["sweep"], cfg["counts"], sweep_variants, opts, warmup, sweep_rounds
        )
    if "options" in parts:
        light = [s for s in cfg["light"] if s.batch == min(x.batch for x in cfg["light"])]
        options_section(
            report, light, option_variants, opts, warmup, rounds, budget, jobs=args.jobs
        )
    if "breakdown" in parts:
        for setting in cfg["light"]:
            if setting.batch == min(s.batch for s in cfg["light"]):
                breakdown_section(report, setting, opts, warmup, rounds, budget and budget / 2)
    report(f"Load average at the end: {load()}; total time {time.perf_counter() - t0:.0f} s.")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(report.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
