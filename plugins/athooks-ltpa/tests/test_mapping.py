"""The ``ltpa`` mapping: found by entry point, equal to the head's own maps, in a Distiller."""

from __future__ import annotations

import athooks_ltpa
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import athooks
import athooks.registry
from athooks import Distiller
from athooks.plugin import Loss


class Tiny(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        c = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return self.fc(F.relu(c).mean((2, 3)))


def plain_student() -> nn.Sequential:
    """Stage outputs '2' (4x4) and '4' (2x2) for 8x8 inputs, like Tiny's conv2 and conv3."""
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(5, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(5, 7, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(28, 5),
    )


class Record(Loss):
    """Keeps the (teacher, student) maps of the step; contributes zero."""

    name = "record"

    def __init__(self, mapping):
        super().__init__()
        self.mapping = mapping
        self.seen = None

    def captures(self):
        return (self.mapping,)

    def forward(self, step):
        self.seen = step.maps(self.mapping)
        return sum(s.sum() for _, s in self.seen) * 0.0


def test_ltpa_is_registered_through_the_entry_point():
    assert "ltpa" in athooks.list_mappings()
    providers = {name: who for _, name, who, _ in athooks.registry.registered()}
    assert providers["ltpa"] == "athooks-ltpa 0.1.0"
    assert isinstance(athooks.mapping("ltpa"), athooks_ltpa.LTPAMapping)


@pytest.mark.parametrize(
    ("compatibility", "normalise"),
    [("pc", "softmax"), ("pc", "sigmoid"), ("dp", "softmax"), ("dp", "sigmoid")],
)
def test_distiller_teacher_maps_are_the_heads_own(compatibility, normalise):
    torch.manual_seed(0)
    head = athooks_ltpa.attach(
        Tiny(),
        layers=["conv2", "conv3"],
        compatibility=compatibility,
        normalise=normalise,
        input_size=(3, 8, 8),
    )
    head(torch.randn(2, 3, 8, 8))  # some forward before, to make stale state possible
    student = plain_student()
    mapping = athooks.mapping("ltpa", fallback="sum_p", p=2)
    record = Record(mapping)
    layers = list(zip(head.layers, ["2", "4"], strict=True))
    x = torch.randn(3, 3, 8, 8)
    with Distiller(
        head, student, layers=layers, losses=[record, athooks.loss("at", mapping=mapping)]
    ) as d:
        student(x)
        total = d.loss()
    assert d.pairs == [("model.conv2", "2"), ("model.conv3", "4")]
    teacher_maps = head.attention_maps  # the head's own maps, from the teacher's forward above
    s_feats = [student[:3](x), student[:5](x)]
    want_at = 0.0
    for (t_map, s_map), own, s_feat in zip(
        record.seen, teacher_maps.values(), s_feats, strict=True
    ):
        assert torch.isfinite(t_map).all()
        torch.testing.assert_close(t_map, own.detach())
        torch.testing.assert_close(s_map, s_feat.pow(2).sum(1))  # the fallback, F_sum^2
        qt = F.normalize(own.detach().flatten(1), dim=1)
        qs = F.normalize(s_feat.pow(2).sum(1).flatten(1), dim=1)
        want_at += (qs - qt).pow(2).mean().item()
    assert total.item() == pytest.approx(1e3 * want_at, rel=1e-5)


def test_pc_softmax_map_needs_no_g_it_cancels():
    """<u, l + g> = <u, l> + <u, g>: the mapping gives the map from the features alone."""
    torch.manual_seed(0)
    head = athooks_ltpa.attach(Tiny(), layers=["conv2", "conv3"], input_size=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    head(x)
    own = head.attention_maps
    model = head.model
    l2 = model.conv2(F.relu(model.conv1(x)))
    tagged = head.layers[0].transform(l2)
    got = athooks.mapping("ltpa")(tagged)  # outside any forward reaching g
    torch.testing.assert_close(got, own["conv2"])


def test_student_with_its_own_head_learns_through_the_mapping():
    torch.manual_seed(0)
    teacher = athooks_ltpa.attach(Tiny(), layers=["conv2", "conv3"], input_size=(3, 8, 8))
    student = athooks_ltpa.attach(
        Tiny(),
        layers=["conv2", "conv3"],
        compatibility="dp",
        normalise="sigmoid",
        input_size=(3, 8, 8),
    )
    layers = list(zip(teacher.layers, student.layers, strict=True))
    x = torch.randn(4, 3, 8, 8)
    with Distiller(teacher, student, layers=layers, losses=athooks.loss("at", mapping="ltpa")) as d:
        student(x)
        loss = d.loss()
        loss.backward()
    want = 0.0
    for t, s in zip(teacher.attention_maps.values(), student.attention_maps.values(), strict=True):
        qt = F.normalize(t.detach().flatten(1), dim=1)
        qs = F.normalize(s.detach().flatten(1), dim=1)
        want += (qs - qt).pow(2).mean().item()
    assert loss.item() == pytest.approx(1e3 * want, rel=1e-5)
    grad = student.projections["0"].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_untagged_features_without_fallback_are_a_clear_error():
    with pytest.raises(athooks.CaptureError, match="does not come from an LTPA head"):
        athooks.mapping("ltpa")(torch.randn(1, 4, 3, 3))
    out = athooks.mapping("ltpa", fallback="max_p", p=1)(torch.randn(1, 4, 3, 3))
    assert out.shape == (1, 3, 3)
    with pytest.raises(athooks.ConfigurationError, match="fallback mapping given by name"):
        athooks.mapping("ltpa", p=2)


def test_ltpa_maps_through_the_public_capture_path_in_a_distiller_with_auto_student():
    """The teacher's layers may be paired with names of a student found by pattern."""
    torch.manual_seed(0)
    head = athooks_ltpa.attach(Tiny(), layers="conv3", compatibility="dp", input_size=(3, 8, 8))
    student = plain_student()
    with Distiller(
        head,
        student,
        layers=[(head.layers[0], "4")],
        losses=athooks.loss("at", mapping="ltpa", fallback="sum_p"),
    ) as d:
        student(torch.randn(2, 3, 8, 8))
        assert torch.isfinite(d.loss())


@pytest.mark.parametrize(
    ("compatibility", "normalise"),
    [("pc", "softmax"), ("dp", "sigmoid")],
)
def test_athooks_viz_draws_the_heads_own_maps(compatibility, normalise):
    import athooks.viz

    torch.manual_seed(0)
    head = athooks_ltpa.attach(
        Tiny(),
        layers=["conv2", "conv3"],
        compatibility=compatibility,
        normalise=normalise,
        input_size=(3, 8, 8),
    )
    images = torch.rand(2, 3, 8, 8)
    maps = athooks.viz.attention_maps(head, images, layers=head.layers, mapping="ltpa")
    assert list(maps) == ["model.conv2", "model.conv3"]
    own = head.attention_maps
    for got, want in zip(maps.values(), own.values(), strict=True):
        torch.testing.assert_close(got, want)


def test_n_d_feature_maps_are_a_clear_error_for_the_head_and_fine_for_the_fallback():
    """LTPA heads are 2-D only: a 1-D or video map of a head's layer says so; the fallback
    mapping of unmarked layers reduces any layout (B, C, *S) -> (B, *S)."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    head = athooks_ltpa.attach(net, layers="1", input_size=(3, 8, 8))
    ltpa = athooks.mapping("ltpa", fallback="sum_p")
    for shape in ((2, 8, 5), (2, 8, 3, 4, 4)):
        with pytest.raises(athooks.CaptureError, match=r"image feature maps \(B, C, H, W\) only"):
            ltpa(head.layers[0].transform(torch.randn(*shape)))
        plain = torch.randn(*shape)
        torch.testing.assert_close(ltpa(plain), plain.pow(2).sum(1))
    with pytest.raises(athooks.ConfigurationError, match=r"input_size must be \(C, H, W\)"):
        athooks_ltpa.attach(net, layers="1", input_size=(3, 16))
