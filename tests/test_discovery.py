"""Layer discovery: layers='auto' and 'blocks', conversions, resize, describe."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
import torchvision
from conftest import MapSpy, TinyCNN, ref_attention
from torch import nn

import athooks
from athooks import Distiller
from athooks.discovery import (
    ChannelsLastToFirst,
    TokensToMap,
    auto_pairs,
    default_input_size,
    probe,
    stage_layers,
)
from athooks.errors import CaptureError, ConfigurationError, LayerResolutionError
from athooks.losses.base import resize_map
from athooks.models import create_model


def seq_cnn(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, 10),
    )


PAIRS = {
    "timm resnet34 -> resnet18": (
        lambda: (timm.create_model("resnet34"), timm.create_model("resnet18")),
        64,
        [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"), ("layer4", "layer4")],
    ),
    "efficientnet_b0 -> mobilenetv3_small_100": (
        lambda: (timm.create_model("efficientnet_b0"), timm.create_model("mobilenetv3_small_100")),
        64,
        [
            ("blocks.0", "bn1"),
            ("blocks.1", "blocks.0"),
            ("blocks.2", "blocks.1"),
            ("blocks.4", "blocks.3"),
            ("blocks.6", "blocks.5"),
        ],
    ),
    "convnext_atto -> resnet18": (
        lambda: (timm.create_model("convnext_atto"), timm.create_model("resnet18")),
        64,
        [
            ("stages.0", "layer1"),
            ("stages.1", "layer2"),
            ("stages.2", "layer3"),
            ("stages.3", "layer4"),
        ],
    ),
    "vit_tiny_patch16 (img 64) -> resnet18": (
        lambda: (
            timm.create_model("vit_tiny_patch16_224", img_size=64),
            timm.create_model("resnet18"),
        ),
        64,
        [("blocks.11", "layer3")],
    ),
    "torchvision resnet34 -> resnet18": (
        lambda: (torchvision.models.resnet34(), torchvision.models.resnet18()),
        64,
        [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"), ("layer4", "layer4")],
    ),
    "torchvision mobilenet_v3_large -> small": (
        lambda: (torchvision.models.mobilenet_v3_large(), torchvision.models.mobilenet_v3_small()),
        64,
        [
            ("features.1", "features.0"),
            ("features.3", "features.1"),
            ("features.6", "features.3"),
            ("features.12", "features.8"),
            ("features", "features"),
        ],
    ),
    "nn.Sequential CNN pair": (
        lambda: (seq_cnn(16), seq_cnn(8)),
        32,
        [("1", "1"), ("3", "3"), ("5", "5")],
    ),
}


@pytest.mark.parametrize("case", list(PAIRS))
def test_auto_pairs_common_models_and_trains(case):
    build, size, expected = PAIRS[case]
    torch.manual_seed(0)
    teacher, student = build()
    x = torch.randn(2, 3, size, size)
    with Distiller(teacher, student) as d:  # layers="auto": found on the first call
        out = student(x)
        assert d.pairs == expected
        loss = out.float().pow(2).mean() * 0 + d.loss()
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_vit_teacher_tokens_become_the_patch_grid():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64)
    info = {i.name: i for i in probe(vit)}["blocks.11"]
    assert info.shape == (17, 192) and info.map_shape == (192, 4, 4) and info.stride == 16
    assert info.transform == TokensToMap(prefix=1, grid=(4, 4))
    x = torch.randn(2, 3, 64, 64)
    seen = {}

    def keep(module, args, out):
        seen["t"] = out  # returns None: a hook that returns a value replaces the output

    vit.blocks[11].register_forward_hook(keep)
    spy = MapSpy()
    with Distiller(vit, timm.create_model("resnet18"), losses=["at", spy]) as d:
        d.student(x)
        d.loss()
    t_map = spy.seen[0][0][0]
    grid = seen["t"][:, 1:].transpose(1, 2).reshape(2, 192, 4, 4)  # drop the class token
    torch.testing.assert_close(t_map, grid.pow(2).sum(1))


def test_distilled_vit_drops_both_prefix_tokens():
    deit = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32)
    info = {i.name: i for i in probe(deit)}["blocks.11"]
    assert info.transform == TokensToMap(prefix=2, grid=(2, 2))


def test_tokens_of_another_size_are_a_clear_error():
    with pytest.raises(
        CaptureError, match=r"expected ViT tokens \(B, 1 \+ 4\*4, C\), got shape \(2, 65, 192\)"
    ):
        TokensToMap(1, (4, 4))(torch.randn(2, 65, 192))


class NHWCNet(nn.Module):
    """A model that says its features are NHWC, like timm's Swin."""

    output_fmt = "NHWC"

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.stage = nn.Sequential(nn.Linear(width, width), nn.GELU())

    def forward(self, x):
        h = self.stem(x).permute(0, 2, 3, 1)  # NHWC from here on
        return self.stage(h).mean((1, 2))


