"""Adversarial tests: what a hostile (or just unlucky) user does, and what athooks must do then.

The promise under test: **never a silent wrong value, nothing left changed**. Every value is
checked against an independent float64 computation written from the paper's formula
(``conftest.ref_at_loss_code``) on hook-free deep copies of the models, never against athooks'
own code; every "nothing left changed" check compares per-module modes, per-parameter
``requires_grad`` (by name and by object), PyTorch's hook dictionaries and BatchNorm buffers.

Only athooks' public API is used: the internals are being replaced (issue 14, "Core v2"), and
these tests are the specification of the redesign. Tests tagged ``# issue 14 §2.N`` encode the
numbered items of that issue; many of them fail on the code that predates it, on purpose.
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
import torchvision
from conftest import TinyCNN, ref_at_loss_code, tiny_pair
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import athooks
import athooks.viz
from athooks import Distiller, Layer
from athooks.errors import (
    AthooksError,
    CaptureError,
    ConfigurationError,
    LayerResolutionError,
    PluginError,
)
from athooks.plugin import Loss, LossSpec, Mapping, MappingSpec, hookimpl


def batch(seed: int, shape=(4, 3, 16, 16)) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


X = batch(0)
X2 = batch(1)
X3 = batch(2)
X4 = batch(3)
Y = torch.tensor([0, 1, 2, 3])
RELU_PAIRS = [("relu1", "relu1"), ("relu2", "relu2"), ("relu3", "relu3")]


# ====================================================================== small models


def cbr(cin: int, cout: int, stride: int = 1, inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=inplace),
    )


class StageNet(nn.Module):
    """A backbone that returns the list of its stage outputs (what a detector neck consumes)."""

    def __init__(self, width: int = 8, in_ch: int = 3) -> None:
        super().__init__()
        self.s1 = cbr(in_ch, width)
        self.s2 = cbr(width, 2 * width, 2)
        self.s3 = cbr(2 * width, 4 * width, 2)

    def forward(self, x: Tensor) -> list[Tensor]:
        a = self.s1(x)
        b = self.s2(a)
        c = self.s3(b)
        return [a, b, c]


class Classifier(nn.Module):
    """Three conv stages (strides 1, 2, 2) and a linear head; returns logits."""

    def __init__(self, width: int = 8, in_ch: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.s1 = cbr(in_ch, width)
        self.s2 = cbr(width, 2 * width, 2)
        self.s3 = cbr(2 * width, 4 * width, 2)
        self.head = nn.Linear(4 * width, classes)

    def trunk(self, x: Tensor) -> Tensor:
        return self.s3(self.s2(self.s1(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x).mean((2, 3)))


def last_module_net(width: int) -> nn.Sequential:
    """A model whose tapped layer ``proj`` is its last module: its output is what it returns."""
    return nn.Sequential(
        OrderedDict(features=cbr(3, width), proj=nn.Conv2d(width, 2 * width, 3, padding=1))
    )


# ====================================================================== reference machinery

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def plain_copy(*models: nn.Module) -> tuple[nn.Module, ...]:
    """Deep copies of the models, made together (shared submodules stay shared), without hooks."""
    copies = copy.deepcopy(models)
    for model in copies:
        for m in model.modules():
            for attr in HOOK_DICTS:
                hooks = getattr(m, attr, None)
                if hooks is not None:
                    hooks.clear()
    return copies


def first_tensor(value):
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def run_capture(model: nn.Module, names, args=(), kwargs=None):
    """Run ``model`` with my own forward hooks; a clone of each named output (graph kept)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    store: dict[str, Tensor] = {}
    handles = []
    for name in names:

        def hook(module, inputs, output, name=name):
            store[name] = first_tensor(output).clone()  # last call wins, as for a tap

        handles.append(modules[name].register_forward_hook(hook))
    try:
        out = model(*args, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return [store[n] for n in names], out


@dataclass
class Ref:
    loss: Tensor  # float64, with its graph towards the copy's parameters
    out: object
    model: nn.Module

    @property
    def value(self) -> float:
        return float(self.loss.detach())

    def grads(self) -> dict[str, Tensor]:
        return grads_of(self.loss, self.model)


def ref_step(
    teacher: nn.Module,
    student: nn.Module,
    pairs,
    args=(),
    kwargs=None,
    *,
    t_args=None,
    t_kwargs=None,
    beta: float = 1e3,
    p: float = 2.0,
    extra=None,
) -> Ref:
    """One step by hand on hook-free copies: the teacher in eval mode under no_grad (every
    module's flag put back afterwards, so shared modules are in the user's mode for the
    student), then the student in its own mode; the loss in float64 from the paper's formula."""
    modes = [(m, m.training) for m in (*teacher.modules(), *student.modules())]
    teacher.eval()
    with torch.no_grad():
        t_feats, _ = run_capture(
            teacher,
            [t for t, _ in pairs],
            args if t_args is None else t_args,
            kwargs if t_kwargs is None else t_kwargs,
        )
    for m, flag in modes:
        m.training = flag
    s_feats, out = run_capture(student, [s for _, s in pairs], args, kwargs)
    loss = ref_at_loss_code(list(zip(t_feats, s_feats, strict=True)), beta=beta, p=p)
    if extra is not None:
        loss = loss + extra(out)
    return Ref(loss, out, student)


def grads_of(loss: Tensor, model: nn.Module) -> dict[str, Tensor]:
    """Gradient of ``loss`` for every parameter of ``model`` that requires grad, by name."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named or not loss.requires_grad:
        return {}
    got = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True, retain_graph=True)
    return {
        n: (g if g is not None else torch.zeros_like(p)).detach()
        for (n, p), g in zip(named, got, strict=True)
    }


def assert_value(got, want: float) -> None:
    assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-7)


def assert_grads(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert sorted(got) == sorted(want), "different sets of parameters receive a gradient"
    scale = max(float(w.abs().max()) for w in want.values())
    assert scale > 0, "reference gradient is zero"
    for name, w in want.items():
        # atol relative to the largest gradient: a bias before a BatchNorm has a gradient that
        # is zero up to rounding, which no relative tolerance can compare
        torch.testing.assert_close(
            got[name], w.to(got[name].dtype), rtol=1e-3, atol=1e-5 * scale, msg=name
        )


def ce(out) -> Tensor:
    return F.cross_entropy(out.double(), Y[: out.shape[0]])


# ---------------------------------------------------------------------- "nothing left changed"


def hook_counts(m: nn.Module) -> tuple[int, ...]:
    return tuple(len(getattr(m, attr, {})) for attr in HOOK_DICTS)


def global_hook_counts() -> tuple[int, ...]:
    from torch.nn.modules import module as mod

    return (
        len(mod._global_forward_hooks),
        len(mod._global_forward_pre_hooks),
        len(mod._global_backward_hooks),
    )


@dataclass
class Snapshot:
    modes: dict
    hooks: dict
    params_by_name: dict
    params_by_object: list
    buffers: dict
    globals_: tuple
    grad_enabled: bool


def snapshot(*models: nn.Module) -> Snapshot:
    modes, hooks, by_name, bufs = {}, {}, {}, {}
    by_object = []
    for i, model in enumerate(models):
        for name, m in model.named_modules(remove_duplicate=False):
            modes[(i, name)] = m.training
            hooks[(i, name)] = hook_counts(m)
        for name, p in model.named_parameters(remove_duplicate=False):
            by_name[(i, name)] = (id(p), p.requires_grad)
            by_object.append((p, p.requires_grad))
        for name, b in model.named_buffers(remove_duplicate=False):
            bufs[(i, name)] = b.detach().clone()
    return Snapshot(
        modes, hooks, by_name, by_object, bufs, global_hook_counts(), torch.is_grad_enabled()
    )


def assert_unchanged(before: Snapshot, *models: nn.Module, buffers_of=None) -> None:
    """Every module's mode and hooks, every parameter's flag, and (for the models whose index is
    in ``buffers_of``, default all) every buffer are exactly as in ``before``."""
    now = snapshot(*models)
    assert now.modes == before.modes, {
        k: (before.modes.get(k), v) for k, v in now.modes.items() if before.modes.get(k) != v
    }
    assert now.hooks == before.hooks, {
        k: (before.hooks.get(k), v) for k, v in now.hooks.items() if before.hooks.get(k) != v
    }
    assert now.params_by_name == before.params_by_name
    assert [p.requires_grad for p, _ in before.params_by_object] == [
        flag for _, flag in before.params_by_object
    ]
    assert now.globals_ == before.globals_
    assert now.grad_enabled == before.grad_enabled
    keep = range(len(models)) if buffers_of is None else buffers_of
    for key, value in before.buffers.items():
        if key[0] in keep:
            assert torch.equal(now.buffers[key], value), key


class Counter:
    """Counts the forwards of a module (my own pre-hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.n = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.n += 1


class ModeLog:
    """Records ``module.training`` at every call of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.seen: list[bool] = []
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.seen.append(module.training)


def hookless(model: nn.Module) -> bool:
    return all(not any(hook_counts(m)) for m in model.modules())


# ====================================================================== §2.1 in-place edits


class FlatNet(StageNet):
    """Returns a flattened *view* of its last stage's output (an embedding head's input)."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[-1].flatten(1)


def inplace_case(kind: str):
    """(teacher, student, layers, edit(out) -> tensor to edit, name of that layer, input)."""
    if kind == "last_module":
        torch.manual_seed(0)
        t, s = last_module_net(16), last_module_net(8)
        return t, s, [("features", "features"), ("proj", "proj")], (lambda o: o), "proj", X
    if kind == "stage_list":
        torch.manual_seed(0)
        t, s = StageNet(16), StageNet(8)
        return t, s, [("s2", "s2"), ("s3", "s3")], (lambda o: o[-1]), "s3", X
    if kind == "view_of_tapped":  # editing a view edits the tapped tensor itself
        torch.manual_seed(0)
        t, s = FlatNet(16), FlatNet(8)
        return t, s, [("s2", "s2"), ("s3", "s3")], (lambda o: o), "s3", X
    torch.manual_seed(1)
    t = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3))
    torch.manual_seed(0)
    s = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3))
    x = batch(0, (2, 3, 32, 32))
    return t, s, [("layer2", "layer2"), ("layer3", "layer3")], (lambda o: o[-1]), "layer3", x


INPLACE_KINDS = ["last_module", "stage_list", "view_of_tapped", "timm_features_only"]


@pytest.mark.parametrize("kind", INPLACE_KINDS)
def test_inplace_edit_of_a_tapped_output_after_the_forward_is_refused_at_backward(kind):
    """Misuse: ``out = s(x); at = d.loss(); out.mul_(3); at.backward()`` where ``out`` is (or
    holds) the output of a tapped student layer. Expected: from step 2 on, ``backward()`` raises
    CaptureError naming the layer and saying it was modified in place (never a gradient from
    the edited values, never autograd's cryptic error); clean steps before and after give the
    reference gradient.  # issue 14 §2.1"""
    teacher, student, layers, edit, name, x = inplace_case(kind)
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, layers, (x,))
    with Distiller(teacher, student, layers=layers) as d:
        student(x)  # step 1: clean
        assert_grads(grads_of(d.loss(), student), want.grads())
        for _ in range(2):  # steps 2 and 3: edited after d.loss()
            out = student(x)
            at = d.loss()
            with torch.no_grad():
                edit(out).mul_(3)
            with pytest.raises(CaptureError) as err:
                at.backward()
            assert name in str(err.value)
            assert "in place" in str(err.value) or "in-place" in str(err.value)
        student(x)  # step 4: clean again, a fresh correct step
        assert_grads(grads_of(d.loss(), student), want.grads())


@pytest.mark.parametrize("kind", INPLACE_KINDS)
def test_without_an_edit_every_step_has_the_reference_gradient(kind):
    """The same models and loop without the in-place edit: the loss and the gradient equal the
    float64 reference at every step (the copy of step 1 and its absence later change nothing).
    # issue 14 §2.1"""
    teacher, student, layers, _, _, x = inplace_case(kind)
    tc, sc = plain_copy(teacher, student)
    with Distiller(teacher, student, layers=layers) as d:
        for step in range(3):
            xb = x + 0.1 * step
            want = ref_step(tc, sc, layers, (xb,))
            student(xb)
            at = d.loss()
            assert_value(at, want.value)
            assert_grads(grads_of(at, student), want.grads())


