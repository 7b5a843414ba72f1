"""Mixed precision and bad input: what athooks does with NaN, empty batches, devices, modes, nesting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import TinyCNN, held_captures, ref_at_loss_code, tiny_pair

from athooks import Distiller
from athooks.errors import CaptureError, ConfigurationError

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


def relu_outputs(model: TinyCNN, x: torch.Tensor) -> list[torch.Tensor]:
    """The three ReLU outputs, computed by hand (no hooks)."""
    return model.features(x)


def reference(teacher: TinyCNN, student: TinyCNN, x: torch.Tensor) -> float:
    with torch.no_grad():
        t_feats = relu_outputs(teacher.eval(), x)
        s_feats = relu_outputs(student, x)
    return float(ref_at_loss_code(list(zip(t_feats, s_feats, strict=True))))


# ------------------------------------------------------------------ mixed precision


def test_bf16_autocast_maps_and_loss_are_float32_and_close_to_fp32():
    teacher, student = tiny_pair(inplace=False)
    want = reference(teacher, student, X)
    with Distiller(teacher, student, layers="relu?") as d:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = student(X)
            assert out.dtype == torch.bfloat16  # autocast really ran the convolutions in bf16
            maps = [v for cap in held_captures(d) for v in cap.values.values()]
            loss = d.loss()
        total = F.cross_entropy(out.float(), Y) + loss
        total.backward()
    assert maps and all(m.dtype == torch.float32 for m in maps)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # bf16 keeps 8 bits of mantissa: the features differ from fp32 by ~0.4%, the loss by less
    assert loss.item() == pytest.approx(want, rel=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_a_bf16_student_gives_float32_maps():
    teacher, student = tiny_pair(inplace=False)
    want = reference(teacher, student, X)
    student.to(torch.bfloat16)
    with Distiller(teacher, student, layers="relu?", teacher_input=lambda x: x.float()) as d:
        student(X.to(torch.bfloat16))
        loss = d.loss()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want, rel=5e-2)


# ------------------------------------------------------------------ NaN and infinity


def test_nan_in_the_input_makes_the_loss_nan_without_check_finite():
    teacher, student = tiny_pair()
    x = X.clone()
    x[1, 0, 3, 3] = float("nan")
    with Distiller(teacher, student, layers="relu?") as d:
        student(x)
        assert torch.isnan(d.loss())  # the documented default: no check, no synchronisation


def test_check_finite_names_the_first_layer_with_nan():
    teacher, student = tiny_pair()
    x = X.clone()
    x[1, 0, 3, 3] = float("nan")
    with Distiller(teacher, student, layers="relu?", check_finite=True) as d:
        student(x)
        with pytest.raises(CaptureError, match="teacher layer 'relu1' holds NaN or infinite"):
            d.loss()
        student(X)  # a clean batch afterwards is fine
        assert torch.isfinite(d.loss())


def test_check_finite_names_a_student_layer_with_inf():
    teacher, student = tiny_pair()
    with torch.no_grad():
        student.conv3.bias[0] = float("inf")
    with Distiller(teacher, student, layers="relu?", check_finite=True) as d:
        student(X)
        with pytest.raises(CaptureError, match="student layer 'relu3' holds NaN or infinite"):
            d.loss()


def test_check_finite_does_not_change_the_loss():
    teacher, student = tiny_pair()
    values = []
    for check in (False, True):
        with Distiller(teacher, student, layers="relu?", check_finite=check) as d:
            student(X)
            values.append(d.loss().item())
    assert values[0] == values[1]


# ------------------------------------------------------------------ batches


def test_empty_batch_is_a_clear_error():
    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu?") as d:
        student(X[:0])
        with pytest.raises(CaptureError, match=r"last batch was empty \(0 samples\).*drop_last"):
            d.loss()


def test_empty_batch_for_a_loss_without_maps():
    teacher, student = tiny_pair()
    with Distiller(teacher, student, losses="kd") as d:
        student(X[:0])
        with pytest.raises(CaptureError, match="last batch was empty"):
            d.loss(Y[:0])


def test_batch_sizes_that_differ_between_the_captures():
    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu?", teacher_input=lambda x: x[:2]) as d:
        student(X)
        with pytest.raises(
            CaptureError,
            match=r"batch sizes differ in pair \(teacher 'relu1', student 'relu1'\): teacher 2, student 4",
        ):
            d.loss()


# ------------------------------------------------------------------ devices and input types


def test_teacher_on_another_device_than_the_input_is_a_clear_error():
    # CPU-only stand-in for a teacher left on the CPU while the student is on a GPU
    teacher, student = tiny_pair()
    teacher.to("meta")
    with (
        Distiller(teacher, student, layers="relu?"),
        pytest.raises(
            ConfigurationError,
            match=r"teacher's parameters are on meta but its input is on cpu; move the teacher "
            r"to the student's device \(teacher.to\('cpu'\)",
        ),
    ):
        student(X)


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ((X.numpy(),), r"\(ndarray\)"),
        (([[0.0, 1.0]],), r"\(list\)"),
        ((), "no arguments"),
    ],
)
def test_non_tensor_input_is_a_clear_error(given, shown):
    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu?") as d:
        with pytest.raises(
            ConfigurationError, match=f"the student was called with {shown} and no tensor"
        ):
            student(*given)
        # the failed call left no step behind, and the next real call works
        with pytest.raises(CaptureError):
            d.loss()
        student(X)
        assert torch.isfinite(d.loss())


def test_non_tensor_input_with_teacher_input_is_left_to_the_user():
    teacher, student = tiny_pair()

    class FromNumpy(TinyCNN):
        def forward(self, x):
            return super().forward(torch.as_tensor(x))

    student = FromNumpy(8)
    with Distiller(
        teacher, student, layers="relu?", teacher_input=lambda x: torch.as_tensor(x)
    ) as d:
        student(X.numpy())
        got = d.loss().item()
    assert got == pytest.approx(reference(teacher, student, X), rel=1e-5)


def test_objects_that_may_hold_tensors_are_not_refused():
    class Batch:
        def __init__(self, x):
            self.x = x

    class TakesBatch(TinyCNN):
        def forward(self, b):
            return super().forward(b.x if isinstance(b, Batch) else b)

    torch.manual_seed(0)
    teacher, student = TakesBatch(16), TakesBatch(8)
    with Distiller(teacher, student, layers="relu?") as d:
        student(Batch(X))
        assert torch.isfinite(d.loss())


# ------------------------------------------------------------------ modes


def test_student_in_eval_mode_gives_the_validation_loss():
    teacher, student = tiny_pair()
    student.eval()
    want = reference(teacher, student, X)  # eval-mode BN on both sides
    with Distiller(teacher, student, layers="relu?") as d:
        student(X)
        assert not student.training  # athooks never changes the student's mode
        got = d.loss()
        assert got.requires_grad  # eval mode is not no_grad
    with Distiller(teacher, student, layers="relu?", no_grad="capture") as d, torch.no_grad():
        student(X)
        assert d.loss().item() == pytest.approx(got.item(), rel=1e-6)
    assert got.item() == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------ nesting


def test_two_teachers_on_one_student():
    torch.manual_seed(0)
    t1, t2, student = TinyCNN(16), TinyCNN(12), TinyCNN(8)
    calls = {"t1": 0, "t2": 0}
    t1.register_forward_pre_hook(lambda *a: calls.__setitem__("t1", calls["t1"] + 1))
    t2.register_forward_pre_hook(lambda *a: calls.__setitem__("t2", calls["t2"] + 1))
    with (
        Distiller(t1, student, layers="relu?") as d1,
        Distiller(t2, student, layers="relu?") as d2,
    ):
        student(X)
        got = (d1.loss().item(), d2.loss().item())
    assert calls == {"t1": 1, "t2": 1}
    assert got[0] == pytest.approx(reference(t1, student, X), rel=1e-5)
    assert got[1] == pytest.approx(reference(t2, student, X), rel=1e-5)


def test_a_loss_that_reruns_the_student_does_not_disturb_another_distiller():
    torch.manual_seed(0)
    t1, t2, student = TinyCNN(16), TinyCNN(12), TinyCNN(8)
    calls = {"t2": 0}
    t2.register_forward_pre_hook(lambda *a: calls.__setitem__("t2", calls["t2"] + 1))
    with (
        Distiller(t1, student, losses="symmetry") as d1,  # re-runs the student, flipped
        Distiller(t2, student, layers="relu?") as d2,
    ):
        student(X)
        d1.loss(Y)  # runs the student (and t1) again on the flipped input internally
        got = d2.loss().item()
    assert calls["t2"] == 1
    assert got == pytest.approx(reference(t2, student, X), rel=1e-5)


def test_a_chain_teacher_to_middle_to_small():
    torch.manual_seed(0)
    big, middle, small = TinyCNN(16), TinyCNN(12), TinyCNN(8)
    with (
        Distiller(big, middle, layers="relu?") as d1,
        Distiller(middle, small, layers="relu?") as d2,
    ):
        small(X)  # runs `middle` as d2's teacher: not a step of d1
        with pytest.raises(CaptureError, match="before any forward of the student"):
            d1.loss()
        assert d2.loss().item() == pytest.approx(reference(middle, small, X), rel=1e-5)
        middle.train()
        middle(X)
        assert d1.loss().item() == pytest.approx(reference(big, middle, X), rel=1e-5)


def test_one_distiller_in_two_nested_blocks_is_refused():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, layers="relu?")
    with d, pytest.raises(ConfigurationError, match="already attached"), d:
        pass


# ------------------------------------------------------------------ detectors: per-region tensors


class ToyDetector(torch.nn.Module):
    """Called like torchvision's detectors (a list of images); ``roi`` runs once per region."""

    def __init__(self, rois_per_image: int, width: int = 8) -> None:
        super().__init__()
        self.backbone = torch.nn.Conv2d(3, width, 3, padding=1)
        self.roi = torch.nn.Conv2d(width, width, 1)
        self.rois_per_image = rois_per_image

    def forward(self, images, targets=None):
        features = self.backbone(torch.stack(list(images)))
        regions = features[:, :, :4, :4].repeat_interleave(self.rois_per_image, 0)
        return self.roi(regions).mean()


