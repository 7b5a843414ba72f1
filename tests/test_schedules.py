"""Loss weights over time (athooks.schedules, Loss.schedule, Distiller.step) and per-pair weights."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import TinyCNN, tiny_pair
from hypothesis import given, settings
from hypothesis import strategies as st

import athooks
from athooks import Distiller
from athooks.errors import CaptureError, ConfigurationError
from athooks.plugin import Loss, LossSpec, hookimpl
from athooks.schedules import (
    Constant,
    constant,
    cosine,
    linear,
    per_epoch,
    step_decay,
    warmup,
)

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])
PAIRS = [("relu1", "relu1"), ("relu2", "relu2"), ("relu3", "relu3")]

steps = st.integers(min_value=0, max_value=10**6)
lengths = st.integers(min_value=1, max_value=10**5)
values = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


# ------------------------------------------------------------------ presets


@settings(max_examples=200, deadline=None)
@given(steps, lengths, values)
def test_warmup_is_linear_from_zero_then_flat(step, n, value):
    expected = value * min(step, n) / n
    assert math.isclose(warmup(n, value)(step), expected, rel_tol=1e-12, abs_tol=1e-300)
    assert warmup(n, value)(n + step) == value


@settings(max_examples=200, deadline=None)
@given(steps, values, values, lengths)
def test_linear_and_cosine_follow_their_formulas(step, start, end, n):
    t = min(step, n) / n
    tol = 1e-12 * max(start, end, 1.0)
    assert math.isclose(linear(start, end, n)(step), start + (end - start) * t, abs_tol=tol)
    half_cosine = end + (start - end) * (1 + math.cos(math.pi * t)) / 2
    assert math.isclose(cosine(start, end, n)(step), half_cosine, abs_tol=tol)
    # the ends exactly
    assert linear(start, end, n)(0) == start and linear(start, end, n)(n + step) == end
    assert cosine(start, end, n)(0) == start and cosine(start, end, n)(n + step) == end


def test_cosine_at_chosen_steps():
    s = cosine(1.0, 0.0, 100)
    assert s(25) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert s(50) == pytest.approx(0.5)
    assert s(75) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)


@settings(max_examples=200, deadline=None)
@given(steps, st.lists(st.integers(0, 10**6), max_size=5, unique=True), values, values)
def test_step_decay_drops_at_each_milestone_like_multisteplr(step, marks, value, gamma):
    marks = sorted(marks)
    passed = sum(1 for m in marks if m <= step)
    assert step_decay(value, marks, gamma)(step) == pytest.approx(value * gamma**passed)


def test_step_decay_matches_torch_multisteplr():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 5, 8], gamma=0.2)
    ours = step_decay(0.1, (3, 5, 8), gamma=0.2)
    for step in range(12):
        assert opt.param_groups[0]["lr"] == pytest.approx(ours(step)), step
        opt.step()
        sched.step()


def test_constant_and_numbers():
    assert constant(0.3)(0) == constant(0.3)(10**9) == 0.3
    assert athooks.loss("at", schedule=2).schedule == Constant(2.0)


def test_chains_switch_at_the_end_of_each_part_and_count_from_there():
    s = warmup(10).then(cosine(1.0, 0.0, 100)).then(constant(0.25), at=200)
    assert s.starts == (0, 10, 200)
    assert [s(k) for k in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert s(60) == pytest.approx(0.5)  # halfway through the cosine, which starts at 10
    assert s(110) == 0.0 and s(199) == 0.0  # the cosine ended at 110
    assert s(200) == s(10**6) == 0.25
    delayed = constant(0).then(warmup(100), at=1000)
    assert delayed(999) == 0 and delayed(1050) == 0.5 and delayed.length == 1100
    assert warmup(10).then(lambda k: 0.5**k)(12) == 0.25  # any callable follows


def test_per_epoch_reads_the_schedule_at_the_epoch():
    s = per_epoch(step_decay(1e3, (60, 120, 160), gamma=0.2), steps_per_epoch=10)
    assert s(599) == 1e3 and s(600) == pytest.approx(200.0) and s(1600) == pytest.approx(8.0)
    dkd = per_epoch(linear(0.05, 1.0, 19), steps_per_epoch=7)  # DKD: min((epoch + 1) / 20, 1)
    for epoch in range(30):
        assert dkd(epoch * 7 + 3) == pytest.approx(min((epoch + 1) / 20, 1.0)), epoch
    assert per_epoch(warmup(5), 10).length == 50


def test_reprs_are_readable_and_rebuild_the_schedule():
    schedules = [
        warmup(500).then(cosine(1, 0, 10_000)),
        per_epoch(step_decay(1e3, milestones=(60, 120, 160), gamma=0.2), steps_per_epoch=391),
        linear(0.05, 1.0, 19),
        constant(0.1),
    ]
    namespace = vars(athooks.schedules)
    for s in schedules:
        assert eval(repr(s), namespace) == s, repr(s)
    assert repr(schedules[0]) == (
        "warmup(steps=500, value=1).then(cosine(start=1, end=0, steps=10000), at=500)"
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: warmup(0), "steps must be a whole number >= 1"),
        (lambda: warmup(2.5), "got float 2.5"),
        (lambda: warmup(True), "got bool"),
        (lambda: cosine(1, 0, -3), "steps must be a whole number >= 1"),
        (lambda: linear(-1, 0, 3), "start must be >= 0"),
        (lambda: cosine(1, float("nan"), 3), "end must be finite"),
        (lambda: constant(float("inf")), "value must be finite"),
        (lambda: step_decay(1, (3, 3)), "strictly increasing"),
        (lambda: step_decay(1, 60), "must be a list of increasing"),
        (lambda: step_decay(1, (-1, 2)), "milestones must be a whole number >= 0"),
        (lambda: step_decay(1, (1, 2), gamma=-0.5), "gamma must be >= 0"),
        (lambda: per_epoch(warmup(5), 0), "steps_per_epoch must be a whole number >= 1"),
        (lambda: per_epoch("cosine", 10), "schedule must be a number, a preset"),
        (lambda: constant(1).then(0.5), "has no end"),
        (lambda: warmup(5).then(0.5).then(0.1, at=3), "at must be a whole number >= 6"),
        (lambda: athooks.loss("at", schedule="cosine"), "schedule must be a number"),
        (lambda: athooks.loss("at", schedule=-1), "schedule must be >= 0"),
    ],
)
def test_bad_schedules_are_refused_when_made(make, match):
    with pytest.raises(ConfigurationError, match=match):
        make()


# ------------------------------------------------------------------ schedules in a Distiller


def _pair():
    torch.manual_seed(0)
    return tiny_pair()


def test_the_term_is_the_schedule_times_the_unscaled_term():
    s = cosine(1.0, 0.1, 4)
    teacher, student = _pair()
    losses = [athooks.loss("at"), athooks.loss("at", schedule=s), "kd", athooks.loss("kd")]
    losses[3].schedule = warmup(2)  # settable on the object too
    with Distiller(teacher, student, layers="relu?", losses=losses) as d:
        for k in range(6):
            assert d.step == k
            student(X)
            total = d.loss()
            terms = d.terms
            assert torch.equal(terms["at_2"], terms["at"] * s(k))
            assert torch.equal(terms["kd_2"], terms["kd"] * warmup(2)(k))
            assert torch.allclose(total.detach(), sum(terms.values()))
    assert d.step == 6


def test_a_schedule_of_zero_gives_no_gradient_and_a_callable_works():
    teacher, student = _pair()
    at = athooks.loss("at", schedule=lambda step: 0.0 if step == 0 else 2.0)
    with Distiller(teacher, student, layers="relu?", losses=at) as d:
        student(X)
        d.loss().backward()
        assert all(p.grad is None or not p.grad.any() for p in student.parameters())
        student(X)
        assert d.loss().item() > 0


def test_the_step_counts_training_losses_only():
    teacher, student = _pair()
    with Distiller(teacher, student, layers="relu?", no_grad="capture") as d:
        student(X)
        d.loss()
        with torch.no_grad():  # a validation forward is not a step, even with its loss
            student(X)
            d.loss()
        assert d.step == 1
        student(X)
        student(X)  # two forwards, one d.loss(): one step
        d.loss()
        assert d.step == 2
        with pytest.raises(CaptureError):
            d.loss()  # no new forward: raises, and is not counted
        assert d.step == 2
    teacher, student = _pair()
    with Distiller(teacher, student, layers="relu?") as d:  # no_grad="skip"
        with torch.no_grad():
            student(X)
        assert d.step == 0


def test_step_can_be_set_by_hand_and_is_checked():
    teacher, student = _pair()
    at = athooks.loss("at", schedule=step_decay(1.0, (10,), gamma=0.5))
    reference = athooks.loss("at")
    d = Distiller(teacher, student, layers="relu?", losses=[at, reference])
    d.step = 10
    with d:
        student(X)
        d.loss()
    assert torch.equal(d.terms["at"], d.terms["at_2"] * 0.5) and d.step == 11
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ConfigurationError, match="step must be a whole number >= 0"):
            d.step = bad


def _recipe(d: Distiller, student, opt, steps: range) -> list[torch.Tensor]:
    out = []
    with d:
        for i in steps:
            x = X.roll(i, 0)
            loss = F.cross_entropy(student(x), Y) + d.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(d.terms["at"])
    return out


def _losses():
    return [athooks.loss("at", schedule=cosine(1.0, 0.0, 6)), "kd"]


def test_state_dict_resumes_the_schedule_bit_for_bit():
    teacher, student = _pair()
    twin = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    whole = _recipe(Distiller(teacher, student, "relu?", _losses()), student, opt, range(6))

    opt_b = torch.optim.SGD(twin.parameters(), lr=0.05)
    d_b = Distiller(teacher, twin, "relu?", _losses())
    first = _recipe(d_b, twin, opt_b, range(3))
    buffer = io.BytesIO()
    torch.save({"s": twin.state_dict(), "o": opt_b.state_dict(), "d": d_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["d"]["schedule.step"].dtype == torch.int64 and saved["d"]["schedule.step"] == 3

    student_c = TinyCNN(8)
    student_c.load_state_dict(saved["s"])
    opt_c = torch.optim.SGD(student_c.parameters(), lr=0.05)
    opt_c.load_state_dict(saved["o"])
    d_c = Distiller(teacher, student_c, "relu?", _losses())
    d_c.load_state_dict(saved["d"])  # strict
    assert d_c.step == 3
    rest = _recipe(d_c, student_c, opt_c, range(3, 6))
    for a, b in zip(whole, first + rest, strict=True):
        assert torch.equal(a, b)
    for a, c in zip(student.parameters(), student_c.parameters(), strict=True):
        assert torch.equal(a, c)


def test_an_old_state_dict_without_the_step_loads_strictly():
    teacher, student = _pair()
    d = Distiller(teacher, student, "relu?", _losses())
    d.step = 7
    old = {k: v for k, v in d.state_dict().items() if k != "schedule.step"}
    d.load_state_dict(old, strict=True)
    assert d.step == 7  # left as it was
    d.load_state_dict({"schedule.step": 2}, strict=True)  # a plain int (e.g. from Lightning) too
    assert d.step == 2
    with pytest.raises(ConfigurationError, match="schedule.step must be a whole number"):
        d.load_state_dict({"schedule.step": torch.tensor(1.5)})


# ------------------------------------------------------------------ per-pair weights


def _models(loss_name: str):
    torch.manual_seed(0)
    return (TinyCNN(8), TinyCNN(8)) if loss_name == "fact" else tiny_pair()  # fact: equal widths


def _single_pair_terms(loss_name: str) -> list[float]:
    """Each pair's unweighted term, from a Distiller on that pair alone."""
    out = []
    for pair in PAIRS:
        teacher, student = _models(loss_name)
        with Distiller(teacher, student, layers=[pair], losses=loss_name) as d:
            student(X)
            out.append(d.loss().item())
    return out


