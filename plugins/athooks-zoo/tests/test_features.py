"""FitNet, NST, FSP, AB and CWD against independent float64 re-derivations of their formulas.

Each reference below is written from the paper's equations and the authors' normalisation
choices with plain torch ops (loops where that is clearer), never calling the plugin's code;
learned parts (regressors, connectors) are set to known values and read back as constants.
"""

from __future__ import annotations

import math

import pytest
import torch
from athooks_zoo.features import AB, CWD, FSP, NST, SPECS, FitNet
from torch import Tensor, nn

import athooks
import athooks.plugin
from athooks import CaptureError, ConfigurationError
from athooks.plugin import Step

RTOL = 1e-6
DTYPE = torch.float64
_HAS_CONNECTORS = hasattr(athooks.plugin, "Connectors") and hasattr(athooks.plugin.Loss, "setup")


def make_step(loss, pairs, teachers, students) -> Step:
    """A hand-built step: the teacher maps detached, as the Distiller gives them."""
    f = loss.features
    return Step(pairs, [{f: t.detach()} for t in teachers], [{f: s} for s in students])


def names(n: int) -> list[tuple[str, str]]:
    return [(f"t{i}", f"s{i}") for i in range(n)]


def leaves(*shapes, seed=0, scale=1.0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        (scale * torch.randn(*shape, generator=g, dtype=DTYPE)).requires_grad_() for shape in shapes
    ]


def copies(xs: list[Tensor]) -> list[Tensor]:
    return [x.detach().clone().requires_grad_() for x in xs]


def close(got: Tensor, want: Tensor) -> None:
    torch.testing.assert_close(got.detach(), want.detach(), rtol=RTOL, atol=1e-12)


def check_value_and_grad(loss, pairs, teachers, students, reference) -> None:
    """The plugin's value and student gradients against the reference's."""
    got = loss(make_step(loss, pairs, teachers, students))
    got.backward()
    ref_students = copies(students)
    want = reference([t.detach() for t in teachers], ref_students)
    want.backward()
    close(got, want)
    for s, r in zip(students, ref_students, strict=True):
        assert s.grad is not None and s.grad.abs().sum() > 0
        close(s.grad, r.grad)


# ------------------------------------------------------------------ learned parts, made known