def test_nhwc_outputs_are_permuted_using_the_model_metadata():
    torch.manual_seed(0)
    teacher, student = NHWCNet(8), NHWCNet(4)
    info = {i.name: i for i in probe(teacher, (3, 32, 32))}["stage"]
    assert info.shape == (8, 8, 8) and info.map_shape == (8, 8, 8) and info.stride == 4
    assert isinstance(info.transform, ChannelsLastToFirst)
    x = torch.randn(2, 3, 32, 32)
    with Distiller(teacher, student, input_size=(3, 32, 32)) as d:
        assert d.pairs == [("stage", "stage")]
        student(x)
        got = d.loss()
    with torch.no_grad():
        t_feat = teacher.stage(teacher.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        s_feat = student.stage(student.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    want = 1e3 * (ref_attention(s_feat) - ref_attention(t_feat)).pow(2).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_swin_stage_outputs_are_found_and_converted():
    swin = timm.create_model("swin_tiny_patch4_window7_224")
    stages = stage_layers(swin)
    assert [s.name for s in stages] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert stages[0].map_shape == (96, 56, 56)
    assert all(isinstance(s.transform, ChannelsLastToFirst) for s in stages)


def test_metadata_names_missing_from_the_model_are_skipped():
    net = TinyCNN()
    net.feature_info = [  # type: ignore[attr-defined]
        {"module": "relu1", "reduction": 1},
        {"module": "gone.layer", "reduction": 2},  # pitfall 10: not in named_modules()
        {"module": "relu3", "reduction": 4},
    ]
    assert [s.name for s in stage_layers(net, (3, 16, 16))] == ["relu1", "relu3"]


def test_probe_rule_last_module_of_the_shallowest_level():
    stages = stage_layers(torchvision.models.resnet18())
    # the stem ReLU is a leaf and the model has block containers: not a stage
    assert [(s.name, s.stride) for s in stages] == [
        ("layer1", 4),
        ("layer2", 8),
        ("layer3", 16),
        ("layer4", 32),
    ]
    # without containers, leaves are stages: the last one per stride
    assert [(s.name, s.stride) for s in stage_layers(seq_cnn(4), (3, 32, 32))] == [
        ("1", 1),
        ("3", 2),
        ("5", 4),
    ]


def test_probe_leaves_the_model_as_it_was():
    net = torchvision.models.resnet18()
    net.train()
    net.layer1.eval()  # a mixed state, e.g. frozen BN in one stage
    stats = net.bn1.running_mean.clone()
    probe(net)
    assert net.training and not net.layer1.training and net.layer2.training
    assert torch.equal(net.bn1.running_mean, stats)
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


def test_default_input_size():
    assert default_input_size(timm.create_model("resnet18")) == (3, 224, 224)
    assert default_input_size(timm.create_model("vit_tiny_patch16_224", img_size=96)) == (3, 96, 96)
    assert default_input_size(create_model("wrn16_1")) == (3, 32, 32)
    gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    assert default_input_size(gray) == (1, 224, 224)


def test_probe_failure_says_to_pass_input_size():
    class NeedsSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 30 * 30, 2)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    with pytest.raises(
        ConfigurationError,
        match=r"probing the teacher with a dummy input of shape \(2, 3, 224, 224\) failed.*input_size",
    ):
        athooks.describe(NeedsSize(), seq_cnn(4))
    with pytest.raises(ConfigurationError, match="dummy input of shape"):
        Distiller(NeedsSize(), seq_cnn(4), input_size=(3, 64, 64))
    with Distiller(NeedsSize(), seq_cnn(4), input_size=(3, 32, 32)) as d:
        assert d.pairs == [("conv", "1")]
    # without input_size the pairs come from the first real input, which the model accepts
    with Distiller(NeedsSize(), seq_cnn(4)) as d:
        d.student(torch.randn(2, 3, 32, 32))
        assert d.pairs == [("conv", "1")]
        assert torch.isfinite(d.loss())


def test_real_input_probe_failure_names_the_fix_not_input_size():
    class Picky(nn.Module):  # fails in eval mode only, so the probe itself fails
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if not self.training:
                raise RuntimeError("this model only runs in training mode")
            return self.conv(x)

    with Distiller(Picky(), seq_cnn(4)) as d, pytest.raises(ConfigurationError) as err:
        d.student(torch.randn(2, 3, 16, 16))
    message = str(err.value)
    assert "probing the teacher with its real input" in message
    assert "only runs in training mode" in message and "name the layers explicitly" in message
    assert "input_size" not in message


def test_no_shared_stride_is_a_clear_error():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32)
    with pytest.raises(
        LayerResolutionError,
        match=r"share no stride: teacher stages blocks.11 \(stride 16\), student stages 1 \(stride 1\), 3 \(stride 2\), 5 \(stride 4\)",
    ):
        Distiller(vit, seq_cnn(4), input_size=(3, 32, 32))


