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


@pytest.mark.parametrize("outputs", [True, False])
def test_symmetry_against_the_closed_form(outputs):
    teacher, student = Linear(seed=1), Linear(seed=2)
    with Distiller(
        teacher, student, losses=athooks.loss("symmetry", beta=2.0, outputs=outputs)
    ) as d:
        student(LX)
        got = d.loss(target=LY)
    with torch.no_grad():
        j = closed_form_input_grad(student, LX, LY)
        j_flip = closed_form_input_grad(student, LX.flip(-1), LY).flip(-1)
        # z(x) - z(flip(x)) = W (vec x - vec flip(x)): the outputs are not flipped back
        dz = (LX - LX.flip(-1)).flatten(1) @ student.weight.T
    want = 2.0 / 2 * (j - j_flip).flatten(1).norm(dim=1).mean()
    if outputs:
        want = want + 2.0 / 2 * dz.norm(dim=1).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


# The symmetry norm as the paper states it (issue 17): "we propagate horizontally flipped images
# as well as originals, backpropagate and flip gradient attention maps back. We then add l2 losses
# on the obtained attentions and outputs, and do second backpropagation".


class Unsymmetric(nn.Module):
    """conv, tanh, a linear head over every position: no mirror symmetry, smooth to second order."""

    def __init__(self, seed: int, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 3, 3, padding=1, dtype=dtype)
        self.head = nn.Linear(3 * 4 * 5, 4, dtype=dtype)

    def forward(self, x):
        return self.head(self.conv(x).tanh().flatten(1))


SX = torch.randn(3, 2, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
SY = torch.tensor([2, 0, 3])


def paper_symmetry(model, x, y, beta, output_beta, outputs):
    """Eq. 6 and the paper's output term, by hand in float64: the loss and d loss / d weights.

    J(x) = d sum_b CE(z(x)_b, y_b) / dx with a graph (double backpropagation); the attention
    term beta/2 * mean_b ||J(x)_b - flip(J(flip(x)))_b||_2, the output term
    output_beta/2 * mean_b ||z(x)_b - z(flip(x))_b||_2 (class scores are not flipped back).
    """
    model = copy.deepcopy(model).double()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}

    def logits_and_attention(inp):
        inp = inp.detach().clone().requires_grad_()
        z = functional_call(model, params, (inp,))
        ce = -z.log_softmax(1).gather(1, y[:, None]).sum()
        (j,) = torch.autograd.grad(ce, inp, create_graph=True)
        return z, j

    x = x.double()
    z, j = logits_and_attention(x)
    z_flip, j_flip = logits_and_attention(x.flip(-1))
    attention = (j - j_flip.flip(-1)).flatten(1).pow(2).sum(1).sqrt().mean()
    loss = beta / 2 * attention
    if outputs:
        loss = loss + output_beta / 2 * (z - z_flip).pow(2).sum(1).sqrt().mean()
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), dict(zip(params, grads, strict=True))


SYMMETRY_CASES = [  # (beta, outputs, output_beta given, output_beta used by the reference)
    (2.0, True, None, 2.0),  # the default: one weight, as in the paper
    (2.0, False, None, 0.0),
    (2.0, True, 0.5, 0.5),
    (0.0, True, 3.0, 3.0),  # the output term alone still trains the student
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("beta", "outputs", "output_beta", "ref_output_beta"), SYMMETRY_CASES)
def test_symmetry_value_and_gradient_against_the_paper(
    beta, outputs, output_beta, ref_output_beta, dtype
):
    teacher, student = Unsymmetric(1, dtype), Unsymmetric(2, dtype)
    want, want_grads = paper_symmetry(student, SX, SY, beta, ref_output_beta, outputs)
    fn = athooks.loss("symmetry", beta=beta, outputs=outputs, output_beta=output_beta)
    with Distiller(teacher, student, losses=fn) as d:
        student(SX.to(dtype))
        got = d.loss(target=SY)
        names, params = zip(*student.named_parameters(), strict=True)
        grads = dict(zip(names, torch.autograd.grad(got, params), strict=True))
    exact = dtype == torch.float64
    tol = {"rtol": 1e-10, "atol": 1e-12} if exact else {"rtol": 1e-4, "atol": 1e-6}
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **tol)
    assert set(grads) == set(want_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g.double(), want_grads[name], **tol, msg=name)
    # the weights learn from every term (the head's bias cancels in z(x) - z(flip(x)))
    assert grads["conv.weight"].abs().sum() > 0 and grads["head.weight"].abs().sum() > 0


