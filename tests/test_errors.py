"""Every error athooks raises: each raise site is triggered here, and listed in docs/reference/errors.md.

The raise sites are found by reading athooks' source (``ast``): each ``raise SomeError(message)``
becomes a regular expression made of the message's literal text with ``.*`` for its
f-string holes. Two checks follow:

- every site is matched by the message of at least one trigger in ``TRIGGERS`` below, raised
  with the site's class (so every error can really happen, and is tested);
- the longest literal part of every site's message appears in the errors page (so every error
  is documented).

A new ``raise`` in athooks fails these tests until it has a trigger here and an entry in
docs/reference/errors.md.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from conftest import TinyCNN, tiny_pair
from torch import nn

import athooks
import athooks.registry
from athooks import Distiller, Layer
from athooks.errors import (
    AthooksError,
    CaptureError,
    ConfigurationError,
    LayerResolutionError,
    PluginError,
    UnknownNameError,
)
from athooks.models import WRN, create_model
from athooks.plugin import LossSpec, MappingSpec, hookimpl

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "athooks"
PAGE = ROOT / "docs" / "reference" / "errors.md"
# Python's own conventions, not athooks errors: abstract methods, a module's __getattr__, the
# CLI's exit
IGNORED_CLASSES = {"NotImplementedError", "SystemExit", "AttributeError"}
# sites whose message is built elsewhere (a helper or a variable): what their messages start with
# (regular expression of the message, the phrase the errors page must contain)
INDIRECT = {
    ("taps.py", "collect"): (
        r"student layer '.*' did not fire during the student's last forward",
        "did not fire during the student's last forward",
    ),
    ("layers.py", "match_modules"): (
        r"pattern '.*' matched no module of the ",
        "matched no module of the",
    ),
    ("registry.py", "_lookup"): (r"unknown (mapping|loss) '.*'; registered ", "; registered"),
}


@dataclass(frozen=True)
class Site:
    file: str
    line: int
    function: str
    cls: str
    regex: str
    longest: str

    def __str__(self) -> str:
        return f"athooks/{self.file}:{self.line} ({self.function}) raise {self.cls}"


def _message_parts(node: ast.AST) -> list[str | None] | None:
    """Literal parts (str) and holes (None) of a message expression; None if not a literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value if isinstance(v, ast.Constant) else None for v in node.values]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _message_parts(node.left), _message_parts(node.right)
        return None if left is None or right is None else left + right
    return None


def raise_sites() -> list[Site]:
    sites = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
                continue
            body_nodes = ast.walk(func) if not isinstance(func, ast.Module) else []
            name = func.name if not isinstance(func, ast.Module) else "<module>"
            for node in body_nodes:
                if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                    continue
                if not isinstance(node.exc.func, ast.Name):
                    continue
                cls = node.exc.func.id
                if cls in IGNORED_CLASSES:
                    continue
                parts = _message_parts(node.exc.args[0]) if node.exc.args else None
                literal = [p for p in (parts or []) if p]
                if not literal:
                    key = (rel, name)
                    assert key in INDIRECT, f"athooks/{rel}:{node.lineno}: add it to INDIRECT"
                    regex, longest = INDIRECT[key]
                else:
                    regex = "".join(re.escape(p) if p is not None else ".*" for p in parts)
                    longest = max(literal, key=len)
                sites.append(Site(rel, node.lineno, name, cls, regex, longest))
    # nested functions are walked twice (as part of their parent): keep one
    unique = {(s.file, s.line): s for s in sites}
    return sorted(unique.values(), key=lambda s: (s.file, s.line))


# ------------------------------------------------------------------ triggers


@pytest.fixture
def register():
    pm = athooks.get_plugin_manager()
    added = []

    def _register(obj, name):
        pm.register(obj, name=name)
        added.append(obj)

    yield _register
    for obj in added:
        pm.unregister(obj)


def _pair():
    return tiny_pair()


X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def step(layers: Any = "relu?", call: Callable[..., Any] | None = None, **kwargs: Any):
    """A Distiller step whose d.loss() is what the trigger examines."""

    def run(target=None):
        teacher, student = _pair()
        with Distiller(teacher, student, layers=layers, **kwargs) as d:
            (call or (lambda s: s(X)))(student)
            d.loss(target)

    return run


class PerRegion(nn.Module):
    """Called with a list of images, like torchvision's detectors; ``roi`` runs per region."""

    def __init__(self, rois: int) -> None:
        super().__init__()
        self.conv, self.roi, self.rois = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), rois

    def forward(self, images):
        return self.roi(self.conv(torch.stack(images)).repeat_interleave(self.rois, 0)).mean()


def _per_region():
    teacher, student = PerRegion(3), PerRegion(2)
    with Distiller(teacher, student, layers="roi") as d:
        student([X[0], X[1]])
        d.loss()


class Branchy(TinyCNN):
    def forward(self, x):  # never reaches relu2, relu3
        return self.relu1(self.bn1(self.conv1(x))).mean((2, 3))


def _not_fired():
    teacher, student = TinyCNN(16), Branchy(8)
    with Distiller(teacher, student, layers="relu3") as d:
        student(X)
        d.loss()


def _teacher_not_fired():
    teacher, student = Branchy(16), TinyCNN(8)
    with Distiller(teacher, student, layers="relu3") as d:
        student(X)
        d.loss()


class Overwrites(TinyCNN):
    later = False

    def forward(self, x):
        a = self.bn1(self.conv1(x))
        if self.later:
            a.mul_(1.0)
        return self.head(
            self.relu3(self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(a)))))).mean((2, 3))
        )


def _overwritten():
    teacher, student = TinyCNN(16, inplace=False), Overwrites(8, inplace=False)
    with Distiller(teacher, student, layers="bn1") as d:
        student(X)
        d.loss()
        student.later = True
        student(X)
        d.loss()


