"""The LTPA head against a re-derivation of the paper's formulas, and on timm/torchvision models."""

from __future__ import annotations

import copy

import athooks_ltpa
import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
import torchvision
from torch import nn

import athooks


class Tiny(nn.Module):
    """conv1 -> conv2 (6 ch, stride 2) -> conv3 (8 ch, stride 4) -> mean -> fc; g is 8-d."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        a = F.relu(self.conv1(x))
        b = self.conv2(a)
        c = self.conv3(F.relu(b))
        return self.fc(F.relu(c).mean((2, 3)))


def reference(model: Tiny, head, x, compatibility, normalise, project, independent):
    """The paper's formulas written out from the parameters, position by position.

    l_i: the conv2 and conv3 outputs; g: the input of fc. Where widths differ (conv2: 6 vs 8),
    "local" maps l_i to 8 with the 1x1 projection weight W (8, 6), "global" maps g to 6 with
    W (6, 8). pc: c_i = <u, l_i + g>; dp: c_i = <l_i, g>. softmax: a = exp(c_i) / sum_j exp(c_j),
    g_a = sum_i a_i l_i; sigmoid: a_i = 1 / (1 + exp(-c_i)), g_a = (1/n) sum_i a_i l_i.
    """
    x = x.double()
    m = copy.deepcopy(model).double()
    l1 = m.conv2(F.relu(m.conv1(x)))
    l2 = m.conv3(F.relu(l1))
    g = F.relu(l2).mean((2, 3))
    maps, descs = [], []
    for k, local in enumerate([l1, l2]):
        gk = g
        if local.shape[1] != g.shape[1]:
            w = head.projections[str(k)].weight.detach().double()
            if project == "local":
                local = torch.einsum("dc,bchw->bdhw", w[:, :, 0, 0], local)
            else:
                gk = g @ w.T
        b, d, h, wd = local.shape
        vecs = local.reshape(b, d, h * wd).transpose(1, 2)  # (B, n, D): l_i for each position i
        if compatibility == "pc":
            u = head.u[k].weight.detach().double()[0, :, 0, 0]
            c = torch.stack([(vecs[:, i] + gk) @ u for i in range(h * wd)], dim=1)
        else:
            c = torch.stack([(vecs[:, i] * gk).sum(1) for i in range(h * wd)], dim=1)
        if normalise == "softmax":
            a = c.exp() / c.exp().sum(1, keepdim=True)
            ga = sum(a[:, i : i + 1] * vecs[:, i] for i in range(h * wd))
        else:
            a = 1 / (1 + (-c).exp())
            ga = sum(a[:, i : i + 1] * vecs[:, i] for i in range(h * wd)) / (h * wd)
        maps.append(a.reshape(b, h, wd))
        descs.append(ga)
    if independent:
        logits = torch.stack(
            [
                gk @ clf.weight.detach().double().T + clf.bias.detach().double()
                for clf, gk in zip(head.classifiers, descs, strict=True)
            ]
        ).mean(0)
    else:
        clf = head.classifier
        logits = torch.cat(descs, 1) @ clf.weight.detach().double().T + clf.bias.detach().double()
    return logits, maps


@pytest.mark.parametrize("compatibility", ["pc", "dp"])
@pytest.mark.parametrize("normalise", ["softmax", "sigmoid"])
@pytest.mark.parametrize("project", ["local", "global"])
@pytest.mark.parametrize("independent", [False, True])
def test_head_matches_the_papers_formulas(compatibility, normalise, project, independent):
    torch.manual_seed(0)
    model = Tiny()
    head = athooks_ltpa.attach(
        model,
        layers=["conv2", "conv3"],
        compatibility=compatibility,
        normalise=normalise,
        project=project,
        independent=independent,
        input_size=(3, 8, 8),
    )
    x = torch.randn(3, 3, 8, 8)
    logits = head(x)
    want_logits, want_maps = reference(
        model, head, x, compatibility, normalise, project, independent
    )
    assert logits.shape == (3, 5)
    torch.testing.assert_close(logits.double(), want_logits, rtol=1e-4, atol=1e-5)
    maps = head.attention_maps
    assert list(maps) == ["conv2", "conv3"]
    for got, want in zip(maps.values(), want_maps, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert len(head.descriptors) == 2


def test_softmax_maps_sum_to_one_per_image_and_sigmoid_maps_are_in_0_1():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    head = athooks_ltpa.attach(Tiny(), layers="conv?", input_size=(3, 16, 16))
    head(x)
    assert list(head.attention_maps) == ["conv1", "conv2", "conv3"]
    for amap in head.attention_maps.values():
        assert (amap >= 0).all()
        torch.testing.assert_close(amap.sum((1, 2)), torch.ones(4))
    head = athooks_ltpa.attach(Tiny(), layers="conv?", normalise="sigmoid", input_size=(3, 16, 16))
    head(x)
    for amap in head.attention_maps.values():
        assert ((amap > 0) & (amap < 1)).all()
        assert not torch.allclose(amap.sum((1, 2)), torch.ones(4))


@pytest.mark.parametrize("compatibility", ["pc", "dp"])
@pytest.mark.parametrize("project", ["local", "global"])
def test_gradients_reach_u_the_projections_the_classifier_and_the_model(compatibility, project):
    torch.manual_seed(0)
    head = athooks_ltpa.attach(
        Tiny(),
        layers=["conv2", "conv3"],
        compatibility=compatibility,
        project=project,
        input_size=(3, 8, 8),
    )
    F.cross_entropy(head(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    assert list(head.projections) == ["0"]  # conv2 (6 ch) differs from g (8); conv3 does not
    named = dict(head.named_parameters())
    expected = ["projections.0.weight", "classifier.weight", "model.conv1.weight"]
    if compatibility == "pc":
        expected += ["u.0.weight", "u.1.weight"]
    else:
        assert len(head.u) == 0
    for name in expected:
        grad = named[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert named["model.fc.weight"].grad is None  # the model's own classifier is not used


def test_timm_resnet18_auto_layers_and_training_step():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    head = athooks_ltpa.attach(model, compatibility="pc", num_classes=10, input_size=(3, 64, 64))
    assert [s.name for s in head.local_layers] == ["layer2", "layer3", "layer4"]
    assert head.global_name == "fc" and head.global_dim == 512
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    with torch.no_grad():  # g is what timm's forward_head(pre_logits=True) returns
        want_g = model.forward_head(model.forward_features(x), pre_logits=True)
    seen = {}
    hook = model.fc.register_forward_pre_hook(lambda m, a: seen.setdefault("g", a[0].detach()))
    logits = head(x)
    hook.remove()
    torch.testing.assert_close(seen["g"], want_g)
    assert logits.shape == (2, 10)
    shapes = {k: tuple(v.shape) for k, v in head.attention_maps.items()}
    assert shapes == {"layer2": (2, 8, 8), "layer3": (2, 4, 4), "layer4": (2, 2, 2)}
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in head.u.parameters())


def test_torchvision_vgg11_small_input():
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=10)
    head = athooks_ltpa.attach(model, compatibility="dp", input_size=(3, 32, 32))
    # the last three stages before g (the adaptive pool that upsamples 1x1 to 7x7 is skipped)
    assert [s.name for s in head.local_layers] == ["features.9", "features.14", "features.19"]
    assert head.global_name == "classifier.6" and head.global_dim == 4096
    assert head.num_classes == 10  # read from the classifier
    logits = head(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    shapes = [tuple(v.shape) for v in head.attention_maps.values()]
    assert shapes == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
    logits.sum().backward()
    assert head.projections["0"].weight.grad.abs().sum() > 0  # 256 -> 4096


def test_global_layer_names_the_module_whose_output_is_g():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    head = athooks_ltpa.attach(
        model, layers="layer[34]", global_layer="layer4", num_classes=3, input_size=(3, 64, 64)
    )
    x = torch.randn(2, 3, 64, 64)
    logits = head(x)
    assert logits.shape == (2, 3) and head.global_dim == 512
    with pytest.raises(athooks.ConfigurationError, match="num_classes"):
        athooks_ltpa.attach(model, layers="layer3", global_layer="layer4")


def test_a_local_layer_overwritten_in_place_is_copied():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.relu(self.bn(self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = InPlace()
    head = athooks_ltpa.attach(model, layers="bn", compatibility="dp", input_size=(3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    head(x).sum().backward()  # no "modified by an inplace operation" error
    model.eval()
    with torch.no_grad():
        pre = model.bn(model.conv(x))  # the values before the in-place ReLU
        g = F.relu(pre).mean((2, 3))
        head(x)
    want = torch.softmax(torch.einsum("bchw,bc->bhw", pre, g).flatten(1), 1).reshape(2, 6, 6)
    torch.testing.assert_close(head.attention_maps["bn"], want)


def test_deep_copy_gives_an_independent_working_head():
    torch.manual_seed(0)
    head = athooks_ltpa.attach(Tiny(), layers=["conv2", "conv3"], input_size=(3, 8, 8))
    ema = copy.deepcopy(head)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    x = torch.randn(2, 3, 8, 8)
    a, b = head(x), ema(x)
    assert not torch.allclose(a, b)
    assert not torch.allclose(head.attention_maps["conv2"], ema.attention_maps["conv2"])
    torch.testing.assert_close(ema(x), b)


def test_remove_detaches_the_head():
    model = Tiny()
    head = athooks_ltpa.attach(model, layers="conv2", input_size=(3, 8, 8))
    head.remove()
    assert not model.conv2._forward_hooks and not model.fc._forward_pre_hooks


def test_removing_a_copy_leaves_the_original_working():
    torch.manual_seed(0)
    head = athooks_ltpa.attach(Tiny(), layers=["conv2", "conv3"], input_size=(3, 8, 8))
    ema = copy.deepcopy(head)
    ema.remove()
    assert not ema.model.conv2._forward_hooks and not ema.model.fc._forward_pre_hooks
    assert len(head.model.conv2._forward_hooks) == 1 and len(head.model.fc._forward_pre_hooks) == 1
    assert head(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_clear_errors():
    with pytest.raises(athooks.ConfigurationError, match="compatibility must be 'pc'"):
        athooks_ltpa.attach(Tiny(), compatibility="cos")
    with pytest.raises(athooks.ConfigurationError, match="normalise must be"):
        athooks_ltpa.attach(Tiny(), normalise="relu")
    with pytest.raises(athooks.LayerResolutionError, match="matched no module"):
        athooks_ltpa.attach(Tiny(), layers="conv9", input_size=(3, 8, 8))
    with pytest.raises(athooks.ConfigurationError, match="no nn.Linear"):
        athooks_ltpa.attach(nn.Sequential(nn.Conv2d(3, 4, 3)), input_size=(3, 8, 8))
    with pytest.raises(athooks.ConfigurationError, match="not a feature map"):
        athooks_ltpa.attach(Tiny(), layers="fc", input_size=(3, 8, 8))
    head = athooks_ltpa.attach(Tiny(), layers="conv2", input_size=(3, 8, 8))
    with pytest.raises(athooks.CaptureError, match="run the model"):
        head.attention_maps  # noqa: B018
    with pytest.raises(athooks.ConfigurationError, match="already an LTPA head"):
        athooks_ltpa.attach(head)


def test_a_local_layer_after_g_is_refused():
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)
            self.extra = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            f = self.conv(x)
            out = self.fc(f.mean((2, 3)))
            self.extra(f)
            return out

    with pytest.raises(athooks.ConfigurationError, match="runs after the global descriptor"):
        athooks_ltpa.attach(Late(), layers="extra", input_size=(3, 6, 6))


def test_an_overwrite_seen_only_in_training_is_an_error_once_then_copied():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.drop = nn.Dropout(0.5, inplace=True)  # in place only in training mode
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.drop(self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    head = athooks_ltpa.attach(Drop(), layers="conv", input_size=(3, 6, 6))
    head.train()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(athooks.CaptureError, match="copies it from the next forward on"):
        head(x)
    head(x).sum().backward()
    assert head.u[0].weight.grad is not None


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    head = athooks_ltpa.attach(Tiny(), layers=["conv2", "conv3"], input_size=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    head(x).sum().backward()
    torch.save(head.state_dict(), tmp_path / "ltpa.pt")
    torch.manual_seed(1)
    again = athooks_ltpa.attach(Tiny(), layers=["conv2", "conv3"], input_size=(3, 8, 8))
    again.load_state_dict(torch.load(tmp_path / "ltpa.pt", weights_only=True))
    head.eval()
    again.eval()
    torch.testing.assert_close(again(x), head(x))
    assert {k for k in head.state_dict() if not k.startswith("model.")} == {
        "projections.0.weight",
        "u.0.weight",
        "u.1.weight",
        "classifier.weight",
        "classifier.bias",
    }
