"""Connectors (lazy adapters), the embedding tap and what a Distiller does with both."""

from __future__ import annotations

import io
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
import torchvision
from conftest import TinyCNN, tiny_pair
from torch import nn

import athooks
import athooks.models
from athooks import Distiller, Layer
from athooks.connectors import ConvBN
from athooks.layers import find_classifier
from athooks.plugin import Connector, Connectors, Features, Loss, Step

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


class Hint(Loss):
    """FitNets' hint with one connector per pair: mean ((conv_bn(s) - t)^2)."""

    name = "hint"

    def __init__(self) -> None:
        super().__init__()
        self.features = Features()
        self.connectors = Connectors()

    def captures(self):
        return (self.features,)

    def forward(self, step):
        pairs = step.features(self.features)
        return self.sum_pairs(
            [(self.connectors[i](s, t) - t).pow(2).mean() for i, (t, s) in enumerate(pairs)]
        )


class EmbedGap(Loss):
    """Squared distance of the student's projected embedding to the teacher's."""

    name = "embed_gap"
    needs_embedding = True

    def __init__(self) -> None:
        super().__init__()
        self.head = Connector(kind="linear")
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, step):
        t, s = step.embedding()
        self.seen.append((t, s))
        return (self.head(s, t) - t).pow(2).sum(1).mean()


# ---------------------------------------------------------------------------- Connector


def test_connector_is_built_in_place_from_the_first_call():
    conn = Connector()
    placeholders = list(conn.parameters())
    assert all(isinstance(p, nn.parameter.UninitializedParameter) for p in placeholders)
    out = conn(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4))
    assert out.shape == (2, 16, 4, 4) and conn.built
    assert (conn.in_channels, conn.out_channels) == (8, 16)
    built = list(conn.parameters())
    assert [id(p) for p in built] == [id(p) for p in placeholders]  # the same objects
    assert isinstance(conn.body, ConvBN)
    assert conn.body.conv.weight.shape == (16, 8, 1, 1)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_an_optimiser_made_before_the_build_trains_the_connector(optimizer):
    torch.manual_seed(0)
    conn = Connector(kind="linear")
    opt = optimizer(conn.parameters(), lr=0.1)
    x, target = torch.randn(8, 5), torch.randn(8, 3)
    first = None
    for _ in range(20):
        loss = (conn(x, 3) - target).pow(2).mean()
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first


def test_connector_equals_its_formula():
    conn = Connector(kind="linear")
    x = torch.randn(3, 4)
    y = conn(x, 2)
    w, b = conn.body.weight, conn.body.bias
    torch.testing.assert_close(y, x @ w.T + b)


def test_connector_follows_dtype_set_before_the_build():
    conn = Connector().to(torch.float64)
    y = conn(torch.randn(2, 3, 4, 4, dtype=torch.float64), 5)
    assert y.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in conn.parameters())
    assert conn.body.bn.num_batches_tracked.dtype == torch.long


@pytest.mark.parametrize("spatial", [(7,), (4, 4), (2, 3, 3)])
def test_conv_connector_on_1d_2d_3d_maps(spatial):
    conn = Connector()
    assert conn(torch.randn(2, 3, *spatial), 6).shape == (2, 6, *spatial)


def test_builder_gives_another_structure():
    def translator(c_in, c_out):
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 1)
        )

    conn = Connector(builder=translator)
    assert len(list(conn.parameters())) == 4
    assert conn(torch.randn(2, 3, 5, 5), 7).shape == (2, 7, 5, 5)


def test_state_dict_round_trip_builds_an_unbuilt_connector():
    conn = Connector()
    conn(torch.randn(2, 3, 4, 4), 6)
    buffer = io.BytesIO()
    torch.save(conn.state_dict(), buffer)
    buffer.seek(0)
    fresh = Connector()
    assert fresh.state_dict() == {}  # nothing to save before the build
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.built and (fresh.in_channels, fresh.out_channels) == (3, 6)
    x = torch.randn(2, 3, 4, 4)
    conn.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x, 6), conn(x, 6))


def test_state_round_trip_of_a_builder_whose_first_weight_is_not_out_by_in():
    def decoder(c_in, c_out):  # a transposed conv's weight is (in, out, k, k)
        return nn.Sequential(
            nn.ConvTranspose2d(c_in, c_out, 2, stride=2), nn.Conv2d(c_out, c_out, 1)
        )

    conn = Connector(builder=decoder)
    conn(torch.randn(1, 3, 4, 4), 5)
    fresh = Connector(builder=decoder)
    fresh.load_state_dict(conn.state_dict())
    assert (fresh.in_channels, fresh.out_channels) == (3, 5)
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(fresh(x, 5), conn(x, 5))


