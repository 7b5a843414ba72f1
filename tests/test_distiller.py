"""The Distiller: what runs when, state, hook hygiene, the forward-hook pitfalls and bad input."""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
import torchvision
from conftest import MapSpy, TinyCNN, held_captures, ref_at_loss_code, tiny_pair
from torch import nn
from torch.utils.checkpoint import checkpoint

import athooks
from athooks import Distiller, Layer
from athooks.errors import CaptureError, ConfigurationError, LayerResolutionError

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def manual_bn_outputs(model: TinyCNN, x: torch.Tensor) -> list[torch.Tensor]:
    """BN outputs before the ReLU, computed without any in-place op."""
    a = model.bn1(model.conv1(x))
    b = model.bn2(model.conv2(F.relu(a)))
    c = model.bn3(model.conv3(F.relu(b)))
    return [a, b, c]


# ------------------------------------------------------------------ what runs, and state


def test_training_step_changes_student_only():
    teacher, student = tiny_pair()
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with Distiller(teacher, student, layers="relu?") as d:
        for _ in range(2):
            loss = F.cross_entropy(student(X), Y) + d.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # weights and BN running statistics
        assert torch.equal(v, teacher_before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())


def test_at_term_has_gradient_towards_student_features():
    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu?", losses=athooks.loss("at")) as d:
        student(X)
        d.loss().backward()
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
    assert student.head.weight.grad is None  # the head is after every tapped layer


def test_teacher_frozen_inside_and_restored_after():
    teacher, student = tiny_pair()
    teacher.train()
    teacher.conv1.weight.requires_grad_(False)  # a user's own choice must come back as it was
    before = {n: p.requires_grad for n, p in teacher.named_parameters()}
    with Distiller(teacher, student, layers="relu?") as d:
        assert not teacher.training
        assert not any(p.requires_grad for p in teacher.parameters())
        student(X)
        d.loss()
    assert teacher.training
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == before


def test_state_restored_and_hooks_removed_when_the_block_raises():
    teacher, student = tiny_pair()
    teacher.train()
    counts = hook_count(teacher), hook_count(student)
    with (
        pytest.raises(RuntimeError, match="user error"),
        Distiller(teacher, student, layers="relu?"),
    ):
        student(X)
        raise RuntimeError("user error")
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert (hook_count(teacher), hook_count(student)) == counts


def test_student_mode_and_requires_grad_are_never_touched():
    teacher, student = tiny_pair()
    student.eval()
    student.conv1.weight.requires_grad_(False)
    with Distiller(teacher, student, layers="relu?") as d:
        assert not student.training
        student(X)
        d.loss()
        student.train()  # the user's own change inside the block stays
    assert student.training and not student.conv1.weight.requires_grad
    assert student.conv2.weight.requires_grad


def test_teacher_runs_once_per_student_forward_before_it():
    teacher, student = tiny_pair()
    order = []
    teacher.register_forward_pre_hook(lambda *a: order.append("teacher"))
    student.register_forward_pre_hook(lambda *a: order.append("student"))
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        d.loss()
        student(X)
    # the student's own pre-hook was registered first, so it runs first; the teacher runs
    # before the student's modules do
    assert order == ["student", "teacher", "student", "teacher"]


def test_teacher_put_back_in_eval_if_something_calls_train():
    teacher, student = tiny_pair()
    both = nn.ModuleDict({"teacher": teacher, "student": student})
    stats = teacher.bn1.running_mean.clone()
    with Distiller(teacher, student, layers="relu?") as d:
        both.train()  # e.g. a LightningModule holding both models
        student(X)
        d.loss()
    assert torch.equal(teacher.bn1.running_mean, stats)


def test_teacher_input_adapts_what_the_teacher_sees():
    teacher, student = tiny_pair()
    seen = []
    teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with Distiller(
        teacher,
        student,
        layers="relu?",
        teacher_input=lambda x: F.interpolate(x, scale_factor=2.0),
        resize="error",
    ) as d:
        student(X)
        with pytest.raises(
            CaptureError, match=r"spatial size: teacher \(32, 32\), student \(16, 16\)"
        ):
            d.loss()
    assert seen == [torch.Size([4, 3, 32, 32])]