@pytest.mark.parametrize("loss_name", ["at", "fact"])
def test_pair_weights_weigh_each_pairs_term(loss_name):
    single = _single_pair_terms(loss_name)
    weights = [0.5, 0.0, 3.0]
    losses = [
        athooks.loss(loss_name, pair_weights=weights),
        athooks.loss(loss_name, pair_weights={"relu1": 0.5, "relu2": 0.0, "relu3": 3.0}),
        athooks.loss(loss_name, pair_weights={"relu3": 3.0}),  # the others weigh 1
    ]
    teacher, student = _models(loss_name)
    with Distiller(teacher, student, layers="relu?", losses=losses) as d:
        student(X)
        d.loss()
    hand = sum(w * t for w, t in zip(weights, single, strict=True))
    assert single[1] > 0 and d.terms[loss_name].item() == pytest.approx(hand, rel=1e-5)
    assert d.terms[f"{loss_name}_2"].item() == pytest.approx(hand, rel=1e-5)
    partial = single[0] + single[1] + 3 * single[2]
    assert d.terms[f"{loss_name}_3"].item() == pytest.approx(partial, rel=1e-5)


def test_pair_weights_and_a_schedule_together():
    teacher, student = _pair()
    both = athooks.loss("at", pair_weights=[1.0, 1.0, 1.0], schedule=0.5)
    with Distiller(teacher, student, layers="relu?", losses=["at", both]) as d:
        student(X)
        d.loss()
    assert torch.equal(d.terms["at_2"], d.terms["at"] * 0.5)