def _reentrant():
    from torch.utils.checkpoint import checkpoint

    class Ck(TinyCNN):
        def forward(self, x):
            a = checkpoint(lambda t: self.relu1(self.bn1(self.conv1(t))), x, use_reentrant=True)
            return a.mean((2, 3))

    teacher, student = TinyCNN(16), Ck(8)
    with Distiller(teacher, student, layers="relu1") as d:
        student(X.clone().requires_grad_())
        d.loss()


def _detached():
    teacher, student = _pair()
    student.bn2.register_forward_hook(lambda m, a, out: out.detach())
    with Distiller(teacher, student, layers="bn2") as d:
        student(X)
        d.loss()


def _compiled_before():
    import torch._dynamo.config as config

    class Early(TinyCNN):
        def forward(self, x):
            return super().forward(x)

    teacher, student, twin = TinyCNN(16), Early(8), Early(8)
    try:
        with Distiller(teacher, student, layers="relu?") as d:
            config.skip_nnmodule_hook_guards = True  # the user undoes athooks' setting
            torch.compile(twin, backend="eager")(X)  # a hookless twin's code, no hook guards
            torch.compile(student, backend="eager")(X)  # ... reused for the student
            d.loss()
    finally:
        torch._dynamo.reset()


def _truncate_calls_differ():
    class Branchy(TinyCNN):
        def forward(self, x):
            _, b, c = self.features(x)
            if x.shape[-1] > 16:  # another count of tapped calls for wide inputs
                c = self.relu3(self.bn3(self.conv3(b)))
            return self.head(c.mean((2, 3)))

    with Distiller(Branchy(16), TinyCNN(8), layers="relu?", truncate_teacher=True) as d:
        d.student(torch.randn(2, 3, 32, 32))
        d.loss()
        d.student(torch.randn(2, 3, 16, 16))


def _timm_checkpointing():
    import timm

    teacher = timm.create_model("resnet18", num_classes=5)
    student = timm.create_model("resnet18", num_classes=5)
    student.set_grad_checkpointing(True)
    with Distiller(teacher, student, layers="layer2") as d:
        student(torch.randn(2, 3, 32, 32))
        d.loss()


def _lifecycle(which: str):
    def run():
        teacher, student = _pair()
        d = Distiller(teacher, student, layers="relu?")
        if which == "detached":
            d.loss()
        with d:
            if which == "twice":
                with d:
                    pass
            if which == "before":
                d.loss()
            student(X)
            d.loss()
            if which == "consumed":
                d.loss()

    return run


class Fails(TinyCNN):
    def forward(self, x):
        super().forward(x)
        raise ValueError("late")


def _unfinished():
    teacher, student = TinyCNN(16), Fails(8)
    with Distiller(teacher, student, layers="relu?") as d:
        with pytest.raises(ValueError, match="late"):
            student(X)
        d.loss()


class NonScalar(athooks.Loss):
    def forward(self, step):
        return torch.ones(3)


class ReadsUncaptured(athooks.Loss):
    def __init__(self):
        super().__init__()
        self.declared = athooks.mapping("sum_p")

    def captures(self):
        return (self.declared,)

    def forward(self, step):
        return step.maps(athooks.mapping("sum"))[0][0].sum()  # not the one it declared


class NeedsTarget(athooks.Loss):
    def forward(self, step):
        return step.require_target("needs_target").float().sum()


class OneTermForAll(athooks.Loss):
    """A per-pair loss that passes sum_pairs one term for all its pairs."""

    def __init__(self):
        super().__init__()
        self.mapping = athooks.mapping("sum_p")

    def captures(self):
        return (self.mapping,)

    def forward(self, step):
        maps = step.maps(self.mapping)
        return self.sum_pairs([maps[0][1].mean()], step.pairs)


def _weighted(**options: Any) -> Callable[[], None]:
    """A step of the relu1..relu3 pairs with an AT loss made with these options."""
    return lambda: step(losses=athooks.loss("at", **options))()


def _one_term_for_all():
    loss = OneTermForAll()
    loss.pair_weights = [1.0, 1.0, 1.0]
    step(losses=loss)()


def _grad_loss_without_input():
    class TakesKw(TinyCNN):
        def forward(self, x=None, *, idx):
            return super().forward(X[: idx.shape[0]])

    torch.manual_seed(0)
    teacher, student = TakesKw(16), TakesKw(8)
    with Distiller(teacher, student, losses="grad_at") as d:
        student(idx=torch.arange(4))
        d.loss(torch.arange(4) % 5)


def _grad_loss_no_grad():
    teacher, student = _pair()
    with Distiller(teacher, student, losses="grad_at", no_grad="capture") as d:
        with torch.no_grad():
            student(X)
        d.loss(torch.arange(4) % 5)


def _grad_loss_compiled():
    teacher, student = _pair()
    try:
        with Distiller(teacher, student, losses="grad_at") as d:
            torch.compile(student, backend="aot_eager")(X)
            d.loss(torch.arange(4) % 5)
    finally:
        torch._dynamo.reset()


def _grad_loss_outside_distiller():
    from athooks.losses.base import Step

    athooks.loss("grad_at")(Step([], [], [], target=torch.zeros(2)))


def _cli_show_out(tmp: Path):
    from athooks.cli import _cmd_show

    class Args:
        out = str(tmp / "maps.jpg")

    _cmd_show(Args())  # type: ignore[arg-type]


def _checkpoint(tmp: Path, what: str):
    from athooks.cli import build_model, load_checkpoint

    net = build_model("athooks:wrn10_1", num_classes=3)
    path = tmp / "w.pt"
    if what == "junk":
        path.write_bytes(b"not a checkpoint")
    elif what == "nostate":
        torch.save({"epoch": 3}, path)
    elif what == "misfit":
        torch.save(build_model("athooks:wrn10_1", num_classes=5).state_dict(), path)
    load_checkpoint(net, str(tmp / "missing.pt") if what == "missing" else str(path))