def test_connectors_are_sized_by_setup():
    loss = Hint()
    assert not loss.connectors.sized
    loss.setup([("a", "a"), ("b", "b")])
    assert len(loss.connectors) == 2 and len(list(loss.parameters())) == 6


# ---------------------------------------------------------------------------- in a Distiller


def test_distiller_hands_out_placeholders_and_trains_them():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, layers=["relu2", "relu3"], losses=Hint())
    params = list(d.parameters())
    assert len(params) == 6
    opt = torch.optim.SGD([*student.parameters(), *params], lr=0.1)
    with d:
        for i in range(2):
            loss = F.cross_entropy(student(X), Y) + d.loss()
            if i == 1:
                before = [p.detach().clone() for p in d.parameters()]
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is not None for p in params)
            opt.step()
    after = list(d.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert [c.in_channels for c in d.losses[0].connectors] == [16, 32]
    assert [c.out_channels for c in d.losses[0].connectors] == [32, 64]
    # never in the student's own state dict
    assert not any("connectors" in k for k in student.state_dict())


def test_value_equals_the_formula_on_the_captured_maps():
    teacher, student = tiny_pair()
    loss = Hint()
    d = Distiller(teacher, student, layers=["relu2"], losses=loss)
    grabbed = {}
    student.relu2.register_forward_hook(lambda m, a, out: grabbed.setdefault("s", out.clone()))
    teacher.relu2.register_forward_hook(lambda m, a, out: grabbed.setdefault("t", out.clone()))
    with d:
        student(X)
        value = d.loss()
    conn = loss.connectors[0].body
    s = grabbed["s"].double()
    z = F.conv2d(s, conn.conv.weight.double())
    mean = z.mean((0, 2, 3), keepdim=True)
    var = z.var((0, 2, 3), unbiased=False, keepdim=True)
    bn = (z - mean) / torch.sqrt(var + conn.bn.eps)
    bn = bn * conn.bn.weight.double().view(1, -1, 1, 1) + conn.bn.bias.double().view(1, -1, 1, 1)
    expected = (bn - grabbed["t"].double()).pow(2).mean()
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_parameters_before_auto_is_a_clear_error_and_input_size_fixes_it():
    teacher, student = tiny_pair()
    with pytest.raises(athooks.ConfigurationError, match="input_size"):
        Distiller(teacher, student, losses=Hint()).parameters()
    d = Distiller(teacher, student, losses=Hint(), input_size=(3, 16, 16))
    assert len(list(d.parameters())) == 3 * len(d.pairs)


def test_auto_after_the_first_call_gives_the_built_connectors():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, losses=Hint())
    with d:
        student(X)
        d.loss()
        params = list(d.parameters())
    assert params and all(not isinstance(p, nn.parameter.UninitializedParameter) for p in params)


def test_warns_when_trainable_loss_parameters_reach_no_optimiser():
    teacher, student = tiny_pair()
    with (
        pytest.warns(UserWarning, match=r"d\.parameters\(\) was never called"),
        Distiller(teacher, student, layers="relu3", losses=Hint()) as d,
    ):
        student(X)
        d.loss()
    d = Distiller(teacher, student, layers="relu3", losses=Hint())
    d.parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with d:
            student(X)
            d.loss()


def test_checkpoint_resume_continues_bit_for_bit():
    def run(steps, state=None, start=0):
        torch.manual_seed(0)
        teacher, student = tiny_pair()
        d = Distiller(teacher, student, layers=["relu2", "relu3"], losses=[Hint(), EmbedGap()])
        opt = torch.optim.SGD([*student.parameters(), *d.parameters()], lr=0.05, momentum=0.9)
        if state is not None:  # into fresh objects, connectors not built yet
            student.load_state_dict(state["student"])
            d.load_state_dict(state["d"])
            opt.load_state_dict(state["opt"])
        with d:
            for i in range(start, start + steps):
                x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i))
                loss = F.cross_entropy(student(x), Y) + d.loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
        buffer = io.BytesIO()
        torch.save(
            {"student": student.state_dict(), "d": d.state_dict(), "opt": opt.state_dict()}, buffer
        )
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)

    straight = run(4)
    resumed = run(2, run(2), start=2)
    assert set(straight["d"]) == set(resumed["d"]) and any("connectors" in k for k in straight["d"])
    for part in ("student", "d"):
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), key