def test_positional_and_keyword_inputs_reach_the_teacher():
    class Scaled(TinyCNN):
        def forward(self, x, *, scale=1.0):
            return super().forward(x * scale)

    torch.manual_seed(0)
    teacher, student = Scaled(16), Scaled(8)
    seen = {}
    teacher.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with Distiller(teacher, student, layers="relu3") as d:
        student(X, scale=0.5)
        d.loss()
    assert seen == {"scale": 0.5}


def test_terms_sum_to_the_loss_and_labels_are_unique():
    teacher, student = tiny_pair()
    losses = [athooks.loss("at"), athooks.loss("at", mapping="max_p", p=4), "at"]
    with Distiller(teacher, student, layers="relu?", losses=losses) as d:
        student(X)
        total = d.loss()
    assert list(d.terms) == ["at", "at_2", "at_3"]
    assert torch.allclose(total.detach(), sum(d.terms.values()))
    assert all(not v.requires_grad for v in d.terms.values())
    assert d.terms["at"] == d.terms["at_3"]


def test_a_forward_under_no_grad_runs_as_if_no_distiller_were_there():
    teacher, student = tiny_pair()
    runs = []
    teacher.register_forward_hook(lambda m, a, o: runs.append(1))
    with torch.no_grad():
        want = student(X)
    for mode in (torch.no_grad, torch.inference_mode):
        with Distiller(teacher, student, layers="relu?") as d:
            with mode():
                got = student(X)
            assert runs == [] and torch.equal(got, want)
            with pytest.raises(CaptureError, match='no_grad="capture"'):
                d.loss()


def test_loss_under_no_grad_with_capture_for_validation():
    teacher, student = tiny_pair()
    with torch.no_grad():
        t_feats = teacher.eval().features(X)  # the teacher runs in eval mode
        want = ref_at_loss_code(list(zip(t_feats, student.features(X), strict=True)))
    teacher.train()
    for mode in (torch.no_grad, torch.inference_mode):
        with Distiller(teacher, student, layers="relu?", no_grad="capture") as d, mode():
            student(X)
            value = d.loss()
        assert not value.requires_grad
        assert value.item() == pytest.approx(want.item(), rel=1e-5)


def test_data_parallel_student_with_bare_names():
    teacher, student = tiny_pair()
    wrapped = nn.DataParallel(student)  # runs the module directly when there is no GPU
    with Distiller(teacher, wrapped, layers=["relu?"]) as d:
        wrapped(X)
        got = d.loss()
    with Distiller(teacher, student, layers=["relu?"]) as d2:
        student(X)
        want = d2.loss()
    assert d.pairs == [("relu1", "relu1"), ("relu2", "relu2"), ("relu3", "relu3")]
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ pitfall 1: in-place ops


@pytest.mark.parametrize("policy", ["auto", "always"])
def test_inplace_overwrite_gives_value_as_produced_and_correct_gradient(policy):
    teacher, student = tiny_pair(inplace=True)
    ref_student = TinyCNN(8, inplace=False)
    ref_student.load_state_dict(student.state_dict())
    ref_teacher = TinyCNN(16, inplace=False)
    ref_teacher.load_state_dict(teacher.state_dict())
    ref_teacher.eval()
    with Distiller(teacher, student, layers="bn?", copy_outputs=policy) as d:
        for step in range(2):  # step 0 probes, step 1 runs with what the probe decided
            x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(step))
            student.zero_grad()
            student(x)
            got = d.loss()
            got.backward()
            ref_student.zero_grad()
            with torch.no_grad():
                t_feats = manual_bn_outputs(ref_teacher, x)
            s_feats = manual_bn_outputs(ref_student, x)
            want = ref_at_loss_code(list(zip(t_feats, s_feats, strict=True)))
            want.backward()
            assert got.item() == pytest.approx(want.item(), rel=1e-5)
            # conv biases before a BN have a zero gradient in exact arithmetic: compare against
            # the scale of the whole gradient (float32 here, float64 in the reference)
            scale = max(
                q.grad.abs().max().item() for q in ref_student.parameters() if q.grad is not None
            )
            for (name, p), p_ref in zip(
                student.named_parameters(), ref_student.parameters(), strict=True
            ):
                if p.grad is None:
                    assert p_ref.grad is None or p_ref.grad.abs().max() == 0, name
                else:
                    torch.testing.assert_close(
                        p.grad.double(), p_ref.grad.double(), rtol=1e-4, atol=1e-4 * scale
                    )


