"""Built-in mappings against the paper's definitions, their gradients, dtypes and properties."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import athooks
from athooks.errors import CaptureError, ConfigurationError
from athooks.mappings import abs_pow_sum, apply_mapping


def feature_maps(max_b=3, max_c=6, max_hw=5):
    @st.composite
    def build(draw):
        b = draw(st.integers(1, max_b))
        c = draw(st.integers(1, max_c))
        h = draw(st.integers(1, max_hw))
        w = draw(st.integers(1, max_hw))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        return torch.randn(b, c, h, w, generator=g, dtype=torch.float64)

    return build()


@pytest.mark.parametrize(
    ("name", "options", "formula"),
    [
        ("sum", {}, lambda a: a.abs().sum(1)),
        ("sum_p", {}, lambda a: (a.abs() ** 2).sum(1)),
        ("sum_p", {"p": 4}, lambda a: (a.abs() ** 4).sum(1)),
        ("sum_p", {"p": 1.5}, lambda a: (a.abs() ** 1.5).sum(1)),
        ("max_p", {}, lambda a: (a.abs() ** 2).max(1).values),
        ("max_p", {"p": 3}, lambda a: (a.abs() ** 3).max(1).values),
    ],
)
def test_values_match_paper_definitions(name, options, formula):
    a = torch.randn(2, 7, 4, 5, dtype=torch.float64)
    got = athooks.mapping(name, **options)(a)
    assert got.shape == (2, 4, 5)
    torch.testing.assert_close(got.double(), formula(a), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 4.0])
def test_abs_pow_sum_same_values_and_gradients_eager_under_torch_func_and_compiled(p):
    """The three paths of abs_pow_sum (eager autograd, torch.func, torch.compile) against
    sum_c |a_c|^p written out and differentiated by autograd, in float64."""
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def formula(x):
        return (x.abs().pow(p).sum(1) * w).sum()

    want = torch.func.grad(formula)(a)
    leaf = a.clone().requires_grad_()
    (abs_pow_sum(leaf, p) * w).sum().backward()
    torch.testing.assert_close(leaf.grad, want)
    torch.testing.assert_close(torch.func.grad(lambda x: (abs_pow_sum(x, p) * w).sum())(a), want)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (abs_pow_sum(x, p) * w).sum(), backend="aot_eager")
    leaf = a.clone().requires_grad_()
    compiled(leaf).backward()
    torch.testing.assert_close(leaf.grad, want)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(abs_pow_sum(a, p), a.abs().pow(p).sum(1))


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("size", ["small", "large"])
def test_both_eager_paths_save_only_the_features_and_match_the_formula(p, size):
    """Eager abs_pow_sum with gradient takes autograd's own ops for a small map (p 1 or 2,
    float32 or wider) and the one-pass Function otherwise: both give sum_c |a_c|^p and its
    gradient (float64, autograd of the formula), and both save only the features for backward
    (no full-size intermediate kept)."""
    from athooks.mappings import _SMALL

    shape = (2, 4, 8, 8) if size == "small" else (2, 33, 64, 64)
    assert (math.prod(shape) <= _SMALL) == (size == "small")
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(shape, dtype=torch.float64, generator=gen)
    w = torch.randn(shape[0], *shape[2:], dtype=torch.float64, generator=gen)
    ref = a.clone().requires_grad_()
    (ref.abs().pow(p).sum(1) * w).sum().backward()
    leaf = a.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = abs_pow_sum(leaf, p)
    (out * w).sum().backward()
    torch.testing.assert_close(out, a.abs().pow(p).sum(1))
    torch.testing.assert_close(leaf.grad, ref.grad)
    function = type(out.grad_fn).__name__.startswith("_AbsPowSum")
    assert function == (size == "large" or p == 4.0)
    full = [t for t in saved if t.numel() == leaf.numel()]
    assert len(full) == 1 and full[0].data_ptr() == leaf.data_ptr()


def test_a_training_step_binds_no_arguments_through_inspect(monkeypatch):
    """The per-step Python cost: autograd.Function.apply of a ``setup_context`` Function calls
    inspect.signature at every call (6 a step with 3 pairs); the eager maps use none."""
    import inspect

    from conftest import tiny_pair

    teacher, student = tiny_pair(inplace=False)
    calls = []
    signature = inspect.signature
    with athooks.Distiller(teacher, student, layers="relu?") as d:
        x = torch.randn(2, 3, 16, 16)
        student(x)
        d.loss().backward()  # the first step probes; count the second
        monkeypatch.setattr(
            inspect, "signature", lambda *a, **k: calls.append(a) or signature(*a, **k)
        )
        student(x)
        d.loss().backward()
    assert calls == []


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, 4.0])
def test_abs_pow_sum_gradcheck(p):
    # stay away from 0, where |a|^p is not differentiable for p = 1
    a = (torch.rand(2, 3, 3, 3, dtype=torch.float64) + 0.1) * torch.where(
        torch.rand(2, 3, 3, 3) > 0.5, 1.0, -1.0
    ).double()
    a.requires_grad_()

    def fn(x):
        return abs_pow_sum(x, p).double()

    assert torch.autograd.gradcheck(fn, (a,))
    assert torch.autograd.gradgradcheck(fn, (a,))


def test_max_p_gradient_matches_autograd_of_definition():
    a = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 3, dtype=torch.float64)
    (athooks.mapping("max_p", p=2)(a).double() * g).sum().backward()
    b = a.detach().clone().requires_grad_()
    ((b.abs() ** 2).max(1).values * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["sum", "sum_p", "max_p"])
def test_low_precision_inputs_give_float32_maps(dtype, name):
    a = (torch.randn(2, 64, 4, 4) * 300).to(dtype)  # 300^2 * 64 overflows fp16 if done in fp16
    out = athooks.mapping(name)(a)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    ref = athooks.mapping(name)(a.float())
    torch.testing.assert_close(out, ref)


def test_low_precision_gradient_has_input_dtype():
    a = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    athooks.mapping("sum_p", p=3)(a).sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_low_precision_gradient_is_the_float32_gradient_rounded(p):
    # d/da sum_c |a_c|^p = p |a|^(p-1) sign(a), computed in float32 from the bf16 values
    a = torch.randn(2, 8, 3, 3).to(torch.bfloat16).requires_grad_()
    g = torch.randn(2, 3, 3)
    (athooks.mapping("sum_p", p=p)(a) * g).sum().backward()
    af = a.detach().float()
    want = g.unsqueeze(1) * p * af.abs().pow(p - 1) * af.sign()
    torch.testing.assert_close(a.grad, want.to(torch.bfloat16))


@pytest.mark.parametrize("p", [0, 0.5, -1, "2", True])
def test_bad_exponent_is_rejected(p):
    with pytest.raises(ConfigurationError, match="p must be"):
        athooks.mapping("sum_p", p=p)


@pytest.mark.parametrize("name", ["sum_p", "max_p"])
@pytest.mark.parametrize("p", [float("inf"), float("nan"), np.float64("inf")])
def test_a_non_finite_exponent_is_rejected(name, p):
    # |A|^inf is 0 or inf: the loss would be NaN
    with pytest.raises(ConfigurationError, match=f"{name}: p must be finite"):
        athooks.mapping(name, p=p)
    with pytest.raises(ConfigurationError, match=f"{name}: p must be finite"):
        athooks.loss("at", mapping=name, p=p)


@pytest.mark.parametrize(("p", "expected"), [(np.int64(4), 4.0), (np.float32(1.5), 1.5)])
def test_numpy_exponents_are_accepted_as_python_floats(p, expected):
    m = athooks.mapping("sum_p", p=p)
    assert type(m.p) is float and m.p == expected
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(m(a), (a.abs() ** expected).sum(1))
    assert athooks.loss("at", mapping="max_p", p=p).mapping.p == expected


def test_repr_names_the_configuration():
    assert repr(athooks.mapping("sum_p", p=4)) == "sum_p(p=4)"
    assert repr(athooks.mapping("max_p")) == "max_p(p=2)"


def test_apply_mapping_rejects_what_is_not_b_c_s_and_wrong_output():
    sum_p = athooks.mapping("sum_p")
    # (B, C) and (B, C, *S) with more than 3 spatial dimensions: no layout to read
    for shape in ((2, 5), (2, 5, 1, 2, 3, 4), (7,)):
        with pytest.raises(CaptureError, match=r"1 to 3 spatial dimensions.*transform") as info:
            apply_mapping(sum_p, torch.randn(*shape), "student layer 'x'")
        assert f"shape {shape}" in str(info.value)
        assert "(B, C, T, H, W) for a video" in str(info.value)
    with pytest.raises(CaptureError, match="pooled"):
        apply_mapping(sum_p, torch.randn(2, 5), "student layer 'x'")
    bad = athooks.mappings.FunctionMapping(lambda f: f.sum((1, 2)), name="bad")
    with pytest.raises(CaptureError, match=r"mapping 'bad' returned .*\(B, \*S\) = \(2, 3, 4\)"):
        apply_mapping(bad, torch.randn(2, 5, 3, 4), "student layer 'x'")
    with pytest.raises(CaptureError, match=r"\(B, \*S\) = \(2, 6, 3, 4\)"):
        apply_mapping(bad, torch.randn(2, 5, 6, 3, 4), "student layer 'x'")
    as_int = athooks.mappings.FunctionMapping(lambda f: f.sum(1).long(), name="ints")
    with pytest.raises(CaptureError, match="floating"):
        apply_mapping(as_int, torch.randn(2, 5, 3, 4), "student layer 'x'")


# ---------------------------------------------------------------- N-d maps (B, C, *S) -> (B, *S)


def _by_hand(a: np.ndarray, name: str, p: float) -> np.ndarray:
    """The paper's F over channels, one spatial cell at a time, in float64 NumPy."""
    b, c = a.shape[:2]
    out = np.zeros((b, *a.shape[2:]))
    for i in range(b):
        for cell in np.ndindex(*a.shape[2:]):
            column = [abs(a[(i, k, *cell)]) for k in range(c)]
            if name == "sum":
                out[(i, *cell)] = sum(column)
            elif name == "sum_p":
                out[(i, *cell)] = sum(v**p for v in column)
            else:
                out[(i, *cell)] = max(column) ** p
    return out


