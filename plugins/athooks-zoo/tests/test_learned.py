"""FT, OFD, ReviewKD and CAT-KD against float64 re-derivations from their papers and authors' code.

Each fidelity test copies the loss's learned weights into a reference written with plain torch
ops (convolutions, loops, explicit batch norm in training mode), and compares the value and the
gradient with respect to the student's tensors.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import textwrap

import pytest
import torch
from athooks_zoo.learned import CATKD, FT, OFD, SPECS, ReviewKD, ofd_margin
from torch import nn

import athooks
from athooks.plugin import Step

D = torch.float64


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.to(D), want.to(D), rtol=1e-6, atol=1e-9)


def step_of(loss, pairs, teachers, students, **kw) -> Step:
    return Step(
        pairs,
        [{loss.features: t} for t in teachers],
        [{loss.features: s} for s in students],
        **kw,
    )


def params(connector) -> list[torch.Tensor]:
    return [p.detach().clone() for p in connector.body.parameters()]


def leaky(x):
    return torch.where(x > 0, x, 0.1 * x)


def bn_train(x, weight, bias, eps=1e-5):
    """Batch norm in training mode: batch statistics over (B, H, W), biased variance."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=D) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=D) * 0.3)


def block_mean(x, size):
    """Average pooling of (B, C, H, W) to (size, size) for H, W divisible by size."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


def nearest(x, size):
    """Nearest resizing as floor(i * in / out), written by indexing."""
    h, w = x.shape[-2:]
    rows = torch.div(torch.arange(size[0]) * h, size[0], rounding_mode="floor")
    cols = torch.div(torch.arange(size[1]) * w, size[1], rounding_mode="floor")
    return x[:, :, rows][:, :, :, cols]


# ------------------------------------------------------------------------------------- FT


def ft_reference(t, s, enc, dec, tra, *, beta, rw, distance="code", factor="flat", rec="l1"):
    def encode(x, ws):
        for w, b in zip(ws[0::2], ws[1::2], strict=True):
            x = leaky(torch.nn.functional.conv2d(x, w, b, padding=1))
        return x

    def decode(x, ws):
        for w, b in zip(ws[0::2], ws[1::2], strict=True):
            x = leaky(torch.nn.functional.conv_transpose2d(x, w, b, padding=1))
        return x

    f_t, f_s = encode(t, enc), encode(s, tra)
    if f_s.shape[-1] > f_t.shape[-1]:
        f_s = block_mean(f_s, f_t.shape[-1])
    elif f_s.shape[-1] < f_t.shape[-1]:
        f_t = block_mean(f_t, f_s.shape[-1])

    def fac(f):
        v = (f**2).mean(1).flatten(1) if factor == "repdistiller" else f.flatten(1)
        return v / torch.sqrt((v**2).sum(1, keepdim=True))

    gap = (fac(f_s) - fac(f_t)).abs()
    value = gap.mean() if distance == "code" else gap.sum(1).mean()
    r = decode(encode(t, enc), dec) - t
    recon = r.abs().mean() if rec == "l1" else (r**2).mean()
    return beta * value + rw * recon


def built_ft(c_t, c_s, **options) -> FT:
    ft = FT(**options)
    ft.setup([("t", "s")])
    w = ft.width(c_t)
    ft.paraphrasers[0].build(c_t, w)
    ft.decoders[0].build(w, c_t)
    ft.translators[0].build(c_s, w)
    return ft.double()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"distance": "paper", "factor": "repdistiller", "reconstruction": "l2", "beta": 3.0},
        {"reconstruction_weight": 0.0},
    ],
    ids=["defaults", "paper-repdistiller-l2", "no-reconstruction"],
)
@pytest.mark.parametrize("s_size", [4, 8], ids=["same-size", "student-larger"])
def test_ft_matches_its_definition(options, s_size):
    torch.manual_seed(0)
    c_t, c_s = 6, 4
    ft = built_ft(c_t, c_s, **options)
    assert ft.width(c_t) == 3  # round(0.5 * 6)
    t = torch.randn(2, c_t, 4, 4, dtype=D)
    s = torch.randn(2, c_s, s_size, s_size, dtype=D, requires_grad=True)
    got = ft(step_of(ft, [("t", "s")], [t], [s]))
    (g_got,) = torch.autograd.grad(got, s)
    s_ref = s.detach().clone().requires_grad_(True)
    want = ft_reference(
        t,
        s_ref,
        params(ft.paraphrasers[0]),
        params(ft.decoders[0]),
        params(ft.translators[0]),
        beta=options.get("beta", 500.0),
        rw=options.get("reconstruction_weight", 1.0),
        distance=options.get("distance", "code"),
        factor=options.get("factor", "flat"),
        rec=options.get("reconstruction", "l1"),
    )
    (g_want,) = torch.autograd.grad(want, s_ref)
    close(got, want)
    close(g_got, g_want)


def test_ft_reconstruction_trains_the_paraphraser_only_and_ft_not_at_all():
    torch.manual_seed(1)
    t = torch.randn(2, 6, 4, 4, dtype=D)
    s = torch.randn(2, 4, 4, 4, dtype=D)
    grads = []
    for beta, rw in [(500.0, 1.0), (0.0, 1.0)]:
        torch.manual_seed(2)
        ft = built_ft(6, 4, beta=beta, reconstruction_weight=rw)
        ft(step_of(ft, [("t", "s")], [t], [s])).backward()
        grads.append([p.grad.clone() for p in ft.paraphrasers[0].parameters()])
        translator = [p.grad for p in ft.translators[0].parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in translator) == (beta > 0)
    for with_ft, without in zip(*grads, strict=True):
        close(with_ft, without)  # the FT term sends nothing to the paraphraser


def test_ft_paraphraser_steps_train_the_paraphraser_first_then_freeze_it():
    torch.manual_seed(3)
    ft = built_ft(6, 4, paraphraser_steps=2)
    t = torch.randn(2, 6, 4, 4, dtype=D)
    enc, dec, tra = params(ft.paraphrasers[0]), params(ft.decoders[0]), params(ft.translators[0])
    for call in range(3):
        s = torch.randn(2, 4, 4, 4, dtype=D, requires_grad=True)
        ft.zero_grad()
        got = ft(step_of(ft, [("t", "s")], [t], [s]))
        if call < 2:  # reconstruction only: nothing reaches the student
            close(got, ft_reference(t, s, enc, dec, tra, beta=0.0, rw=1.0))
            assert not got.requires_grad or torch.autograd.grad(got, s, allow_unused=True) == (
                None,
            )
        else:  # FT only, the paraphraser frozen
            close(got, ft_reference(t, s, enc, dec, tra, beta=500.0, rw=0.0))
            got.backward()
            assert s.grad is not None and s.grad.abs().sum() > 0
            assert all(p.grad is None for p in ft.paraphrasers[0].parameters())
    assert int(ft.steps) == 3
    assert "steps" in ft.state_dict()


# ------------------------------------------------------------------------------------ OFD


def phi_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def margin_reference(mean, std):
    out = []
    for m, s in zip(mean.tolist(), std.tolist(), strict=True):
        s = abs(s)
        if phi_cdf(-m / s) > 0.001:
            out.append(
                -s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / phi_cdf(-m / s) + m
            )
        else:
            out.append(-3 * s)
    return torch.tensor(out, dtype=D)


def test_ofd_margin_is_the_authors_gaussian_formula():
    mean = torch.tensor([0.0, 1.0, -2.0, 5.0, 0.3], dtype=D)
    std = torch.tensor([1.0, 0.5, 1.5, 1.0, -0.7], dtype=D)  # |std| is used, as the authors
    close(ofd_margin(mean, std), margin_reference(mean, std))
    assert (ofd_margin(mean, std) <= 0).all()
    assert float(ofd_margin(torch.tensor([5.0]), torch.tensor([1.0]))) == -3.0  # Phi < 0.001


def ofd_reference(ts, ss, convs, bns, margins, weight, halving=True):
    n, total = len(ts), 0.0
    for j, (t, s, w, (g, b), m) in enumerate(zip(ts, ss, convs, bns, margins, strict=True)):
        s_hat = bn_train(torch.einsum("oc,bchw->bohw", w[:, :, 0, 0], s), g, b)
        target = torch.maximum(t, m.view(1, -1, 1, 1))
        mask = ((s_hat > target) | (target > 0)).to(D)
        term = ((s_hat - target) ** 2 * mask).sum() / t.shape[0]
        total = total + term / (2 ** (n - 1 - j) if halving else 1)
    return weight * total


@pytest.mark.parametrize("how", ["stats", "margins", "equal-stages"])
def test_ofd_matches_its_definition(how):
    gen = torch.Generator().manual_seed(4)
    pairs = [("l2", "l2"), ("l3", "l3")]
    widths = [(6, 4), (8, 5)]
    stats = [
        (torch.randn(c, generator=gen, dtype=D), torch.rand(c, generator=gen, dtype=D) + 0.2)
        for c, _ in widths
    ]
    margins = [margin_reference(mu, sd) for mu, sd in stats]
    options = {"margins": margins} if how == "margins" else {"stats": stats}
    if how == "equal-stages":
        options["stage_weights"] = "equal"
    ofd = OFD(weight=2e-3, **options)
    ofd.setup(pairs)
    for j, (c_t, c_s) in enumerate(widths):
        ofd.connectors[j].build(c_s, c_t)
    ofd.double()
    randomise_bn(ofd, gen)
    ts = [torch.randn(3, c, 4, 4, generator=gen, dtype=D) for c, _ in widths]
    ss = [torch.randn(3, c, 4, 4, generator=gen, dtype=D, requires_grad=True) for _, c in widths]
    got = ofd(step_of(ofd, pairs, ts, ss))
    g_got = torch.autograd.grad(got, ss)
    refs = [s.detach().clone().requires_grad_(True) for s in ss]
    convs = [ofd.connectors[j].body[0].weight.detach() for j in range(2)]
    bns = [
        (ofd.connectors[j].body[1].weight.detach(), ofd.connectors[j].body[1].bias.detach())
        for j in range(2)
    ]
    want = ofd_reference(ts, refs, convs, bns, margins, 2e-3, halving=how != "equal-stages")
    g_want = torch.autograd.grad(want, refs)
    close(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        close(a, b)


def test_ofd_estimates_the_margins_from_the_teachers_features_and_saves_them():
    gen = torch.Generator().manual_seed(5)
    ofd = OFD()
    ofd.setup([("t", "s")])
    seen = []
    for _ in range(3):
        t = torch.randn(4, 3, 5, 5, generator=gen) * torch.tensor([1.0, 2.0, 0.5]).view(
            1, 3, 1, 1
        ) + torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
        seen.append(t.to(D))
        ofd(step_of(ofd, [("t", "s")], [t], [torch.randn(4, 2, 5, 5, generator=gen)]))
    allx = torch.cat(seen).transpose(0, 1).reshape(3, -1)
    mean, std = allx.mean(1), allx.std(1, unbiased=False)
    close(ofd.moments[0].mean, mean)
    close(ofd.moments[0].std(), std)
    close(ofd.margins()[0], margin_reference(mean, std))
    ofd.eval()  # eval mode: the estimate is frozen
    ofd(step_of(ofd, [("t", "s")], [seen[0].float() + 10], [torch.randn(4, 2, 5, 5)]))
    close(ofd.margins()[0], margin_reference(mean, std))
    again = OFD()
    again.setup([("t", "s")])
    again.load_state_dict(ofd.state_dict())
    close(again.margins()[0], margin_reference(mean, std))
    assert again.connectors[0].built and int(again.moments[0].count) == 3 * 4 * 25
    again.float().train()  # a dtype cast (as the Distiller's) keeps the count exact
    assert again.moments[0].count.dtype == torch.long


# ------------------------------------------------------------------------------- ReviewKD


def hcl_reference(fs, ft):
    """The authors' HCL written out: full level weight 1, then the pooled levels below H."""
    h = fs.shape[2]
    levels = {8: [(0.5, 4), (0.25, 2), (0.125, 1)], 4: [(0.5, 2), (0.25, 1)], 2: [(0.5, 1)]}[h]
    loss, tot = ((fs - ft) ** 2).mean(), 1.0
    for w, size in levels:
        loss = loss + w * ((block_mean(fs, size) - block_mean(ft, size)) ** 2).mean()
        tot += w
    return loss / tot