def known_connector(conn: nn.Module, seed: int) -> dict[str, Tensor | float | None]:
    """Set a built connector's conv and batch norm to known values; return them as constants.

    The connector must be a 1x1 convolution (any dimension, bias or not), a batch norm and at
    most a ReLU, in that order: what FitNet's ConvReg and the default Connector are.
    """
    convs = [m for m in conn.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    bns = [
        m for m in conn.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
    ]
    assert len(convs) == 1 and len(bns) == 1, conn
    conv, bn = convs[0], bns[0]
    assert all(k == 1 for k in conv.kernel_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (conv.weight, conv.bias, bn.weight, bn.bias):
            if p is not None:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.1)
    return {
        "w": conv.weight.detach().clone().reshape(conv.out_channels, conv.in_channels).double(),
        "b": None if conv.bias is None else conv.bias.detach().clone().double(),
        "gamma": bn.weight.detach().clone().double(),
        "beta": bn.bias.detach().clone().double(),
        "eps": float(bn.eps),
    }


def ref_conv_bn(x: Tensor, p: dict, relu: bool = False) -> Tensor:
    """A 1x1 convolution then training-mode batch norm (biased batch variance), per channel."""
    w, b = p["w"], p["b"]
    outs = []
    for o in range(w.shape[0]):
        y = sum(w[o, i] * x[:, i] for i in range(x.shape[1]))
        if b is not None:
            y = y + b[o]
        mean = y.mean()
        var = ((y - mean) ** 2).mean()
        y = (y - mean) / torch.sqrt(var + p["eps"]) * p["gamma"][o] + p["beta"][o]
        outs.append(torch.clamp(y, min=0) if relu else y)
    return torch.stack(outs, dim=1)


def avg_pool(x: Tensor, k: int) -> Tensor:
    """``k x k`` average pooling of ``(B, C, H, W)`` by reshaping (H and W multiples of k)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // k, k, w // k, k).mean(dim=(3, 5))


def build(loss, pairs, teachers, students) -> None:
    """Run the loss once in float32 so that its connectors are built, then make it float64."""
    loss.setup(pairs)
    loss(make_step(loss, pairs, [t.float() for t in teachers], [s.float() for s in students]))
    loss.double()


# ------------------------------------------------------------------ FitNet


@pytest.mark.parametrize("relu", [True, False])
def test_fitnet_is_the_hint_mse_through_convreg(relu):
    pairs = names(2)
    teachers = leaves((3, 6, 4, 4), (3, 5, 2, 2), seed=1)
    students = leaves((3, 4, 4, 4), (3, 3, 2, 2), seed=2)
    loss = FitNet(beta=100.0, relu=relu)
    build(loss, pairs, teachers, students)
    regs = [known_connector(loss.regressors[i], seed=10 + i) for i in range(2)]

    def reference(ts, ss):
        total = 0
        for t, s, p in zip(ts, ss, regs, strict=True):
            y = ref_conv_bn(s, p, relu=relu)
            total = total + ((y - t) ** 2).sum() / t.numel()
        return 100.0 * total

    check_value_and_grad(loss, pairs, teachers, students, reference)


def test_fitnet_pools_a_larger_student_map_to_the_teachers_size():
    pairs = names(1)
    teachers = leaves((2, 6, 2, 2), seed=3)
    students = leaves((2, 4, 4, 4), seed=4)
    loss = FitNet(beta=2.5)
    build(loss, pairs, teachers, students)
    p = known_connector(loss.regressors[0], seed=5)

    def reference(ts, ss):
        y = ref_conv_bn(avg_pool(ss[0], 2), p, relu=True)
        return 2.5 * ((y - ts[0]) ** 2).mean()

    check_value_and_grad(loss, pairs, teachers, students, reference)


def test_fitnet_interpolates_a_smaller_student_map_bilinearly():
    pairs = names(1)
    teachers = leaves((2, 6, 4, 4), seed=3)
    students = leaves((2, 4, 2, 2), seed=4)
    loss = FitNet(beta=1.0, relu=False)
    build(loss, pairs, teachers, students)
    p = known_connector(loss.regressors[0], seed=5)

    def reference(ts, ss):
        # bilinear, align_corners=False, 2 -> 4: output i samples input (i + 0.5) / 2 - 0.5,
        # clamped at the borders
        s = ss[0]
        rows = []
        for i in range(4):
            cols = []
            for j in range(4):
                y, x = (
                    min(max((i + 0.5) / 2 - 0.5, 0.0), 1.0),
                    min(max((j + 0.5) / 2 - 0.5, 0.0), 1.0),
                )
                y0, x0 = math.floor(y), math.floor(x)
                y1, x1 = min(y0 + 1, 1), min(x0 + 1, 1)
                dy, dx = y - y0, x - x0
                cols.append(
                    (1 - dy) * (1 - dx) * s[:, :, y0, x0]
                    + (1 - dy) * dx * s[:, :, y0, x1]
                    + dy * (1 - dx) * s[:, :, y1, x0]
                    + dy * dx * s[:, :, y1, x1]
                )
            rows.append(torch.stack(cols, dim=-1))
        up = torch.stack(rows, dim=-2)
        return ((ref_conv_bn(up, p) - ts[0]) ** 2).mean()

    check_value_and_grad(loss, pairs, teachers, students, reference)


# ------------------------------------------------------------------ NST


def ref_nst(ts, ss, beta=50.0, degree=2, c=0.0):
    total = 0
    for t, s in zip(ts, ss, strict=True):
        if t.shape[2] > s.shape[2]:
            t = avg_pool(t, t.shape[2] // s.shape[2])
        elif s.shape[2] > t.shape[2]:
            s = avg_pool(s, s.shape[2] // t.shape[2])
        per_sample = []
        for b in range(t.shape[0]):
            ft = [t[b, i].flatten() / torch.sqrt((t[b, i] ** 2).sum()) for i in range(t.shape[1])]
            fs = [s[b, j].flatten() / torch.sqrt((s[b, j] ** 2).sum()) for j in range(s.shape[1])]

            def k(x, y):
                return ((x * y).sum() + c) ** degree

            tt = sum(k(a, a2) for a in ft for a2 in ft) / len(ft) ** 2
            ss_ = sum(k(a, a2) for a in fs for a2 in fs) / len(fs) ** 2
            st = sum(k(a, a2) for a in fs for a2 in ft) / (len(fs) * len(ft))
            per_sample.append(tt + ss_ - 2 * st)
        total = total + sum(per_sample) / len(per_sample)
    return beta * total


@pytest.mark.parametrize(("degree", "c"), [(2, 0.0), (3, 0.5)])
def test_nst_is_the_polynomial_mmd_of_normalised_channels(degree, c):
    pairs = names(2)
    teachers = leaves((2, 5, 4, 4), (2, 3, 4, 2), seed=6)
    students = leaves((2, 3, 4, 4), (2, 4, 4, 2), seed=7)
    loss = NST(beta=50.0, degree=degree, c=c)
    check_value_and_grad(
        loss, pairs, teachers, students, lambda t, s: ref_nst(t, s, 50.0, degree, c)
    )


def test_nst_pools_the_larger_map_to_the_smaller():
    pairs = names(2)
    teachers = leaves((2, 5, 8, 8), (2, 3, 2, 2), seed=8)
    students = leaves((2, 3, 4, 4), (2, 4, 4, 4), seed=9)
    check_value_and_grad(NST(beta=3.0), pairs, teachers, students, lambda t, s: ref_nst(t, s, 3.0))


# ------------------------------------------------------------------ FSP


def ref_fsp_matrix(f1: Tensor, f2: Tensor) -> Tensor:
    if f1.shape[2] > f2.shape[2]:
        f1 = avg_pool(f1, f1.shape[2] // f2.shape[2])
    elif f2.shape[2] > f1.shape[2]:
        f2 = avg_pool(f2, f2.shape[2] // f1.shape[2])
    bsz, c1, c2 = f1.shape[0], f1.shape[1], f2.shape[1]
    hw = f1.shape[2] * f1.shape[3]
    rows = []
    for b in range(bsz):
        cells = [[(f1[b, i] * f2[b, j]).sum() / hw for j in range(c2)] for i in range(c1)]
        rows.append(torch.stack([torch.stack(r) for r in cells]))
    return torch.stack(rows)


def ref_fsp(ts, ss, beta, normalization):
    total = 0
    for j in range(len(ts) - 1):
        g_t = ref_fsp_matrix(ts[j], ts[j + 1])
        g_s = ref_fsp_matrix(ss[j], ss[j + 1])
        sq = (g_s - g_t) ** 2
        if normalization == "code":
            total = total + sq.sum() / sq.numel()
        else:
            total = total + sq.sum() / sq.shape[0]
    return beta * total


@pytest.mark.parametrize("normalization", ["code", "paper"])
def test_fsp_compares_the_flow_matrices_of_consecutive_layers(normalization):
    pairs = names(3)
    teachers = leaves((2, 3, 4, 4), (2, 4, 4, 4), (2, 2, 2, 2), seed=11)
    students = leaves((2, 3, 8, 8), (2, 4, 4, 4), (2, 2, 2, 2), seed=12)
    loss = FSP(beta=2.0, normalization=normalization)
    check_value_and_grad(
        loss, pairs, teachers, students, lambda t, s: ref_fsp(t, s, 2.0, normalization)
    )


def test_fsp_with_connectors_maps_the_student_to_the_teachers_widths():
    pairs = names(2)
    teachers = leaves((2, 3, 4, 4), (2, 4, 4, 4), seed=13)
    students = leaves((2, 2, 4, 4), (2, 5, 4, 4), seed=14)
    loss = FSP(connector=True)
    build(loss, pairs, teachers, students)
    conns = [known_connector(loss.connectors[i], seed=20 + i) for i in range(2)]

    def reference(ts, ss):
        return ref_fsp(ts, [ref_conv_bn(s, p) for s, p in zip(ss, conns, strict=True)], 1.0, "code")

    check_value_and_grad(loss, pairs, teachers, students, reference)


# ------------------------------------------------------------------ AB


def ref_ab(ts, rs, beta, margin, layer_weights):
    n = len(ts)
    total = 0
    for j, (t, r) in enumerate(zip(ts, rs, strict=True)):
        flat_t, flat_r = t.flatten(), r.flatten()
        cost = 0
        for tv, rv in zip(flat_t, flat_r, strict=True):
            if tv > 0:  # the teacher's neuron is active: keep r at least margin above 0
                cost = cost + (torch.clamp(margin - rv, min=0) ** 2)
            else:  # inactive: keep r at least margin below 0
                cost = cost + (torch.clamp(margin + rv, min=0) ** 2)
        w = 2.0 ** (j - n + 1) if layer_weights == "code" else 1.0
        total = total + w * cost / t.shape[0] * 3 / 1000
    return beta * total


@pytest.mark.parametrize(
    ("margin", "layer_weights", "connector"), [(1.0, "code", None), (0.5, "equal", True)]
)
def test_ab_is_the_margin_boundary_loss_through_the_connector(margin, layer_weights, connector):
    pairs = names(2)
    teachers = leaves((2, 4, 3, 3), (2, 3, 2, 2), seed=15)
    students = leaves((2, 2, 3, 3), (2, 3, 2, 2), seed=16)  # the second pair: equal widths
    loss = AB(beta=1.5, margin=margin, layer_weights=layer_weights, connector=connector)
    build(loss, pairs, teachers, students)
    p0 = known_connector(loss.connectors[0], seed=30)
    p1 = known_connector(loss.connectors[1], seed=31) if connector else None
    assert loss.connectors[1].built == bool(connector)  # None: the identity at equal widths

    def reference(ts, ss):
        rs = [ref_conv_bn(ss[0], p0), ss[1] if p1 is None else ref_conv_bn(ss[1], p1)]
        return ref_ab(ts, rs, 1.5, margin, layer_weights)

    check_value_and_grad(loss, pairs, teachers, students, reference)


# ------------------------------------------------------------------ CWD


def ref_cwd(ts, ss, weight, tau):
    total = 0
    for t, s in zip(ts, ss, strict=True):
        bsz, c = t.shape[:2]
        kl = 0
        for b in range(bsz):
            for ch in range(c):
                zt, zs = t[b, ch].flatten() / tau, s[b, ch].flatten() / tau
                p = torch.exp(zt) / torch.exp(zt).sum()
                q = torch.exp(zs) / torch.exp(zs).sum()
                kl = kl + (p * (torch.log(p) - torch.log(q))).sum()
        total = total + kl * tau**2 / (bsz * c)
    return weight * total


@pytest.mark.parametrize("tau", [4.0, 1.0])
def test_cwd_is_the_channel_wise_spatial_kl(tau):
    pairs = names(2)
    teachers = leaves((2, 3, 4, 4), (2, 2, 3, 5), seed=17, scale=3.0)
    students = leaves((2, 3, 4, 4), (2, 2, 3, 5), seed=18, scale=3.0)
    loss = CWD(weight=3.0, tau=tau)
    loss.setup(pairs)
    check_value_and_grad(loss, pairs, teachers, students, lambda t, s: ref_cwd(t, s, 3.0, tau))
    assert not any(c.built for c in loss.connectors)  # equal widths: no connector used


def test_cwd_connects_a_student_of_another_width():
    pairs = names(2)
    teachers = leaves((2, 4, 3, 3), (2, 2, 2, 2), seed=19)
    students = leaves((2, 2, 3, 3), (2, 2, 2, 2), seed=20)
    loss = CWD(weight=1.0, tau=2.0)
    build(loss, pairs, teachers, students)
    p = known_connector(loss.connectors[0], seed=40)
    assert not loss.connectors[1].built

    def reference(ts, ss):
        return ref_cwd(ts, [ref_conv_bn(ss[0], p), ss[1]], 1.0, 2.0)

    check_value_and_grad(loss, pairs, teachers, students, reference)


# ------------------------------------------------------------------ registry and options


def test_specs_name_every_method():
    assert [s.name for s in SPECS] == ["fitnet", "nst", "fsp", "ab", "cwd"]
    for spec in SPECS:
        made = spec.factory()
        assert made.name == spec.name and spec.summary
        assert repr(made)


@pytest.mark.parametrize(
    ("cls", "options", "match"),
    [
        (FitNet, {"beta": -1.0}, "fitnet: beta must be >= 0"),
        (FitNet, {"beta": float("nan")}, "fitnet: beta must be finite"),
        (FitNet, {"beta": True}, "fitnet: beta must be a real number"),
        (FitNet, {"beta": "100"}, "fitnet: beta must be a real number"),
        (FitNet, {"relu": 1}, "fitnet: relu must be True or False"),
        (NST, {"beta": float("inf")}, "nst: beta must be finite"),
        (NST, {"degree": 0}, "nst: degree must be a positive integer"),
        (NST, {"degree": 2.5}, "nst: degree must be a positive integer"),
        (NST, {"c": -0.1}, "nst: c must be >= 0"),
        (FSP, {"beta": -2}, "fsp: beta must be >= 0"),
        (FSP, {"normalization": "sum"}, "fsp: normalization must be one of 'code', 'paper'"),
        (FSP, {"connector": "yes"}, "fsp: connector must be True or False"),
        (AB, {"beta": -1}, "ab: beta must be >= 0"),
        (AB, {"margin": -1.0}, "ab: margin must be >= 0"),
        (AB, {"margin": float("nan")}, "ab: margin must be finite"),
        (AB, {"layer_weights": "paper"}, "ab: layer_weights must be one of 'code', 'equal'"),
        (AB, {"connector": 1}, "ab: connector must be None"),
        (CWD, {"weight": -3.0}, "cwd: weight must be >= 0"),
        (CWD, {"tau": 0.0}, "cwd: tau must be > 0"),
        (CWD, {"tau": float("inf")}, "cwd: tau must be finite"),
        (CWD, {"connector": "auto"}, "cwd: connector must be None"),
    ],
)
def test_options_are_checked(cls, options, match):
    with pytest.raises(ConfigurationError, match=match):
        cls(**options)


# ------------------------------------------------------------------ shape errors


def every_loss():
    return [FitNet(), NST(), FSP(), AB(), CWD()]


@pytest.mark.parametrize("loss", every_loss(), ids=lambda x: x.name)
def test_a_batch_mismatch_is_refused(loss):
    pairs = names(2)
    loss.setup(pairs)
    t = [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)]
    s = [torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)]
    with pytest.raises(CaptureError, match=r"batch sizes differ .* teacher 2, student 3"):
        loss(make_step(loss, pairs, t, s))


@pytest.mark.parametrize("loss", every_loss(), ids=lambda x: x.name)
def test_maps_of_other_layouts_are_refused(loss):
    pairs = names(2)
    loss.setup(pairs)
    t = [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)]
    with pytest.raises(CaptureError, match="different layouts"):
        loss(make_step(loss, pairs, t, [torch.randn(2, 4, 16), torch.randn(2, 4, 16)]))
    with pytest.raises(CaptureError, match=r"needs feature maps \(B, C, \*S\)"):
        loss(make_step(loss, pairs, t, [torch.randn(2, 4), torch.randn(2, 4)]))


@pytest.mark.parametrize("loss", [FitNet(), AB(), CWD(), FSP(connector=True)], ids=lambda x: x.name)
def test_a_learned_loss_without_setup_says_so(loss):
    pairs = names(2)
    t = [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)]
    with pytest.raises(CaptureError, match=r"call loss.setup\(pairs\)"):
        loss(make_step(loss, pairs, t, [x.clone() for x in t]))


def test_fsp_needs_two_pairs_and_equal_widths_without_connectors():
    loss = FSP()
    with pytest.raises(CaptureError, match="at least two layer pairs; got 1"):
        loss(make_step(loss, names(1), [torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 4, 4)]))
    t = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)]
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4)]
    with pytest.raises(CaptureError, match=r"teacher width 4 and student width 6.*connector=True"):
        loss(make_step(loss, names(2), t, s))


@pytest.mark.parametrize("loss", [AB(), CWD()], ids=lambda x: x.name)
def test_neuron_wise_losses_refuse_other_spatial_sizes(loss):
    loss.setup(names(1))
    t, s = [torch.randn(2, 4, 4, 4)], [torch.randn(2, 4, 8, 8)]
    with pytest.raises(CaptureError, match=r"teacher \(4, 4\) and student \(8, 8\)"):
        loss(make_step(loss, names(1), t, s))


@pytest.mark.parametrize("loss", [AB(connector=False), CWD(connector=False)], ids=["ab", "cwd"])
def test_connector_false_refuses_other_widths(loss):
    t, s = [torch.randn(2, 4, 4, 4)], [torch.randn(2, 3, 4, 4)]
    with pytest.raises(CaptureError, match=r"teacher width 4 and student width 3.*connector=None"):
        loss(make_step(loss, names(1), t, s))


def test_other_layouts_work_one_dimensional_and_video():
    for shape_t, shape_s in [((2, 4, 9), (2, 3, 9)), ((2, 4, 2, 3, 3), (2, 3, 2, 3, 3))]:
        for loss in [FitNet(), NST(), AB(), CWD(), FSP(connector=True)]:
            pairs = names(2)
            loss.setup(pairs)
            t = [torch.randn(*shape_t), torch.randn(*shape_t)]
            s = [torch.randn(*shape_s, requires_grad=True), torch.randn(*shape_s)]
            value = loss(make_step(loss, pairs, t, s))
            value.backward()
            assert torch.isfinite(value) and s[0].grad is not None


# ------------------------------------------------------------------ through the Distiller


class TinyNet(nn.Module):
    """Two blocks (b1 at stride 1, b2 at stride 2, pre-ReLU outputs) and a classifier."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width))
        self.b2 = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.b2(self.b1(x)))