@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 5, 4), (2, 3, 3, 4, 5)])
@pytest.mark.parametrize("name,p", [("sum", 1.0), ("sum_p", 2.0), ("sum_p", 3.0), ("max_p", 4.0)])
def test_built_in_mappings_on_every_layout(shape, name, p):
    g = torch.Generator().manual_seed(len(shape))
    a = torch.randn(*shape, generator=g, dtype=torch.float64)
    m = athooks.mapping(name) if name == "sum" else athooks.mapping(name, p=p)
    out = apply_mapping(m, a, "layer 'x'")
    assert out.shape == (shape[0], *shape[2:])
    np.testing.assert_allclose(out.numpy(), _by_hand(a.numpy(), name, p), rtol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 6), (2, 3, 3, 4, 4)])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_abs_pow_sum_gradient_on_1d_and_3d(shape, p):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: abs_pow_sum(t, p), (a,))


def test_token_sequence_read_as_1d_map_is_refused():
    """(B, N, C) out of a transformer block would give a map over channels: an error says so."""
    block = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), block)
    student = torch.nn.Sequential(torch.nn.Linear(8, 16), copy.deepcopy(block))
    x = torch.randn(2, 10, 8)
    with (
        athooks.Distiller(teacher, student, layers="1"),
        pytest.raises(CaptureError, match=r"tokens \(B, N, C\).*norm2.*transpose"),
    ):
        student(x)
    # the transform says what the tensor is: (B, C, N) is a 1-D map over the tokens
    layer = athooks.Layer("1", transform=lambda t: t.transpose(1, 2))
    with athooks.Distiller(teacher, student, layers=layer) as d:
        student(x)
        assert torch.isfinite(d.loss())
    # a 1-D convolution's output is (B, C, T) and is not questioned
    conv = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3), torch.nn.Linear(4, 4))
    conv2 = copy.deepcopy(conv)
    with athooks.Distiller(conv, conv2, layers="0") as d:
        conv2(torch.randn(2, 3, 6))
        assert d.loss().item() == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- properties of maps and loss