def test_reviewkd_matches_its_definition():
    gen = torch.Generator().manual_seed(6)
    pairs = [("l2", "l2"), ("l3", "l3")]  # shallow, deep
    rkd = ReviewKD(weight=5.0)
    rkd.setup(pairs)
    mid = 5  # min(512, the student's deepest width 5)
    rkd.reduce[0].build(4, mid)
    rkd.reduce[1].build(5, mid)
    rkd.expand[0].build(mid, 6)
    rkd.expand[1].build(mid, 10)
    rkd.fuse[0].build(2 * mid, 2)
    assert len(rkd.fuse) == 1  # the deepest pair has no fusion
    rkd.double()
    randomise_bn(rkd, gen)
    t0, t1 = (
        torch.randn(2, 6, 8, 8, generator=gen, dtype=D),
        torch.randn(2, 10, 4, 4, generator=gen, dtype=D),
    )
    s0 = torch.randn(2, 4, 8, 8, generator=gen, dtype=D, requires_grad=True)
    s1 = torch.randn(2, 5, 2, 2, generator=gen, dtype=D, requires_grad=True)  # smaller than t1
    got = rkd(step_of(rkd, pairs, [t0, t1], [s0, s1]))
    g_got = torch.autograd.grad(got, [s0, s1])

    def conv_bn(x, conn, padding):
        conv, bn = conn.body[0], conn.body[1]
        y = torch.nn.functional.conv2d(x, conv.weight.detach(), None, padding=padding)
        return bn_train(y, bn.weight.detach(), bn.bias.detach())

    r0, r1 = (x.detach().clone().requires_grad_(True) for x in (s0, s1))
    # deepest: no fusion; resized (nearest) to the teacher's 4x4, then the 3x3 conv + BN
    x1 = nearest(conv_bn(r1, rkd.reduce[1], 0), (4, 4))
    out1 = conv_bn(x1, rkd.expand[1], 1)
    # shallower: fuse with the deeper ABF's x, upsampled (nearest) to 8x8
    x0 = conv_bn(r0, rkd.reduce[0], 0)
    y = nearest(x1, (8, 8))
    att = rkd.fuse[0].body[0]
    z = torch.sigmoid(
        torch.nn.functional.conv2d(torch.cat([x0, y], 1), att.weight.detach(), att.bias.detach())
    )
    x0 = x0 * z[:, 0:1] + y * z[:, 1:2]
    out0 = conv_bn(x0, rkd.expand[0], 1)
    want = 5.0 * (hcl_reference(out0, t0) + hcl_reference(out1, t1))
    g_want = torch.autograd.grad(want, [r0, r1])
    close(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        close(a, b)


def test_reviewkd_mid_channels_and_order_check():
    rkd = ReviewKD(mid_channels=7)
    pairs = [("a", "a"), ("b", "b")]
    rkd.setup(pairs)
    t = [torch.randn(2, 6, 8, 8), torch.randn(2, 10, 4, 4)]
    s = [torch.randn(2, 4, 8, 8), torch.randn(2, 5, 4, 4)]
    rkd(step_of(rkd, pairs, t, s))
    assert rkd.reduce[0].out_channels == 7 and rkd.fuse[0].in_channels == 14
    wrong = ReviewKD()
    wrong.setup(pairs)
    with pytest.raises(athooks.CaptureError, match="shallowest to the deepest"):
        wrong(step_of(wrong, pairs, t[::-1], s[::-1]))


# --------------------------------------------------------------------------------- CAT-KD


def cat_reference(t, s, w_t, w_s, *, weight, r, normalize):
    def cam(a, w):
        b, c, h, wd = a.shape
        out = torch.zeros(b, w.shape[0], h, wd, dtype=D)
        for k in range(w.shape[0]):
            for ch in range(c):
                out[:, k] = out[:, k] + w[k, ch] * a[:, ch]
        return out

    p_t, p_s = block_mean(cam(t, w_t), r), block_mean(cam(s, w_s), r)
    if normalize:
        p_t = p_t / torch.sqrt((p_t**2).sum(dim=(2, 3), keepdim=True))
        p_s = p_s / torch.sqrt((p_s**2).sum(dim=(2, 3), keepdim=True))
    return weight * ((p_s - p_t) ** 2).mean()


@pytest.mark.parametrize("normalize", [False, True])
def test_catkd_matches_its_definition(normalize):
    gen = torch.Generator().manual_seed(7)
    cat = CATKD(normalize=normalize)
    head_t, head_s = nn.Linear(6, 5).double(), nn.Linear(3, 5).double()
    t = torch.randn(2, 6, 4, 4, generator=gen, dtype=D)
    s = torch.randn(2, 3, 6, 6, generator=gen, dtype=D, requires_grad=True)
    pairs = [("l3", "l3"), ("l4", "l4")]  # only the last pair is read
    step = Step(
        pairs,
        [{cat.features: torch.randn(2, 1, 8, 8)}, {cat.features: t}],
        [{cat.features: torch.randn(2, 1, 8, 8)}, {cat.features: s}],
        classifiers=(head_t, head_s),
    )
    got = cat(step)
    g_got = torch.autograd.grad(got, [s, head_s.weight])
    r_s = s.detach().clone().requires_grad_(True)
    r_w = head_s.weight.detach().clone().requires_grad_(True)
    want = cat_reference(t, r_s, head_t.weight.detach(), r_w, weight=15.0, r=2, normalize=normalize)
    g_want = torch.autograd.grad(want, [r_s, r_w])
    close(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        close(a, b)


def test_catkd_errors_name_the_mismatch():
    cat = CATKD()
    t, s = torch.randn(2, 6, 4, 4), torch.randn(2, 3, 4, 4)
    pairs = [("l4", "l4")]
    with pytest.raises(athooks.CaptureError, match="same classes"):
        cat(step_of(cat, pairs, [t], [s], classifiers=(nn.Linear(6, 5), nn.Linear(3, 7))))
    with pytest.raises(athooks.CaptureError, match="classifier reads 4 features"):
        cat(step_of(cat, pairs, [t], [s], classifiers=(nn.Linear(6, 5), nn.Linear(4, 5))))
    with pytest.raises(athooks.CaptureError, match="needs_classifier"):
        cat(step_of(cat, pairs, [t], [s]))
    with pytest.raises(athooks.CaptureError, match="without a"):
        cat(step_of(cat, pairs, [t], [s], classifiers=(nn.ReLU(), nn.Linear(3, 5))))


# ------------------------------------------------------------------------ options, errors


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: FT(beta=-1), "beta must be >= 0"),
        (lambda: FT(beta=float("nan")), "beta must be finite"),
        (lambda: FT(rate=0), "rate must be > 0"),
        (lambda: FT(reconstruction="l3"), "reconstruction must be one of"),
        (lambda: FT(paraphraser_steps=-1), "paraphraser_steps must be an integer >= 0"),
        (lambda: FT(paraphraser_steps=3, reconstruction_weight=0), "reconstruction_weight=0"),
        (lambda: FT(distance="cosine"), "distance must be one of"),
        (lambda: OFD(weight=float("inf")), "weight must be finite"),
        (lambda: OFD(weight="1"), "weight must be a real number"),
        (lambda: OFD(margins=[torch.ones(3)]), "positive values"),
        (lambda: OFD(margins=torch.zeros(3)), "one entry per layer pair"),
        (
            lambda: OFD(margins=[torch.zeros(3)], stats=[(torch.zeros(3), torch.ones(3))]),
            "not both",
        ),
        (lambda: OFD(stats=[(torch.zeros(3), torch.ones(2))]), "one of each per teacher channel"),
        (lambda: OFD(stats=[(torch.zeros(3), torch.tensor([1.0, float("nan"), 1.0]))]), "NaN"),
        (lambda: OFD(stage_weights="linear"), "stage_weights must be one of"),
        (lambda: ReviewKD(weight=-0.5), "weight must be >= 0"),
        (lambda: ReviewKD(mid_channels=0), "mid_channels must be an integer >= 1"),
        (lambda: CATKD(resolution=0), "resolution must be an integer >= 1"),
        (lambda: CATKD(weight=True), "weight must be a real number"),
        (lambda: CATKD(normalize=1), "normalize must be True or False"),
    ],
)
def test_options_are_validated(make, match):
    with pytest.raises(athooks.ConfigurationError, match=match):
        make()