class SometimesInplace(TinyCNN):
    """Overwrites the output of bn2 in place only when asked (a changing code path)."""

    overwrite = False

    def forward(self, x):
        a = self.relu1(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a))
        b = b.relu_() if self.overwrite else F.relu(b)
        return self.head(self.relu3(self.bn3(self.conv3(b))).mean((2, 3)))


def test_overwrite_that_appears_after_probing_is_a_clear_error():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), SometimesInplace(8)
    with Distiller(teacher, student, layers="bn2") as d:
        student(X)
        d.loss().backward()
        student.overwrite = True
        student(X)
        with pytest.raises(
            CaptureError,
            match=r"student layer 'bn2' was overwritten in place.*copy_outputs='always'",
        ):
            d.loss()
    with Distiller(teacher, student, layers="bn2", copy_outputs="always") as d:
        student(X)
        d.loss().backward()  # works


def test_timm_resnet_block_bn2_hit_by_residual_add():
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=5)
    student = timm.create_model("resnet18", num_classes=5)
    with torch.no_grad():  # undo zero_init_last so the maps are not all zero
        for m in (*teacher.modules(), *student.modules()):
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    captured = {}

    def keep(name):
        def hook(module, args, out):
            captured[name] = out.detach().clone()

        return hook

    teacher.layer1[0].bn2.register_forward_hook(keep("t"))
    student.layer1[0].bn2.register_forward_hook(keep("s"))
    with Distiller(teacher, student, layers="layer1.0.bn2") as d:
        for _ in range(2):
            student(x)
            got = d.loss()
            got.backward()  # no "modified by an inplace operation" error
            want = ref_at_loss_code([(captured["t"], captured["s"])])
            assert got.item() == pytest.approx(want.item(), rel=1e-5)


# ------------------------------------------------------------------ pitfall 2: repeated calls


class Twice(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.Tanh())

    def forward(self, x):
        first = self.block(self.stem(x))
        return self.block(first * 2).mean((1, 2, 3))


def test_module_called_several_times_uses_the_last_call():
    torch.manual_seed(0)
    teacher, student = Twice(6), Twice(4)
    with Distiller(teacher, student, layers="block") as d:
        student(X)
        got = d.loss()
    teacher.eval()
    with torch.no_grad():
        t_last = teacher.block(teacher.block(teacher.stem(X)) * 2)
        s_last = student.block(student.block(student.stem(X)) * 2)
        s_first = student.block(student.stem(X))
    assert got.item() == pytest.approx(ref_at_loss_code([(t_last, s_last)]).item(), rel=1e-5)
    assert got.item() != pytest.approx(ref_at_loss_code([(t_last, s_first)]).item(), rel=1e-3)


def test_torchvision_shared_relu_fires_per_call_and_keeps_the_last():
    t, s = torchvision.models.resnet34(), torchvision.models.resnet18()
    outs = []
    s.layer1[0].relu.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    spy = MapSpy()
    with Distiller(t, s, layers="layer1.0.relu", losses=["at", spy]) as d:
        s(torch.randn(2, 3, 32, 32))
        assert len(outs) == 2  # relu runs twice in a BasicBlock
        assert torch.isfinite(d.loss())
    torch.testing.assert_close(spy.seen[0][0][1], outs[-1].pow(2).sum(1))  # the last call


# ------------------------------------------------------------------ layers that do not fire


class Branchy(TinyCNN):
    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.extra = nn.Conv2d(2 * width, 2 * width, 1)
        self.use_extra = True

    def forward(self, x):
        a = self.relu1(self.bn1(self.conv1(x)))
        b = self.relu2(self.bn2(self.conv2(a)))
        if self.use_extra:
            b = self.extra(b)
        return self.head(self.relu3(self.bn3(self.conv3(b))).mean((2, 3)))