# ====================================================================== §2.2 checkpointing


def test_reentrant_checkpoint_of_the_whole_student_is_refused():
    """Misuse: ``checkpoint(student, x, use_reentrant=True)`` inside the block: the student's
    forward runs with gradient disabled. Expected: ``d.loss()`` raises CaptureError mentioning
    use_reentrant or no_grad, instead of a loss that silently trains nothing.  # issue 14 §2.2"""
    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu?") as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint(student, X, use_reentrant=True)
        with pytest.raises(CaptureError, match=r"use_reentrant|no_grad"):
            d.loss()


def test_non_reentrant_checkpoint_of_the_whole_student_matches_the_reference():
    """``checkpoint(student, x, use_reentrant=False)``: loss and gradients equal a run without
    checkpointing (float64 reference), and the recompute during backward leaves no half-finished
    step: the next step is correct too.  # issue 14 §2.2"""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    with Distiller(teacher, student, layers="relu?") as d:
        for x in (X, X2):
            want = ref_step(tc, sc, RELU_PAIRS, (x,), extra=ce)
            out = checkpoint(student, x, use_reentrant=False)
            loss = F.cross_entropy(out, Y) + d.loss()
            assert_value(loss, want.value)
            assert_grads(grads_of(loss, student), want.grads())


def test_non_reentrant_checkpoint_runs_the_teacher_once_per_step():
    """The recompute of a non-reentrant checkpoint calls the student again during backward.
    Expected: the teacher runs exactly once per step (my own counter on the teacher), also
    across two steps.  # issue 14 §2.2"""
    teacher, student = tiny_pair()
    runs = Counter(teacher)
    with Distiller(teacher, student, layers="relu?") as d:
        for step, x in enumerate((X, X2), start=1):
            out = checkpoint(student, x, use_reentrant=False)
            (F.cross_entropy(out, Y) + d.loss()).backward()
            assert runs.n == step


# ====================================================================== §2.3 shared modules


class StemNet(nn.Module):
    def __init__(self, stem: nn.Module, width: int) -> None:
        super().__init__()
        self.stem = stem
        self.c2 = cbr(8, width, 2)
        self.c3 = cbr(width, 2 * width, 2)
        self.head = nn.Linear(2 * width, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.c3(self.c2(self.stem(x))).mean((2, 3)))


@dataclass
class SharedCase:
    teacher: nn.Module
    student: nn.Module
    layers: list
    shared: list  # names (in the student) of the parameters both models use
    shared_module: nn.Module | None  # a module both models run, if any
    shared_bn: nn.BatchNorm2d | None


def shared_case(kind: str) -> SharedCase:
    torch.manual_seed(0)
    if kind == "stem_module":
        stem = cbr(3, 8)
        teacher, student = StemNet(stem, 16), StemNet(stem, 8)
        shared = [n for n, _ in student.named_parameters() if n.startswith("stem.")]
        return SharedCase(teacher, student, [("c2", "c2"), ("c3", "c3")], shared, stem, stem[1])
    if kind == "tied_weights":
        teacher, student = TinyCNN(8), TinyCNN(8)
        teacher.conv1.weight = student.conv1.weight
        teacher.conv1.bias = student.conv1.bias
        return SharedCase(teacher, student, RELU_PAIRS, ["conv1.weight", "conv1.bias"], None, None)
    # the teacher is nn.Sequential(student_backbone, head): it contains the student
    student = TinyCNN(8)
    teacher = nn.Sequential(student, nn.Linear(5, 10))
    shared = [n for n, _ in student.named_parameters()]
    layers = [("0.relu2", "relu2"), ("0.relu3", "relu3")]
    return SharedCase(teacher, student, layers, shared, student, student.bn2)


SHARED_KINDS = ["stem_module", "tied_weights", "teacher_contains_student"]
SHARED_MODULE_KINDS = ["stem_module", "teacher_contains_student"]


def teacher_only_params(case: SharedCase) -> list[nn.Parameter]:
    ids = {id(p) for p in case.student.parameters()}
    return [p for p in case.teacher.parameters() if id(p) not in ids]


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_shared_parameters_keep_their_requires_grad_inside_the_block(kind):
    """A parameter both models use is the student's too: inside the block it keeps the
    requires_grad the user gave it (True), while the parameters that are the teacher's alone
    are frozen.  # issue 14 §2.3"""
    case = shared_case(kind)
    s_params = dict(case.student.named_parameters())
    with Distiller(case.teacher, case.student, layers=case.layers):
        assert all(s_params[n].requires_grad for n in case.shared)
        assert teacher_only_params(case)
        assert not any(p.requires_grad for p in teacher_only_params(case))


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_student_gets_its_gradient_for_shared_parameters(kind):
    """``CE + d.loss()`` gives the student the reference gradient for every parameter,
    the shared ones included (the teacher's run contributes none: it is under no_grad).
    # issue 14 §2.3"""
    case = shared_case(kind)
    tc, sc = plain_copy(case.teacher, case.student)
    want = ref_step(tc, sc, case.layers, (X,), extra=ce)
    with Distiller(case.teacher, case.student, layers=case.layers) as d:
        loss = F.cross_entropy(case.student(X), Y) + d.loss()
        assert_value(loss, want.value)
        assert_grads(grads_of(loss, case.student), want.grads())


@pytest.mark.parametrize("kind", SHARED_MODULE_KINDS)
def test_teacher_runs_do_not_update_shared_batchnorm_statistics(kind):
    """A BatchNorm both models run: the teacher's run (eval mode, shared parts included) leaves
    its running statistics alone; only the student's training forward updates them, exactly as
    one training forward of the student alone would.  # issue 14 §2.3"""
    case = shared_case(kind)
    (sc,) = plain_copy(case.student)
    sc(X)  # the student alone, in training mode: one update
    want_bn = [m for m in sc.modules() if isinstance(m, nn.BatchNorm2d)]
    with Distiller(case.teacher, case.student, layers=case.layers) as d:
        case.student(X)
        d.loss()
        bn = case.shared_bn
        idx = [m for m in case.student.modules() if isinstance(m, nn.BatchNorm2d)].index(bn)
        assert torch.equal(bn.running_mean, want_bn[idx].running_mean)
        assert torch.equal(bn.running_var, want_bn[idx].running_var)
        assert int(bn.num_batches_tracked) == int(want_bn[idx].num_batches_tracked) == 1


@pytest.mark.parametrize("kind", SHARED_MODULE_KINDS)
def test_student_sees_shared_modules_in_the_users_mode(kind):
    """The teacher runs its shared parts in eval mode; the student's forward sees them in the
    mode the user set (training), at every step.  # issue 14 §2.3"""
    case = shared_case(kind)
    log = ModeLog(case.shared_bn)
    with Distiller(case.teacher, case.student, layers=case.layers) as d:
        for x in (X, X2):
            case.student(x)
            d.loss()
    assert log.seen == [False, True, False, True]  # teacher (eval), student (train), per step


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_shared_modules_everything_restored_after_the_block(kind):
    """After a training step with shared modules, every module's mode, every parameter's flag
    and every hook is as before the block, and the teacher-only BatchNorms are untouched.
    # issue 14 §2.3"""
    case = shared_case(kind)
    before = snapshot(case.teacher, case.student)
    teacher_bufs = {
        id(b): b.clone()
        for m in case.teacher.modules()
        if not any(m is n for n in case.student.modules())
        for b in m.buffers(recurse=False)
    }
    with Distiller(case.teacher, case.student, layers=case.layers) as d:
        (F.cross_entropy(case.student(X), Y) + d.loss()).backward()
    assert_unchanged(before, case.teacher, case.student, buffers_of=())
    for m in case.teacher.modules():
        for b in m.buffers(recurse=False):
            if id(b) in teacher_bufs:
                assert torch.equal(b, teacher_bufs[id(b)])


# ====================================================================== §2.4 chains


def chain():
    torch.manual_seed(0)
    return TinyCNN(16), TinyCNN(12), TinyCNN(8)


def enter_chain(order: str, d1: Distiller, d2: Distiller):
    outer, inner = (d1, d2) if order == "d1_outer" else (d2, d1)
    outer.attach()
    inner.attach()
    return outer, inner


def leave_chain(outer: Distiller, inner: Distiller) -> None:
    inner.detach()
    outer.detach()


CHAIN_ORDERS = ["d1_outer", "d2_outer"]


@pytest.mark.parametrize("order", CHAIN_ORDERS)
def test_chain_middle_model_keeps_learning(order):
    """``d1 = Distiller(big, mid)``, ``d2 = Distiller(mid, small)``, both attached: mid is d1's
    student, so its parameters keep requires_grad=True, ``mid(x)`` after ``mid.train()`` runs in
    training mode, and ``CE(mid(x)) + d1.loss()`` gives mid the reference gradient.
    # issue 14 §2.4"""
    big, mid, small = chain()
    bc, mc = plain_copy(big, mid)
    want = ref_step(bc, mc, RELU_PAIRS, (X,), extra=ce)
    d1, d2 = Distiller(big, mid, layers="relu?"), Distiller(mid, small, layers="relu?")
    log = ModeLog(mid.bn1)
    outer, inner = enter_chain(order, d1, d2)
    try:
        assert all(p.requires_grad for p in mid.parameters())
        mid.train()
        loss = F.cross_entropy(mid(X), Y) + d1.loss()
        assert log.seen == [True]
        assert_value(loss, want.value)
        assert_grads(grads_of(loss, mid), want.grads())
    finally:
        leave_chain(outer, inner)


@pytest.mark.parametrize("order", CHAIN_ORDERS)
def test_chain_small_step_runs_middle_as_a_frozen_eval_teacher(order):
    """``small(x)`` runs mid as d2's teacher: in eval mode, without updating mid's BatchNorm
    statistics, without running big and without starting a step of d1; ``d2.loss()`` equals
    the reference from mid's eval-mode outputs; and mid is back in the user's training mode for
    its own next forward.  # issue 14 §2.4"""
    big, mid, small = chain()
    mc, smc = plain_copy(mid, small)
    want = ref_step(mc, smc, RELU_PAIRS, (X,))
    big_runs = Counter(big)
    log = ModeLog(mid.bn1)
    d1, d2 = Distiller(big, mid, layers="relu?"), Distiller(mid, small, layers="relu?")
    outer, inner = enter_chain(order, d1, d2)
    try:
        mid.train()
        stats = mid.bn1.running_mean.clone(), int(mid.bn1.num_batches_tracked)
        small(X)
        assert log.seen == [False]
        assert torch.equal(mid.bn1.running_mean, stats[0])
        assert int(mid.bn1.num_batches_tracked) == stats[1]
        assert big_runs.n == 0
        with pytest.raises(CaptureError):
            d1.loss()  # small(x) is not a step of d1
        got = d2.loss()
        assert_value(got, want.value)
        assert_grads(grads_of(got, small), want.grads())
        mid(X)
        assert log.seen == [False, True]
    finally:
        leave_chain(outer, inner)


@pytest.mark.parametrize("order", CHAIN_ORDERS)
def test_chain_two_full_iterations_then_everything_restored(order):
    """Two iterations of a chain's training loop (mid's step then small's step, each with its
    CE): every loss and gradient equals the reference computed on copies that go through the
    same sequence; after both blocks every mode, flag and hook of the three models is as
    before, and big's BatchNorm statistics are untouched.  # issue 14 §2.4"""
    big, mid, small = chain()
    bc, mc, smc = plain_copy(big, mid, small)
    before = snapshot(big, mid, small)
    d1, d2 = Distiller(big, mid, layers="relu?"), Distiller(mid, small, layers="relu?")
    outer, inner = enter_chain(order, d1, d2)
    try:
        for x in (X, X2):
            want_mid = ref_step(bc, mc, RELU_PAIRS, (x,), extra=ce)
            want_small = ref_step(mc, smc, RELU_PAIRS, (x,), extra=ce)
            l_mid = F.cross_entropy(mid(x), Y) + d1.loss()
            l_small = F.cross_entropy(small(x), Y) + d2.loss()
            assert_value(l_mid, want_mid.value)
            assert_value(l_small, want_small.value)
            assert_grads(grads_of(l_mid, mid), want_mid.grads())
            assert_grads(grads_of(l_small, small), want_small.grads())
    finally:
        leave_chain(outer, inner)
    assert_unchanged(before, big, mid, small, buffers_of=(0,))