def _setup(loss, pairs):
    loss.setup(pairs)
    return loss


@pytest.mark.parametrize("make", [FT, OFD, ReviewKD, CATKD], ids=lambda c: c.name)
def test_batch_mismatch_is_a_clear_error(make):
    loss = _setup(make(), [("t", "s")])
    step = step_of(
        loss,
        [("t", "s")],
        [torch.randn(3, 4, 4, 4)],
        [torch.randn(2, 4, 4, 4)],
        classifiers=(nn.Linear(4, 2), nn.Linear(4, 2)),
    )
    with pytest.raises(athooks.CaptureError, match="batch sizes differ.*teacher 3, student 2"):
        loss(step)


@pytest.mark.parametrize("make", [FT, OFD, ReviewKD, CATKD], ids=lambda c: c.name)
def test_non_image_features_are_a_clear_error(make):
    loss = _setup(make(), [("t", "s")])
    step = step_of(loss, [("t", "s")], [torch.randn(2, 4, 9)], [torch.randn(2, 4, 9)])
    with pytest.raises(athooks.CaptureError, match=r"\(B, C, H, W\)"):
        loss(step)


def test_width_errors_name_the_layer_and_the_fix():
    ofd = _setup(OFD(margins=[torch.zeros(5)]), [("t", "s")])
    with pytest.raises(athooks.CaptureError, match="5 values but the teacher's layer 't' has 4"):
        ofd(step_of(ofd, [("t", "s")], [torch.randn(2, 4, 4, 4)], [torch.randn(2, 3, 4, 4)]))
    with pytest.raises(athooks.ConfigurationError, match="1 entries but the Distiller taps 2"):
        OFD(margins=[torch.zeros(5)]).setup([("a", "a"), ("b", "b")])
    ft = _setup(FT(), [("t", "s")])
    ft(step_of(ft, [("t", "s")], [torch.randn(2, 4, 4, 4)], [torch.randn(2, 3, 4, 4)]))
    with pytest.raises(athooks.CaptureError, match="widths changed"):
        ft(step_of(ft, [("t", "s")], [torch.randn(2, 4, 4, 4)], [torch.randn(2, 5, 4, 4)]))