def _pretrained_download_fails(monkeypatch):
    import timm

    from athooks.cli import build_model

    def offline(name, pretrained=False, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    build_model("resnet18", pretrained=True)


def _plugin(register, kind: str):
    def explode():
        raise RuntimeError("no weights")

    def needs_option(size):
        return lambda f: f.sum(1)

    class Plugin:
        @hookimpl
        def athooks_mappings(self):
            return [
                MappingSpec("sum", lambda: lambda f: f.sum(1)),  # clashes with the built-in
                MappingSpec("explodes_e", explode),
                MappingSpec("junk_e", lambda: 42),
                MappingSpec("typeerror_e", lambda **kw: needs_option(**kw)),
            ]

        @hookimpl
        def athooks_losses(self):
            return [LossSpec("notaloss_e", lambda: object())]

    register(Plugin(), "errors-test-plugin")
    {
        "clash": lambda: athooks.mapping("sum"),
        "explodes": lambda: athooks.mapping("explodes_e"),
        "junk": lambda: athooks.mapping("junk_e"),
        "notaloss": lambda: athooks.loss("notaloss_e"),
        "rejected": lambda: athooks.mapping("typeerror_e"),
    }[kind]()


def _resolve(layers: Callable[[nn.Module, nn.Module], Any]) -> None:
    from athooks.layers import resolve_pairs

    teacher, student = _pair()
    resolve_pairs(teacher, student, layers(teacher, student))


def _module_name_not_on_teacher():
    from athooks.layers import resolve_pairs

    teacher, student = _pair()
    student.add_module("extra", nn.Conv2d(3, 3, 1))
    resolve_pairs(teacher, student, [student.extra])


def _fact_shapes():
    teacher, student = _pair()
    with Distiller(teacher, student, layers="relu1", losses="fact") as d:
        student(X)
        d.loss()


def _kd_classes():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16, classes=7), TinyCNN(8)
    with Distiller(teacher, student, losses="kd") as d:
        student(X)
        d.loss(torch.arange(4) % 5)


def _logits_missing():
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3))
    student = nn.Sequential(nn.Conv2d(3, 4, 3))
    with Distiller(teacher, student, losses="kd") as d:
        student(X)
        d.loss(torch.arange(4))


def _grad_target_size():
    teacher, student = _pair()
    with Distiller(teacher, student, losses="grad_at") as d:
        student(X)
        d.loss(torch.arange(3))


def _teacher_device():
    teacher, student = _pair()
    teacher.to("meta")
    with Distiller(teacher, student, layers="relu?"):
        student(X)


def _not_spatial():
    teacher, student = _pair()
    from athooks.mappings import FunctionMapping

    channels = FunctionMapping(lambda f: f.mean((2, 3)), name="channels")
    channels.is_attention_map = False

    class ChannelGap(athooks.Loss):
        def __init__(self):
            super().__init__()
            self.m = channels

        def captures(self):
            return (self.m,)

        def forward(self, step):
            return sum((t - s).pow(2).sum() for t, s in step.maps(self.m))

    with Distiller(teacher, student, layers="relu1", losses=ChannelGap()) as d:
        student(X)
        d.loss()


def _vit_tokens():
    from athooks.discovery import TokensToMap

    TokensToMap(prefix=1, grid=(4, 4))(torch.randn(2, 10, 8))


def _probe_fails():
    from athooks.discovery import probe

    probe(nn.Sequential(nn.Conv2d(1, 4, 3)), (3, 16, 16), side="teacher")


def _no_stage():
    from athooks.discovery import stage_layers

    stage_layers(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)), input_size=(3, 16, 16))


class Mixed(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.stage = nn.Sequential(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1)),
            torchvision.models.resnet.BasicBlock(width, width),
        )

    def forward(self, x):
        return self.stage(self.stem(x))


def _blocks_mixed():
    Distiller(Mixed(8), Mixed(4), layers="blocks", input_size=(3, 16, 16))


def _no_shared_stride():
    t = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Sequential(nn.Conv2d(4, 4, 1)))
    s = nn.Sequential(nn.Conv2d(3, 4, 3, stride=8, padding=1), nn.Sequential(nn.Conv2d(4, 4, 1)))
    Distiller(t, s, layers="auto", input_size=(3, 16, 16))


def _blocks_unequal():
    Distiller(
        torchvision.models.resnet34(),
        torchvision.models.resnet18(),
        layers="blocks",
        input_size=(3, 32, 32),
    )


def _viz(kind: str, tmp: Path):
    from athooks import viz

    model = TinyCNN(8)
    images = torch.rand(2, 3, 16, 16)
    {
        "images_type": lambda: viz.plot_maps([1, 2], {}),
        "images_shape": lambda: viz.plot_maps(torch.rand(16, 16), {}),
        "layers": lambda: viz.attention_maps(model, images, layers=[3]),
        "not_run": lambda: viz.attention_maps(Branchy(8), images, layers="relu3"),
        "channels": lambda: viz.load_image(tmp / "x.png", (8, 8), channels=2),
        "unreadable": lambda: viz.load_image(tmp / "missing.png", (8, 8)),
        "image_shape": lambda: viz.overlay(torch.rand(5, 8, 8), torch.rand(4, 4)),
        "alpha": lambda: viz.overlay(torch.rand(3, 8, 8), torch.rand(4, 4), alpha=2.0),
        "amap": lambda: viz.overlay(torch.rand(3, 8, 8), torch.rand(2, 4, 4)),
        "nothing": lambda: viz.plot_maps(images[:0], {}),
        "maps_shape": lambda: viz.plot_maps(images, {"relu1": torch.rand(3, 4, 4)}),
        "models_as": lambda: viz.compare(model, TinyCNN(8), images, "relu1", models_as="diag"),
        "display": lambda: viz.compare(
            model, TinyCNN(8), images, "relu1", display=torch.rand(3, 3, 16, 16)
        ),
        "ps": lambda: viz.plot_across_p(model, images, ps=[], layers="relu1"),
        "select_all": lambda: viz.attention_maps(model, images, Layer("relu1", select="*")),
    }[kind]()