# ====================================================================== §2.5 restore exactly once


def test_two_distillers_on_one_teacher_detached_out_of_order_keep_it_frozen():
    """``d1.attach(); d2.attach(); d1.detach()``: d2 still holds the teacher, so it stays in
    eval mode with frozen parameters, and d2's steps stay correct.  # issue 14 §2.5"""
    torch.manual_seed(0)
    teacher, s1, s2 = TinyCNN(16), TinyCNN(8), TinyCNN(8)
    tc, sc = plain_copy(teacher, s2)
    d1, d2 = Distiller(teacher, s1, layers="relu?"), Distiller(teacher, s2, layers="relu?")
    d1.attach()
    d2.attach()
    try:
        d1.detach()
        assert not any(m.training for m in teacher.modules())
        assert not any(p.requires_grad for p in teacher.parameters())
        s2(X)
        assert_value(d2.loss(), ref_step(tc, sc, RELU_PAIRS, (X,)).value)
    finally:
        d2.detach()


def test_two_distillers_on_one_teacher_detached_out_of_order_restore_it_once():
    """``d1.attach(); d2.attach(); d1.detach(); d2.detach()``: after the last release the
    teacher is exactly as before the first attach (training mode, trainable).  # issue 14 §2.5"""
    torch.manual_seed(0)
    teacher, s1, s2 = TinyCNN(16), TinyCNN(8), TinyCNN(8)
    before = snapshot(teacher, s1, s2)
    d1, d2 = Distiller(teacher, s1, layers="relu?"), Distiller(teacher, s2, layers="relu?")
    d1.attach()
    d2.attach()
    d1.detach()
    d2.detach()
    assert_unchanged(before, teacher, s1, s2)


def test_two_distillers_on_one_teacher_nested_in_order_restore_it():
    """The well-behaved order (nested ``with``): the teacher stays frozen inside the inner
    block's exit and is fully restored after the outer one.  # issue 14 §2.5"""
    torch.manual_seed(0)
    teacher, s1, s2 = TinyCNN(16), TinyCNN(8), TinyCNN(8)
    before = snapshot(teacher, s1, s2)
    with Distiller(teacher, s1, layers="relu?"):
        with Distiller(teacher, s2, layers="relu?") as d2:
            s2(X)
            d2.loss()
        assert not teacher.training
        assert not any(p.requires_grad for p in teacher.parameters())
    assert_unchanged(before, teacher, s1, s2, buffers_of=(0,))


def test_distiller_deleted_while_attached_releases_its_hold():
    """``del d; gc.collect()`` while attached: the Distiller's hooks are removed and the teacher
    is restored (no other Distiller holds it): modes, flags and hooks exactly as before.
    # issue 14 §2.5"""
    teacher, student = tiny_pair()
    before = snapshot(teacher, student)
    d = Distiller(teacher, student, layers="relu?").attach()
    student(X)
    del d
    gc.collect()
    assert_unchanged(before, teacher, student, buffers_of=(0,))


def test_deleting_one_of_two_distillers_keeps_the_teacher_held_by_the_other():
    """Two Distillers share a teacher; the first is deleted while attached: the teacher stays
    frozen and in eval mode for the second, whose detach then restores it fully.
    # issue 14 §2.5"""
    torch.manual_seed(0)
    teacher, s1, s2 = TinyCNN(16), TinyCNN(8), TinyCNN(8)
    before = snapshot(teacher, s1, s2)
    d1 = Distiller(teacher, s1, layers="relu?").attach()
    d2 = Distiller(teacher, s2, layers="relu?").attach()
    del d1
    gc.collect()
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    d2.detach()
    assert_unchanged(before, teacher, s1, s2)


@pytest.mark.parametrize(
    "how",
    ["new_parameter_for_a_frozen_head", "frozen_new_parameter", "load_state_dict_assign"],
)
def test_replaced_teacher_parameter_ends_with_the_original_requires_grad(how):
    """A teacher parameter replaced inside the block (attribute assignment of a new
    nn.Parameter, or ``load_state_dict(..., assign=True)``): after the block the parameter in
    that place has the requires_grad the original had before the block (and the user's new
    values are kept).  # issue 14 §2.5"""
    teacher, student = tiny_pair()
    if how == "new_parameter_for_a_frozen_head":
        teacher.head.requires_grad_(False)  # the user froze the head before the block
    want = {n: p.requires_grad for n, p in teacher.named_parameters()}
    torch.manual_seed(5)
    replacement = TinyCNN(16).state_dict()
    with Distiller(teacher, student, layers="relu?") as d:
        if how == "load_state_dict_assign":
            teacher.load_state_dict(replacement, assign=True)
        else:
            new = nn.Parameter(torch.randn_like(teacher.head.weight))
            new.requires_grad_(how != "frozen_new_parameter")
            teacher.head.weight = new
        student(X)
        d.loss()
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == want
    if how == "load_state_dict_assign":
        assert torch.equal(teacher.conv1.weight, replacement["conv1.weight"])
    else:
        assert teacher.head.weight is new


def test_mixed_mode_teacher_gets_each_modules_mode_back():
    """The user's teacher had mixed modes before the block (``teacher.train()`` then one
    BatchNorm in eval, as when freezing BN statistics) and a frozen first conv: after the
    block every module has exactly its own mode back and every parameter its flag.
    # issue 14 §2.5"""
    teacher, student = tiny_pair()
    teacher.train()
    teacher.bn2.eval()
    teacher.conv1.requires_grad_(False)
    before = snapshot(teacher, student)
    with Distiller(teacher, student, layers="relu?") as d:
        (F.cross_entropy(student(X), Y) + d.loss()).backward()
    assert_unchanged(before, teacher, student, buffers_of=(0,))


# ====================================================================== §2.6 validation inside


@pytest.mark.parametrize("grad_off", ["no_grad", "inference_mode"])
def test_forward_without_gradient_inside_the_block_is_a_plain_forward(grad_off):
    """Default ``no_grad="skip"``: a validation forward under no_grad / inference_mode inside the
    block runs as if no Distiller were there: the teacher does not run, the output equals the
    model's output without athooks, nothing crashes.  # issue 14 §2.6"""
    teacher, student = tiny_pair()
    student.eval()
    (sc,) = plain_copy(student)
    with torch.no_grad():
        want = sc(X)
    runs = Counter(teacher)
    ctx = torch.no_grad if grad_off == "no_grad" else torch.inference_mode
    with Distiller(teacher, student, layers="relu?"), ctx():
        out = student(X)
    assert runs.n == 0
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("grad_off", ["no_grad", "inference_mode"])
def test_validation_forward_is_invisible_to_the_training_step(grad_off):
    """A training forward, then a validation forward without gradient, then ``d.loss()``:
    the loss (value and gradient) is the training step's.  # issue 14 §2.6"""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X,))
    ctx = torch.no_grad if grad_off == "no_grad" else torch.inference_mode
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        with ctx():
            student(X2)
        got = d.loss()
        assert got.requires_grad
        assert_value(got, want.value)
        assert_grads(grads_of(got, student), want.grads())


def test_loss_with_only_skipped_forwards_points_to_the_capture_option():
    """Only no_grad forwards in the block, then ``d.loss()``: there is no recorded step, so it
    raises CaptureError whose message mentions ``no_grad="capture"``.  # issue 14 §2.6"""
    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu?") as d, torch.no_grad():
        student(X)
        with pytest.raises(CaptureError, match=r"""no_grad\s*=\s*["']capture["']"""):
            d.loss()


@pytest.mark.parametrize("grad_off", ["no_grad", "inference_mode"])
def test_no_grad_capture_option_gives_the_validation_loss(grad_off):
    """``Distiller(..., no_grad="capture")``: under no_grad / inference_mode the teacher runs
    once and ``d.loss()`` returns the reference value, without gradient, without a crash.
    # issue 14 §2.6"""
    teacher, student = tiny_pair()
    student.eval()
    tc, sc = plain_copy(teacher, student)
    with torch.no_grad():
        want = ref_step(tc, sc, RELU_PAIRS, (X,)).value
    runs = Counter(teacher)
    ctx = torch.no_grad if grad_off == "no_grad" else torch.inference_mode
    with Distiller(teacher, student, layers="relu?", no_grad="capture") as d, ctx():
        student(X)
        got = d.loss()
    assert runs.n == 1
    assert not got.requires_grad
    assert_value(got, want)


# ====================================================================== §2.7 interrupts


class Stop(BaseException):
    """A BaseException of the user's (a signal handler's timeout, say)."""


class Interruptible(TinyCNN):
    interrupt = False

    def forward(self, x: Tensor) -> Tensor:
        c = self.features(x)[-1]  # every tapped layer has fired
        if self.interrupt:
            raise Stop()
        return self.head(c.mean((2, 3)))


@pytest.mark.parametrize("where", ["keyboardinterrupt_from_a_hook", "baseexception_from_forward"])
def test_interrupt_in_the_students_forward_leaves_a_fresh_next_step(where):
    """A KeyboardInterrupt (from a forward hook the user added on a middle layer) or another
    BaseException (from the model's forward after every tap fired) inside the student's
    forward. Expected: ``d.loss()`` right after raises CaptureError (the forward did not
    finish); the next ``student(x2)`` is a fresh step: the teacher runs again and ``d.loss()``
    equals the reference for x2; after the block everything is as before.  # issue 14 §2.7"""
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), Interruptible(8)
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X2,))
    flag = {"on": True}

    def hook(module, args, output):
        if flag["on"]:
            raise KeyboardInterrupt

    handle = student.relu2.register_forward_hook(hook)
    runs = Counter(teacher)
    before = snapshot(teacher, student)
    with Distiller(teacher, student, layers="relu?") as d:
        if where == "baseexception_from_forward":
            flag["on"] = False
            student.interrupt = True
        with pytest.raises((KeyboardInterrupt, Stop)):
            student(X)
        with pytest.raises(CaptureError):
            d.loss()
        flag["on"] = False
        student.interrupt = False
        student(X2)
        assert runs.n == 2
        got = d.loss()
        assert_value(got, want.value)
        assert_grads(grads_of(got, student), want.grads())
    assert_unchanged(before, teacher, student, buffers_of=(0,))
    handle.remove()


def test_interrupt_in_the_teachers_forward_leaves_a_fresh_next_step():
    """A KeyboardInterrupt inside the teacher's forward (run by athooks): the teacher is still
    frozen and in eval mode afterwards, ``d.loss()`` raises CaptureError, the next step is
    correct, and after the block the teacher is restored.  # issue 14 §2.7"""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X2,))
    flag = {"on": True}

    def hook(module, args, output):
        if flag["on"]:
            raise KeyboardInterrupt

    handle = teacher.relu2.register_forward_hook(hook)
    before = snapshot(teacher, student)
    with Distiller(teacher, student, layers="relu?") as d:
        with pytest.raises(KeyboardInterrupt):
            student(X)
        assert not any(m.training for m in teacher.modules())
        assert not any(p.requires_grad for p in teacher.parameters())
        with pytest.raises(CaptureError):
            d.loss()
        flag["on"] = False
        student(X2)
        assert_value(d.loss(), want.value)
    assert_unchanged(before, teacher, student, buffers_of=(0,))
    handle.remove()


# ====================================================================== §2.8 probes while attached


class DrivenRuns:
    """Counts the teacher's forwards that happen inside a call of the student (the runs a
    Distiller makes), as opposed to a probe that calls the teacher itself."""

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        self.inside = 0
        self.n = 0
        student.register_forward_pre_hook(self._enter)
        student.register_forward_hook(self._leave, always_call=True)
        teacher.register_forward_pre_hook(self._teacher)

    def _enter(self, module, args):
        self.inside += 1

    def _leave(self, module, args, output):
        self.inside -= 1

    def _teacher(self, module, args):
        if self.inside:
            self.n += 1