# ------------------------------------------------------------------ registry, docs, Distiller


def test_specs_name_every_method():
    assert [spec.name for spec in SPECS] == ["ft", "ofd", "reviewkd", "catkd"]
    for spec in SPECS:
        assert isinstance(spec.factory(), athooks.plugin.Loss)


FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?:python|py)\b[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M
)


@pytest.mark.parametrize("obj", [FT, OFD, ReviewKD, CATKD, ofd_margin], ids=lambda o: o.__name__)
def test_docstring_examples_run(obj):
    blocks = FENCE.findall(inspect.getdoc(obj))
    assert blocks
    for _, body in blocks:
        exec(compile(textwrap.dedent(body), f"<{obj.__name__}>", "exec"), {})


def cnn(width: int, classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
        nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


def _distiller_support() -> dict[str, bool]:
    """Whether the Distiller calls Loss.setup and gives the step the classifiers (the core's part)."""
    seen = {"setup": False, "classifier": False}

    class Probe(athooks.plugin.Loss):
        name = "probe"
        needs_classifier = True

        def __init__(self):
            super().__init__()
            self.features = athooks.plugin.Features()

        def captures(self):
            return (self.features,)

        def setup(self, pairs):
            super().setup(pairs)
            seen["setup"] = True

        def forward(self, step):
            with contextlib.suppress(athooks.CaptureError):
                seen["classifier"] = isinstance(step.classifier("student"), nn.Linear)
            return step.features(self.features)[0][1].sum() * 0

    with athooks.Distiller(cnn(2), cnn(2), layers=[("0", "0")], losses=Probe()) as d:
        cnn_out = d.student(torch.randn(1, 3, 4, 4))
        d.loss()
    del cnn_out
    return seen


SUPPORT = _distiller_support()


@pytest.mark.parametrize("make", [FT, OFD, ReviewKD, CATKD], ids=lambda c: c.name)
def test_through_the_distiller(make):
    if not SUPPORT["setup"]:
        pytest.skip("the core's Distiller does not call Loss.setup(pairs) yet (plugin API spec)")
    if make is CATKD and not SUPPORT["classifier"]:
        pytest.skip("the core's Distiller does not give the step the classifiers yet")
    torch.manual_seed(8)
    teacher, student = cnn(16), cnn(8)
    loss = make()
    layers = [("0", "0"), ("1", "1")]
    with athooks.Distiller(teacher, student, layers=layers, losses=loss) as d:
        learned = list(d.parameters())
        opt = torch.optim.SGD([*student.parameters(), *learned], lr=0.01)
        for _ in range(2):
            out = student(torch.randn(4, 3, 8, 8))
            term = d.loss()
            assert torch.isfinite(term)
            opt.zero_grad()
            (out.square().mean() + term).backward()
            opt.step()
    assert student[1][0].weight.grad is not None and student[1][0].weight.grad.abs().sum() > 0
    if make is not CATKD:
        assert learned and all(
            not isinstance(p, nn.parameter.UninitializedParameter) for p in learned
        )
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)


@pytest.mark.parametrize("make", [FT, OFD, ReviewKD], ids=lambda c: c.name)
def test_distiller_checkpoint_restores_the_learned_parts(make):
    if not SUPPORT["setup"]:
        pytest.skip("the core's Distiller does not call Loss.setup(pairs) yet (plugin API spec)")
    torch.manual_seed(9)
    teacher, student = cnn(16), cnn(8)
    layers = [("0", "0"), ("1", "1")]
    first, second = make(), make()
    with athooks.Distiller(teacher, student, layers=layers, losses=first) as d:
        list(d.parameters())
        student(torch.randn(4, 3, 8, 8))
        d.loss()
        saved = d.state_dict()
    with athooks.Distiller(teacher, student, layers=layers, losses=second) as d2:
        list(d2.parameters())
        d2.load_state_dict(saved)
    want, got = first.state_dict(), second.state_dict()
    assert sorted(want) == sorted(got) and len(want) > 3
    for name, value in want.items():
        assert torch.equal(value, got[name]), name