def test_pair_weights_are_checked_against_the_pairs_at_the_first_step():
    teacher, student = _pair()
    at = athooks.loss("at", pair_weights=[1.0, 2.0])
    with Distiller(teacher, student, layers="relu?", losses=at) as d:
        student(X)
        with pytest.raises(
            ConfigurationError, match=r"2 weights for 3 layer pairs: \(teacher 'relu1'"
        ):
            d.loss()
    teacher, student = _pair()
    at = athooks.loss("at", pair_weights={"relu1": 1.0, "conv2": 2.0})
    with Distiller(teacher, student, layers="relu?", losses=at) as d:
        student(X)
        with pytest.raises(ConfigurationError, match="names 'conv2', which is not the student"):
            d.loss()


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        (torch.ones(3), "pass .tolist()"),
        ("1,2,3", "must be a list of numbers"),
        ({1: 2.0}, "must be a list of numbers"),
        ([1.0, -1.0], r"pair_weights\[1\] must be >= 0"),
        ({"relu1": float("nan")}, r"pair_weights\['relu1'\] must be finite"),
    ],
)
def test_bad_pair_weights_are_refused_when_set(weights, match):
    with pytest.raises(ConfigurationError, match=match):
        athooks.loss("at", pair_weights=weights)
    at = athooks.loss("at")
    with pytest.raises(ConfigurationError, match=match):
        at.pair_weights = weights