PROBES = {
    "describe": lambda t, s: athooks.describe(t, s, input_size=(3, 16, 16)),
    "viz_student": lambda t, s: athooks.viz.attention_maps(s, X3[:2]),
    "viz_teacher": lambda t, s: athooks.viz.attention_maps(t, X3[:2]),
    "new_distiller": lambda t, s: Distiller(t, s, input_size=(3, 16, 16)),
}


@pytest.mark.parametrize("probe", list(PROBES))
def test_probes_between_forward_and_loss_are_invisible(probe):
    """Between ``student(x)`` and ``d.loss()``: ``athooks.describe``, ``viz.attention_maps`` of
    either model, or constructing another Distiller on the same models. Expected: the attached
    Distiller does not run its teacher for them, and ``d.loss()`` still equals the reference
    for x (with its gradient).  # issue 14 §2.8"""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X,))
    driven = DrivenRuns(teacher, student)
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        assert driven.n == 1
        PROBES[probe](teacher, student)
        assert driven.n == 1
        got = d.loss()
        assert_value(got, want.value)
        assert_grads(grads_of(got, student), want.grads())


# ====================================================================== §2.9 threads


def test_two_threads_each_get_their_own_step():
    """Two threads share one Distiller; a barrier forces both forwards before either
    ``d.loss()``. Expected: each thread gets exactly the reference loss of its own batch.
    # issue 14 §2.9"""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    xs = (X, X2)
    wants = [ref_step(tc, sc, RELU_PAIRS, (x,)).value for x in xs]
    barrier = threading.Barrier(2)
    got: dict[int, float] = {}
    errors: dict[int, BaseException] = {}

    with Distiller(teacher, student, layers="relu?") as d:

        def work(i: int) -> None:
            try:
                student(xs[i])
                barrier.wait(timeout=30)
                got[i] = float(d.loss())
            except BaseException as err:
                errors[i] = err
                barrier.abort()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert_value(got[0], wants[0])
    assert_value(got[1], wants[1])


def test_a_step_in_another_thread_does_not_disturb_this_threads_step():
    """The main thread runs ``student(x)``; a background thread (an evaluator, say) then runs a
    whole step of its own (forward and loss); the main thread's ``d.loss()`` is still the
    reference for x, and the other thread got the reference for its batch.  # issue 14 §2.9"""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    want_main = ref_step(tc, sc, RELU_PAIRS, (X,)).value
    want_other = ref_step(tc, sc, RELU_PAIRS, (X2,)).value
    result: dict[str, object] = {}
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)

        def other() -> None:
            try:
                student(X2)
                result["loss"] = float(d.loss())
            except BaseException as err:
                result["error"] = err

        t = threading.Thread(target=other)
        t.start()
        t.join(60)
        assert "error" not in result, result
        assert_value(result["loss"], want_other)
        assert_value(d.loss(), want_main)


# ====================================================================== §2.10 "auto" on real input


def test_auto_pairs_are_unknown_until_the_first_call():
    """``layers="auto"`` without input_size: the pairs are chosen on the student's first call in
    the block, so ``d.pairs`` before raises ConfigurationError suggesting input_size; after the
    first call they are known, and the loss of that very call equals the reference.
    # issue 14 §2.10"""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    d = Distiller(teacher, student)
    with pytest.raises(ConfigurationError, match="input_size"):
        d.pairs  # noqa: B018
    with d:
        student(X)
        pairs = d.pairs
        assert pairs
        assert_value(d.loss(), ref_step(tc, sc, pairs, (X,)).value)


def test_auto_with_input_size_chooses_the_pairs_at_construction():
    """With ``input_size=(C, H, W)`` the pairs are known at construction, as today, and do not
    change on the first call.  # issue 14 §2.10"""
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, input_size=(3, 16, 16))
    pairs = d.pairs
    assert pairs
    with d:
        student(X)
        d.loss()
        assert d.pairs == pairs


def test_readme_quickstart_resnet34_to_resnet18_at_32x32():
    """The README quickstart at CIFAR size: torchvision resnet34 -> resnet18, ``layers="auto"``,
    32x32 input. Expected pairs layer1..layer3 (layer4 would be a 1x1 map) and the loss equals
    the reference over those three.  # issue 14 §2.10"""
    torch.manual_seed(0)
    teacher = torchvision.models.resnet34(num_classes=10)
    student = torchvision.models.resnet18(num_classes=10)
    x = batch(0, (2, 3, 32, 32))
    tc, sc = plain_copy(teacher, student)
    want_pairs = [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    want = ref_step(tc, sc, want_pairs, (x,))
    with Distiller(teacher, student) as d:
        student(x)
        assert d.pairs == want_pairs
        assert_value(d.loss(), want.value)


@pytest.mark.parametrize("family", ["torchvision_mobilenet", "timm_resnet"])
def test_auto_never_pairs_a_1x1_map(family):
    """Whatever the model family, no auto pair compares 1x1 maps (a 1x1 map carries no spatial
    information: its normalised value is 1 and its loss 0). Checked with my own hooks on the
    paired student modules, at the real 32x32 input (MobileNetV3's last stage and timm's
    ResNet layer4 are 1x1 there).  # issue 14 §2.10"""
    torch.manual_seed(0)
    if family == "torchvision_mobilenet":
        teacher = torchvision.models.mobilenet_v3_large(num_classes=10)
        student = torchvision.models.mobilenet_v3_small(num_classes=10)
    else:
        teacher = timm.create_model("resnet18", num_classes=10)
        student = timm.create_model("resnet10t", num_classes=10)
    x = batch(0, (2, 3, 32, 32))
    sizes: dict[str, tuple[int, int]] = {}
    modules = dict(student.named_modules())
    handles = [
        m.register_forward_hook(lambda mod, a, o, n=n: sizes.__setitem__(n, tuple(o.shape[-2:])))
        for n, m in modules.items()
        if n
    ]
    with Distiller(teacher, student) as d:
        student(x)
        pairs = d.pairs
        d.loss()
    for h in handles:
        h.remove()
    assert pairs
    assert all(sizes[s] != (1, 1) for _, s in pairs), {s: sizes[s] for _, s in pairs}


class TokenGrid(nn.Module):
    """Integer ids (B, 64) -> embeddings reshaped into an 8x8 map -> convs -> logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.c1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU())
        self.head = nn.Linear(2 * width, 5)

    def forward(self, ids: Tensor) -> Tensor:
        e = self.embed(ids)  # (B, 64, C)
        grid = e.transpose(1, 2).reshape(ids.shape[0], -1, 8, 8)
        return self.head(self.c2(self.c1(grid)).mean((2, 3)))


class TwoInputs(Classifier):
    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x * mask)


class KeywordOnly(Classifier):
    def forward(self, *, image: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(image)


def auto_case(kind: str):
    """(teacher, student, args, kwargs, teacher_input or None, t_args or None)."""
    torch.manual_seed(0)
    if kind == "token_ids":
        ids = torch.randint(0, 50, (4, 64), generator=torch.Generator().manual_seed(0))
        return TokenGrid(16), TokenGrid(8), (ids,), {}, None, None
    if kind == "two_inputs":
        mask = (batch(9, (4, 1, 16, 16)) > 0).float()
        return TwoInputs(16), TwoInputs(8), (X, mask), {}, None, None
    if kind == "keyword_only":
        return KeywordOnly(16), KeywordOnly(8), (), {"image": X}, None, None
    # a 1-channel student, a 3-channel teacher
    x = batch(0, (4, 1, 16, 16))

    def to_rgb(x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1)

    return Classifier(16, in_ch=3), Classifier(8, in_ch=1), (x,), {}, to_rgb, (to_rgb(x),)


@pytest.mark.parametrize("kind", ["token_ids", "two_inputs", "keyword_only", "teacher_input_rgb"])
def test_auto_works_on_models_a_dummy_image_cannot_probe(kind):
    """Models that a (3, 224, 224) dummy probe cannot run: integer token ids reshaped into a
    map, a two-input forward, a keyword-only input, a teacher_input that changes the channel
    count. With ``layers="auto"`` chosen from the real input: a finite loss equal to the
    reference, and the reference gradient to the student.  # issue 14 §2.10"""
    teacher, student, args, kwargs, teacher_input, t_args = auto_case(kind)
    tc, sc = plain_copy(teacher, student)
    with Distiller(teacher, student, teacher_input=teacher_input) as d:
        student(*args, **kwargs)
        pairs = d.pairs
        assert pairs
        got = d.loss()
        want = ref_step(tc, sc, pairs, args, kwargs, t_args=t_args)
        assert torch.isfinite(got)
        assert_value(got, want.value)
        assert_grads(grads_of(got, student), want.grads())


# ====================================================================== §2.11 layer specs


def stage_pair():
    torch.manual_seed(0)
    return Classifier(16), Classifier(8)


def test_top_level_two_tuple_of_names_is_ambiguous():
    """``layers=("s3", "s2")``: two names used on both models, or one (teacher, student) pair?
    Expected: ConfigurationError that shows both readings.  # issue 14 §2.11"""
    teacher, student = stage_pair()
    with pytest.raises(ConfigurationError) as err:
        Distiller(teacher, student, layers=("s3", "s2"))
    flat = re.sub(r"[\s'\"]", "", str(err.value))  # whatever the quoting and spacing
    assert "[(s3,s2)]" in flat  # the one-pair reading
    assert "[s3,s2]" in flat  # the two-names reading


def test_list_of_names_and_list_of_one_pair_are_unambiguous():
    """``layers=["s3", "s2"]`` is two names used on both models, ``[("s3", "s2")]`` one pair;
    the first gives the reference loss.  # issue 14 §2.11"""
    teacher, student = stage_pair()
    tc, sc = plain_copy(teacher, student)
    two = Distiller(teacher, student, layers=["s3", "s2"])
    one = Distiller(teacher, student, layers=[("s3", "s2")])
    assert two.pairs == [("s3", "s3"), ("s2", "s2")]
    assert one.pairs == [("s3", "s2")]
    with two:
        student(X)
        assert_value(two.loss(), ref_step(tc, sc, two.pairs, (X,)).value)
    with one:
        student(X)
        assert torch.isfinite(one.loss())


@pytest.mark.parametrize(
    "layers, pair",
    [
        (["layer?", "layer4"], "layer4"),
        ([("layer2", "layer2"), ("layer2", "layer2")], "layer2"),
        (["re:layer[34]", "layer3"], "layer3"),
    ],
    ids=["glob_and_name", "explicit_duplicate", "regex_and_name"],
)
def test_a_pair_given_twice_is_refused(layers, pair):
    """Overlapping specs that give the same (teacher, student) pair twice would silently double
    its weight. Expected: LayerResolutionError naming the pair.  # issue 14 §2.11"""
    teacher = torchvision.models.resnet34(num_classes=10)
    student = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(LayerResolutionError, match=pair):
        Distiller(teacher, student, layers=layers)


@pytest.mark.parametrize("form", ["one_module", "pair_of_modules", "dict_of_modules"])
def test_module_objects_as_layer_specs_give_the_same_loss_as_names(form):
    """``layers=[student.s3]``, ``[(teacher.s3, student.s2)]``, ``{teacher.s2: student.s2}``
    give the same pairs and loss as the names.  # issue 14 §2.11"""
    teacher, student = stage_pair()
    by_module, by_name = {
        "one_module": ([student.s3], ["s3"]),
        "pair_of_modules": ([(teacher.s3, student.s2)], [("s3", "s2")]),
        "dict_of_modules": ({teacher.s2: student.s2}, {"s2": "s2"}),
    }[form]
    student.eval()  # the same BatchNorm statistics for both runs
    d_mod = Distiller(teacher, student, layers=by_module)
    d_name = Distiller(teacher, student, layers=by_name)
    assert d_mod.pairs == d_name.pairs
    with d_name:
        student(X)
        want = float(d_name.loss())
    with d_mod:
        student(X)
        assert_value(d_mod.loss(), want)


class GlobNet(nn.Module):
    """Stages registered under names with glob characters (``stage[0]``, ``stage[1]``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = cbr(3, width)
        self.add_module("stage[0]", cbr(width, 2 * width, 2))
        self.add_module("stage[1]", cbr(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = getattr(self, "stage[1]")(getattr(self, "stage[0]")(self.stem(x)))
        return self.head(h.mean((2, 3)))


def test_module_named_with_glob_characters_is_tapped_by_its_exact_name():
    """``model.add_module("stage[0]", block)``: ``layers=["stage[0]", "stage[1]"]`` taps those
    exact modules (an exact name wins over a pattern reading) and the loss is the reference.
    # issue 14 §2.11"""
    torch.manual_seed(0)
    teacher, student = GlobNet(16), GlobNet(8)
    tc, sc = plain_copy(teacher, student)
    pairs = [("stage[0]", "stage[0]"), ("stage[1]", "stage[1]")]
    with Distiller(teacher, student, layers=["stage[0]", "stage[1]"]) as d:
        assert d.pairs == pairs
        student(X)
        assert_value(d.loss(), ref_step(tc, sc, pairs, (X,)).value)


def test_auto_on_a_model_with_glob_characters_in_its_names():
    """``layers="auto"`` on GlobNet finds its stages and taps them by their exact names.
    # issue 14 §2.11"""
    torch.manual_seed(0)
    teacher, student = GlobNet(16), GlobNet(8)
    tc, sc = plain_copy(teacher, student)
    with Distiller(teacher, student, input_size=(3, 16, 16)) as d:
        student(X)
        pairs = d.pairs
        assert any("[" in s for _, s in pairs)
        assert_value(d.loss(), ref_step(tc, sc, pairs, (X,)).value)


class HeadFirst(nn.Module):
    """A trainable head registered before a frozen backbone (linear probing with AT)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.head = nn.Linear(4 * width, 5)
        self.backbone = StageNet(width)
        self.backbone.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x)[-1].mean((2, 3)))


def test_trainable_head_before_a_frozen_backbone_is_not_a_false_no_gradient_error():
    """The student's only trainable parameters are in a head registered *before* the frozen
    backbone the taps are in: the maps rightly carry no gradient. Expected: no CaptureError
    ("carries no gradient" would be false), the loss is the reference (a warning is fine).
    # issue 14 §2.11"""
    torch.manual_seed(0)
    teacher, student = HeadFirst(16), HeadFirst(8)
    tc, sc = plain_copy(teacher, student)
    pairs = [("backbone.s2", "backbone.s2"), ("backbone.s3", "backbone.s3")]
    with Distiller(teacher, student, layers=pairs) as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student(X)
        got = d.loss()
    assert_value(got, ref_step(tc, sc, pairs, (X,)).value)


# ====================================================================== §2.12 options and plugins


@pytest.mark.parametrize(
    "make",
    [
        lambda: athooks.loss("at", beta=float("nan")),
        lambda: athooks.loss("at", beta=float("inf")),
        lambda: athooks.loss("at", beta=-1),
        lambda: athooks.mapping("sum_p", p=float("inf")),
    ],
    ids=["beta_nan", "beta_inf", "beta_negative", "p_inf"],
)
def test_non_finite_or_negative_options_are_refused(make):
    """A NaN, infinite or negative beta, or an infinite p, would make every loss NaN/inf or
    reward divergence. Expected: ConfigurationError when the loss or mapping is built.
    # issue 14 §2.12"""
    with pytest.raises(ConfigurationError):
        make()


@pytest.mark.parametrize(
    "numpy_opts, python_opts",
    [({"beta": np.float32(1e3)}, {"beta": 1e3}), ({"p": np.int64(2)}, {"p": 2})],
    ids=["beta_np_float32", "p_np_int64"],
)
def test_numpy_scalar_options_are_accepted(numpy_opts, python_opts):
    """Options read from a config through NumPy (``np.float32(1e3)``, ``np.int64(2)``) are
    accepted and give the same loss as the Python numbers.  # issue 14 §2.12"""
    teacher, student = tiny_pair()
    values = []
    for opts in (numpy_opts, python_opts):
        with Distiller(teacher, student, layers="relu?", losses=athooks.loss("at", **opts)) as d:
            student.eval()
            student(X)
            values.append(float(d.loss()))
    assert values[0] == pytest.approx(values[1], rel=1e-6)


@pytest.fixture
def plugins():
    """register(obj, name): a plugin registered for this test only."""
    pm = athooks.get_plugin_manager()
    done = []

    def register(obj, name):
        pm.register(obj, name=name)
        done.append(obj)

    yield register
    for obj in done:
        pm.unregister(obj)


class Scaled(Mapping):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = scale

    def forward(self, features: Tensor) -> Tensor:
        return self.scale * features.pow(2).sum(1)


class WeightedAT(Loss):
    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.at = athooks.loss("at")

    def captures(self):
        return self.at.captures()

    def forward(self, step):
        return self.at(step)


class ValidatingPlugin:
    @hookimpl
    def athooks_mappings(self):
        return [MappingSpec("adv_scaled", Scaled, "validates its option")]

    @hookimpl
    def athooks_losses(self):
        return [LossSpec("adv_weighted", WeightedAT, "validates its option")]


@pytest.mark.parametrize(
    "make",
    [
        lambda: athooks.mapping("adv_scaled", scale=-1.0),
        lambda: athooks.loss("adv_weighted", weight=-1),
    ],
    ids=["mapping", "loss"],
)
def test_plugin_factory_rejecting_a_bad_option_is_a_configuration_error(plugins, make):
    """A plugin's factory raises ValueError for the user's bad option: that is the user's
    configuration mistake, reported as ConfigurationError, not as PluginError (the plugin did
    nothing wrong).  # issue 14 §2.12"""
    plugins(ValidatingPlugin(), "adv-validating")
    with pytest.raises(ConfigurationError) as err:
        make()
    assert not isinstance(err.value, PluginError)
    assert "must be" in str(err.value)  # the plugin's own explanation is kept


class DupA:
    @hookimpl
    def athooks_mappings(self):
        return [MappingSpec("adv_dup", lambda: lambda f: f.abs().sum(1))]


class DupB:
    @hookimpl
    def athooks_mappings(self):
        return [MappingSpec("adv_dup", lambda: lambda f: f.abs().amax(1))]


def test_a_mapping_name_registered_twice_is_still_listed(plugins):
    """Two plugins register the same mapping name: ``list_mappings()`` still shows it (hiding it
    makes the clash invisible to the user who lists what is installed).  # issue 14 §2.12"""
    plugins(DupA(), "adv-dup-a")
    plugins(DupB(), "adv-dup-b")
    assert "adv_dup" in athooks.list_mappings()


def test_using_a_mapping_name_registered_twice_names_both_plugins(plugins):
    """Using the clashing name raises PluginError naming both plugins.  # issue 14 §2.12"""
    plugins(DupA(), "adv-dup-a")
    plugins(DupB(), "adv-dup-b")
    with pytest.raises(PluginError) as err:
        athooks.mapping("adv_dup")
    assert "adv-dup-a" in str(err.value) and "adv-dup-b" in str(err.value)


class Learned(Mapping):
    """A learnable mapping: sum_c A^2 then a learned 3x3 smoothing."""

    def __init__(self) -> None:
        super().__init__()
        self.smooth = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, features: Tensor) -> Tensor:
        return F.softplus(self.smooth(features.pow(2).sum(1, keepdim=True))).squeeze(1)