def _viz_no_matplotlib(monkeypatch):
    import builtins

    from athooks import viz

    real = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("blocked")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    viz._require_matplotlib()


def _lightning(kind: str):
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from athooks.lightning import AttentionTransfer

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyCNN(8)
            self.scale = 2.0

    teacher = TinyCNN(16)
    module = Module()
    if kind == "teacher":
        AttentionTransfer("resnet18", student="net")  # type: ignore[arg-type]
    elif kind == "student":
        AttentionTransfer(teacher, student=3)  # type: ignore[arg-type]
    elif kind == "target":
        AttentionTransfer(teacher, student="net", target=3)  # type: ignore[arg-type]
    elif kind == "foreign":
        AttentionTransfer(teacher, student=TinyCNN(8))._student_of(module)
    elif kind == "missing":
        AttentionTransfer(teacher, student="backbone")._student_of(module)
    elif kind == "not_module":
        AttentionTransfer(teacher, student="scale")._student_of(module)
    elif kind == "learnable":
        from athooks.mappings import FunctionMapping

        gate = nn.Conv2d(1, 1, 1)
        mapping = FunctionMapping(lambda f: gate(f.pow(2).mean(1, keepdim=True)).squeeze(1))
        mapping.gate = gate
        callback = AttentionTransfer(
            teacher, student="net", layers="relu1", losses=athooks.loss("at", mapping=mapping)
        )
        callback.on_fit_start(None, module)  # type: ignore[arg-type]
    elif kind == "returns":
        callback = AttentionTransfer(teacher, student="net", layers="relu1")
        callback.on_fit_start(None, module)  # type: ignore[arg-type]
        try:
            module.net(X)
            callback._add_transfer(module, "a string", None)
        finally:
            callback._restore(module)


def _data_parallel():
    teacher, student = _pair()
    wrapped = nn.DataParallel(student)
    wrapped.device_ids = [0, 1]  # as on a machine with two GPUs
    Distiller(teacher, wrapped, layers="relu?").attach()


def _replicas_only():
    teacher, student = _pair()
    with Distiller(teacher, student, layers="relu?") as d:
        replica = student._replicate_for_data_parallel()  # what DataParallel runs on each GPU
        replica._parameters = student._parameters
        replica(X)
        d.loss()


def _threads_with_shared_modules():
    import threading

    teacher, student = TinyCNN(8), TinyCNN(8)
    teacher.conv1 = student.conv1  # a shared stem
    errors = []
    inside = threading.Event()
    release = threading.Event()

    def hold(module, args, out):
        inside.set()
        release.wait(10)

    handle = student.relu3.register_forward_hook(hold)
    with Distiller(teacher, student, layers="relu?"):
        worker = threading.Thread(target=lambda: student(X))
        worker.start()
        inside.wait(10)
        handle.remove()
        try:
            student(X)
        except CaptureError as err:
            errors.append(err)
        finally:
            release.set()
            worker.join()
    raise errors[0]


class EditsInput(TinyCNN):
    def forward(self, x):
        return super().forward(x.sub_(0.5))


def _teacher_edits_input():
    teacher, student = EditsInput(16), TinyCNN(8)
    with Distiller(teacher, student, layers="relu?"):
        student(X.clone())


class ReturnsStage(TinyCNN):
    def forward(self, x):
        b = self.features(x)[1]
        return self.bn3(self.conv3(b))  # the tapped layer's output itself


def _edited_after_forward():
    teacher, student = ReturnsStage(16, inplace=False), ReturnsStage(8, inplace=False)
    with Distiller(teacher, student, layers="bn3") as d:
        for _ in range(2):  # the first step maps a copy (the probe): from the second on, not
            out = student(X)
            at = d.loss()
            out.mul_(3)
            at.backward()


def _state_dict_misfit():
    from athooks.mappings import FunctionMapping

    gate = nn.Conv2d(1, 1, 1)
    mapping = FunctionMapping(lambda f: gate(f.pow(2).mean(1, keepdim=True)).squeeze(1))
    mapping.gate = gate
    d = Distiller(*_pair(), layers="relu?", losses=athooks.loss("at", mapping=mapping))
    state = d.state_dict()
    del state["losses.0.mapping.gate.bias"]
    d.load_state_dict(state)


def _state_dict_before_auto():
    teacher, student = _pair()
    d = Distiller(teacher, student)  # "auto": its layers are chosen on the first call
    d.load_state_dict({"taps.conv9.copy": torch.tensor(True)})
    with d:
        student(X)


class _FitLike(athooks.plugin.Loss):
    """A loss with one connector per pair (as FitNet), for the connector errors."""

    name = "fit_like"

    def __init__(self, call_setup: bool = True):
        super().__init__()
        self.features = athooks.plugin.Features()
        self.connectors = athooks.plugin.Connectors()
        self.call_setup = call_setup

    def setup(self, pairs):
        if self.call_setup:
            super().setup(pairs)

    def captures(self):
        return (self.features,)

    def forward(self, step):
        terms = [
            (self.connectors[i](s, t) - t).pow(2).mean()
            for i, (t, s) in enumerate(step.features(self.features))
        ]
        return self.sum_pairs(terms)


class _EmbLike(athooks.plugin.Loss):
    name = "emb_like"
    needs_embedding = True

    def forward(self, step):
        t, s = step.embedding()
        return (t.mean() - s.mean()) ** 2