def test_symmetry_without_outputs_is_exactly_the_attention_term():
    """outputs=False: the value of athooks' Eq. 6 before the output term, bit for bit."""

    class AttentionOnly(athooks.plugin.Loss):  # the symmetry term as athooks computed it before
        name = "attention_only"
        needs_input_grad = True

        def forward(self, step):
            from athooks.losses.gradient import input_gradient

            j = input_gradient(step, "student", step.target, self.name)
            j_flip = input_gradient(step, "student", step.target, self.name, flip=True)
            norms = torch.linalg.vector_norm((j - j_flip).flatten(1), ord=2, dim=1)
            return 2.0 / 2 * norms.mean()

    teacher, student = Unsymmetric(1, torch.float32), Unsymmetric(2, torch.float32)
    losses = [athooks.loss("symmetry", beta=2.0, outputs=False), AttentionOnly()]
    with Distiller(teacher, student, losses=losses) as d:
        student(SX.float())
        d.loss(target=SY)
        terms = dict(d.terms)
    assert torch.equal(terms["symmetry"], terms["attention_only"])
    with Distiller(teacher, student, losses=athooks.loss("symmetry", beta=2.0)) as d:
        student(SX.float())
        with_outputs = d.loss(target=SY)
    assert with_outputs.item() > terms["symmetry"].item()  # on by default


def test_the_output_term_costs_no_forward():
    """One flipped student forward gives both J(flip(x)) and z(flip(x))."""
    calls = {"teacher": 0, "student": 0}
    teacher, student = Unsymmetric(1), Unsymmetric(2)
    for who, model in (("teacher", teacher), ("student", student)):
        model.register_forward_pre_hook(lambda *_, who=who: calls.__setitem__(who, calls[who] + 1))
    counts = {}
    for outputs in (False, True):
        calls.update(teacher=0, student=0)
        with Distiller(teacher, student, losses=athooks.loss("symmetry", outputs=outputs)) as d:
            for _ in range(2):
                student(SX)
                d.loss(target=SY).backward()
        counts[outputs] = dict(calls)
    assert counts[True] == counts[False]
    assert counts[True]["student"] == 2 * 2  # per step: the training forward and the flipped one
    # and with grad_at in the same step, still one flipped forward
    calls.update(teacher=0, student=0)
    with Distiller(teacher, student, losses=["grad_at", "symmetry", "input_grad_l2"]) as d:
        student(SX)
        d.loss(target=SY)
    assert calls["student"] == 2


def test_symmetry_options_are_shown_and_kept():
    fn = athooks.loss("symmetry", beta=2.0)
    assert (fn.outputs, fn.output_beta) == (True, None)
    assert repr(fn) == "Symmetry(beta=2, outputs=True, output_beta=beta)"
    fn = athooks.loss("symmetry", beta=2.0, output_beta=np.float32(0.5))
    assert type(fn.output_beta) is float and fn.output_beta == 0.5
    assert repr(fn) == "Symmetry(beta=2, outputs=True, output_beta=0.5)"
    assert repr(athooks.loss("symmetry", outputs=False)) == "Symmetry(beta=1, outputs=False)"


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
        *[
            ("symmetry", "output_beta", v, "symmetry: output_beta must be finite")
            for v in (NAN, INF)
        ],
        ("symmetry", "output_beta", -1.0, "symmetry: output_beta must be >= 0"),
        ("symmetry", "output_beta", "1", "symmetry: output_beta must be a real number.*got str"),
        ("symmetry", "output_beta", True, "symmetry: output_beta must be a real number.*got bool"),
        ("symmetry", "outputs", 1, "symmetry: outputs must be True or False, got 1"),
        ("symmetry", "outputs", "no", "symmetry: outputs must be True or False, got 'no'"),
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