@pytest.mark.skipif(
    not _HAS_CONNECTORS,
    reason="needs the core's Connectors and Loss.setup (the lead's plugin API, not on main yet)",
)
@pytest.mark.parametrize(
    ("make", "learned"),
    [
        (lambda: FitNet(), True),
        (lambda: NST(), False),
        (lambda: FSP(connector=True), True),
        (lambda: AB(), True),
        (lambda: CWD(), True),
    ],
    ids=["fitnet", "nst", "fsp", "ab", "cwd"],
)
def test_through_the_distiller_on_models_of_different_widths(make, learned):
    torch.manual_seed(0)
    teacher, student = TinyNet(16), TinyNet(8)
    loss = make()
    with athooks.Distiller(teacher, student, layers=[("b1", "b1"), ("b2", "b2")], losses=loss) as d:
        own = list(d.parameters())
        student(torch.randn(4, 3, 8, 8))
        value = d.loss()
        assert value.dim() == 0 and torch.isfinite(value)
        value.backward()
    assert student.b1[0].weight.grad is not None and student.b1[0].weight.grad.abs().sum() > 0
    learned_params = list(loss.parameters())
    assert bool(learned_params) == learned
    if learned:
        ids = {id(p) for p in own}
        assert all(id(p) in ids for p in learned_params)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learned_params)