LOSS_FORMS = [
    ("code", "sum_p", {}),
    ("paper", "sum_p", {}),
    ("code", "max_p", {"p": 4}),
    ("code", "sum", {}),
]


def _pair_loss(form, teacher_feats, student_feats):
    distance, mapping, options = form
    at = athooks.loss("at", distance=distance, mapping=mapping, **options)
    return at.pair_loss(at.mapping(teacher_feats), at.mapping(student_feats))


@settings(max_examples=40, deadline=None)
@given(a=feature_maps())
@pytest.mark.parametrize("form", LOSS_FORMS)
def test_zero_for_identical_features(form, a):
    assert _pair_loss(form, a, a.clone()).item() == pytest.approx(0.0, abs=1e-10)


def _map_norms(form, x):
    _, mapping, options = form
    return athooks.mapping(mapping, **options)(x).flatten(1).norm(dim=1)


@settings(max_examples=40, deadline=None)
@given(a=feature_maps(), seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-2, 1e2))
@pytest.mark.parametrize("form", LOSS_FORMS)
def test_invariant_to_positive_scaling(form, a, seed, scale):
    b = torch.randn(a.shape, generator=torch.Generator().manual_seed(seed), dtype=a.dtype)
    # invariance holds away from the normalisation's eps (1e-12 on ||Q||), as in the reference
    for x in (a, b, a * scale, b * scale):
        assume(bool((_map_norms(form, x) > 1e-6).all()))
    base = _pair_loss(form, a, b).item()
    assert _pair_loss(form, a * scale, b).item() == pytest.approx(base, rel=1e-6, abs=1e-9)
    assert _pair_loss(form, a, b * scale).item() == pytest.approx(base, rel=1e-6, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(a=feature_maps(), seed=st.integers(0, 1000))
@pytest.mark.parametrize("name", ["sum", "sum_p", "max_p"])
def test_mapping_invariant_to_channel_permutation(name, a, seed):
    perm = torch.randperm(a.shape[1], generator=torch.Generator().manual_seed(seed))
    m = athooks.mapping(name)
    torch.testing.assert_close(m(a[:, perm]), m(a))


@settings(max_examples=40, deadline=None)
@given(a=feature_maps(), seed=st.integers(0, 1000))
@pytest.mark.parametrize("form", LOSS_FORMS)
def test_loss_invariant_to_channel_permutation(form, a, seed):
    b = torch.randn_like(a[:, :1]).expand_as(a) + torch.randn_like(a)
    perm = torch.randperm(a.shape[1], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(_pair_loss(form, a[:, perm], b), _pair_loss(form, a, b))


@settings(max_examples=25, deadline=None)
@given(a=feature_maps())
@pytest.mark.parametrize("form", LOSS_FORMS)
def test_finite_for_all_zero_maps(form, a):
    zeros = torch.zeros_like(a, requires_grad=True)
    for t, s in ((zeros, a), (a, zeros), (zeros, zeros.detach())):
        loss = _pair_loss(form, t.detach(), s)
        assert torch.isfinite(loss)
    # the gradient is finite too, including at the non-differentiable all-zero point
    s = torch.zeros_like(a, requires_grad=True)
    _pair_loss(form, a, s).backward()
    assert torch.isfinite(s.grad).all()