def test_strict_load_state_dict_with_a_missing_key_names_it():
    """``d.load_state_dict(sd, strict=True)`` where a learnable mapping's weight was removed
    from the checkpoint: ConfigurationError naming the missing key (not torch's RuntimeError,
    and never a silent keep of the fresh random weight).  # issue 14 §2.12"""
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, layers="relu3", losses=athooks.loss("at", mapping=Learned()))
    sd = d.state_dict()
    key = next(k for k in sd if k.endswith("smooth.weight"))
    del sd[key]
    with pytest.raises(ConfigurationError, match=r"smooth\.weight"):
        d.load_state_dict(sd, strict=True)


class Branchy(TinyCNN):
    skip = False

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu1(self.bn1(self.conv1(x)))
        b = self.relu2(self.bn2(self.conv2(a)))
        if self.skip:
            return self.head(b.mean((2, 3))[:, : self.head.in_features].repeat(1, 2))
        c = self.relu3(self.bn3(self.conv3(b)))
        return self.head(c.mean((2, 3)))


def test_terms_are_empty_after_a_loss_that_raised():
    """Step 1 succeeds; in step 2 a tapped layer does not fire and ``d.loss()`` raises. Then
    ``d.terms`` is empty: logging the previous step's values as this step's would be a silent
    wrong value.  # issue 14 §2.12"""
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), Branchy(8)
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        d.loss()
        assert d.terms
        student.skip = True
        student(X2)
        with pytest.raises(CaptureError):
            d.loss()
        assert d.terms == {}
        student.skip = False  # and the failure leaves the next step intact
        student(X3)
        got = d.loss()
        assert float(d.terms["at"]) == pytest.approx(float(got), rel=1e-6)


def test_torch_func_grad_through_functional_call_matches_autograd():
    """``torch.func.grad`` of a function that calls the student through
    ``torch.func.functional_call`` inside the block and returns ``CE + d.loss()`` gives the same
    gradients as ``torch.autograd.grad`` of the same function (and the float64 reference).
    # issue 14 §2.12"""
    teacher, student = tiny_pair(inplace=False)
    student.eval()  # BatchNorm buffers are not updated inside the functional transform
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X,), extra=ce).grads()
    buffers = dict(student.named_buffers())
    with Distiller(teacher, student, layers="relu?") as d:

        def f(params):
            out = torch.func.functional_call(student, (params, buffers), (X,))
            return F.cross_entropy(out, Y) + d.loss()

        params = {n: p.detach() for n, p in student.named_parameters()}
        g_func = torch.func.grad(f)(params)
        leaves = {n: p.detach().clone().requires_grad_() for n, p in student.named_parameters()}
        loss = f(leaves)
        g_auto = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
    for name in want:
        torch.testing.assert_close(g_func[name], g_auto[name], rtol=1e-5, atol=1e-7)
    assert_grads(g_auto, want)


# ====================================================================== §2.13 DataParallel


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_multi_device_data_parallel_is_refused_with_the_fix(side):
    """An ``nn.DataParallel`` teacher or student over more than one device runs replicas whose
    hooks athooks cannot follow. Expected: refused when the Distiller attaches (or earlier),
    with ConfigurationError mentioning DistributedDataParallel; nothing is left changed.
    # issue 14 §2.13"""
    teacher, student = tiny_pair()
    if side == "student":
        student = nn.DataParallel(student)
        student.device_ids = [0, 1]
    else:
        teacher = nn.DataParallel(teacher)
        teacher.device_ids = [0, 1]
    before = snapshot(teacher, student)
    with pytest.raises(ConfigurationError, match="DistributedDataParallel"):
        d = Distiller(teacher, student, layers="relu?")
        d.attach()
        d.detach()  # reached only when the attach was (wrongly) accepted
    assert_unchanged(before, teacher, student)


class ReplicaNet(Classifier):
    use_replica = False

    def forward(self, x: Tensor) -> Tensor:
        s2 = self.s2._replicate_for_data_parallel() if self.use_replica else self.s2
        return self.head(self.s3(s2(self.s1(x))).mean((2, 3)))


def test_a_data_parallel_replica_of_a_tapped_module_is_reported():
    """A replica of a tapped module, made the way DataParallel makes it, runs inside the
    student's forward in place of the original. Expected: ``d.loss()`` raises CaptureError
    mentioning DataParallel, never a silently dropped layer.  # issue 14 §2.13"""
    torch.manual_seed(0)
    teacher, student = Classifier(16), ReplicaNet(8)
    with Distiller(teacher, student, layers=["s2", "s3"]) as d:
        student.use_replica = True
        student(X)
        with pytest.raises(CaptureError, match="DataParallel"):
            d.loss()