@pytest.mark.skipif(
    not _HAS_CONNECTORS,
    reason="needs the core's Connectors and Loss.setup (the lead's plugin API, not on main yet)",
)
def test_fsp_through_the_distiller_on_models_of_equal_widths():
    torch.manual_seed(0)
    teacher, student = TinyNet(8), TinyNet(8)
    with athooks.Distiller(
        teacher, student, layers=[("b1", "b1"), ("b2", "b2")], losses=FSP()
    ) as d:
        student(torch.randn(4, 3, 8, 8))
        value = d.loss()
        value.backward()
    assert torch.isfinite(value) and student.b1[0].weight.grad.abs().sum() > 0


@pytest.mark.skipif(
    not _HAS_CONNECTORS,
    reason="needs the core's Connectors and Loss.setup (the lead's plugin API, not on main yet)",
)
@pytest.mark.parametrize("make", [FitNet, AB, CWD], ids=["fitnet", "ab", "cwd"])
def test_learned_parts_round_trip_through_the_distillers_state_dict(make):
    torch.manual_seed(0)
    teacher, student = TinyNet(16), TinyNet(8)
    x = torch.randn(4, 3, 8, 8)
    layers = [("b1", "b1"), ("b2", "b2")]
    with athooks.Distiller(teacher, student, layers=layers, losses=make()) as d:
        list(d.parameters())  # what an optimiser would be given
        student(x)
        before = d.loss().detach()
        state = d.state_dict()
    with athooks.Distiller(teacher, student, layers=layers, losses=make()) as d:
        d.load_state_dict(state)  # builds the connectors from the checkpoint
        list(d.parameters())
        student(x)
        close(d.loss(), before)


