"""TapSet, Tap and PairedTaps directly (not through a Distiller): arming, dedup, copies, checks."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from conftest import TinyCNN, data_parallel_replica, tiny_pair
from torch import nn

import athooks
from athooks import Layer
from athooks.context import internal_run
from athooks.errors import CaptureError
from athooks.layers import resolve_pairs
from athooks.taps import InertHook, PairedTaps, TapSet, apply_layer, check_finite, is_replica

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
SUM_P = athooks.mapping("sum_p")


def relu_taps(model, copy="auto", side="student"):
    taps = TapSet(side, model, [SUM_P], copy=copy)
    indices = [taps.add(n, getattr(model, n), Layer(n)) for n in ("relu1", "relu2", "relu3")]
    return taps, indices


def test_a_tap_captures_only_while_armed_in_its_thread():
    model = TinyCNN(8, inplace=False)
    taps, indices = relu_taps(model)
    taps.attach()
    model(X)  # not armed: nothing happens
    store = taps.arm()
    feats = model.features(X)
    taps.disarm()
    model(X)  # disarmed again
    assert sorted(store) == indices
    for i, feat in zip(indices, feats, strict=True):
        torch.testing.assert_close(store[i].values[SUM_P], feat.pow(2).sum(1))
        assert store[i].calls == 1
    taps.detach()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_arming_is_per_thread():
    model = TinyCNN(8)
    taps, _ = relu_taps(model, side="model")
    taps.attach()
    store = taps.arm()
    other: list = []

    def elsewhere():
        other.append(taps.armed())
        with torch.no_grad():
            model(X + 1)  # fires the hooks in a thread where the set is not armed

    worker = threading.Thread(target=elsewhere)
    worker.start()
    worker.join()
    assert other == [None] and not store
    taps.detach()


def test_calls_inside_an_internal_run_are_not_captured_by_a_set_armed_outside():
    model = TinyCNN(8)
    taps, _ = relu_taps(model, side="model")
    taps.attach()
    store = taps.arm()
    with internal_run(), torch.no_grad():
        model(X)  # a probe, say
    assert not store
    with internal_run():
        inner = taps.arm()  # armed at depth 1: captures there
        with torch.no_grad():
            model(X)
    assert len(inner) == 3
    taps.detach()


def test_taps_are_deduplicated_by_module_and_spec():
    model = TinyCNN(8)
    taps = TapSet("teacher", model, [SUM_P])
    a = taps.add("relu1", model.relu1, Layer("relu1"))
    b = taps.add("relu1", model.relu1, Layer("relu1"))
    c = taps.add("relu1", model.relu1, Layer("relu1", select=0))
    assert a == b != c and len(taps.taps) == 2


def test_the_last_call_of_a_module_wins_and_calls_are_counted():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), relu, nn.Conv2d(4, 4, 3), relu)
    taps = TapSet("model", model, [SUM_P])
    i = taps.add("1", relu, Layer("1"))
    taps.attach()
    store = taps.arm()
    with torch.no_grad():
        out = model(X)
    assert store[i].calls == 2
    torch.testing.assert_close(store[i].values[SUM_P], out.pow(2).sum(1))
    taps.detach()


def test_teacher_maps_are_detached_copies_independent_of_the_output():
    model = TinyCNN(8, inplace=False)
    taps = TapSet("teacher", model, [athooks.mapping("sum_p"), athooks.mapping("sum")])
    features = athooks.losses.FActT().features  # keeps the feature map itself
    taps = TapSet("teacher", model, [features])
    i = taps.add("relu1", model.relu1, Layer("relu1"))
    taps.attach()
    store = taps.arm()
    out = {}
    model.relu1.register_forward_hook(lambda m, a, o: out.setdefault("t", o))
    model(X)
    kept = store[i].values[features]
    assert not kept.requires_grad
    out["t"].mul_(0)  # the model's own tensor, edited: the capture is a copy
    assert kept.abs().sum() > 0
    taps.detach()


def test_probing_copies_on_the_first_forward_then_only_overwritten_outputs():
    model = TinyCNN(8, inplace=True)  # bn outputs are overwritten by the in-place ReLUs
    taps = TapSet("student", model, [SUM_P])
    bn = taps.add("bn1", model.bn1, Layer("bn1"))
    relu = taps.add("relu1", model.relu1, Layer("relu1"))
    taps.attach()
    for _ in range(2):
        store = taps.arm()
        model(X)
        taps.end_forward(store)
        taps.disarm()
    assert taps.taps[bn].copy and not taps.taps[relu].copy
    assert taps.copy_state() == {"bn1": True, "relu1": False}
    assert taps.load_copy_state({"bn1": False, "nope": True}) == ["nope"]
    taps.detach()


def test_an_overwrite_that_starts_later_is_reported_at_collect():
    model = TinyCNN(8, inplace=False)
    taps = TapSet("student", model, [SUM_P])
    i = taps.add("bn1", model.bn1, Layer("bn1"))
    taps.attach()
    store = taps.arm()
    model(X)
    taps.end_forward(store)  # the probe: not overwritten, so no copy from now on
    handle = model.bn1.register_forward_hook(lambda m, a, o: o.mul_(1.0))
    store = taps.arm()
    model(X)
    taps.end_forward(store)
    with pytest.raises(CaptureError, match="overwritten in place after athooks captured it"):
        taps.collect(store, [i], grad_enabled=True)
    handle.remove()
    taps.detach()


def test_an_edit_after_the_forward_fails_backward_with_a_clear_error():
    model = TinyCNN(8, inplace=False)
    taps = TapSet("student", model, [SUM_P], copy="auto")
    i = taps.add("relu3", model.relu3, Layer("relu3"))
    taps.taps[i].probing = False  # as after a first step that did not overwrite it
    taps.attach()
    out = {}
    model.relu3.register_forward_hook(lambda m, a, o: out.setdefault("t", o.view_as(o)))
    store = taps.arm()
    model(X)
    amap = store[i].values[SUM_P]
    out["t"].add_(1.0)  # edits the tapped output (a view shares its version counter)
    with pytest.raises(CaptureError, match="student layer 'relu3' was modified in place"):
        amap.sum().backward()
    taps.detach()


def test_collect_names_the_tap_that_did_not_fire():
    model = TinyCNN(8)
    taps, indices = relu_taps(model, side="teacher")
    store = taps.arm()
    with pytest.raises(CaptureError, match="teacher layer 'relu1' did not fire"):
        taps.collect(store, indices)


def test_a_replica_is_reported_and_a_deep_copy_is_ignored():
    model = TinyCNN(8)
    taps, indices = relu_taps(model, side="model")
    taps.attach()
    replica = data_parallel_replica(model)
    clone = copy.deepcopy(model)
    assert is_replica(replica.relu1, model.relu1) and not is_replica(clone.relu1, model.relu1)
    store = taps.arm()
    with torch.no_grad():
        clone(X)
        replica(X)
    assert not store and store.replicas == ["relu1", "relu2", "relu3"]
    with pytest.raises(CaptureError, match="ran only as DataParallel replicas"):
        taps.collect(store, indices)
    taps.detach()


def test_hooks_pickle_to_inert_ones():
    import pickle

    model = TinyCNN(8)
    taps, _ = relu_taps(model)
    taps.attach()
    restored = pickle.loads(pickle.dumps(model))
    assert all(
        isinstance(h, InertHook) for m in restored.modules() for h in m._forward_hooks.values()
    )
    taps.detach()


def test_apply_layer_selects_copies_and_transforms():
    out = (torch.randn(2, 4, 3, 3), "aux")
    raw, maps = apply_layer(Layer("x", select=0), out, [SUM_P], "layer 'x'", copy=True)
    assert raw is out[0]
    torch.testing.assert_close(maps[SUM_P], out[0].pow(2).sum(1))
    nhwc = torch.randn(2, 3, 3, 4)
    _, maps = apply_layer(Layer("x", transform=lambda t: t.permute(0, 3, 1, 2)), nhwc, [SUM_P], "x")
    torch.testing.assert_close(maps[SUM_P], nhwc.pow(2).sum(-1))


def test_paired_taps_values_move_the_teacher_maps_and_check_the_batch():
    teacher, student = tiny_pair()
    paired = PairedTaps(teacher, student, resolve_pairs(teacher, student, "relu?"), [SUM_P])
    assert paired.pairs == [("relu1", "relu1"), ("relu2", "relu2"), ("relu3", "relu3")]
    paired.attach()
    t_store = paired.teacher.arm()
    with torch.no_grad():
        teacher.eval()(X)
    paired.teacher.disarm()
    s_store = paired.student.arm()
    student(X)
    paired.student.disarm()
    t_vals, s_vals = paired.values(t_store, s_store, grad_enabled=True)
    assert len(t_vals) == len(s_vals) == 3 and all(v[SUM_P].requires_grad for v in s_vals)
    assert not any(v[SUM_P].requires_grad for v in t_vals)
    paired.detach()
    with pytest.raises(CaptureError, match="batch was empty"):
        paired.values(None, None, grad_enabled=True, student_output=torch.zeros(0, 5))


def test_paired_taps_warn_once_for_a_single_cell_map():
    teacher, student = tiny_pair()
    paired = PairedTaps(teacher, student, resolve_pairs(teacher, student, "relu3"), [SUM_P])
    paired.attach()
    x = torch.randn(2, 3, 4, 4)  # relu3 is 1x1 at 4x4
    stores = []
    for taps, model in ((paired.teacher, teacher), (paired.student, student)):
        stores.append(taps.arm())
        with torch.no_grad():
            model(x)
        taps.disarm()
    with pytest.warns(UserWarning, match="single cell"):
        paired.values(*stores, grad_enabled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paired.values(*stores, grad_enabled=False)  # once per pair
    paired.detach()


def test_check_finite_names_the_first_bad_layer():
    good, bad = {SUM_P: torch.ones(1, 2, 2)}, {SUM_P: torch.tensor([[[1.0, float("nan")]]])}
    check_finite([("a", "b")], [good], [good])
    with pytest.raises(CaptureError, match="student layer 'b' holds NaN"):
        check_finite([("a", "b")], [good], [bad])