# ------------------------------------------------------------------ blocks


def test_blocks_on_equal_resnets():
    torch.manual_seed(0)
    teacher, student = timm.create_model("resnet18"), timm.create_model("resnet18")
    with Distiller(teacher, student, layers="blocks") as d:
        student(torch.randn(2, 3, 64, 64))
        assert d.pairs == [(f"layer{i}.{j}",) * 2 for i in range(1, 5) for j in (0, 1)]
        d.loss().backward()


def test_blocks_on_wrns_of_equal_depth():
    torch.manual_seed(0)
    teacher, student = create_model("wrn16_2"), create_model("wrn16_1")
    with Distiller(teacher, student, layers="blocks") as d:
        student(torch.randn(2, 3, 32, 32))
        assert d.pairs == [(f"layer{i}.{j}",) * 2 for i in (1, 2, 3) for j in (0, 1)]
        assert torch.isfinite(d.loss())


def test_auto_on_wrns_uses_the_group_outputs():
    teacher, student = create_model("wrn40_1"), create_model("wrn16_1")
    assert athooks.describe(teacher, student).layers()[0][0].pattern == "layer1"
    with Distiller(teacher, student) as d:
        student(torch.randn(2, 3, 32, 32))
        assert d.pairs == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]


def test_blocks_with_different_layouts_is_a_clear_error():
    with pytest.raises(
        LayerResolutionError,
        match=r"same number of blocks per stage.*teacher: layer1: 3, layer2: 4, layer3: 6, layer4: 3; student: layer1: 2, layer2: 2, layer3: 2, layer4: 2",
    ):
        Distiller(
            torchvision.models.resnet34(), torchvision.models.resnet18(), layers="blocks",
            input_size=(3, 64, 64),
        )  # fmt: skip
    with (
        Distiller(create_model("wrn40_1"), create_model("wrn16_1"), layers="blocks") as d,
        pytest.raises(LayerResolutionError, match="same number of blocks"),
    ):
        d.student(torch.randn(2, 3, 32, 32))  # found on the first call


# ------------------------------------------------------------------ resize