@pytest.mark.skipif(
    not _HAS_CONNECTORS,
    reason="needs the core's Connectors and Loss.setup (the lead's plugin API, not on main yet)",
)
def test_an_unused_connector_placeholder_does_not_trouble_the_optimiser():
    torch.manual_seed(0)
    teacher, student = TinyNet(8), TinyNet(8)  # equal widths: AB's connectors stay unbuilt
    loss = AB()
    with athooks.Distiller(teacher, student, layers=[("b1", "b1"), ("b2", "b2")], losses=loss) as d:
        opt = torch.optim.SGD([*student.parameters(), *d.parameters()], lr=0.1, momentum=0.9)
        for _ in range(2):
            student(torch.randn(4, 3, 8, 8))
            value = d.loss()
            opt.zero_grad()
            value.backward()
            opt.step()
        assert torch.isfinite(value)
        assert not any(c.built for c in loss.connectors)


def test_per_pair_weights_of_the_core_apply_and_fsp_refuses_them():
    pairs = names(2)
    t = [torch.randn(2, 4, 4, 4), torch.randn(2, 3, 2, 2)]
    s = [torch.randn(2, 2, 4, 4), torch.randn(2, 5, 2, 2)]
    loss = NST()
    whole = loss(make_step(loss, pairs, t, s))
    loss.pair_weights = [1.0, 0.0]
    first = loss(make_step(loss, pairs, t, s))
    loss.pair_weights = [0.0, 2.0]
    second = loss(make_step(loss, pairs, t, s))
    close(first + second / 2, whole)
    fsp = FSP()
    fsp.pair_weights = [1.0, 1.0]
    same = [x.clone() for x in t]
    with pytest.raises(ConfigurationError, match="per-pair weights .* do not apply"):
        fsp(make_step(fsp, pairs, t, same))