def _connector(kind: str):
    from athooks.plugin import Connector

    def run():
        if kind == "kind":
            Connector(kind="mlp")
        elif kind == "builder":
            Connector(builder=3)
        elif kind == "builder_returns":
            Connector(builder=lambda i, o: "not a module")
        elif kind == "not_float":
            Connector()(torch.ones(2, 3, 4, 4, dtype=torch.long), 4)
        elif kind == "linear_shape":
            Connector(kind="linear")(torch.randn(2, 3, 4, 4), 4)
        elif kind == "conv_shape":
            Connector()(torch.randn(2, 3), 4)
        elif kind == "names_depend":

            def build(i, o):
                return nn.Sequential(*[nn.Linear(i, o) for _ in range(1 if o == 1 else 2)])

            Connector(builder=build, kind="linear")(torch.randn(2, 3), 4)
        elif kind == "widths_changed":
            conn = Connector()
            conn(torch.randn(2, 3, 4, 4), 4)
            conn(torch.randn(2, 5, 4, 4), 4)
        elif kind == "unsized":
            athooks.plugin.Connectors()[0]

    return run


def _connector_distiller(kind: str):
    def run():
        teacher, student = _pair()
        if kind == "before_auto":
            Distiller(teacher, student, losses=_FitLike()).parameters()
        elif kind == "embedding_unused":
            Distiller(teacher, student, layers="relu?", embedding="head")
        elif kind == "embedding_many":
            Distiller(teacher, student, layers="relu?", losses=_EmbLike(), embedding="relu?")
        elif kind == "embedding_spatial":
            with Distiller(
                teacher, student, layers="relu?", losses=_EmbLike(), embedding="relu3"
            ) as d:
                student(X)
                d.loss()
        elif kind == "state_pairs":
            d = Distiller(teacher, student, layers="relu?", losses=_FitLike())
            with d:
                student(X)
                d.loss()
            saved = {k: v for k, v in d.state_dict().items() if k.startswith("losses.")}
            other = Distiller(teacher, student, losses=_FitLike())
            other.load_state_dict(saved)
            with other:  # at 4x4 "auto" pairs two layers (relu3 is 1x1), the saved state three
                student(torch.randn(2, 3, 4, 4))
        elif kind == "reused":
            hint = _FitLike()
            Distiller(teacher, student, layers="relu?", losses=hint)
            Distiller(teacher, student, layers="relu3", losses=hint)
        elif kind == "embedding_batch":
            d = Distiller(teacher, student, losses=_EmbLike(), teacher_input=lambda x: x[:2])
            with d:
                student(X)
                d.loss()
        elif kind == "no_classifier":

            class Plain(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.conv = nn.Conv2d(3, 4, 3)

                def forward(self, x):
                    return self.conv(x)

            Distiller(Plain(), Plain(), layers="conv", losses=_EmbLike())

    return run


def _step_errors(kind: str):
    from athooks.plugin import Step

    def run():
        step = Step([], [], [])
        if kind == "embedding":
            step.embedding()
        elif kind == "classifier_side":
            step.classifier("both")
        elif kind == "classifier":
            step.classifier("teacher")
        elif kind == "extra":
            step.extra("index")
        elif kind == "sum_pairs":
            _FitLike().sum_pairs([])

    return run


class _Keys(nn.Module):
    def __init__(self, keys):
        super().__init__()
        self.keys = keys

    def forward(self, x):
        return {k: x for k in self.keys}


def _select_all_no_shared_key():
    teacher, student = nn.Sequential(_Keys(("a",))), nn.Sequential(_Keys(("b",)))
    with Distiller(teacher, student, layers=Layer("0", select="*")):
        student(X)


def _tokens_read_as_1d():
    def net():
        return nn.Sequential(nn.Linear(4, 6))

    teacher, student = net(), net()
    with Distiller(teacher, student, layers="0"):
        student(torch.randn(2, 5, 4))  # (B, N, C) tokens out of a Linear


def _layouts_differ():
    teacher = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1))
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    video = lambda x: x[:, :, None].expand(-1, -1, 2, -1, -1)  # noqa: E731
    with Distiller(teacher, student, layers="0", teacher_input=video) as d:
        student(X)
        d.loss()


@dataclass
class Trigger:
    id: str
    cls: type[BaseException]
    run: Callable[..., Any]
    needs: tuple[str, ...] = ()  # fixtures the trigger takes: "tmp", "register", "monkeypatch"


def _demo_unlabeled_without_distiller():
    from athooks.demo.run import DemoConfig, train

    x, y = torch.randn(4, 1, 32, 32), torch.zeros(4, dtype=torch.long)
    student = create_model("wrn16_1", num_classes=10, in_chans=1)
    train(student, x, y, epochs=1, config=DemoConfig(), unlabeled=x, progress=False)


def t(id: str, cls: type[BaseException], run: Callable[..., Any], *needs: str) -> Trigger:
    return Trigger(id, cls, run, needs)


CE, CP, LR = ConfigurationError, CaptureError, LayerResolutionError