def test_single_device_data_parallel_teacher_and_student_give_the_reference():
    """CPU ``nn.DataParallel`` (no device ids: the module runs directly) around both models:
    bare layer names, the reference loss and gradient.  # issue 14 §2.13"""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X,))
    dt, ds = nn.DataParallel(teacher), nn.DataParallel(student)
    with Distiller(dt, ds, layers="relu?") as d:
        ds(X)
        got = d.loss()
        assert_value(got, want.value)
        assert_grads(grads_of(got, student), want.grads())


# ====================================================================== beyond issue 14


def test_two_teachers_on_one_student_each_give_their_reference_and_gradient():
    """Two Distillers (two teachers) on one student: each teacher runs once per step, and the
    gradient of ``d1.loss() + d2.loss()`` is the sum of the two references'."""
    torch.manual_seed(0)
    t1, t2, student = TinyCNN(16), TinyCNN(12), TinyCNN(8)
    t1c, t2c, sc = plain_copy(t1, t2, student)
    w1 = ref_step(t1c, sc, RELU_PAIRS, (X,))
    w2 = ref_step(t2c, sc, RELU_PAIRS, (X,))
    r1, r2 = Counter(t1), Counter(t2)
    with Distiller(t1, student, layers="relu?") as d1, Distiller(t2, student, layers="relu?") as d2:
        student(X)
        total = d1.loss() + d2.loss()
    assert (r1.n, r2.n) == (1, 1)
    assert_value(total, w1.value + w2.value)
    g1, g2 = w1.grads(), w2.grads()
    assert_grads(grads_of(total, student), {n: g1[n] + g2[n] for n in g1})


def test_student_called_twice_before_one_loss_gives_the_second_batchs_loss():
    """``student(x1); student(x2); d.loss()``: the loss (value and gradient) is the second
    batch's; the teacher ran for both calls."""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X2,))
    runs = Counter(teacher)
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        student(X2)
        got = d.loss()
    assert runs.n == 2
    assert_value(got, want.value)
    assert_grads(grads_of(got, student), want.grads())


def test_second_loss_for_one_forward_is_refused_and_the_first_still_backpropagates():
    """``d.loss()`` twice for one forward: the second raises CaptureError; releasing the
    captures must not break the first loss, whose gradient is still the reference. Outside the
    block (before entering and after leaving) ``d.loss()`` raises CaptureError too. (What
    ``d.terms`` holds after these raising calls is left open: the docs say "the last values",
    issue 14 §2.12 says empty after a raising call.)"""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X,))
    d = Distiller(teacher, student, layers="relu?")
    with pytest.raises(CaptureError):
        d.loss()
    with d:
        student(X)
        first = d.loss()
        assert float(sum(d.terms.values())) == pytest.approx(want.value, rel=1e-4)
        with pytest.raises(CaptureError):
            d.loss()
        assert_grads(grads_of(first, student), want.grads())
    with pytest.raises(CaptureError):
        d.loss()


def test_re_entering_the_block_gives_correct_steps_and_restores_each_time():
    """The same Distiller used in two successive ``with`` blocks (epochs): each block's step is
    the reference, and after each block both models are exactly as before it."""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    d = Distiller(teacher, student, layers="relu?")
    for x in (X, X2):
        before = snapshot(teacher, student)
        want = ref_step(tc, sc, RELU_PAIRS, (x,))
        with d:
            student(x)
            got = d.loss()
            assert_value(got, want.value)
            assert_grads(grads_of(got, student), want.grads())
        assert_unchanged(before, teacher, student, buffers_of=(0,))


def test_an_exception_inside_the_block_leaves_everything_restored():
    """A user error (RuntimeError) raised in the middle of the block, after a forward and a
    backward, with the user's own hooks on both models and a partially frozen teacher: after
    the block every mode, flag, hook and the teacher's BatchNorm buffers are as before."""
    teacher, student = tiny_pair()
    teacher.conv1.requires_grad_(False)
    user_hooks = [
        teacher.relu1.register_forward_hook(lambda *a: None),
        student.relu2.register_forward_pre_hook(lambda *a: None),
    ]
    before = snapshot(teacher, student)
    with (
        pytest.raises(RuntimeError, match="user bug"),
        Distiller(teacher, student, layers="relu?") as d,
    ):
        (F.cross_entropy(student(X), Y) + d.loss()).backward()
        student(X2)
        raise RuntimeError("user bug")
    assert_unchanged(before, teacher, student, buffers_of=(0,))
    for h in user_hooks:
        h.remove()


def test_deep_copy_of_the_hooked_student_does_not_disturb_the_step():
    """``copy.deepcopy(student)`` inside the block (an EMA, a best-model snapshot), the copy run
    between ``student(x)`` and ``d.loss()``: the loss is still x's, the teacher ran once; after
    the block the copy is a plain model (runs no teacher, same output as the student)."""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X,))
    runs = Counter(teacher)
    with Distiller(teacher, student, layers="relu?") as d:
        snap = copy.deepcopy(student)
        student(X)
        snap(X2)
        got = d.loss()
        assert runs.n == 1
        assert_value(got, want.value)
        assert_grads(grads_of(got, student), want.grads())
    n = runs.n
    with torch.no_grad():  # training mode: batch statistics, so the same output
        torch.testing.assert_close(snap(X), student(X))
    assert runs.n == n


def test_timm_model_ema_v3_inside_the_block():
    """timm's ModelEmaV3 (a deep copy of the hooked student) built, run and updated inside the
    block: the teacher runs once per student call and each step's loss is the reference."""
    from timm.utils import ModelEmaV3

    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    runs = Counter(teacher)
    with Distiller(teacher, student, layers="relu?") as d:
        ema = ModelEmaV3(student, decay=0.9)
        for step, x in enumerate((X, X2), start=1):
            want = ref_step(tc, sc, RELU_PAIRS, (x,))
            student(x)
            ema.module(x)
            got = d.loss()
            assert_value(got, want.value)
            ema.update(student)
            assert runs.n == step


def test_saving_and_pickling_the_hooked_student_inside_the_block():
    """``torch.save(student.state_dict())`` and ``torch.save(student)`` inside the block: the
    state dict has exactly the model's own keys and values; the pickled model loads as a plain
    model (its hooks do nothing) and can be distilled again with the reference loss."""
    teacher, student = tiny_pair()
    keys = list(student.state_dict())
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        d.loss()
        sd_buf, model_buf = io.BytesIO(), io.BytesIO()
        torch.save(student.state_dict(), sd_buf)
        torch.save(student, model_buf)
        pickled = pickle.dumps(student)
    sd = torch.load(io.BytesIO(sd_buf.getvalue()), weights_only=True)
    assert list(sd) == keys
    for k, v in student.state_dict().items():
        assert torch.equal(sd[k], v)
    loaded = torch.load(io.BytesIO(model_buf.getvalue()), weights_only=False)
    unpickled = pickle.loads(pickled)
    runs = Counter(teacher)
    for model in (loaded, unpickled):
        model.eval()
        with torch.no_grad():
            model(X)
    assert runs.n == 0
    loaded.train()
    tc, lc = plain_copy(teacher, loaded)
    with Distiller(teacher, loaded, layers="relu?") as d2:
        loaded(X2)
        assert_value(d2.loss(), ref_step(tc, lc, RELU_PAIRS, (X2,)).value)


def test_switching_the_student_to_eval_inside_the_block_and_back():
    """A training step, then ``student.eval()`` for a validation pass *with* gradient (e.g. a
    meta-learning step), then ``student.train()`` again: each step's loss and gradient is the
    reference in that mode; the eval pass leaves the student's BatchNorm statistics alone."""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    with Distiller(teacher, student, layers="relu?") as d:
        for mode, x in (("train", X), ("eval", X2), ("train", X3)):
            student.train(mode == "train")
            sc.train(mode == "train")
            stats = student.bn1.running_mean.clone()
            want = ref_step(tc, sc, RELU_PAIRS, (x,))
            student(x)
            got = d.loss()
            assert got.requires_grad
            assert_value(got, want.value)
            assert_grads(grads_of(got, student), want.grads())
            if mode == "eval":
                assert torch.equal(student.bn1.running_mean, stats)


@pytest.mark.parametrize("who", ["teacher_root", "teacher_submodule", "parent_of_both"])
def test_train_called_on_the_teacher_inside_the_block(who):
    """Something calls ``.train()`` inside the block: on the teacher, on one of its BatchNorms
    only, or on a parent ModuleDict holding both models (as a training framework does). The
    teacher still runs entirely in eval mode (its BatchNorm statistics untouched, the loss is
    the eval-mode reference), and after the block its modes are as before the block."""
    teacher, student = tiny_pair()
    teacher.eval()  # the user's teacher is in eval mode before the block
    parent = nn.ModuleDict({"teacher": teacher, "student": student})
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X,))
    log = ModeLog(teacher.bn2)
    before = snapshot(teacher)
    with Distiller(teacher, student, layers="relu?") as d:
        {"teacher_root": teacher, "teacher_submodule": teacher.bn2, "parent_of_both": parent}[
            who
        ].train()
        student(X)
        assert log.seen == [False]
        assert_value(d.loss(), want.value)
    assert_unchanged(before, teacher)


def test_requires_grad_true_on_a_parent_inside_the_block():
    """``parent.requires_grad_(True)`` on a ModuleDict holding both models, inside the block
    (an "unfreeze all" helper): the teacher still gets no gradient, and after the block each
    teacher parameter has its flag from before the block (the user's frozen conv1 frozen)."""
    teacher, student = tiny_pair()
    teacher.conv1.requires_grad_(False)
    parent = nn.ModuleDict({"teacher": teacher, "student": student})
    before = snapshot(teacher)
    with Distiller(teacher, student, layers="relu?") as d:
        parent.requires_grad_(True)
        (F.cross_entropy(student(X), Y) + d.loss()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert_unchanged(before, teacher)


def test_student_compiled_inside_the_block_and_used_after_it():
    """``torch.compile(student, backend="eager")`` made inside the block: the loss and gradient
    are the reference; after the block the compiled model no longer runs the teacher (hooks
    baked into compiled code must not outlive the block) and gives the plain output."""
    teacher, student = tiny_pair(inplace=False)
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X,))
    runs = Counter(teacher)
    with Distiller(teacher, student, layers="relu?") as d:
        compiled = torch.compile(student, backend="eager")
        compiled(X)
        got = d.loss()
        assert_value(got, want.value)
        assert_grads(grads_of(got, student), want.grads())
    n = runs.n
    student.eval()
    with torch.no_grad():
        out = compiled(X2)
        plain = sc.eval()(X2)
    assert runs.n == n
    torch.testing.assert_close(out, plain)


def test_gradient_accumulation_over_two_forwards():
    """Two micro-batches, each with its own forward, ``d.loss()`` and ``backward()``: the
    accumulated gradients equal the sum of the two references'."""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    w1 = ref_step(tc, sc, RELU_PAIRS, (X,), extra=ce).grads()
    w2 = ref_step(tc, sc, RELU_PAIRS, (X2,), extra=ce).grads()
    with Distiller(teacher, student, layers="relu?") as d:
        for x in (X, X2):
            (F.cross_entropy(student(x), Y) + d.loss()).backward()
    assert_grads({n: p.grad for n, p in student.named_parameters()}, {n: w1[n] + w2[n] for n in w1})


def test_input_gradient_for_adversarial_training():
    """An input that requires grad (adversarial training asks for d loss / d x): the gradient of
    ``d.loss()`` with respect to x equals the reference's (only the student's path counts; the
    teacher runs without gradient)."""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    x_ref = X.clone().requires_grad_()
    want = torch.autograd.grad(ref_step(tc, sc, RELU_PAIRS, (x_ref,)).loss, x_ref)[0]
    x = X.clone().requires_grad_()
    with Distiller(teacher, student, layers="relu?") as d:
        student(x)
        (got,) = torch.autograd.grad(d.loss(), x)
    torch.testing.assert_close(got, want.float(), rtol=1e-3, atol=1e-4 * float(want.abs().max()))


class InplaceNormalising(TinyCNN):
    """A teacher that normalises its input in place (``x.sub_(m).div_(s)``), as some do."""

    def forward(self, x: Tensor) -> Tensor:
        x.sub_(0.5).div_(0.25)
        return super().forward(x)