IMAGES = [torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]


@pytest.mark.parametrize("rois", [(3, 2), (2, 2)], ids=["counts-differ", "counts-equal"])
def test_a_per_region_layer_of_a_detector_is_refused_with_the_fix(rois):
    # (2, 2): both models make 4 regions for 2 images, so the maps could be compared one
    # against the other, silently pairing unrelated regions: that must fail too
    teacher, student = ToyDetector(rois[0]), ToyDetector(rois[1])
    with Distiller(teacher, student, layers="roi", teacher_input=lambda im, t=None: (im,)) as d:
        student(IMAGES, [{}, {}])
        with pytest.raises(CaptureError, match=r"for a step of 2 images.*backbone or FPN level"):
            d.loss()


def test_a_per_image_layer_of_a_list_input_model_is_fine():
    teacher, student = ToyDetector(3), ToyDetector(2)
    with Distiller(
        teacher, student, layers="backbone", teacher_input=lambda im, t=None: (im,)
    ) as d:
        student(IMAGES, [{}, {}])
        assert torch.isfinite(d.loss())


def test_a_per_region_layer_of_a_detector_called_with_a_tensor_names_the_fix():
    # torchvision's detectors also accept a (B, C, H, W) tensor; regions then differ in count
    teacher, student = ToyDetector(3), ToyDetector(2)
    with Distiller(teacher, student, layers="roi", teacher_input=lambda im, t=None: (im,)) as d:
        student(torch.stack(IMAGES), [{}, {}])
        with pytest.raises(CaptureError, match=r"for a batch of 2.*backbone or FPN level"):
            d.loss()