def test_student_layer_that_did_not_fire_is_named():
    torch.manual_seed(0)
    teacher, student = Branchy(16), Branchy(8)
    student.use_extra = False
    with Distiller(teacher, student, layers=["extra", "relu3"]) as d:
        student(X)
        with pytest.raises(CaptureError, match="student layer 'extra' did not fire.*torch.compile"):
            d.loss()


def test_teacher_layer_that_did_not_fire_is_named():
    torch.manual_seed(0)
    teacher, student = Branchy(16), Branchy(8)
    teacher.use_extra = False
    with Distiller(teacher, student, layers="extra") as d:
        student(X)
        with pytest.raises(CaptureError, match="teacher layer 'extra' did not fire"):
            d.loss()


def test_timm_grad_checkpointing_that_bypasses_stage_hooks_is_caught():
    teacher = timm.create_model("resnet18", num_classes=5)
    student = timm.create_model("resnet18", num_classes=5)
    student.set_grad_checkpointing(True)
    with Distiller(teacher, student, layers="layer2") as d:
        student(torch.randn(2, 3, 32, 32))
        with pytest.raises(
            CaptureError,
            match="student layer 'layer2' did not fire.*set_grad_checkpointing.*Tap its last "
            "block instead \\('layer2.1'",
        ):
            d.loss()


def test_timm_grad_checkpointing_with_block_taps_gives_the_same_values_and_gradients():
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=5)
    plain = timm.create_model("resnet18", num_classes=5)
    ckpt = timm.create_model("resnet18", num_classes=5)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    got = {}
    for name, student in (("plain", plain), ("ckpt", ckpt)):
        with Distiller(teacher, student, layers=["layer1.1", "layer2.1", "layer3.1"]) as d:
            loss = F.cross_entropy(student(x), y) + d.loss()
            loss.backward()
        got[name] = (loss.item(), {n: p.grad for n, p in student.named_parameters()})
    assert got["ckpt"][0] == pytest.approx(got["plain"][0], rel=1e-6)
    for n, g in got["plain"][1].items():
        torch.testing.assert_close(got["ckpt"][1][n], g, msg=n)


# ------------------------------------------------------------------ pitfall 5: checkpointing


class Checkpointed(TinyCNN):
    reentrant = False

    def forward(self, x):
        a = self.relu1(self.bn1(self.conv1(x)))
        b = checkpoint(self.mid, a, use_reentrant=self.reentrant)
        return self.head(self.relu3(self.bn3(self.conv3(b))).mean((2, 3)))

    def mid(self, a):
        return self.relu2(self.bn2(self.conv2(a)))


def test_non_reentrant_checkpoint_gives_the_same_values_and_gradients():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16, inplace=False), Checkpointed(8, inplace=False)
    plain = TinyCNN(8, inplace=False)
    plain.load_state_dict(student.state_dict())
    runs = []
    teacher.register_forward_hook(lambda m, a, o: runs.append(1))
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        got = d.loss()
        got.backward()
        # the recompute during backward re-fired the hooks; nothing was captured from it, and
        # it did not run the teacher again
        assert held_captures(d) == [] and runs == [1]
    with Distiller(teacher, plain, layers="relu?") as d:
        plain(X)
        want = d.loss()
        want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for p, q in zip(student.parameters(), plain.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)


def test_reentrant_checkpoint_is_a_clear_error_naming_the_layer():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16, inplace=False), Checkpointed(8, inplace=False)
    student.reentrant = True
    x = X.clone().requires_grad_()
    with Distiller(teacher, student, layers="relu?") as d:
        student(x)
        with pytest.raises(
            CaptureError,
            match="student layer 'relu2' ran with gradient disabled.*use_reentrant=False",
        ):
            d.loss()


class Detaching(TinyCNN):
    def forward(self, x):
        a = self.relu1(self.bn1(self.conv1(x)))
        return self.head(self.relu2(self.bn2(self.conv2(a))).detach().mean((2, 3)))