# ------------------------------------------------------------------ N-d maps: 1-D signals, video


def paper_at_terms(t_feats, s_feats, p=2.0):
    """Q = sum_c |A_c|^p, q = Q / ||Q||_2 over all spatial cells, per sample (float64, by hand).

    Returns the per-pair "code" term (mean over batch and cells of (q_S - q_T)^2) and the
    "paper" term (batch mean of ||q_S - q_T||_2).
    """
    t, s = t_feats.double(), s_feats.double()
    q_t = t.abs().pow(p).sum(1).reshape(t.shape[0], -1)
    q_s = s.abs().pow(p).sum(1).reshape(s.shape[0], -1)
    q_t = q_t / q_t.pow(2).sum(1, keepdim=True).sqrt()
    q_s = q_s / q_s.pow(2).sum(1, keepdim=True).sqrt()
    diff = q_s - q_t
    return diff.pow(2).sum() / diff.numel(), diff.pow(2).sum(1).sqrt().mean()


@pytest.mark.parametrize("shape", [(3, 5, 11), (2, 4, 3, 5, 6)], ids=["1d", "3d"])
@pytest.mark.parametrize("distance", ["code", "paper"])
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_on_1d_and_3d_maps_against_the_paper(shape, distance, p):
    g = torch.Generator().manual_seed(7)
    a_t = torch.randn(*shape, generator=g, dtype=torch.float64)
    a_s = torch.randn(shape[0], shape[1] + 2, *shape[2:], generator=g, dtype=torch.float64)
    a_s.requires_grad_()
    at = athooks.loss("at", beta=3.0, distance=distance, p=p)
    ours = at.pair_loss(at.mapping(a_t), at.mapping(a_s))
    assert at.mapping(a_s).shape == (shape[0], *shape[2:])
    (grad,) = torch.autograd.grad(ours, a_s)
    ref_s = a_s.detach().clone().requires_grad_()
    code, paper = paper_at_terms(a_t, ref_s, p)
    ref = code if distance == "code" else paper
    (ref_grad,) = torch.autograd.grad(ref, ref_s)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-14)


def _up_linear_by_hand(x, size):
    """1-D linear interpolation with align_corners=False along the last axis, by hand."""
    n = x.shape[-1]
    out = []
    for i in range(size):
        src = min(max((i + 0.5) * n / size - 0.5, 0.0), n - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n - 1)
        w = src - lo
        out.append((1 - w) * x[..., lo] + w * x[..., hi])
    return torch.stack(out, -1)


def test_resize_map_on_1d_and_3d_maps():
    from athooks.losses.base import resize_map

    signal = torch.tensor([[1.0, 3.0, 5.0, 7.0, 2.0, 0.0]])
    # shrinking: the mean of the cells each output cell covers (area), mass kept per region
    assert resize_map(signal, (3,)).tolist() == [[2.0, 6.0, 1.0]]
    assert resize_map(signal, (2,)).tolist() == [[3.0, 3.0]]
    torch.testing.assert_close(
        resize_map(signal, (4,)), F.interpolate(signal[:, None], size=4, mode="area")[:, 0]
    )
    # growing: linear, align_corners=False
    up = resize_map(torch.tensor([[0.0, 1.0]]), (4,))
    torch.testing.assert_close(up, torch.tensor([[0.0, 0.25, 0.75, 1.0]]))
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(resize_map(x, (13,)), _up_linear_by_hand(x, 13))

    video = torch.rand(2, 4, 8, 6, generator=g, dtype=torch.float64)  # (B, T, H, W)
    small = resize_map(video, (2, 4, 3))
    blocks = video.reshape(2, 2, 2, 4, 2, 3, 2).mean((2, 4, 6))
    torch.testing.assert_close(small, blocks)
    torch.testing.assert_close(small.sum((1, 2, 3)) * 8, video.sum((1, 2, 3)))  # mass kept
    # one axis grows (T 4 -> 8), the others shrink: trilinear for all
    mixed = resize_map(video, (8, 4, 3))
    ref = F.interpolate(video[:, None], size=(8, 4, 3), mode="trilinear", align_corners=False)
    torch.testing.assert_close(mixed, ref[:, 0])
    # trilinear is separable: linear along each axis in turn, by hand
    grown = resize_map(video, (7, 9, 11))
    by_hand = _up_linear_by_hand(video, 11)
    by_hand = _up_linear_by_hand(by_hand.transpose(-1, -2), 9).transpose(-1, -2)
    by_hand = _up_linear_by_hand(by_hand.permute(0, 2, 3, 1), 7).permute(0, 3, 1, 2)
    torch.testing.assert_close(grown, by_hand)
    with pytest.raises(ConfigurationError, match=r"one size per spatial dimension"):
        resize_map(video, (4, 4))