@pytest.mark.parametrize("name", ["kd", "grad_at", "symmetry", "input_grad_l2"])
def test_losses_without_pairs_refuse_pair_weights_at_their_first_step(name):
    teacher, student = _pair()
    with Distiller(
        teacher, student, layers="relu?", losses=athooks.loss(name, pair_weights=[1])
    ) as d:
        student(X)
        with pytest.raises(CaptureError, match="did not sum per-pair terms with self.sum_pairs"):
            d.loss(target=Y)


class SumsItself(Loss):
    """A third party's per-pair loss that sums its pairs without sum_pairs."""

    name = "sums_itself"

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta
        self.mapping = athooks.mapping("sum_p")

    def captures(self):
        return (self.mapping,)

    def forward(self, step):
        return (
            self.beta
            * torch.stack([(t - s).pow(2).mean() for t, s in step.maps(self.mapping)]).sum()
        )


class Summed(SumsItself):
    name = "summed"

    def forward(self, step):
        return self.beta * self.sum_pairs(
            [(t - s).pow(2).mean() for t, s in step.maps(self.mapping)]
        )


class Plugin:
    @hookimpl
    def athooks_losses(self):
        return [LossSpec("sums_itself", SumsItself), LossSpec("summed", Summed)]


@pytest.fixture
def plugin():
    pm = athooks.get_plugin_manager()
    obj = Plugin()
    pm.register(obj, name="schedules-test-plugin")
    yield
    pm.unregister(obj)


def test_a_plugins_loss_takes_both_options_and_cannot_ignore_pair_weights(plugin):
    ignoring = athooks.loss("sums_itself", beta=2.0, pair_weights=[1, 1, 1])
    teacher, student = _pair()
    with Distiller(teacher, student, layers="relu?", losses=ignoring) as d:
        student(X)
        with pytest.raises(CaptureError, match="loss 'sums_itself' was given pair_weights"):
            d.loss()
    scheduled = athooks.loss("summed", beta=2.0, schedule=warmup(2), pair_weights=[0, 1, 1])
    plain = athooks.loss("summed", beta=2.0)
    assert scheduled.beta == 2.0 and scheduled.schedule == warmup(2)
    teacher, student = _pair()
    with Distiller(teacher, student, layers="relu?", losses=[plain, scheduled]) as d:
        for k in range(3):
            student(X)
            d.loss()
            assert d.terms["summed_2"].item() <= d.terms["summed"].item() * warmup(2)(k) + 1e-7
    assert d.terms["summed_2"].item() > 0


def test_sum_pairs_by_hand():
    at = athooks.loss("at", pair_weights={"b": 2.0})
    terms = [torch.tensor(1.0), torch.tensor(3.0)]
    assert at.sum_pairs(terms, [("a", "a"), ("b", "b")]).item() == 7.0
    assert athooks.loss("at").sum_pairs(terms).item() == 4.0
    listed = athooks.loss("at", pair_weights=[2.0, 0.5])
    assert listed.sum_pairs(terms).item() == 3.5  # no names needed for a list
    with pytest.raises(ConfigurationError, match="2 weights for 3 layer pairs: 3 pairs"):
        listed.sum_pairs([*terms, torch.tensor(1.0)])