def test_student_map_without_gradient_is_an_error():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), TinyCNN(8)
    student.bn2.register_forward_hook(lambda m, a, out: out.detach())
    with Distiller(teacher, student, layers="bn2") as d:
        student(X)
        with pytest.raises(CaptureError, match="student layer 'bn2' carries no gradient"):
            d.loss()


def test_frozen_layers_before_the_tap_are_not_an_error():
    teacher, student = tiny_pair()
    for m in (student.conv1, student.bn1):
        for p in m.parameters():
            p.requires_grad_(False)
    with Distiller(teacher, student, layers="relu1") as d:
        student(X)
        with pytest.warns(UserWarning, match="'relu1' carries no gradient: nothing trainable"):
            assert not d.loss().requires_grad
        student(X)
        assert not d.loss().requires_grad  # warned once


# ------------------------------------------------------------------ pitfall 8: deep copies


def test_ema_copy_inside_the_block_does_not_write_into_captures():
    teacher, student = tiny_pair()
    teacher_calls = []
    teacher.register_forward_pre_hook(lambda *a: teacher_calls.append(1))
    other = torch.randn(4, 3, 16, 16)
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        want = d.loss().item()
        ema = copy.deepcopy(student)  # copies athooks' hooks along with the modules
        student(X)
        ema(other)  # must not replace the student's captures, nor run the teacher
        got = d.loss().item()
    assert got == pytest.approx(want, rel=1e-6)
    assert len(teacher_calls) == 2


def test_timm_model_ema_v3_updated_inside_the_block():
    from timm.utils import ModelEmaV3

    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu?") as d:
        ema = ModelEmaV3(student, decay=0.9)
        student(X)
        want = d.loss().item()
        student(X)
        ema.update(student)
        ema.module(torch.randn(4, 3, 16, 16))
        assert d.loss().item() == pytest.approx(want, rel=1e-6)


def test_a_model_carrying_hooks_can_be_pickled_and_unpickled_inert():
    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu?"):
        blob = pickle.dumps(student)
    clone = pickle.loads(blob)  # our own bytes, written just above
    clone(X)  # its copied hooks do nothing


# ------------------------------------------------------------------ pitfall 7: outputs


class Outputs(nn.Module):
    def __init__(self, width: int, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.aux = nn.Conv2d(3, width, 1)
        self.kind = kind

    def forward(self, x):
        return self.block(x)[0] if self.kind == "tuple" else self.block(x)["feat"]

    def block(self, x):
        feat, aux = self.conv(x), self.aux(x)
        return (feat, aux) if self.kind == "tuple" else {"feat": feat, "aux": aux}


class Wrap(nn.Module):
    def __init__(self, width: int, kind: str) -> None:
        super().__init__()
        self.inner = Outputs(width, kind)
        self.inner.forward = self.inner.block  # type: ignore[method-assign]

    def forward(self, x):
        out = self.inner(x)
        first = out[0] if isinstance(out, tuple) else out["feat"]
        second = out[1] if isinstance(out, tuple) else out["aux"]
        return (first + second).mean((1, 2, 3))


@pytest.mark.parametrize("kind", ["tuple", "dict"])
@pytest.mark.parametrize(
    ("select", "which"),
    [(None, 0), ("second", 1), ("callable", 1)],
)
def test_tuple_and_dict_outputs(kind, select, which):
    torch.manual_seed(0)
    teacher, student = Wrap(6, kind), Wrap(4, kind)
    if select == "second":
        select = 1 if kind == "tuple" else "aux"
    elif select == "callable":
        select = (lambda out: out[1]) if kind == "tuple" else (lambda out: out["aux"])
    with Distiller(teacher, student, layers=Layer("inner", select=select)) as d:
        student(X)
        got = d.loss()
    with torch.no_grad():
        t = teacher.inner.block(X)
        s = student.inner.block(X)
        key = which if kind == "tuple" else ("feat", "aux")[which]
        want = ref_at_loss_code([(t[key], s[key])])
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_token_outputs_need_a_transform():
    mha_t = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    mha_s = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    tokens = torch.randn(2, 16, 8)
    with (
        Distiller(mha_t, mha_s, layers="self_attn"),
        pytest.raises(CaptureError, match=r"shape \(2, 16, 8\).*tokens \(B, N, C\).*transform"),
    ):
        mha_s(tokens)
    grid = Layer("linear2", transform=lambda t: t.transpose(1, 2).reshape(2, 8, 4, 4))
    with Distiller(mha_t, mha_s, layers=grid) as d:
        mha_s(tokens)
        assert torch.isfinite(d.loss())


def test_bad_select_is_a_clear_error():
    torch.manual_seed(0)
    teacher, student = Wrap(6, "tuple"), Wrap(4, "tuple")
    with (
        Distiller(teacher, student, layers=Layer("inner", select=5)),
        pytest.raises(
            CaptureError,
            # the layer is named with its key, as in d.pairs
            match=r"select=5 failed on the output of teacher layer 'inner\[5\]' \(a tuple\)",
        ),
    ):
        student(X)


# ------------------------------------------------------------------ lifecycle


def test_loss_lifecycle_errors():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, layers="relu?")
    with pytest.raises(CaptureError, match="not attached"):
        d.loss()
    with d:
        with pytest.raises(CaptureError, match="before any forward of the student"):
            d.loss()
        with pytest.raises(ConfigurationError, match="already attached"):
            d.attach()
        student(X)
        d.loss()
        with pytest.raises(CaptureError, match="already called for the student's last forward"):
            d.loss()
        student(X)
        d.loss()  # a new forward makes it usable again
    with pytest.raises(CaptureError, match="not attached"):
        d.loss()