def test_resize_map_2d_is_unchanged():
    """The 2-D path is the same F.interpolate calls as before N-d maps, bit for bit."""
    from athooks.losses.base import resize_map

    g = torch.Generator().manual_seed(11)
    m = torch.rand(3, 7, 9, generator=g)
    for size in ((3, 4), (7, 9), (7, 4), (14, 9), (5, 18), (10, 3)):
        if size[0] <= 7 and size[1] <= 9:
            ref = F.interpolate(m[:, None], size=size, mode="area")[:, 0]
        else:
            ref = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        assert torch.equal(resize_map(m, size), ref)


class Signal1d(nn.Module):
    """A 1-D CNN on (B, C, T): a stem, three stages (strides 1, 2, 2), pooling, a classifier."""

    def __init__(self, width: int, classes: int = 4, blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(2, width, 5, padding=2), nn.ReLU())

        def stage(c_in, c_out, stride):
            layers = []
            for i in range(blocks):
                layers += [
                    nn.Conv1d(c_in if i == 0 else c_out, c_out, 3, stride if i == 0 else 1, 1),
                    nn.BatchNorm1d(c_out),
                    nn.ReLU(),
                ]
            return nn.Sequential(*layers)

        self.layer1 = stage(width, width, 1)
        self.layer2 = stage(width, 2 * width, 2)
        self.layer3 = stage(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        h = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(h.mean(-1))


def _stage_outputs(model, names, run):
    """Run ``run()`` with plain forward hooks of the test's own on ``names``: their outputs."""
    got = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: got.__setitem__(n, out.detach().clone())
        )
        for n in names
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [got[n] for n in names]


def test_distiller_on_a_1d_conv_pair():
    torch.manual_seed(0)
    teacher, student = Signal1d(16, blocks=2), Signal1d(8)
    x = torch.randn(4, 2, 32)
    names = ["layer1", "layer2", "layer3"]
    t_ref = _stage_outputs(teacher, names, lambda: teacher.eval()(x))
    s_state = copy.deepcopy(student.state_dict())
    s_ref = _stage_outputs(student, names, lambda: copy.deepcopy(student)(x))
    student.load_state_dict(s_state)  # the copy's BatchNorm statistics were not ours
    teacher.train()
    with Distiller(teacher, student, layers="layer?") as d:
        out = student(x)
        loss = d.loss()
        (F.cross_entropy(out, torch.tensor([0, 1, 2, 3])) + loss).backward()
    ref = sum(paper_at_terms(t, s)[0] for t, s in zip(t_ref, s_ref, strict=True)) * 1e3
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-7)
    assert d.pairs == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert student.stem[0].weight.grad.abs().sum() > 0