def test_a_teacher_that_edits_its_input_in_place_does_not_change_the_students_input():
    """The teacher runs first, on the very tensor the user passed; it normalises it in place.
    A careful user expects ``student(x)`` not to modify x, nor the student to see the teacher's
    edit (without athooks, nothing would touch x). Expected: either a clear athooks error, or
    x unchanged, the student's output as without athooks and the reference loss (the teacher
    on its own normalised copy). Not in issue 14; encoded as a mature library would behave."""
    torch.manual_seed(0)
    teacher, student = InplaceNormalising(16), TinyCNN(8)
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X.clone(),), t_args=(X.clone(),))
    x = X.clone()
    with Distiller(teacher, student, layers="relu?") as d:
        try:
            out = student(x)
        except AthooksError:
            return  # a clear refusal is acceptable
        assert torch.equal(x, X)
        torch.testing.assert_close(out, want.out)
        assert_value(d.loss(), want.value)


@pytest.mark.parametrize("layout", ["channels_last", "transposed_view", "batch_of_one"])
def test_unusual_input_layouts_give_the_reference(layout):
    """A channels_last input, a non-contiguous view, a batch of one sample: the loss and the
    gradient are the reference's (no shape or stride assumption in the capture)."""
    teacher, student = tiny_pair()
    x = {
        "channels_last": X.to(memory_format=torch.channels_last),
        "transposed_view": X.transpose(2, 3),
        "batch_of_one": X[:1],
    }[layout]
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (x.contiguous(),))
    with Distiller(teacher, student, layers="relu?") as d:
        student(x)
        got = d.loss()
        assert_value(got, want.value)
        assert_grads(grads_of(got, student), want.grads())


def test_float64_models_match_the_reference_to_double_precision():
    """Both models in float64: the loss matches the float64 reference to ~1e-10 relative
    (athooks must not round through float32 when the model is wider)."""
    teacher, student = tiny_pair()
    teacher.double()
    student.double()
    tc, sc = plain_copy(teacher, student)
    x = X.double()
    want = ref_step(tc, sc, RELU_PAIRS, (x,))
    with Distiller(teacher, student, layers="relu?") as d:
        student(x)
        got = d.loss()
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(want.value, rel=1e-10)


def test_a_generator_closed_early_inside_the_block_restores_everything():
    """A training loop written as a generator that yields inside the ``with`` block, closed
    early by its consumer (GeneratorExit at the yield): everything is restored."""
    teacher, student = tiny_pair()
    before = snapshot(teacher, student)

    def loop():
        with Distiller(teacher, student, layers="relu?") as d:
            for x in (X, X2, X3):
                student(x)
                yield float(d.loss())

    gen = loop()
    next(gen)
    gen.close()
    assert_unchanged(before, teacher, student, buffers_of=(0,))


def test_user_hooks_added_inside_the_block_survive_it():
    """A hook the user registers on the student or teacher inside the block is the user's: it
    still fires after the block; athooks removes only its own."""
    teacher, student = tiny_pair()
    fired = []
    with Distiller(teacher, student, layers="relu?") as d:
        h1 = student.relu2.register_forward_hook(lambda *a: fired.append("s"))
        h2 = teacher.relu2.register_forward_hook(lambda *a: fired.append("t"))
        student(X)
        d.loss()
    fired.clear()
    student(X)
    teacher(X)
    assert fired == ["s", "t"]
    h1.remove()
    h2.remove()
    assert hookless(student) and hookless(teacher)


def test_direct_calls_of_the_teacher_or_a_student_part_do_not_disturb_the_step():
    """Between ``student(x)`` and ``d.loss()`` the user calls ``teacher(x2)`` (for logging) and a
    student submodule directly: neither starts a step nor writes into the captures."""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X,))
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        with torch.no_grad():
            teacher(X2)
        student.relu3(student.bn3(student.conv3(torch.randn(4, 16, 8, 8))))
        assert_value(d.loss(), want.value)


def test_teacher_input_that_raises_leaves_a_fresh_next_step():
    """``teacher_input`` raises on one bad batch: that forward raises, ``d.loss()`` refuses,
    and the next batch is a correct step (the teacher runs for it)."""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X2,))
    fail = {"on": True}

    def teacher_input(x):
        if fail["on"]:
            raise ValueError("bad batch")
        return x

    runs = Counter(teacher)
    with Distiller(teacher, student, layers="relu?", teacher_input=teacher_input) as d:
        with pytest.raises(ValueError, match="bad batch"):
            student(X)
        with pytest.raises(CaptureError):
            d.loss()
        fail["on"] = False
        student(X2)
        assert runs.n == 1
        assert_value(d.loss(), want.value)


def test_a_distiller_that_is_never_attached_changes_nothing():
    """Constructing a Distiller with ``layers="auto"`` (and input_size, so it probes now) on a
    teacher with mixed modes: no mode, flag, hook or BatchNorm statistic changes."""
    teacher, student = tiny_pair()
    teacher.bn1.eval()
    student.eval()
    student.bn3.train()
    before = snapshot(teacher, student)
    Distiller(teacher, student, input_size=(3, 16, 16))
    assert_unchanged(before, teacher, student)


def test_three_sgd_steps_match_a_hand_written_at_loop():
    """Three optimizer steps with ``CE + d.loss()``: the student's weights after each step match
    a hand-written float64-loss AT loop on a copy with the same optimizer."""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(sc.parameters(), lr=0.05, momentum=0.9)
    with Distiller(teacher, student, layers="relu?") as d:
        for x in (X, X2, X3):
            ref = ref_step(tc, sc, RELU_PAIRS, (x,), extra=ce)
            ref_opt.zero_grad()
            ref.loss.backward()
            ref_opt.step()
            loss = F.cross_entropy(student(x), Y) + d.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert_value(loss, ref.value)
            for (n, p), q in zip(student.named_parameters(), sc.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_leaving_the_inner_of_two_distillers_on_one_student_keeps_the_outer_working():
    """Two teachers on one student; the inner block ends (the second teacher's schedule is
    over): the outer Distiller's next step is the reference, and the second teacher no longer
    runs and is restored."""
    torch.manual_seed(0)
    t1, t2, student = TinyCNN(16), TinyCNN(12), TinyCNN(8)
    t1c, sc = plain_copy(t1, student)
    before_t2 = snapshot(t2)
    r2 = Counter(t2)
    with Distiller(t1, student, layers="relu?") as d1:
        with Distiller(t2, student, layers="relu?") as d2:
            student(X)
            d1.loss()
            d2.loss()
        r2.handle.remove()
        assert_unchanged(before_t2, t2)
        r2.handle = t2.register_forward_pre_hook(r2)
        student(X2)
        got = d1.loss()
        assert r2.n == 1
        assert_value(got, ref_step(t1c, sc, RELU_PAIRS, (X2,)).value)
        assert_grads(grads_of(got, student), ref_step(t1c, sc, RELU_PAIRS, (X2,)).grads())
    r2.handle.remove()


def test_models_cast_to_float64_between_steps_inside_the_block():
    """Both models are cast to float64 between two steps inside the block (a precision check
    in the middle of training): the second step's loss is the float64 reference, in float64."""
    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        d.loss()
        teacher.double()
        student.double()
        tc, sc = plain_copy(teacher, student)
        x = X2.double()
        student(x)
        got = d.loss()
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(ref_step(tc, sc, RELU_PAIRS, (x,)).value, rel=1e-9)


def test_input_edited_in_place_between_forward_and_loss_does_not_change_the_value():
    """The user reuses the input buffer (``x.mul_(0.5)``, the next batch's augmentation) between
    ``student(x)`` and ``d.loss()``: the loss is the value of the forward that ran, not one
    recomputed from the edited input."""
    teacher, student = tiny_pair()
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, RELU_PAIRS, (X.clone(),)).value
    x = X.clone()
    with Distiller(teacher, student, layers="relu?") as d:
        student(x)
        x.mul_(0.5)
        assert_value(d.loss(), want)


# issue 15 (found writing docs/how-to/detection.md): an SSDlite with random weights, in eval mode
# as every teacher runs, gives features of about 1e-13; its sum_p maps (about 1e-26 per cell)
# have a norm below F.normalize's eps (1e-12), so the normalised map is ~0, and the pair's term
# is 1000 / (H * W) whatever the student does, with no gradient: a constant that trains nothing,
# like a one-cell map, but without the one-cell map's warning (now warned, on the pair's first
# step).
def test_a_vanishing_teacher_map_is_warned_about():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        teacher[0].weight.mul_(1e-14)
        teacher[0].bias.zero_()
    x = torch.rand(2, 3, 8, 8)
    with Distiller(teacher, student, layers="1") as d:
        student(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = d.loss()
    # the fact the warning is about, from the formula: q_T is ~0, so the term is 1000 / (H * W)
    # (||q_S||^2 = 1 per image, averaged over the 64 cells) and carries no gradient
    assert abs(float(loss) - 1000 / 64) < 1e-3
    (grad,) = torch.autograd.grad(loss, student[0].weight, allow_unused=True)
    assert grad is None or float(grad.abs().max()) < 1e-4  # rounding only
    assert any("zero" in str(w.message) for w in caught), [str(w.message) for w in caught]


class _Pyramid(nn.Module):
    """Returns an OrderedDict of two levels, like torchvision's FPN backbones."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)

    def forward(self, x):
        out = self.conv(x)
        return OrderedDict([("0", out), ("1", F.max_pool2d(out, 2))])


class _Detectorish(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.backbone = _Pyramid(width)

    def forward(self, x):
        return sum(level.mean() for level in self.backbone(x).values())


# issue 15 (found writing docs/how-to/detection.md): with one Layer per FPN level, every pair
# was named ('backbone', 'backbone'), in d.pairs and in every error message, so neither said
# which level a pair or an error is about (fixed on i15-nd: pairs carry the key)
def test_pairs_of_one_dict_output_are_told_apart():
    levels = [(Layer("backbone", select=k), Layer("backbone", select=k)) for k in ("0", "1")]
    with Distiller(_Detectorish(8), _Detectorish(4), layers=levels) as d:
        assert len(set(d.pairs)) == 2, d.pairs


# issue 15 (found writing docs/how-to/segmentation.md): on torchvision's segmentation models,
# "auto" takes the classifier heads for stages (LRASPP: 'classifier', a 5-channel logits map,
# and 'classifier.cbr'; DeepLabV3: 'aux_classifier'), pairing logits with logits
def test_auto_on_a_segmentation_model_leaves_the_classifier_out():
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    none = {"weights": None, "weights_backbone": None, "num_classes": 5}
    teacher, student = lraspp_mobilenet_v3_large(**none), lraspp_mobilenet_v3_large(**none)
    pairing = athooks.describe(teacher, student, example=torch.rand(2, 3, 64, 64))
    picked = [name for pair in pairing.pairs for name in (pair.teacher.name, pair.student.name)]
    assert picked and not any("classifier" in name for name in picked), picked


class _ListInput(nn.Module):
    """Called like torchvision's detectors, with a list of (C, H, W) images; keeps what it got."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.seen: list[list[tuple[int, ...]]] = []
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1)
        )

    def forward(self, images, targets=None):
        self.seen.append([tuple(image.shape) for image in images])
        batch = torch.stack(images)
        # a detector's transform normalises with a 3-channel mean, which broadcasts a
        # 1-channel image to 3 channels without an error: this does the same
        return self.body(batch.expand(-1, 3, -1, -1)).mean()


# issue 15 (found writing docs/how-to/detection.md): the first-call probe takes the batch size
# from the first tensor, which for a list of images is an image's channel count (3), and cuts
# every tensor of that leading size to its first entry: each image becomes its first channel,
# (1, H, W). A torchvision detector's normalisation broadcasts that back to 3 channels, so the
# probe runs, silently, on other images than the user's.
def test_the_first_call_probe_keeps_a_list_of_images_whole_images():
    teacher, student = _ListInput(8), _ListInput(4)
    images = [torch.rand(3, 16, 16), torch.rand(3, 16, 16)]
    with Distiller(teacher, student, teacher_input=lambda images, targets=None: (images,)) as d:
        student(images, [{}, {}])
        d.loss()
    for model in (teacher, student):
        assert all(shape == (3, 16, 16) for call in model.seen for shape in call), model.seen