def test_forward_that_raised_leaves_no_usable_step():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), TinyCNN(8)
    with Distiller(teacher, student, layers="relu?") as d:
        with pytest.raises(RuntimeError):
            student(torch.randn(4, 5, 16, 16))  # wrong channel count: the teacher raises first
        with pytest.raises(CaptureError, match="before any forward|did not finish"):
            d.loss()
        student(X)
        assert torch.isfinite(d.loss())


class FailsLate(TinyCNN):
    fail = True

    def forward(self, x):
        out = super().forward(x)  # every tapped layer fired
        if self.fail:
            raise RuntimeError("late failure")
        return out


def test_student_forward_that_raised_after_the_taps_fired_is_not_a_step():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), FailsLate(8)
    with Distiller(teacher, student, layers="relu?") as d:
        with pytest.raises(RuntimeError, match="late failure"):
            student(X)
        with pytest.raises(CaptureError, match="did not finish"):
            d.loss()
        student.fail = False
        student(X)  # the next forward starts cleanly
        assert torch.isfinite(d.loss())


def test_teacher_errors_say_athooks_ran_it():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU())
    teacher_first = TinyCNN(16)
    with Distiller(teacher, student, layers=[("relu1", "1")]), pytest.raises(RuntimeError) as info:
        student(torch.randn(2, 1, 16, 16))
    assert "athooks ran the teacher" in "".join(getattr(info.value, "__notes__", []))
    del teacher_first


def test_captures_are_released_after_loss_and_nothing_is_retained_after_exit():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, layers="relu?")
    with d:
        out = student(X)
        d.loss()
        assert held_captures(d) == []
    del out
    ref = weakref.ref(d)
    gc.disable()
    try:
        del d
        assert ref() is None  # no reference cycles keep it alive
    finally:
        gc.enable()
    assert hook_count(student) == 0 and hook_count(teacher) == 0


def test_a_distiller_dropped_while_attached_removes_its_hooks():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, layers="relu?").attach()
    assert hook_count(student) > 0
    del d
    gc.collect()
    assert hook_count(student) == 0 and hook_count(teacher) == 0
    student(X)  # still a plain model


# ------------------------------------------------------------------ bad input


def test_teacher_is_the_student():
    _, student = tiny_pair()
    with pytest.raises(ConfigurationError, match="the teacher and the student are the same module"):
        Distiller(student, student, layers="relu?")
    with pytest.raises(ConfigurationError, match="same module"):
        Distiller(nn.DataParallel(student), student, layers="relu?")


