"""The paper's other losses against independent re-derivations (issue: KD, F-ActT, gradient AT)."""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import TinyCNN, ref_at_loss_code, tiny_pair
from torch import nn
from torch.func import functional_call

import athooks
from athooks import Distiller
from athooks.errors import CaptureError, ConfigurationError

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


class Linear(nn.Module):
    """logits = W vec(x) + b: its input gradient has a closed form."""

    def __init__(self, in_shape=(1, 2, 3), classes=4, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = int(torch.tensor(in_shape).prod())
        self.weight = nn.Parameter(torch.randn(classes, n, generator=g, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(classes, generator=g, dtype=dtype))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def closed_form_input_grad(model: Linear, x, y):
    """d sum_b CE(W x_b + b, y_b) / d x_b = W^T (softmax(z_b) - onehot(y_b)), by hand."""
    z = x.flatten(1) @ model.weight.T + model.bias
    p = z.softmax(1)
    onehot = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
    return ((p - onehot) @ model.weight).reshape(x.shape)


LX = torch.randn(5, 1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
LY = torch.tensor([0, 3, 1, 2, 3])


# ------------------------------------------------------------------ KD and AT + KD


def authors_distillation(y, teacher_scores, labels, t, alpha):
    """The authors' `distillation`, re-derived: KL summed over classes, averaged over the batch."""
    log_p = F.log_softmax(y / t, dim=1)
    q = F.softmax(teacher_scores / t, dim=1)
    kl = (q * (q.log() - log_p)).sum() / y.shape[0]
    return kl * t * t * alpha + F.cross_entropy(y, labels) * (1.0 - alpha)


def test_kd_with_scaled_ce_equals_the_authors_distillation():
    teacher, student = tiny_pair()
    with Distiller(teacher, student, losses=athooks.loss("kd", weight=0.9, temperature=4.0)) as d:
        out = student(X)
        got = 0.1 * F.cross_entropy(out, Y) + d.loss()
    teacher.eval()
    with torch.no_grad():
        t_out = teacher(X)
    want = authors_distillation(out, t_out, Y, 4.0, 0.9)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_at_plus_kd_equals_the_authors_objective():
    teacher, student = tiny_pair(inplace=False)
    losses = [athooks.loss("at", beta=1e3), athooks.loss("kd", weight=0.9, temperature=4.0)]
    with Distiller(teacher, student, layers="relu?", losses=losses) as d:
        out = student(X)
        got = 0.1 * F.cross_entropy(out, Y) + d.loss()
        assert set(d.terms) == {"at", "kd"}
        assert torch.allclose(
            got.detach() - 0.1 * F.cross_entropy(out, Y).detach(), sum(d.terms.values())
        )
    teacher.eval()
    with torch.no_grad():
        t_out = teacher(X)
        t_feats = teacher.features(X)
        s_feats = student.features(X)
    want = authors_distillation(out.detach(), t_out, Y, 4.0, 0.9) + ref_at_loss_code(
        list(zip(t_feats, s_feats, strict=True))
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_kd_explains_unusable_outputs():
    class DictOut(TinyCNN):
        def forward(self, x):
            return {"features": super().forward(x)}

    torch.manual_seed(0)
    teacher, student = TinyCNN(16), DictOut(8)
    with Distiller(teacher, student, losses="kd") as d:
        student(X)
        with pytest.raises(
            CaptureError,
            match=r"loss 'kd' needs the student's class logits \(B, classes\), but the student returned a dict with keys \['features'\]",
        ):
            d.loss()


# ------------------------------------------------------------------ F-ActT


def test_fact_against_a_re_derivation():
    torch.manual_seed(0)
    teacher, student = TinyCNN(8, inplace=False), TinyCNN(8, inplace=False)
    with Distiller(teacher, student, layers="relu?", losses=athooks.loss("fact", beta=0.5)) as d:
        student(X)
        got = d.loss()
        got.backward()
    teacher.eval()
    with torch.no_grad():
        pairs = list(zip(teacher.features(X), student.features(X), strict=True))
    want = 0.5 / 2 * sum((s - t).flatten(1).pow(2).sum(1).mean() for t, s in pairs)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_fact_keeps_values_as_produced_under_inplace_ops():
    torch.manual_seed(0)
    teacher, student = TinyCNN(8), TinyCNN(8)  # ReLU(inplace=True) after each tapped BN
    with Distiller(teacher, student, layers="bn?", losses=athooks.loss("fact")) as d:
        for _ in range(2):
            student(X)
            got = d.loss()
            got.backward()
    ref_t, ref_s = TinyCNN(8, inplace=False), TinyCNN(8, inplace=False)
    ref_t.load_state_dict(teacher.state_dict())
    ref_s.load_state_dict(student.state_dict())
    ref_t.eval()
    with torch.no_grad():

        def bns(m):
            a = m.bn1(m.conv1(X))
            b = m.bn2(m.conv2(F.relu(a)))
            return [a, b, m.bn3(m.conv3(F.relu(b)))]

        want = (
            1e-3
            / 2
            * sum(
                (s - t).flatten(1).pow(2).sum(1).mean()
                for t, s in zip(bns(ref_t), bns(ref_s), strict=True)
            )
        )
    # the student's BN statistics moved between the two steps above; compare the last step
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


def test_fact_with_different_shapes_says_why_at_does_not_need_them():
    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu1", losses="fact") as d:
        student(X)
        with pytest.raises(
            CaptureError,
            match=r"teacher \(4, 16, 16, 16\) and student \(4, 8, 16, 16\).*'at'.*does not need equal widths",
        ):
            d.loss()


# ------------------------------------------------------------------ gradient-based losses


def run_grad_loss(name, teacher, student, x=LX, y=LY, beta=2.0):
    with Distiller(teacher, student, losses=athooks.loss(name, beta=beta)) as d:
        student(x)
        return d.loss(target=y)


def test_grad_at_against_the_closed_form():
    teacher, student = Linear(seed=1), Linear(seed=2)
    got = run_grad_loss("grad_at", teacher, student)
    with torch.no_grad():
        j_s = closed_form_input_grad(student, LX, LY)
        j_t = closed_form_input_grad(teacher, LX, LY)
    want = 2.0 / 2 * (j_s - j_t).flatten(1).norm(dim=1).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


def test_symmetry_against_the_closed_form():
    teacher, student = Linear(seed=1), Linear(seed=2)
    got = run_grad_loss("symmetry", teacher, student)
    with torch.no_grad():
        j = closed_form_input_grad(student, LX, LY)
        j_flip = closed_form_input_grad(student, LX.flip(-1), LY).flip(-1)
    want = 2.0 / 2 * (j - j_flip).flatten(1).norm(dim=1).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


def test_input_grad_l2_against_the_closed_form():
    teacher, student = Linear(seed=1), Linear(seed=2)
    got = run_grad_loss("input_grad_l2", teacher, student)
    with torch.no_grad():
        j = closed_form_input_grad(student, LX, LY)
    want = 2.0 * j.flatten(1).pow(2).sum(1).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


@pytest.mark.parametrize("name", ["grad_at", "symmetry", "input_grad_l2"])
def test_gradcheck_of_the_gradient_based_terms(name):
    """float64 gradcheck through the double backward, w.r.t. the student's weights."""
    teacher, student = Linear(seed=1), Linear(seed=2)
    loss_fn = athooks.loss(name, beta=1.0)
    d = Distiller(teacher, student, losses=loss_fn).attach()
    try:

        def f(weight, bias):
            functional_call(student, {"weight": weight, "bias": bias}, (LX,))
            return d.loss(target=LY)

        w = student.weight.detach().clone().requires_grad_()
        b = student.bias.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(f, (w, b))
    finally:
        d.detach()


@pytest.mark.parametrize("name", ["grad_at", "symmetry", "input_grad_l2"])
def test_gradient_based_terms_on_a_cnn_train_the_student(name):
    torch.manual_seed(0)
    teacher, student = TinyCNN(16, inplace=True), TinyCNN(8, inplace=True)
    with Distiller(teacher, student, losses=athooks.loss(name, beta=1.0)) as d:
        out = student(X)
        ce = F.cross_entropy(out, Y)
        total = ce + d.loss(target=Y)
        g_total = torch.autograd.grad(total, student.conv1.weight, retain_graph=True)[0]
        g_ce = torch.autograd.grad(ce, student.conv1.weight)[0]
    assert torch.isfinite(g_total).all()
    assert not torch.allclose(g_total, g_ce)  # the term changes the student's update


def test_grad_at_is_zero_for_the_same_network():
    torch.manual_seed(0)
    student = TinyCNN(8, inplace=False)
    teacher = copy.deepcopy(student)
    student.eval()  # the teacher always runs in eval mode: compare like with like
    with Distiller(teacher, student, losses=athooks.loss("grad_at", beta=1.0)) as d:
        student(X)
        loss = d.loss(target=Y)
        loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_symmetry_is_zero_for_a_mirror_symmetric_network():
    class MirrorInvariant(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            with torch.no_grad():  # kernels symmetric under a horizontal flip
                self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)

        def forward(self, x):
            return self.conv(x).relu().mean((2, 3))

    net = MirrorInvariant()
    loss = run_grad_loss("symmetry", TinyCNN(4), net, x=X, y=Y, beta=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_losses_need_labels():
    teacher, student = Linear(seed=1), Linear(seed=2)
    with Distiller(teacher, student, losses="grad_at") as d:
        student(LX)
        with pytest.raises(
            CaptureError, match=r"loss 'grad_at' needs the labels: call d.loss\(target=y\)"
        ):
            d.loss()


def test_gradient_losses_need_a_forward_with_gradient():
    teacher, student = Linear(seed=1), Linear(seed=2)
    capture = Distiller(teacher, student, losses="input_grad_l2", no_grad="capture")
    with capture as d, torch.no_grad():
        student(LX)
        with pytest.raises(CaptureError, match="ran without gradient"):
            d.loss(target=LY)
    with Distiller(teacher, student, losses="input_grad_l2") as d, torch.no_grad():
        student(LX)  # by default a forward under no_grad is no step at all
        with pytest.raises(CaptureError, match='before any forward.*no_grad="capture"'):
            d.loss(target=LY)


def test_input_that_already_requires_grad_is_kept():
    teacher, student = Linear(seed=1), Linear(seed=2)
    pre = nn.Parameter(torch.zeros(1, 1, 2, 3, dtype=torch.float64))  # e.g. a learned offset
    with Distiller(teacher, student, losses="input_grad_l2") as d:
        student(LX + pre)
        d.loss(target=LY).backward()
    assert pre.grad is not None and pre.grad.abs().sum() > 0  # the graph upstream is intact


def test_keyword_tensor_input_is_found():
    class KW(Linear):
        def forward(self, *, image):
            return super().forward(image)

    teacher, student = KW(seed=1), KW(seed=2)
    with Distiller(teacher, student, losses=athooks.loss("grad_at", beta=2.0)) as d:
        student(image=LX)
        got = d.loss(target=LY)
    with torch.no_grad():
        want = (
            (closed_form_input_grad(student, LX, LY) - closed_form_input_grad(teacher, LX, LY))
            .flatten(1)
            .norm(dim=1)
            .mean()
        )
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


def test_combined_terms_sum_to_the_loss():
    teacher, student = tiny_pair(inplace=False)
    losses = ["at", "kd", athooks.loss("grad_at", beta=0.5), athooks.loss("symmetry", beta=0.5)]
    with Distiller(teacher, student, layers="relu?", losses=losses) as d:
        student(X)
        total = d.loss(target=Y)
    assert list(d.terms) == ["at", "kd", "grad_at", "symmetry"]
    assert total.item() == pytest.approx(sum(v.item() for v in d.terms.values()), rel=1e-6)


# ------------------------------------------------------------- numeric options (issue 14)

NAN, INF = float("nan"), float("inf")
GRAD_LOSSES = ("grad_at", "symmetry", "input_grad_l2")


@pytest.mark.parametrize(
    ("name", "option", "value", "match"),
    [
        *[("at", "beta", v, "at: beta must be finite") for v in (NAN, INF, -INF, 10**400)],
        ("at", "beta", -1.0, r"at: beta must be >= 0"),
        ("at", "beta", "big", "at: beta must be a real number"),
        ("at", "beta", True, "at: beta must be a real number.*got bool"),
        ("at", "beta", torch.tensor(1e3), r"got Tensor.*\.item\(\)"),
        *[("kd", "weight", v, "kd: weight must be finite") for v in (NAN, INF)],
        ("kd", "weight", -0.5, "kd: weight must be >= 0"),
        ("kd", "weight", "0.9", "kd: weight must be a real number.*got str"),
        *[("kd", "temperature", v, "kd: temperature must be finite") for v in (NAN, INF)],
        *[("kd", "temperature", v, "kd: temperature must be > 0") for v in (0, -4.0)],
        *[("fact", "beta", v, "fact: beta must be finite") for v in (NAN, INF)],
        ("fact", "beta", -1e-3, "fact: beta must be >= 0"),
        ("fact", "beta", "1e-3", "fact: beta must be a real number"),
        *[(g, "beta", v, f"{g}: beta must be finite") for g in GRAD_LOSSES for v in (NAN, INF)],
        *[(g, "beta", -1.0, f"{g}: beta must be >= 0") for g in GRAD_LOSSES],
    ],
    ids=lambda v: repr(v)[:20] if not isinstance(v, str) else None,
)
def test_bad_numeric_options_are_refused(name, option, value, match):
    with pytest.raises(ConfigurationError, match=match):
        athooks.loss(name, **{option: value})


@pytest.mark.parametrize(
    ("name", "option", "value", "expected"),
    [
        ("at", "beta", np.float32(1e3), 1000.0),
        ("at", "beta", np.int64(10), 10.0),
        ("at", "beta", 0, 0.0),  # zero switches a term off, e.g. to log it only
        ("kd", "weight", np.float64(0.9), 0.9),
        ("kd", "temperature", np.int64(4), 4.0),
        ("kd", "temperature", Fraction(1, 2), 0.5),
        ("fact", "beta", np.float32(0.5), 0.5),
        *[(g, "beta", np.float32(2.0), 2.0) for g in GRAD_LOSSES],
    ],
)
def test_real_numbers_of_any_kind_are_stored_as_python_floats(name, option, value, expected):
    loss = athooks.loss(name, **{option: value})
    stored = getattr(loss, option)
    assert type(stored) is float and stored == expected


def test_the_checks_also_apply_to_losses_built_directly():
    from athooks.losses import AT, KD, FActT, GradAT

    for build in (lambda: AT(beta=NAN), lambda: FActT(beta=-1), lambda: GradAT(beta=INF)):
        with pytest.raises(ConfigurationError, match="beta must be"):
            build()
    with pytest.raises(ConfigurationError, match="temperature must be finite"):
        KD(temperature=INF)


def test_a_numpy_beta_gives_the_reference_loss():
    teacher, student = tiny_pair(inplace=False)
    beta = np.float32(1e3)
    with Distiller(teacher, student, layers="relu?", losses=athooks.loss("at", beta=beta)) as d:
        student(X)
        got = d.loss()
    teacher.eval()  # the Distiller runs the teacher in eval mode
    with torch.no_grad():
        pairs = list(zip(teacher.features(X), student.features(X), strict=True))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_at_loss_code(pairs, beta=1000.0).item(), rel=1e-5)


# ------------------------------------------------------------- athooks.checks.check_real


def test_check_real_returns_a_python_float():
    from athooks.checks import check_real

    assert type(check_real(np.float32(0.25), owner="o", option="x")) is float
    assert check_real(3, owner="o", option="x", minimum=3) == 3.0
    assert check_real(-5, owner="o", option="x") == -5.0  # no bound unless asked


@pytest.mark.parametrize(
    ("value", "kwargs", "match"),
    [
        (NAN, {}, "o: x must be finite, got nan"),
        (np.float32("inf"), {}, "o: x must be finite"),
        (np.bool_(True), {}, "o: x must be a real number.*got bool"),
        (3, {"minimum": 3, "strict": True}, "o: x must be > 3, got 3"),
        (0.5, {"minimum": 1, "reason": " (why)"}, r"o: x must be >= 1 \(why\), got 0.5"),
        (None, {"minimum": 0}, "o: x must be a real number >= 0, got NoneType None"),
    ],
)
def test_check_real_refuses(value, kwargs, match):
    from athooks.checks import check_real

    with pytest.raises(ConfigurationError, match=match):
        check_real(value, owner="o", option="x", **kwargs)