# ---------------------------------------------------------------------------- the embedding


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: torchvision.models.resnet18(), "fc"),
        (lambda: torchvision.models.mobilenet_v3_small(), "classifier.3"),
        (lambda: torchvision.models.vit_b_16(), "heads.head"),
        (lambda: timm.create_model("resnet18"), "fc"),
        (lambda: timm.create_model("convnext_atto"), "head.fc"),
        (lambda: timm.create_model("vit_tiny_patch16_224"), "head"),
        (lambda: athooks.models.create_model("wrn16_1"), "fc"),
        (lambda: TinyCNN(4), "head"),
    ],
)
def test_find_classifier(build, name):
    assert find_classifier(build())[0] == name


def test_find_classifier_looks_through_wrappers():
    model = torchvision.models.resnet18()
    assert find_classifier(torch.nn.DataParallel(model))[0] == "module.fc"


@pytest.mark.filterwarnings("ignore:the losses of this Distiller")
def test_embedding_is_the_classifier_input_and_the_teacher_has_no_gradient():
    teacher, student = tiny_pair()
    loss = EmbedGap()
    with Distiller(teacher, student, layers="relu3", losses=[loss, "at"]) as d:
        out = student(X)
        d.loss()
    t, s = loss.seen[0]
    torch.testing.assert_close(s, student.features(X)[-1].mean((2, 3)))
    with torch.no_grad():
        teacher.eval()
        torch.testing.assert_close(t, teacher.features(X)[-1].mean((2, 3)))
    assert s.requires_grad and not t.requires_grad and out.shape == (4, 5)


def test_embedding_alone_and_on_a_timm_pair_of_different_widths():
    teacher = timm.create_model("resnet26", num_classes=5)
    student = timm.create_model("resnet10t", num_classes=5)
    loss = EmbedGap()
    d = Distiller(teacher, student, losses=loss)
    opt = torch.optim.SGD([*student.parameters(), *d.parameters()], lr=0.01)
    with d:
        student(torch.randn(2, 3, 32, 32))
        value = d.loss()
        opt.zero_grad()
        value.backward()
    t, s = loss.seen[0]
    assert t.shape == (2, 2048) and s.shape == (2, 512)
    assert loss.head.body.weight.grad is not None


@pytest.mark.filterwarnings("ignore:the losses of this Distiller")
def test_embedding_can_be_named():
    teacher, student = tiny_pair()
    loss = EmbedGap()
    with Distiller(
        teacher,
        student,
        losses=loss,
        embedding=(Layer("head", of="input"), Layer("head", of="input")),
    ) as d:
        student(X)
        d.loss()
    assert loss.seen[0][1].shape == (4, 32)


def test_pre_logits_as_layers_and_of_input():
    teacher, student = torchvision.models.resnet34(), torchvision.models.resnet18()
    d = Distiller(teacher, student, layers=Layer.pre_logits(), losses="fact")
    assert d.pairs == [("fc:input", "fc:input")]
    with d:
        student(torch.randn(2, 3, 32, 32))
        assert d.loss().ndim == 0


def test_extras_reach_the_step():
    class NeedsIndex(Loss):
        name = "needs_index"

        def forward(self, step):
            return step.extra("index").float().sum() * 0 + step.student_output.sum() * 0

    teacher, student = tiny_pair()
    with Distiller(teacher, student, layers="relu3", losses=NeedsIndex()) as d:
        student(X)
        assert d.loss(index=torch.arange(4)) == 0
        student(X)
        with pytest.raises(athooks.CaptureError, match="index"):
            d.loss()


def test_step_replace_shares_the_captures():
    f = Features()
    t, s = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    step = Step([("a", "a")], [{f: t}], [{f: s}], student_output=torch.zeros(2, 3))
    other = step.replace(student_output=torch.ones(2, 3), teacher_output=torch.ones(2, 3))
    assert other.features(f)[0][0] is t and step.student_output.sum() == 0
    assert other.student_output.sum() == 6 and other.teacher_output.sum() == 6


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_connectors_and_embedding_with_a_compiled_student(backend):
    def run(compile_it):
        torch.manual_seed(0)
        teacher, student = tiny_pair(inplace=False)
        d = Distiller(teacher, student, layers=["relu2", "relu3"], losses=[Hint(), EmbedGap()])
        params = list(d.parameters())
        with d:
            call = torch.compile(student, backend=backend) if compile_it else student
            call(X)
            value = d.loss()
            value.backward()
        torch._dynamo.reset()
        return value, [p.grad.clone() for p in params], student.conv1.weight.grad.clone()

    want, want_grads, want_student = run(False)
    got, got_grads, got_student = run(True)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_student, want_student, rtol=1e-4, atol=1e-6)