@pytest.mark.parametrize("bad", ["resnet18", None, torch.randn(2)])
def test_models_must_be_modules(bad):
    _, student = tiny_pair()
    with pytest.raises(
        ConfigurationError, match="teacher must be a torch.nn.Module.*build the model first"
    ):
        Distiller(bad, student, layers="relu?")
    with pytest.raises(ConfigurationError, match="student must be a torch.nn.Module"):
        Distiller(student, bad, layers="relu?")


def test_pattern_matching_nothing_suggests_names():
    teacher, student = tiny_pair()
    with pytest.raises(
        LayerResolutionError,
        match="pattern 'rleu1' matched no module of the teacher; close names: relu1",
    ):
        Distiller(teacher, student, layers="rleu1")


def test_unequal_numbers_of_layers_list_both_sides():
    t, s = torchvision.models.resnet34(), torchvision.models.resnet18()
    with pytest.raises(
        LayerResolutionError,
        match=r"matched 3 modules.*matched 2(.|\n)*teacher: layer4.0, layer4.1, layer4.2(.|\n)*student: layer4.0, layer4.1",
    ):
        Distiller(t, s, layers="layer4.*")


def test_different_spatial_sizes_name_the_pair_and_both_sizes():
    t, s = torchvision.models.resnet34(), torchvision.models.resnet18()
    with Distiller(t, s, layers={"layer2": "layer3"}, resize="error") as d:
        s(torch.randn(2, 3, 64, 64))
        with pytest.raises(
            CaptureError,
            match=r"pair \(teacher 'layer2', student 'layer3'\) differ in spatial size: teacher \(8, 8\), student \(4, 4\)",
        ):
            d.loss()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"losses": 3}, "losses must be a loss name"),
        ({"losses": [nn.MSELoss()]}, "expected a loss name or athooks.loss"),
        ({"losses": []}, "losses is empty"),
        ({"losses": "attention"}, "unknown loss 'attention'"),
        ({"teacher_input": 3}, "teacher_input must be a callable"),
        ({"copy_outputs": "never"}, "copy_outputs must be 'auto' or 'always'"),
        ({"resize": "nearest"}, "resize must be 'student'"),
    ],
)
def test_bad_arguments(kwargs, match):
    teacher, student = tiny_pair()
    with pytest.raises(ConfigurationError, match=match):
        Distiller(teacher, student, layers="relu?", **kwargs)


def test_mapping_returning_wrong_shape_is_caught_at_capture():
    teacher, student = tiny_pair()
    at = athooks.loss("at", mapping=lambda f: f.mean((1, 2)))
    with (
        Distiller(teacher, student, layers="relu1", losses=at),
        pytest.raises(
            CaptureError,
            match=r"returned a torch.float32 tensor of shape \(4, 16\) for teacher layer 'relu1'",
        ),
    ):
        student(X)


def test_loss_returning_non_scalar_is_caught():
    class Bad(athooks.Loss):
        def forward(self, step):
            return torch.ones(3)

    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu1", losses=Bad()) as d:
        student(X)
        with pytest.raises(CaptureError, match="a loss must return a scalar tensor"):
            d.loss()


# ------------------------------------------------------------------ pitfall 3: torch.compile
# Each test uses its own subclass: dynamo caches compiled code per `forward` code object, and a
# graph compiled without hooks is reused, hooks silently skipped, for another instance.


class CompiledLate(TinyCNN):
    def forward(self, x):
        return super().forward(x)


class CompiledEarly(TinyCNN):
    def forward(self, x):
        return super().forward(x)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_student_compiled_after_the_distiller_works(backend):
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), CompiledLate(8)
    twin = CompiledLate(8)
    twin.load_state_dict(student.state_dict())
    with Distiller(teacher, twin, layers="relu?") as d:
        twin(X)
        want = d.loss()
        want.backward()
    torch._dynamo.reset()
    with Distiller(teacher, student, layers="relu?") as d:
        compiled = torch.compile(student, backend=backend)
        compiled(X)
        got = d.loss()
        got.backward()
    torch._dynamo.reset()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(student.conv1.weight.grad, twin.conv1.weight.grad)