def test_resize_map_rules():
    m = torch.arange(16.0).reshape(1, 4, 4)
    torch.testing.assert_close(resize_map(m, (2, 2)), F.avg_pool2d(m[:, None], 2)[:, 0])
    up = resize_map(m, (8, 8))
    torch.testing.assert_close(
        up, F.interpolate(m[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    )


@pytest.mark.parametrize("mode", ["student", "teacher"])
def test_resize_modes_against_a_direct_computation(mode):
    torch.manual_seed(0)
    teacher, student = torchvision.models.resnet34(), torchvision.models.resnet18()
    x = torch.randn(2, 3, 64, 64)
    with Distiller(teacher, student, layers={"layer2": "layer3"}, resize=mode) as d:
        student(x)
        got = d.loss()
    teacher.eval()
    with torch.no_grad():
        h = teacher.maxpool(teacher.relu(teacher.bn1(teacher.conv1(x))))
        t_feat = teacher.layer2(teacher.layer1(h))  # 8x8
        h = student.maxpool(student.relu(student.bn1(student.conv1(x))))
        s_feat = student.layer3(student.layer2(student.layer1(h)))  # 4x4
    qt, qs = t_feat.double().pow(2).sum(1), s_feat.double().pow(2).sum(1)
    if mode == "student":  # the teacher's 8x8 map averaged down to 4x4
        qt = F.adaptive_avg_pool2d(qt[:, None], (4, 4))[:, 0]
    else:  # the student's 4x4 map upsampled bilinearly to 8x8
        qs = F.interpolate(qs[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    want = (
        1e3 * (F.normalize(qs.flatten(1), dim=1) - F.normalize(qt.flatten(1), dim=1)).pow(2).mean()
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


# ------------------------------------------------------------------ describe


def test_describe_prints_an_80_column_table():
    pairing = athooks.describe(
        timm.create_model("efficientnet_b0"), timm.create_model("mobilenetv3_small_100")
    )
    text = str(pairing)
    lines = text.splitlines()
    assert lines[0].split() == ["teacher", "layer", "shape", "stride", "student", "layer", "shape"]
    assert "blocks.6" in text and "576x7x7" in text
    assert all(len(line) <= 80 for line in lines)
    assert repr(pairing) == text
    assert pairing.teacher_strides == [2, 4, 8, 16, 32]


def test_a_module_named_auto_is_reachable_with_a_regex():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.auto = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.auto(x)

    with Distiller(Odd(), Odd(), layers="re:auto") as d:
        assert d.pairs == [("auto", "auto")]


def test_blocks_of_timm_stages_with_a_blocks_child_and_of_vits():
    a, b = timm.create_model("convnext_atto"), timm.create_model("convnext_atto")
    pairs = [p[0].pattern for p in auto_pairs(a, b, "blocks").layers()]
    assert pairs[:3] == ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0"]
    assert len(pairs) == 2 + 2 + 6 + 2  # convnext_atto depths; no downsample layers
    vit_t = timm.create_model("vit_tiny_patch16_224", img_size=32)
    vit_s = timm.create_model("vit_small_patch16_224", img_size=32)
    pairing = auto_pairs(vit_s, vit_t, "blocks")
    assert [p.teacher.name for p in pairing.pairs] == [f"blocks.{i}" for i in range(12)]


def test_blocks_of_mixed_kinds_is_an_error_not_a_guess():
    with pytest.raises(
        LayerResolutionError,
        match=r"cannot tell the blocks of stage 'features'.*Conv2dNormActivation, InvertedResidual",
    ):
        auto_pairs(
            torchvision.models.mobilenet_v3_large(),
            torchvision.models.mobilenet_v3_small(),
            "blocks",
        )


def test_global_descriptors_have_no_stride():
    infos = {i.name: i for i in probe(torchvision.models.resnet18())}
    assert infos["avgpool"].map_shape == (512, 1, 1) and infos["avgpool"].stride is None
    assert infos["layer4"].stride == 32


def test_both_models_are_probed_at_one_size():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64)
    pairing = athooks.describe(vit, timm.create_model("resnet18"))
    (pair,) = pairing.pairs
    assert pair.teacher.map_shape[1:] == pair.student.map_shape[1:] == (4, 4)


def test_probe_error_message_reads_cleanly():
    vit = timm.create_model("vit_tiny_patch16_224")
    with pytest.raises(ConfigurationError) as info:
        probe(vit, (3, 64, 64))
    assert ".." not in str(info.value) and "Pass input_size=(C, H, W)" in str(info.value)