TRIGGERS = [
    # Distiller arguments
    t("models_must_be_modules", CE, lambda: Distiller("resnet18", TinyCNN(8))),
    t("same_module", CE, lambda: Distiller(*(lambda s: (s, s))(TinyCNN(8)), layers="relu?")),
    t("teacher_input", CE, lambda: Distiller(*_pair(), layers="relu?", teacher_input=3)),
    t("resize", CE, lambda: Distiller(*_pair(), layers="relu?", resize="nearest")),
    t("copy_outputs", CE, lambda: Distiller(*_pair(), layers="relu?", copy_outputs="never")),
    t("check_finite", CE, lambda: Distiller(*_pair(), layers="relu?", check_finite="yes")),
    t("teacher_compile", CE, lambda: Distiller(*_pair(), layers="relu?", teacher_compile=1)),
    t("teacher_dtype", CE, lambda: Distiller(*_pair(), layers="relu?", teacher_dtype=torch.int8)),
    t("channels_last", CE, lambda: Distiller(*_pair(), layers="relu?", teacher_channels_last=1)),
    t("truncate_type", CE, lambda: Distiller(*_pair(), layers="relu?", truncate_teacher="y")),
    t(
        "truncate_needs_output",
        CE,
        lambda: Distiller(*_pair(), layers="relu?", losses=["at", "kd"], truncate_teacher=True),
    ),
    t("truncate_calls_differ", CP, _truncate_calls_differ),
    t("losses_type", CE, lambda: Distiller(*_pair(), layers="relu?", losses=3)),
    t("losses_item", CE, lambda: Distiller(*_pair(), layers="relu?", losses=[nn.MSELoss()])),
    t("losses_empty", CE, lambda: Distiller(*_pair(), layers="relu?", losses=[])),
    t("unknown_loss", UnknownNameError, lambda: Distiller(*_pair(), losses="attention")),
    t(
        "state_dict_key",
        CE,
        lambda: Distiller(*_pair(), layers="relu?").load_state_dict({"x": torch.zeros(1)}),
    ),
    # lifecycle
    t("attached_twice", CE, _lifecycle("twice")),
    t("not_attached", CP, _lifecycle("detached")),
    t("loss_before_forward", CP, _lifecycle("before")),
    t("loss_twice", CP, _lifecycle("consumed")),
    t("forward_unfinished", CP, _unfinished),
    t("pairs_not_resolved", CE, lambda: Distiller(*_pair()).pairs),
    t("no_grad_policy", CE, lambda: Distiller(*_pair(), layers="relu?", no_grad="never")),
    t("data_parallel", CE, _data_parallel),
    t("replicas_only", CP, _replicas_only),
    t("threads_with_shared_modules", CP, _threads_with_shared_modules),
    t("teacher_edits_input", CP, _teacher_edits_input),
    t("edited_after_forward", CP, _edited_after_forward),
    t("state_dict_misfit", CE, _state_dict_misfit),
    t("state_dict_before_auto", CE, _state_dict_before_auto),
    # connectors and embeddings (the plugin API of losses with learned adapters)
    *[
        t(f"connector_{kind}", cls, _connector(kind))
        for kind, cls in [
            ("kind", CE),
            ("builder", CE),
            ("builder_returns", CE),
            ("not_float", CP),
            ("linear_shape", CP),
            ("conv_shape", CP),
            ("names_depend", CE),
            ("widths_changed", CP),
            ("unsized", CP),
        ]
    ],
    *[
        t(f"connector_distiller_{kind}", cls, _connector_distiller(kind))
        for kind, cls in [
            ("before_auto", CE),
            ("embedding_unused", CE),
            ("embedding_many", CE),
            ("embedding_spatial", CP),
            ("state_pairs", CE),
            ("embedding_batch", CP),
            ("reused", CE),
            ("no_classifier", LR),
        ]
    ],
    *[
        t(f"step_{kind}", CP, _step_errors(kind))
        for kind in ("embedding", "classifier_side", "classifier", "extra", "sum_pairs")
    ],
    t("layer_of", CE, lambda: Layer("fc", of="weights")),
    # what a step captured
    t("student_layer_not_fired", CP, _not_fired),
    t("teacher_layer_not_fired", CP, _teacher_not_fired),
    t("compiled_before", CP, _compiled_before),
    t("timm_checkpointing", CP, _timm_checkpointing),
    t("overwritten_in_place", CP, _overwritten),
    t("reentrant_checkpoint", CP, _reentrant),
    t("map_without_gradient", CP, _detached),
    t("empty_batch", CP, step(call=lambda s: s(X[:0]))),
    t("check_finite_nan", CP, step(call=lambda s: s(X * float("nan")), check_finite=True)),
    t("batch_sizes_differ", CP, step(teacher_input=lambda x: x[:2])),
    t("per_region_maps", CP, _per_region),
    t("non_tensor_input", CE, step(call=lambda s: s(X.numpy()))),
    t("teacher_device", CE, lambda: _teacher_device()),
    t("loss_not_scalar", CP, step(losses=NonScalar())),
    t("mapping_not_captured", CP, step(losses=ReadsUncaptured())),
    t("needs_target", CP, step(losses=NeedsTarget())),
    t("spatial_sizes_error", CP, step(layers={"relu1": "relu2"}, resize="error")),
    t("not_spatial_shapes", CP, _not_spatial),
    # layers
    t("layer_pattern_type", CE, lambda: Layer(3)),
    t("empty_pattern", CE, lambda: Distiller(*_pair(), layers="")),
    t("bad_regex", CE, lambda: Distiller(*_pair(), layers="re:(")),
    t("layer_spec_type", CE, lambda: Distiller(*_pair(), layers=["relu1", 3])),
    t("layers_type", CE, lambda: Distiller(*_pair(), layers=3)),
    t("pair_tuple", CE, lambda: Distiller(*_pair(), layers=[("relu1", "relu1", "relu1")])),
    t("layers_empty", CE, lambda: Distiller(*_pair(), layers=[])),
    t("layers_ambiguous_tuple", CE, lambda: _resolve(lambda t, s: ("relu3", "relu2"))),
    t("layer_pair_twice", LR, lambda: _resolve(lambda t, s: ["relu?", "relu3"])),
    t("module_of_neither", LR, lambda: _resolve(lambda t, s: [TinyCNN(4).relu1])),
    t("module_other_side", LR, lambda: _resolve(lambda t, s: [(s.relu1, "relu1")])),
    t("module_not_in_side", LR, lambda: _resolve(lambda t, s: [("relu1", TinyCNN(4).relu1)])),
    t("module_is_the_model", LR, lambda: _resolve(lambda t, s: [(t, "relu1")])),
    t("module_name_not_on_other", LR, _module_name_not_on_teacher),
    t("pattern_no_match", LR, lambda: Distiller(*_pair(), layers="rleu1")),
    t(
        "unequal_matches",
        LR,
        lambda: Distiller(
            torchvision.models.resnet34(), torchvision.models.resnet18(), layers="layer4.*"
        ),
    ),
    # taps
    t("select_fails", CP, step(layers=Layer("relu1", select=5))),
    t("select_not_tensor", CP, step(layers=Layer("relu1", select=lambda out: 3))),
    t(
        "no_tensor_in_output",
        CP,
        lambda: __import__("athooks.taps").taps.select_tensor((1, "a"), None, "x"),
    ),
    t("transform_not_tensor", CP, step(layers=Layer("relu1", transform=lambda f: 3))),
    t("select_keys_bad", CE, lambda: Layer("relu1", select=())),
    t("select_keys_twice", CE, lambda: Layer("relu1", select=("a", "a"))),
    t(
        "select_counts_differ",
        LR,
        lambda: _resolve(lambda t, s: [(Layer("relu1", select=(0, 1)), Layer("relu1", select=0))]),
    ),
    t("select_all_single_tensor", LR, step(layers=Layer("relu1", select="*"))),
    t("select_all_no_shared_key", LR, _select_all_no_shared_key),
    t(
        "select_all_pairs_too_early",
        CE,
        lambda: Distiller(*_pair(), layers=Layer("relu1", select="*")).pairs,
    ),
    t(
        "apply_layer_several",
        CP,
        lambda: __import__("athooks.taps").taps.apply_layer(
            Layer("x", select=("a", "b")), {"a": X}, [], "layer 'x'"
        ),
    ),
    # mappings
    t("p_type", CE, lambda: athooks.mapping("sum_p", p="2")),
    t("p_range", CE, lambda: athooks.mapping("sum_p", p=0.5)),
    t(
        "mapping_options_with_object",
        CE,
        lambda: athooks.loss("at", mapping=athooks.mapping("sum"), p=4),
    ),
    t("mapping_type", CE, lambda: athooks.loss("at", mapping=3)),
    t("feature_map_not_4d", CP, step(layers="head")),
    t("mapping_wrong_shape", CP, step(losses=athooks.loss("at", mapping=lambda f: f.mean((1, 2))))),
    t("tokens_read_as_1d", CP, _tokens_read_as_1d),
    t("layouts_differ", CP, _layouts_differ),
    t(
        "resize_map_size",
        CE,
        lambda: __import__("athooks.losses.base").losses.base.resize_map(torch.rand(2, 4, 4), (2,)),
    ),
    # losses
    t("at_distance", CE, lambda: athooks.loss("at", distance="l1")),
    t("at_beta", CE, lambda: athooks.loss("at", beta="big")),
    t("beta_not_finite", CE, lambda: athooks.loss("at", beta=float("nan"))),
    t("beta_negative", CE, lambda: athooks.loss("fact", beta=-1.0)),
    t("kd_temperature", CE, lambda: athooks.loss("kd", temperature=0)),
    t("kd_classes", CE, _kd_classes),
    t("logits_missing", CP, _logits_missing),
    t("fact_shapes", CP, _fact_shapes),
    t("grad_beta", CE, lambda: athooks.loss("grad_at", beta="big")),
    t("grad_outside_distiller", CP, _grad_loss_outside_distiller),
    t("grad_no_graph", CP, _grad_loss_no_grad),
    t("grad_compiled", CP, _grad_loss_compiled),
    t("grad_no_input", CP, _grad_loss_without_input),
    t("grad_target_size", CP, _grad_target_size),
    # schedules and per-pair weights
    t("schedule_steps", CE, lambda: athooks.schedules.warmup(0)),
    t("distiller_step", CE, lambda: setattr(Distiller(*_pair(), layers="relu?"), "step", -1)),
    t("schedule_type", CE, lambda: athooks.loss("at", schedule="cosine")),
    t("schedule_value", CE, _weighted(schedule=lambda s: float("nan"))),
    t("schedule_then_no_end", CE, lambda: athooks.schedules.constant(1).then(0.5)),
    t("milestones_type", CE, lambda: athooks.schedules.step_decay(1.0, 60)),
    t("milestones_order", CE, lambda: athooks.schedules.step_decay(1.0, (60, 30))),
    t("pair_weights_type", CE, lambda: athooks.loss("at", pair_weights=torch.ones(3))),
    t("pair_weights_count", CE, _weighted(pair_weights=[1.0, 2.0])),
    t("pair_weights_names", CE, _weighted(pair_weights={"relu9": 2.0})),
    t("pair_weights_ignored", CP, step(losses=athooks.loss("kd", pair_weights=[1.0]))),
    t("sum_pairs_terms", CP, _one_term_for_all),
    t(
        "sum_pairs_no_names",
        CP,
        lambda: athooks.loss("at", pair_weights={"relu1": 2.0}).sum_pairs([torch.tensor(1.0)]),
    ),
    # registry and plugins
    t("name_not_string", CE, lambda: athooks.mapping(3)),
    t("unknown_mapping", UnknownNameError, lambda: athooks.mapping("sum_q")),
    t("unexpected_option", CE, lambda: athooks.mapping("sum_p", q=2)),
    t("duplicate_name", PluginError, lambda register: _plugin(register, "clash"), "register"),
    t("factory_fails", PluginError, lambda register: _plugin(register, "explodes"), "register"),
    t("factory_junk", PluginError, lambda register: _plugin(register, "junk"), "register"),
    t("factory_not_loss", PluginError, lambda register: _plugin(register, "notaloss"), "register"),
    t("options_rejected", CE, lambda register: _plugin(register, "rejected"), "register"),
    # discovery
    t("input_size", CE, lambda: Distiller(*_pair(), input_size=(16, 16))),
    t(
        "auto_mode",
        CE,
        lambda: __import__("athooks.discovery").discovery.auto_pairs(*_pair(), "all"),
    ),
    t("vit_tokens", CP, _vit_tokens),
    t("probe_fails", CE, _probe_fails),
    t("no_stage", LR, _no_stage),
    t("blocks_mixed", LR, _blocks_mixed),
    t("no_shared_stride", LR, _no_shared_stride),
    t("blocks_unequal", LR, _blocks_unequal),
    # models and CLI
    t("wrn_depth", CE, lambda: create_model("wrn15_1")),
    t("wrn_width", CE, lambda: WRN(16, 0)),
    t("unknown_model", CE, lambda: create_model("resnet9")),
    t("cli_not_module", CE, lambda: __import__("athooks.cli").cli.build_model("math:pi")),
    t("cli_cannot_build", CE, lambda: __import__("athooks.cli").cli.build_model("no_such_pkg:net")),
    t(
        "cli_no_weights",
        CE,
        lambda: __import__("athooks.cli").cli.build_model("athooks:wrn16_1", pretrained=True),
    ),
    t("cli_download", CE, _pretrained_download_fails, "monkeypatch"),
    t("cli_out_suffix", CE, _cli_show_out, "tmp"),
    t("checkpoint_missing", CE, lambda tmp: _checkpoint(tmp, "missing"), "tmp"),
    t("checkpoint_junk", CE, lambda tmp: _checkpoint(tmp, "junk"), "tmp"),
    t("checkpoint_no_state", CE, lambda tmp: _checkpoint(tmp, "nostate"), "tmp"),
    t("checkpoint_misfit", CE, lambda tmp: _checkpoint(tmp, "misfit"), "tmp"),
    t("demo_unlabeled_no_distiller", CE, _demo_unlabeled_without_distiller),
    t(
        "demo_unlabeled_all_labelled",
        CE,
        lambda tmp: __import__("athooks.demo.run").demo.run.run_demo(
            __import__("athooks.demo.run").demo.run.DemoConfig(unlabeled=True, labels=1300), tmp
        ),
        "tmp",
    ),
    # viz
    *[
        t(f"viz_{kind}", cls, (lambda tmp, k=kind: _viz(k, tmp)), "tmp")
        for kind, cls in [
            ("images_type", CE),
            ("images_shape", CE),
            ("layers", CE),
            ("not_run", CP),
            ("channels", CE),
            ("unreadable", CE),
            ("image_shape", CE),
            ("alpha", CE),
            ("amap", CE),
            ("nothing", CE),
            ("maps_shape", CE),
            ("models_as", CE),
            ("display", CE),
            ("ps", CE),
            ("select_all", CE),
        ]
    ],
    t("viz_no_matplotlib", ImportError, _viz_no_matplotlib, "monkeypatch"),
    # lightning
    *[
        t(f"lightning_{kind}", CE, (lambda k=kind: _lightning(k)))
        for kind in (
            "teacher",
            "student",
            "target",
            "foreign",
            "missing",
            "not_module",
            "learnable",
            "returns",
        )
    ],
]