def test_distiller_on_a_1d_pair_of_different_lengths_resizes_over_time():
    torch.manual_seed(1)
    teacher, student = Signal1d(16), Signal1d(8)
    x = torch.randn(3, 2, 32)
    t_out = _stage_outputs(teacher, ["layer2"], lambda: teacher.eval()(x))[0]  # T = 16
    s_out = _stage_outputs(student, ["layer3"], lambda: copy.deepcopy(student).eval()(x))[0]
    student.eval()
    with Distiller(teacher, student, layers={"layer2": "layer3"}) as d:
        student(x)
        loss = d.loss()
    # the teacher's map of 16 cells averaged down to the student's 8: pairs of cells
    q_t = t_out.double().pow(2).sum(1)
    q_t = q_t.reshape(3, 8, 2).mean(-1)
    q_s = s_out.double().pow(2).sum(1)
    q_t, q_s = F.normalize(q_t, dim=1), F.normalize(q_s, dim=1)
    torch.testing.assert_close(loss.double(), 1e3 * (q_s - q_t).pow(2).mean(), rtol=1e-4, atol=0)


def test_distiller_on_torchvision_video_r3d_to_mc3():
    """Video (B, C, T, H, W): the maps are (B, T, H, W); teacher maps of another T are resized."""
    from torchvision.models.video import mc3_18, r3d_18

    torch.manual_seed(0)
    teacher, student = r3d_18(weights=None, num_classes=5), mc3_18(weights=None, num_classes=5)
    x = torch.randn(2, 3, 4, 32, 32)
    names = ["layer1", "layer2", "layer3", "layer4"]
    t_ref = _stage_outputs(teacher, names, lambda: teacher.eval()(x))
    s_ref = _stage_outputs(student, names, lambda: copy.deepcopy(student).eval()(x))
    student.eval()  # the reference ran in eval mode too
    with Distiller(teacher, student, layers=names) as d:
        out = student(x)
        loss = d.loss()
    (out.sum() * 0 + loss).backward()
    assert d.pairs == [(n, n) for n in names]
    assert torch.isfinite(loss)
    # r3d halves T at layer2..4 (4, 2, 1, 1 frames), mc3 keeps 4: the teacher's maps are
    # interpolated along T (trilinear, align_corners=False), by hand: 2 -> 4 frames is
    # (t0, .75 t0 + .25 t1, .25 t0 + .75 t1, t1); 1 -> 4 repeats the frame
    terms = []
    for t, s in zip(t_ref, s_ref, strict=True):
        q_t, q_s = t.double().pow(2).sum(1), s.double().pow(2).sum(1)
        assert q_s.shape[1] == 4
        if q_t.shape[1] == 2:
            a, b = q_t[:, 0], q_t[:, 1]
            q_t = torch.stack([a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b], 1)
        elif q_t.shape[1] == 1:
            q_t = q_t.expand(-1, 4, -1, -1)
        assert q_t.shape == q_s.shape
        q_t, q_s = F.normalize(q_t.flatten(1), dim=1), F.normalize(q_s.flatten(1), dim=1)
        terms.append((q_s - q_t).pow(2).mean())
    torch.testing.assert_close(loss.double(), 1e3 * sum(terms), rtol=1e-4, atol=1e-8)
    assert student.stem[0].weight.grad is not None
    assert student.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_other_built_in_losses_on_1d_maps():
    """fact compares whole (B, C, T) maps; kd and the gradient losses do not read maps."""
    torch.manual_seed(2)
    teacher, student = Signal1d(8), Signal1d(8)
    x, y = torch.randn(3, 2, 16), torch.tensor([0, 1, 2])
    losses = [
        athooks.loss("fact"),
        athooks.loss("kd"),
        athooks.loss("grad_at"),
        athooks.loss("symmetry"),
        athooks.loss("input_grad_l2"),
    ]
    with Distiller(teacher, student, layers="layer?", losses=losses) as d:
        student(x)
        total = d.loss(target=y)
        terms = dict(d.terms)
    total.backward()
    assert set(terms) == {"fact", "kd", "grad_at", "symmetry", "input_grad_l2"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert student.stem[0].weight.grad.abs().sum() > 0