def test_student_compiled_before_the_distiller_is_recompiled_with_the_hooks():
    """Code compiled before the Distiller has no guard on hooks: attaching drops it, so the
    next call compiles again with the taps (the compiled model, or the model itself, given)."""
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), CompiledEarly(8)
    twin = CompiledLate(8)
    twin.load_state_dict(student.state_dict())
    with Distiller(teacher, twin, layers="relu?") as d:
        twin(X)
        want = d.loss().item()
    compiled = torch.compile(student, backend="eager")
    compiled(X)  # graph compiled without athooks' hooks
    for given in (compiled, student):
        with Distiller(teacher, given, layers="relu?") as d:
            compiled(X)
            assert d.loss().item() == pytest.approx(want, rel=1e-5)
        compiled(X)  # after the block: the hooks are gone, so is their code
        assert held_captures(d) == []
    torch._dynamo.reset()


class CompiledInPlace(TinyCNN):
    def forward(self, x):
        return super().forward(x)


def test_module_compile_in_place_before_and_after_the_distiller():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), CompiledInPlace(8)
    twin = TinyCNN(8)
    twin.load_state_dict(student.state_dict())
    with Distiller(teacher, twin, layers="relu?") as d:
        twin(X)
        want = d.loss().item()
    student.compile(backend="eager")  # nn.Module.compile(): compiled in place
    student(X)
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        assert d.loss().item() == pytest.approx(want, rel=1e-5)
    torch._dynamo.reset()
    other = CompiledInPlace(8)
    other.load_state_dict(twin.state_dict())
    with Distiller(teacher, other, layers="relu?") as d:  # Distiller first, then compile
        other.compile(backend="eager")
        other(X)
        assert d.loss().item() == pytest.approx(want, rel=1e-5)
    torch._dynamo.reset()


class CompiledPerEpoch(TinyCNN):
    def forward(self, x):
        return super().forward(x)


def test_compiled_student_with_a_new_distiller_each_epoch():
    # compiled once, inside the first block; later blocks add new hooks to the same modules
    torch.manual_seed(0)
    teacher, student = TinyCNN(16), CompiledPerEpoch(8)
    twin = TinyCNN(8)
    twin.load_state_dict(student.state_dict())
    with Distiller(teacher, twin, layers="relu?") as d:
        twin(X)
        want = d.loss().item()
    compiled = None
    for _ in range(3):
        with Distiller(teacher, student, layers="relu?") as d:
            if compiled is None:
                compiled = torch.compile(student, backend="aot_eager")
            compiled(X)
            assert d.loss().item() == pytest.approx(want, rel=1e-5)
        compiled(X)  # a call between the blocks (validation) captures nothing
        assert held_captures(d) == []
    torch._dynamo.reset()


# ------------------------------------------------------------------ memory held per step


def test_no_teacher_feature_map_outlives_the_teacher_forward():
    teacher, student = tiny_pair(inplace=False)
    refs = {}

    def watch(name):
        def hook(module, args, out):
            refs[name] = weakref.ref(out)

        return hook

    for name in ("relu1", "relu2", "relu3"):
        getattr(teacher, name).register_forward_hook(watch(name))
    with Distiller(teacher, student, layers="relu?") as d:
        out = student(X)
        assert refs and all(r() is None for r in refs.values()), "a teacher feature map is alive"
        # what is held: one small map per layer and side
        held = [v for cap in held_captures(d, "teacher") for v in cap.values.values()]
        assert [tuple(v.shape) for v in held] == [(4, 16, 16), (4, 8, 8), (4, 4, 4)]
        assert all(cap.source is None for cap in held_captures(d, "student"))
        d.loss()
    del out


def test_teacher_maps_are_no_grad_tensors_not_inference_tensors():
    # pitfall 6: maps made under inference_mode "cannot be saved for backward" by some ops
    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        maps = [v for cap in held_captures(d, "teacher") for v in cap.values.values()]
        assert maps and not any(m.is_inference() or m.requires_grad for m in maps)
        loss = d.loss() * torch.ones((), requires_grad=True).clone()  # usable in any graph
        loss.backward()