def _run(trigger: Trigger, request: pytest.FixtureRequest) -> BaseException:
    kwargs = {}
    for need in trigger.needs:
        if need == "tmp":
            kwargs["tmp"] = request.getfixturevalue("tmp_path")
        else:
            kwargs[need] = request.getfixturevalue(need)
    with pytest.raises(trigger.cls) as info:
        trigger.run(**kwargs)
    return info.value


MESSAGES: dict[str, tuple[type[BaseException], str]] = {}


@pytest.mark.parametrize("trigger", TRIGGERS, ids=[tr.id for tr in TRIGGERS])
def test_trigger_raises_its_error(trigger, request):
    err = _run(trigger, request)
    if trigger.cls is not ImportError:
        assert isinstance(err, AthooksError)
    message = str(err)
    assert len(message) > 20
    MESSAGES[trigger.id] = (type(err), message)


def _cls(name: str) -> type[BaseException]:
    return getattr(athooks.errors, name, None) or {"ImportError": ImportError}[name]


def test_every_raise_site_is_triggered(request):
    missing = [tr for tr in TRIGGERS if tr.id not in MESSAGES]
    for trigger in missing:  # when run on its own (-k), run the triggers here
        err = _run(trigger, request)
        MESSAGES[trigger.id] = (type(err), str(err))
    untriggered = []
    for site in raise_sites():
        rx = re.compile(site.regex, re.S)
        cls = _cls(site.cls)
        if not any(issubclass(c, cls) and rx.search(m) for c, m in MESSAGES.values()):
            untriggered.append(str(site))
    assert not untriggered, "raise sites no trigger in TRIGGERS reaches:\n" + "\n".join(untriggered)


def _normalise(text: str) -> str:
    return " ".join(text.replace("``", "").replace("`", "").split())


def test_every_raise_site_is_documented():
    page = _normalise(PAGE.read_text())
    missing = []
    for site in raise_sites():
        key = _normalise(site.longest)
        if key not in page:
            missing.append(f"{site}: {key!r}")
    assert not missing, f"not listed in {PAGE.name}:\n" + "\n".join(missing)


def test_every_error_class_is_described():
    page = PAGE.read_text()
    for cls in (
        AthooksError,
        ConfigurationError,
        LayerResolutionError,
        UnknownNameError,
        PluginError,
        CaptureError,
    ):
        assert f"## {cls.__name__}" in page or f"`{cls.__name__}`" in page
