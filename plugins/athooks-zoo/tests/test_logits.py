"""The zoo's logit methods: DKD, DIST and logit standardisation (on KD and DKD).

Fidelity tests compare the value and the gradient w.r.t. the student's logits with an independent
float64 re-derivation from the papers' equations (loops over samples and classes, plain torch
ops, none of the plugin's code), with the authors' normalisation choices.
"""

from __future__ import annotations

import math

import pytest
import torch
from athooks_zoo import logits as zoo_logits
from athooks_zoo.logits import DIST, DKD, LogitStandardization
from torch import nn

import athooks
from athooks.plugin import Step

torch.set_default_dtype(torch.float32)

B, C = 5, 7
REL = 1e-6


def _logits(seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z_s = (scale * torch.randn(B, C, generator=g, dtype=torch.float64)).requires_grad_(True)
    z_t = scale * torch.randn(B, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    return z_s, z_t, y


def _step(z_s, z_t, y=None, **kw) -> Step:
    return Step([], [], [], student_output=z_s, teacher_output=z_t, target=y, **kw)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == torch.float64 and b.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=REL, atol=1e-12)


def _value_and_grad(fn, z_s):
    z = z_s.detach().clone().requires_grad_(True)
    value = fn(z)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


# -- independent references ------------------------------------------------------------------------


def _softmax_row(v: torch.Tensor) -> torch.Tensor:
    e = torch.stack([torch.exp(v[k] - v.max()) for k in range(v.shape[0])])
    return e / e.sum()


def _kl(p: list, q: list) -> torch.Tensor:
    """KL(p || q) = sum_k p_k log(p_k / q_k), terms with p_k = 0 dropped."""
    out = torch.zeros((), dtype=torch.float64)
    for pk, qk in zip(p, q, strict=True):
        if float(pk) > 0:
            out = out + pk * torch.log(pk / qk)
    return out


def ref_kd(z_s, z_t, temperature, weight):
    """Hinton KD: weight * T^2 / B * sum_i KL(p_T || p_S) with p = softmax(z / T)."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(z_s.shape[0]):
        p_s = _softmax_row(z_s[i] / temperature)
        p_t = _softmax_row(z_t[i] / temperature)
        total = total + _kl(list(p_t), list(p_s))
    return weight * temperature**2 * total / z_s.shape[0]


def ref_dkd(z_s, z_t, y, alpha, beta, temperature):
    """Zhao et al. Eq. (DKD = alpha TCKD + beta NCKD), both KLs summed per sample, mean over B, T^2."""
    total = torch.zeros((), dtype=torch.float64)
    n = z_s.shape[0]
    for i in range(n):
        g = int(y[i])
        p_s = _softmax_row(z_s[i] / temperature)
        p_t = _softmax_row(z_t[i] / temperature)
        b_s = [p_s[g], 1 - p_s[g]]
        b_t = [p_t[g], 1 - p_t[g]]
        tckd = _kl(b_t, b_s)
        others = [k for k in range(z_s.shape[1]) if k != g]
        hat_s = [p_s[k] / (1 - p_s[g]) for k in others]
        hat_t = [p_t[k] / (1 - p_t[g]) for k in others]
        nckd = _kl(hat_t, hat_s)
        total = total + alpha * tckd + beta * nckd
    return temperature**2 * total / n


def _pearson(u: list, v: list, eps: float) -> torch.Tensor:
    n = len(u)
    mu = sum(u) / n
    mv = sum(v) / n
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v, strict=True))
    su = torch.sqrt(sum((a - mu) ** 2 for a in u))
    sv = torch.sqrt(sum((b - mv) ** 2 for b in v))
    return cov / (su * sv + eps)


def _pearson_stats(u: list, v: list) -> torch.Tensor:
    """The textbook form: cov / (sigma_u sigma_v), population statistics."""
    n = len(u)
    mu = sum(u) / n
    mv = sum(v) / n
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v, strict=True)) / n
    su = torch.sqrt(sum((a - mu) ** 2 for a in u) / n)
    sv = torch.sqrt(sum((b - mv) ** 2 for b in v) / n)
    return cov / (su * sv)


def ref_dist(z_s, z_t, beta, gamma, tau, eps=None):
    n, c = z_s.shape
    y_s = [_softmax_row(z_s[i] / tau) for i in range(n)]
    y_t = [_softmax_row(z_t[i] / tau) for i in range(n)]

    def corr(u, v):
        return _pearson_stats(u, v) if eps is None else _pearson(u, v, eps)

    inter = sum(1 - corr(list(y_s[i]), list(y_t[i])) for i in range(n)) / n
    intra = (
        sum(
            1 - corr([y_s[i][j] for i in range(n)], [y_t[i][j] for i in range(n)]) for j in range(c)
        )
        / c
    )
    return tau**2 * (beta * inter + gamma * intra)


def ref_standardize(z, form):
    rows = []
    for i in range(z.shape[0]):
        row = z[i]
        c = row.shape[0]
        m = sum(row[k] for k in range(c)) / c
        ss = sum((row[k] - m) ** 2 for k in range(c))
        sd = torch.sqrt(ss / (c - 1)) + 1e-7 if form == "code" else torch.sqrt(ss / c)
        rows.append(torch.stack([(row[k] - m) / sd for k in range(c)]))
    return torch.stack(rows)


# -- fidelity --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "beta", "temperature", "seed"),
    [(1.0, 8.0, 4.0, 0), (1.0, 0.5, 1.0, 1), (0.0, 2.0, 2.5, 2), (3.0, 0.0, 4.0, 3)],
)
def test_dkd_fidelity(alpha, beta, temperature, seed):
    z_s, z_t, y = _logits(seed)
    loss = DKD(alpha=alpha, beta=beta, temperature=temperature)
    got, g_got = _value_and_grad(lambda z: loss(_step(z, z_t, y)), z_s)
    want, g_want = _value_and_grad(lambda z: ref_dkd(z, z_t, y, alpha, beta, temperature), z_s)
    _close(got, want)
    _close(g_got, g_want)


def test_dkd_fidelity_column_target_and_dict_outputs():
    z_s, z_t, y = _logits(5)
    loss = DKD()
    got = loss(_step({"logits": z_s}, (z_t, None), y.reshape(-1, 1)))
    _close(got.detach(), ref_dkd(z_s, z_t, y, 1.0, 8.0, 4.0).detach())


@pytest.mark.parametrize(
    ("beta", "gamma", "tau", "seed"), [(1.0, 1.0, 1.0, 0), (1.0, 1.0, 4.0, 1), (2.0, 0.5, 2.0, 2)]
)
def test_dist_fidelity(beta, gamma, tau, seed):
    z_s, z_t, _ = _logits(seed)
    loss = DIST(beta=beta, gamma=gamma, tau=tau)
    got, g_got = _value_and_grad(lambda z: loss(_step(z, z_t)), z_s)
    want, g_want = _value_and_grad(lambda z: ref_dist(z, z_t, beta, gamma, tau, eps=1e-8), z_s)
    _close(got, want)
    _close(g_got, g_want)


def test_dist_paper_form_is_textbook_pearson():
    z_s, z_t, _ = _logits(7)
    loss = DIST(eps=0.0, tau=4.0)
    got, g_got = _value_and_grad(lambda z: loss(_step(z, z_t)), z_s)
    want, g_want = _value_and_grad(lambda z: ref_dist(z, z_t, 1.0, 1.0, 4.0), z_s)
    _close(got, want)
    _close(g_got, g_want)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_logit_std_kd_fidelity(form):
    z_s, z_t, _ = _logits(11, scale=5.0)
    loss = LogitStandardization("kd", form=form)  # the authors' temperature 2, weight 9
    assert loss.inner.temperature == 2.0 and loss.inner.weight == 9.0
    got, g_got = _value_and_grad(lambda z: loss(_step(z, z_t)), z_s)

    def ref(z):
        return ref_kd(ref_standardize(z, form), ref_standardize(z_t, form), 2.0, 9.0)

    want, g_want = _value_and_grad(ref, z_s)
    _close(got, want)
    _close(g_got, g_want)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_logit_std_dkd_fidelity(form):
    z_s, z_t, y = _logits(12, scale=5.0)
    loss = LogitStandardization("dkd", form=form)  # alpha 9, beta 72, T 2 as the authors
    assert (loss.inner.alpha, loss.inner.beta, loss.inner.temperature) == (9.0, 72.0, 2.0)
    got, g_got = _value_and_grad(lambda z: loss(_step(z, z_t, y)), z_s)

    def ref(z):
        return ref_dkd(ref_standardize(z, form), ref_standardize(z_t, form), y, 9.0, 72.0, 2.0)

    want, g_want = _value_and_grad(ref, z_s)
    _close(got, want)
    _close(g_got, g_want)


def test_logit_std_of_built_loss_objects_keeps_their_options():
    z_s, z_t, y = _logits(13)
    inner = DKD(alpha=1.0, beta=8.0, temperature=4.0)
    loss = LogitStandardization(inner)
    assert loss.inner is inner and loss.name == "logit_std(dkd)"
    got = loss(_step(z_s, z_t, y))
    want = ref_dkd(ref_standardize(z_s, "code"), ref_standardize(z_t, "code"), y, 1.0, 8.0, 4.0)
    _close(got.detach(), want.detach())
    kd = athooks.loss("kd", weight=0.5, temperature=3.0)
    got = LogitStandardization(kd)(_step(z_s, z_t))
    want = ref_kd(ref_standardize(z_s, "code"), ref_standardize(z_t, "code"), 3.0, 0.5)
    _close(got.detach(), want.detach())


def test_logit_std_options_override_the_authors_settings():
    loss = LogitStandardization("kd", temperature=4.0)
    assert loss.inner.temperature == 4.0 and loss.inner.weight == 9.0
    loss = LogitStandardization("dist", tau=2.0)
    assert loss.inner.tau == 2.0 and loss.name == "logit_std(dist)"


def test_logit_std_is_scale_and_shift_invariant():
    z_s, z_t, y = _logits(14)
    loss = LogitStandardization("dkd")
    a = loss(_step(z_s, z_t, y))
    b = loss(_step(3.0 * z_s + 2.0, 0.5 * z_t - 1.0, y))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


# -- DKD warm-up -----------------------------------------------------------------------------------


def test_dkd_warmup_ramps_per_training_step_and_is_saved():
    z_s, z_t, y = _logits(3)
    full = DKD()(_step(z_s, z_t, y)).detach()
    loss = DKD(warmup_steps=3)
    values = [loss(_step(z_s, z_t, y)).detach() for _ in range(4)]
    for got, factor in zip(values, [1 / 3, 2 / 3, 1.0, 1.0], strict=True):
        torch.testing.assert_close(got, factor * full)
    assert int(loss.state_dict()["steps_done"]) == 4
    with torch.no_grad():  # a validation call does not count
        loss(_step(z_s, z_t, y))
    assert int(loss.steps_done) == 4
    fresh = DKD(warmup_steps=3)
    fresh.load_state_dict(loss.state_dict())
    torch.testing.assert_close(fresh(_step(z_s, z_t, y)).detach(), full)
    assert "steps_done" not in DKD().state_dict()


# -- option validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "options", "match"),
    [
        (DKD, {"alpha": -1.0}, r"alpha must be >= 0 \(a negative weight"),
        (DKD, {"beta": float("nan")}, "beta must be finite"),
        (DKD, {"beta": "8"}, "beta must be a real number"),
        (DKD, {"alpha": True}, "alpha must be a real number"),
        (DKD, {"alpha": torch.tensor(1.0)}, r"alpha=t.item\(\)"),
        (DKD, {"temperature": 0.0}, "temperature must be > 0"),
        (DKD, {"temperature": float("inf")}, "temperature must be finite"),
        (DKD, {"warmup_steps": -1}, "warmup_steps must be a whole number >= 0"),
        (DKD, {"warmup_steps": 2.5}, "warmup_steps must be a whole number"),
        (DIST, {"beta": -0.1}, "beta must be >= 0"),
        (DIST, {"gamma": float("inf")}, "gamma must be finite"),
        (DIST, {"tau": 0}, "tau must be > 0"),
        (DIST, {"eps": -1e-8}, "eps must be >= 0"),
        (LogitStandardization, {"form": "standard"}, "form must be 'code'"),
        (LogitStandardization, {"loss": 3}, "loss must be a logit loss's name"),
        (LogitStandardization, {"loss": "dkd", "alpha": -1.0}, "alpha must be >= 0"),
        (LogitStandardization, {"loss": "dkd", "weight": 1.0}, "does not take the options"),
    ],
)
def test_option_errors(factory, options, match):
    with pytest.raises(athooks.ConfigurationError, match=match):
        factory(**options)


def test_logit_std_refusals():
    with pytest.raises(athooks.ConfigurationError, match="already built"):
        LogitStandardization(DKD(), alpha=2.0)
    with pytest.raises(athooks.ConfigurationError, match="reads none"):
        LogitStandardization(athooks.loss("at"))
    with pytest.raises(athooks.ConfigurationError, match="already standardises"):
        LogitStandardization(LogitStandardization("kd"))
    z = torch.randn(3, 1)
    with pytest.raises(athooks.ConfigurationError, match="two classes or more"):
        LogitStandardization("kd")(_step(z, z))


# -- shape and output errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss", [DKD(), DIST(), LogitStandardization("kd"), LogitStandardization("dkd")]
)
def test_mismatch_errors(loss):
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(athooks.ConfigurationError, match="same classes"):
        loss(_step(torch.randn(4, 5), torch.randn(4, 6), y))
    with pytest.raises(athooks.CaptureError, match="same batch"):
        loss(_step(torch.randn(4, 5), torch.randn(3, 5), y))
    with pytest.raises(athooks.CaptureError, match=r"student's class logits.*shape \(4, 5, 2\)"):
        loss(_step(torch.randn(4, 5, 2), torch.randn(4, 5), y))
    with pytest.raises(athooks.CaptureError, match=r"teacher returned a dict with keys \['out'\]"):
        loss(_step(torch.randn(4, 5), {"out": torch.randn(4, 5)}, y))


def test_dkd_target_errors():
    z = torch.randn(4, 5)
    with pytest.raises(athooks.CaptureError, match="needs the labels"):
        DKD()(_step(z, z))
    with pytest.raises(athooks.CaptureError, match=r"class indices.*y.argmax\(1\)"):
        DKD()(_step(z, z, torch.rand(4, 5)))
    with pytest.raises(athooks.CaptureError, match="has 3 labels"):
        DKD()(_step(z, z, torch.tensor([0, 1, 2])))
    with pytest.raises(athooks.CaptureError, match=r"in \[0, 5\).*from 0 to 5"):
        DKD()(_step(z, z, torch.tensor([0, 1, 2, 5])))


def test_dist_warns_once_for_a_single_sample():
    z = torch.randn(1, 5, requires_grad=True)
    loss = DIST()
    with pytest.warns(UserWarning, match="batch of one"):
        loss(_step(z, torch.randn(1, 5)))
    assert math.isfinite(float(loss(_step(z, torch.randn(1, 5))).detach()))


def test_half_precision_logits_are_computed_in_float32():
    z_s = torch.randn(4, 5).half().requires_grad_(True)
    z_t = torch.randn(4, 5).bfloat16()
    y = torch.tensor([0, 1, 2, 3])
    for loss in (DKD(), DIST(), LogitStandardization("dkd")):
        value = loss(_step(z_s, z_t, y))
        assert value.dtype == torch.float32 and torch.isfinite(value)


def test_specs_and_names():
    names = [spec.name for spec in zoo_logits.SPECS]
    assert names == ["dkd", "dist", "logit_std"]
    assert LogitStandardization("kd").name == "logit_std(kd)"
    assert all(cls.needs_teacher_output for cls in (DKD, DIST, LogitStandardization))
    print(DKD(warmup_steps=5), DIST(), LogitStandardization("kd"))


# -- through the Distiller -------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self, width: int, classes: int = 6) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b2(self.b1(x)).mean((2, 3)))


@pytest.mark.parametrize(
    ("make", "label"),
    [
        (lambda: DKD(), "dkd"),
        (lambda: DIST(), "dist"),
        (lambda: LogitStandardization("kd"), "logit_std(kd)"),
        (lambda: LogitStandardization("dkd"), "logit_std(dkd)"),
    ],
)
def test_through_the_distiller(make, label):
    torch.manual_seed(0)
    teacher, student = Tiny(16), Tiny(8)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 2, 2])
    with athooks.Distiller(
        teacher, student, layers=[("b1", "b1"), ("b2", "b2")], losses=make()
    ) as d:
        student(x)
        total = d.loss(target=y)
        assert torch.isfinite(total) and list(d.terms) == [label]
        total.backward()
    assert student.fc.weight.grad is not None and student.fc.weight.grad.abs().sum() > 0
    assert student.b1[0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_logit_std_dist_through_the_distiller_with_dict_outputs():
    class DictOut(Tiny):
        def forward(self, x):
            return {"logits": super().forward(x), "aux": 0}

    teacher, student = DictOut(16), DictOut(8)
    with athooks.Distiller(teacher, student, layers=[], losses=LogitStandardization("dist")) as d:
        student(torch.randn(4, 3, 8, 8))
        total = d.loss()
    assert torch.isfinite(total) and list(d.terms) == ["logit_std(dist)"]


# -- through the registry --------------------------------------------------------------------------


@pytest.fixture
def zoo_registered():
    """The zoo's plugin registered, by hand where the package is not installed."""
    from athooks_zoo import plugin

    pm = athooks.get_plugin_manager()
    added = "dkd" not in athooks.list_losses()
    if added:
        pm.register(plugin, name="athooks-zoo-test")
    yield
    if added:
        pm.unregister(plugin)


def test_by_name(zoo_registered):
    assert isinstance(athooks.loss("dkd", beta=2.0), DKD)
    assert isinstance(athooks.loss("dist", tau=4.0), DIST)
    std = athooks.loss("logit_std", loss="kd")
    assert isinstance(std, LogitStandardization) and std.name == "logit_std(kd)"
    wrapped = athooks.loss("logit_std", loss=athooks.loss("dkd"), form="paper")
    assert wrapped.name == "logit_std(dkd)" and wrapped.inner.beta == 8.0
    with pytest.raises(athooks.ConfigurationError, match="alpha must be >= 0"):
        athooks.loss("dkd", alpha=-1.0)


def test_logit_std_forwards_setup_captures_and_needs():
    from athooks.plugin import Features, Loss

    class Recorder(Loss):
        name = "recorder"
        needs_teacher_output = True
        needs_embedding = True

        def __init__(self):
            super().__init__()
            self.features = Features()
            self.pairs = None

        def captures(self):
            return (self.features,)

        def setup(self, pairs):
            super().setup(pairs)
            self.pairs = list(pairs)

        def forward(self, step):
            return step.student_output.sum() * 0

    inner = Recorder()
    loss = LogitStandardization(inner)
    loss.setup([("b1", "b1")])
    assert inner.pairs == [("b1", "b1")]
    assert loss.captures() == (inner.features,)
    assert loss.needs_embedding and not loss.needs_classifier and loss.needs_teacher_output