# ====================================================================== N-d maps (issue 15)


class Net1d(nn.Module):
    """A 1-D CNN (B, C, T) whose BatchNorm outputs are overwritten by in-place ReLUs."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(2, width, 3, padding=1), nn.BatchNorm1d(width)
        self.conv2, self.bn2 = nn.Conv1d(width, 2 * width, 3, 2, 1), nn.BatchNorm1d(2 * width)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2 * width, 4)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean(-1))


class Net3d(nn.Module):
    """A small video CNN (B, C, T, H, W)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.s1 = nn.Sequential(nn.Conv3d(3, width, 3, 1, 1), nn.BatchNorm3d(width), nn.ReLU())
        self.s2 = nn.Sequential(
            nn.Conv3d(width, 2 * width, 3, (1, 2, 2), 1), nn.BatchNorm3d(2 * width), nn.ReLU()
        )
        self.fc = nn.Linear(2 * width, 4)

    def forward(self, x):
        return self.fc(self.s2(self.s1(x)).mean((2, 3, 4)))


SIGNAL = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(4))
CLIP = torch.randn(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def test_1d_maps_of_outputs_overwritten_in_place_give_the_reference():
    """bn1/bn2 outputs are overwritten by ReLU(inplace=True): the maps and their gradients are
    those of the values as produced, over two steps (probing, then copying)."""
    torch.manual_seed(0)
    teacher, student = Net1d(16), Net1d(8)
    pairs = [("bn1", "bn1"), ("bn2", "bn2")]
    before = snapshot(teacher, student)
    with Distiller(teacher, student, layers="bn?") as d:
        for x in (SIGNAL, SIGNAL.flip(0)):
            tc, sc = plain_copy(teacher, student)
            want = ref_step(tc, sc, pairs, (x,))
            student(x)
            got = d.loss()
            assert_value(got, want.value)
            assert_grads(grads_of(got, student), want.grads())
    assert_unchanged(before, teacher, student, buffers_of=[0])


def test_video_maps_give_the_reference_and_leave_nothing_changed():
    torch.manual_seed(1)
    teacher, student = Net3d(8), Net3d(4)
    pairs = [("s1", "s1"), ("s2", "s2")]
    before = snapshot(teacher, student)
    tc, sc = plain_copy(teacher, student)
    want = ref_step(tc, sc, pairs, (CLIP,))
    with Distiller(teacher, student, layers="s?") as d:
        student(CLIP)
        got = d.loss()
        assert_value(got, want.value)
        assert_grads(grads_of(got, student), want.grads())
    assert_unchanged(before, teacher, student, buffers_of=[0])


def test_an_image_map_paired_with_a_video_map_is_refused_not_resized():
    """(B, T, H, W) against (B, H, W): no resize can make them comparable, so no value."""
    teacher = Net3d(4)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    before = snapshot(teacher, student)
    with Distiller(
        teacher,
        student,
        layers=[("s1", "1")],
        teacher_input=lambda x: x[:, :, None].expand(-1, -1, 3, -1, -1),
    ) as d:
        student(CLIP[:, :, 0])
        with pytest.raises(CaptureError, match=r"different layouts.*\(3, 8, 8\).*\(8, 8\)"):
            d.loss()
    assert_unchanged(before, teacher, student)


@pytest.mark.parametrize("shape", [(4, 16), (2, 2, 2, 2, 2, 2)])
def test_outputs_without_a_1_to_3_d_layout_are_refused_with_the_fix(shape):
    class Reshape(nn.Module):
        def forward(self, x):
            return x.reshape(shape)

    def net():
        return nn.Sequential(nn.Flatten(), nn.Linear(48, 64 // shape[0]), Reshape())

    teacher, student = net(), net()
    before = snapshot(teacher, student)
    d = Distiller(teacher, student, layers="2")
    with d, pytest.raises(CaptureError, match=r"\(B, C, T, H, W\) for a video.*transform"):
        student(torch.randn(shape[0], 3, 4, 4))
    assert_unchanged(before, teacher, student)
    assert not d.attached


def test_vit_tokens_named_without_a_transform_are_refused_not_read_as_1d():
    """A ViT block's (B, N, C) would pass as (B, C, T), with a map over channels: refused."""
    teacher = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=4)
    student = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=4)
    before = snapshot(teacher, student)
    with (
        Distiller(teacher, student, layers="blocks.11"),
        pytest.raises(CaptureError, match=r"\(2, 5, 192\).*tokens \(B, N, C\).*fc2"),
    ):
        student(torch.randn(2, 3, 32, 32))
    assert_unchanged(before, teacher, student)


# ====================================================================== several tensors of one output


class DictNeck(nn.Module):
    """Three levels in a dict; the model edits the last in place after the neck returns."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, 2, 1)
        self.c3 = nn.Conv2d(width, width, 3, 2, 1)

    def forward(self, x):
        a = self.c1(x)
        b = self.c2(a)
        return {"p1": a, "p2": b, "p3": self.c3(b)}


class DictNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.neck = DictNeck(width)
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        levels = self.neck(x)
        levels["p3"].mul_(2.0).relu_()  # in place, after athooks captured the level
        return self.fc(sum(v.mean((2, 3)) for v in levels.values()))


def _dict_reference(teacher, student, x, keys):
    """The AT loss on hook-free copies, the levels cloned as produced (my own hooks)."""
    tc, sc = plain_copy(teacher, student)
    got = {}

    def keep(side):
        def hook(module, inputs, output):
            got[side] = {k: output[k].clone() for k in keys}

        return hook

    tc.neck.register_forward_hook(keep("t"))
    sc.neck.register_forward_hook(keep("s"))
    tc.eval()
    with torch.no_grad():
        tc(x)
    sc(x)
    loss = ref_at_loss_code([(got["t"][k], got["s"][k]) for k in keys])
    return loss, sc


@pytest.mark.parametrize("select", [("p1", "p2", "p3"), "*"])
def test_levels_of_a_dict_edited_in_place_give_the_reference_over_two_steps(select):
    torch.manual_seed(0)
    teacher, student = DictNet(8), DictNet(4)
    keys = ["p1", "p2", "p3"]
    before = snapshot(teacher, student)
    with Distiller(teacher, student, layers=athooks.Layer("neck", select=select)) as d:
        for x in (X, X2):
            want, sc = _dict_reference(teacher, student, x, keys)
            student(x)
            got = d.loss()
            assert_value(got, float(want.detach()))
            assert_grads(grads_of(got, student), grads_of(want, sc))
        assert [s for _, s in d.pairs] == [f"neck['{k}']" for k in keys]
        assert len(student.neck._forward_hooks) == 1
    assert_unchanged(before, teacher, student, buffers_of=[0])


# issue 15 (found writing docs/how-to/segmentation.md): a DeepLabV3's dilated ResNet has
# layer2, layer3 and layer4 at stride 8; the stage of that stride is the last of them, layer4
# (the backbone dict's 'out'). main's "auto" takes 'aux_classifier' (a logits map) there;
# i15-discovery took the backbone dict's first level, 'aux' (layer3), instead of 'out' (fixed:
# of one module's levels that tie, the later key is the stage).
def test_auto_takes_the_deepest_stage_of_a_dilated_segmentation_backbone():
    from torchvision.models.segmentation import deeplabv3_resnet50

    none = {"weights": None, "weights_backbone": None, "num_classes": 5, "aux_loss": True}
    teacher, student = deeplabv3_resnet50(**none), deeplabv3_resnet50(**none)
    pairing = athooks.describe(teacher, student, example=torch.rand(2, 3, 64, 64))
    last = pairing.pairs[-1].teacher
    assert last.stride == 8, pairing
    picked = (last.name, getattr(last, "select", None))
    assert picked in {("backbone.layer4", None), ("backbone", "out")}, pairing


# issue 15 (found writing docs/how-to/detection.md): athooks.viz.attention_maps with one Layer
# per FPN level returns one entry, keyed by the module name: each level overwrote the one
# before, and only the last level's map is returned, silently (fixed: maps keyed by label)
def test_attention_maps_of_several_levels_of_one_module_are_all_returned():
    levels = [Layer("backbone", select="0"), Layer("backbone", select="1")]
    try:
        maps = athooks.viz.attention_maps(_Detectorish(4), torch.rand(2, 3, 8, 8), layers=levels)
    except AthooksError:
        return  # refusing, with a message, is not a silent wrong value either
    assert sorted(tuple(m.shape) for m in maps.values()) == [(2, 4, 4), (2, 8, 8)], maps.keys()


# ---------------------------------------------------------------------------- connectors (issue 16)


class _Hint(athooks.plugin.Loss):
    """FitNets-style hint through per-pair connectors (1x1 conv + BN, built on the first step)."""

    name = "hint"

    def __init__(self):
        super().__init__()
        self.features = athooks.plugin.Features()
        self.connectors = athooks.plugin.Connectors()

    def captures(self):
        return (self.features,)

    def forward(self, step):
        pairs = step.features(self.features)
        return self.sum_pairs(
            [(self.connectors[i](s, t) - t).pow(2).mean() for i, (t, s) in enumerate(pairs)]
        )


def test_one_loss_object_in_two_distillers_of_different_pair_counts_is_refused():
    teacher, student = tiny_pair()
    hint = _Hint()
    Distiller(teacher, student, layers=["relu2", "relu3"], losses=hint)
    with pytest.raises(athooks.ConfigurationError, match="its own loss object"):
        Distiller(teacher, student, layers=["relu3"], losses=hint)


def test_a_validation_step_with_no_grad_capture_leaves_the_connectors_statistics_alone():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, layers=["relu3"], losses=_Hint(), no_grad="capture")
    opt = torch.optim.SGD([*student.parameters(), *d.parameters()], lr=0.1)
    x = torch.randn(4, 3, 16, 16)
    with d:
        F.cross_entropy(student(x), torch.arange(4) % 5).add(d.loss()).backward()
        opt.step()
        bn = d.losses[0].connectors[0].body.bn
        before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
        with torch.no_grad():
            student(torch.randn(4, 3, 16, 16) * 5)
            value = d.loss()
        assert not value.requires_grad
        assert torch.equal(bn.running_mean, before[0])
        assert torch.equal(bn.num_batches_tracked, before[1])
        assert d.losses[0].training  # the mode is given back


def test_connectors_follow_the_student_to_another_dtype_between_steps():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, layers=["relu3"], losses=_Hint())
    params = list(d.parameters())
    x = torch.randn(4, 3, 16, 16)
    with d:
        student(x)
        d.loss().backward()
        teacher.double(), student.double()
        student(x.double())
        value = d.loss()
    assert value.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in d.parameters())
    assert [id(p) for p in d.parameters()] == [id(p) for p in params]  # the optimiser's objects


def test_the_embedding_of_a_student_whose_classifier_input_is_edited_in_place():
    """The classifier's input overwritten after the tap (``x.relu_()`` in the head): the vector is
    copied on the first forward, so its value and gradient are those of the input as it was."""

    class Edits(TinyCNN):
        def forward(self, x):
            c = self.features(x)[-1]
            pooled = c.mean((2, 3))
            out = self.head(pooled)
            pooled.mul_(0)  # after the classifier read it
            return out

    class Gap(athooks.plugin.Loss):
        name = "gap"
        needs_embedding = True

        def forward(self, step):
            t, s = step.embedding()
            return (s.sum(1) - t.sum(1)).pow(2).mean()

    torch.manual_seed(0)
    teacher, student = TinyCNN(8), Edits(8)
    reference = TinyCNN(8)
    reference.load_state_dict(student.state_dict())
    with Distiller(teacher, student, losses=Gap()) as d:
        student(X)
        got = d.loss()
        got.backward()
    with torch.no_grad():
        t = teacher.eval().features(X)[-1].mean((2, 3)).double()
    s = reference.features(X)[-1].mean((2, 3))
    want = (s.double().sum(1) - t.sum(1)).pow(2).mean()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(student.conv1.weight.grad, reference.conv1.weight.grad.float())
