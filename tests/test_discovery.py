"""Layer discovery: layers='auto' and 'blocks', conversions, resize, describe."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
import torchvision
from conftest import MapSpy, TinyCNN, ref_attention, resnet_stage_outputs
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


# ------------------------------------------------------------------ stage criteria (issue 15)


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class WithConstantMap(nn.Module):
    """A stride-8 map that ignores the input (like xcit's ``pos_embed``), after real stages."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stage1 = conv(3, width, 2)
        self.stage2 = conv(width, width, 2)
        self.pos_embed = PosEmbed(width)
        self.fc = nn.Linear(width, 5)

    def forward(self, x):
        h = self.stage2(self.stage1(x))
        h = h + self.pos_embed(h.shape[0], h.shape[2] // 2, h.shape[3] // 2).repeat_interleave(
            2, 2
        ).repeat_interleave(2, 3)
        return self.fc(h.mean((2, 3)))


class PosEmbed(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(2, width, 1)

    def forward(self, batch: int, h: int, w: int):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        grid = torch.stack([ys, xs]).float()[None].expand(batch, -1, -1, -1)
        return self.proj(grid)  # depends on the sizes only


def test_an_input_independent_map_is_not_a_stage():
    infos = {i.name: i for i in probe(WithConstantMap(), (3, 32, 32))}
    assert infos["pos_embed"].note == "does not depend on the input"
    assert infos["pos_embed"].stride == 8 and infos["pos_embed"].map_shape == (8, 4, 4)
    stages = stage_layers(WithConstantMap(), (3, 32, 32))
    assert [s.name for s in stages] == ["stage1", "stage2"]
    # a real input of one sample: its mirror image is the second sample
    with Distiller(WithConstantMap(), WithConstantMap()) as d:
        d.student(torch.randn(1, 3, 32, 32))
        assert d.pairs == [("stage1", "stage1"), ("stage2", "stage2")]


class WithRoiHead(nn.Module):
    """A head on a fixed number of regions per call: its batch is not the input's."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = conv(3, 8, 2)
        self.roi_head = conv(8, 8, 1)

    def forward(self, x):
        h = self.stage1(x)
        rois = h[:, :, :4, :4].reshape(-1, 8, 4, 4).repeat(3, 1, 1, 1)  # 3 regions per image
        return self.roi_head(rois).mean()


def test_per_roi_tensors_are_not_stages():
    infos = {i.name: i for i in probe(WithRoiHead(), (3, 16, 16))}
    assert infos["roi_head"].note == "batch 6, not the input's 2"
    assert [s.name for s in stage_layers(WithRoiHead(), (3, 16, 16))] == ["stage1"]


class SegNet(nn.Module):
    """An encoder, then a classifier with num_classes channels (as torchvision's segmenters)."""

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.backbone = nn.Sequential(conv(3, 8, 2), conv(8, 16, 2))
        self.classifier = nn.Sequential(conv(16, 16), nn.Conv2d(16, num_classes, 1))
        self.aux_classifier = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        h = self.backbone(x)
        return {"out": self.classifier(h), "aux": self.aux_classifier(h)}


class TailLogits(nn.Module):
    """A final 1x1 conv to num_classes channels under an ordinary name."""

    num_classes = 5

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(3, 8, 2), conv(8, 16, 2))
        self.project = nn.Sequential(nn.Conv2d(16, 5, 1))

    def forward(self, x):
        return self.project(self.body(x)).mean((2, 3))


def test_classifier_and_logits_maps_are_not_stages():
    infos = {i.name: i for i in probe(SegNet(), (3, 32, 32))}
    assert infos["classifier"].note == "a classifier head"
    assert infos["classifier.0"].note == "a classifier head"
    assert infos["aux_classifier"].note == "a classifier head"
    assert [s.name for s in stage_layers(SegNet(), (3, 32, 32))] == ["backbone.0", "backbone"]
    flow_like = nn.Sequential(conv(3, 8, 2), nn.Sequential())
    flow_like.add_module("mask_predictor", nn.Conv2d(8, 36, 1))  # RAFT's upsampling mask
    infos = {i.name: i for i in probe(flow_like, (3, 32, 32))}
    assert infos["mask_predictor"].note == "a classifier head"
    infos = {i.name: i for i in probe(TailLogits(), (3, 32, 32))}
    assert infos["project"].note == "a logits map (num_classes channels)"
    assert [s.name for s in stage_layers(TailLogits(), (3, 32, 32))] == ["body.0", "body"]


class AttnBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k = nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 1)
        self.k_norm = nn.BatchNorm2d(width)

    def forward(self, h):
        q, k = self.q(h), self.k_norm(self.k(h))
        weights = torch.softmax((q * k).sum(1, keepdim=True).flatten(2), -1).view_as(h[:, :1])
        return h * weights


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv(3, 8, 2)
        self.attn = AttnBlock(8)
        self.down = conv(8, 8, 2)

    def forward(self, x):
        return self.down(self.attn(self.stem(x)))


def test_attention_internals_are_never_stages():
    infos = {i.name: i for i in probe(WithAttention(), (3, 16, 16))}
    for name in ("attn", "attn.q", "attn.k", "attn.k_norm"):
        assert infos[name].note is not None and "attention" in infos[name].note, name
    assert [s.name for s in stage_layers(WithAttention(), (3, 16, 16))] == ["stem", "down"]


# ------------------------------------------------------------------ layouts


class PermuteNet(nn.Module):
    """Channels last without metadata: a torchvision-style Permute, then LayerNorm/Linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 4, 4), torchvision.ops.Permute([0, 2, 3, 1]), nn.LayerNorm(width)
        )
        self.stage = nn.Sequential(nn.Sequential(nn.Linear(width, width), nn.GELU()))

    def forward(self, x):
        return self.stage(self.stem(x)).mean((1, 2))


def test_channels_last_is_read_from_the_modules():
    infos = {i.name: i for i in probe(PermuteNet(24), (3, 32, 48))}
    assert infos["stem.0"].layout == "NCHW" and infos["stem.0"].map_shape == (24, 8, 12)
    for name in ("stem.1", "stem", "stage"):
        assert infos[name].layout == "NHWC" and infos[name].map_shape == (24, 8, 12), name
        assert infos[name].transform == ChannelsLastToFirst() and infos[name].stride == 4


def test_torchvision_swin_is_channels_last():
    torch.manual_seed(0)
    swin = torchvision.models.swin_t()
    stages = stage_layers(swin, (3, 64, 64))
    assert [(s.name, s.layout, s.map_shape, s.stride) for s in stages] == [
        ("features.1", "NHWC", (96, 16, 16), 4),
        ("features.3", "NHWC", (192, 8, 8), 8),
        ("features.5", "NHWC", (384, 4, 4), 16),
        ("features", "NHWC", (768, 2, 2), 32),
    ]


def tv_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128
    )


def test_torchvision_vit_tokens_with_a_class_token_become_the_grid():
    torch.manual_seed(0)
    vit, student = tv_vit(), torchvision.models.resnet18()
    infos = {i.name: i for i in probe(vit, (3, 64, 64))}
    layer = infos["encoder.layers.encoder_layer_1"]
    assert layer.shape == (17, 64) and layer.layout == "tokens"
    assert layer.transform == TokensToMap(prefix=1, grid=(4, 4)) and layer.stride == 16
    assert infos["encoder.layers.encoder_layer_1.self_attention"].note is not None
    x = torch.randn(2, 3, 64, 64)
    with Distiller(vit, student) as d:
        student(x)
        assert d.pairs == [("encoder", "layer3")]
        loss = d.loss()
    loss.backward()
    vit.eval()
    with torch.no_grad():
        tokens = vit.encoder(
            torch.cat([vit.class_token.expand(2, -1, -1), vit._process_input(x)], 1)
        )
    t_feat = tokens[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4)  # drop the class token
    s_feat = resnet_stage_outputs(student, x)[2]
    want = 1e3 * (ref_attention(s_feat) - ref_attention(t_feat)).pow(2).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


def test_tokens_of_a_non_square_input_lie_on_its_grid():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=(32, 64), dynamic_img_size=False)
    info = {i.name: i for i in probe(vit, (3, 32, 64))}["blocks.11"]
    assert info.map_shape == (192, 2, 4) and info.transform == TokensToMap(1, (2, 4))


# ------------------------------------------------------------------ strides


def test_strides_round_to_powers_of_two_and_pair_by_depth():
    """Inception at 128 px: 61/28/13/6/2 cells read as strides 2/4/8/16/64."""
    teacher, student = timm.create_model("inception_v3"), timm.create_model("resnet18")
    pairing = auto_pairs(teacher, student, input_size=(3, 128, 128))
    assert pairing.teacher_strides == [2, 4, 8, 16, 64]
    assert [(p.teacher.name, p.student.name) for p in pairing.pairs] == [
        ("Conv2d_4a_3x3", "layer1"),
        ("Mixed_5d", "layer2"),
        ("Mixed_6e", "layer3"),
        ("Mixed_7c", "layer4"),  # 2x2 (stride 64 by rounding) with 4x4: one octave, both last
    ]
    assert [p.teacher.map_shape[1] for p in pairing.pairs] == [28, 13, 6, 2]
    assert pairing.warnings == []
    assert "64/32" in str(pairing)


def test_torchvision_inception_without_metadata_pairs_too():
    teacher = torchvision.models.inception_v3(aux_logits=False, init_weights=False)
    pairing = auto_pairs(teacher, torchvision.models.resnet18(), input_size=(3, 128, 128))
    assert [p.student.name for p in pairing.pairs] == ["layer1", "layer2", "layer3", "layer4"]


# ------------------------------------------------------------------ detectors, segmenters


def small_detector() -> nn.Module:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    return fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=128
    )


@pytest.mark.slow
def test_detectors_pair_fpn_levels_by_name_and_train():
    torch.manual_seed(0)
    teacher, student = small_detector(), small_detector()
    images = [torch.rand(3, 100, 120), torch.rand(3, 90, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1])}] * 2
    student.train()
    with Distiller(teacher, student) as d:
        task = student(images, targets)  # the probe runs both in eval, on the images only
        assert [(p.teacher.label, p.student.label) for p in d.pairing.pairs] == [
            ("backbone['0']", "backbone['0']"),
            ("backbone['1']", "backbone['1']"),
            ("backbone['pool']", "backbone['pool']"),
        ]
        layers = d.pairing.layers()
        assert layers[0][0] == athooks.Layer("backbone", select="0")
        # strides against the images as resized inside (128 px), not the raw input
        assert [p.teacher.stride for p in d.pairing.pairs] == [32, 32, 64]
        loss = sum(task.values()) + d.loss()
    assert torch.isfinite(loss)
    loss.backward()
    assert student.training


def test_segmentation_backbone_stages_are_paired_and_the_classifier_is_not():
    build = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large
    teacher = build(weights=None, weights_backbone=None)
    student = build(weights=None, weights_backbone=None)
    pairing = auto_pairs(teacher, student, example=((torch.randn(2, 3, 64, 64),), {}))
    labels = [p.teacher.label for p in pairing.pairs]
    assert labels == ["backbone.1", "backbone.3", "backbone.6", "backbone['out']"]
    assert not any("classifier" in p.student.label for p in pairing.pairs)


# ------------------------------------------------------------------ N-d, tokens, other inputs


def test_video_models_pair_their_stages_as_nd_maps():
    torch.manual_seed(0)
    teacher, student = torchvision.models.video.r3d_18(), torchvision.models.video.mc3_18()
    pairing = auto_pairs(teacher, student, example=((torch.randn(1, 3, 4, 32, 32),), {}))
    rows = [(p.teacher.name, p.teacher.map_shape, p.student.map_shape) for p in pairing.pairs]
    assert rows == [
        ("layer1", (64, 4, 16, 16), (64, 4, 16, 16)),
        ("layer2", (128, 2, 8, 8), (128, 4, 8, 8)),
        ("layer3", (256, 1, 4, 4), (256, 4, 4, 4)),
        ("layer4", (512, 1, 2, 2), (512, 4, 2, 2)),
    ]
    assert [p.teacher.stride for p in pairing.pairs] == [2, 4, 8, 16]  # over H, W
    assert pairing.pairs[0].teacher.layout == "NCTHW" and "64x4x16x16" in str(pairing)


class Conv1dNet(nn.Module):
    """A 1-D signal model: (B, C, T) in, stages at strides 2 and 4."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv1d(2, width, 5, 2, 2), nn.BatchNorm1d(width), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv1d(width, 2 * width, 5, 2, 2), nn.ReLU())
        self.fc = nn.Linear(2 * width, 3)

    def forward(self, x):
        return self.fc(self.stage2(self.stage1(x)).mean(-1))


def test_one_dimensional_signals():
    pairing = auto_pairs(Conv1dNet(16), Conv1dNet(8), example=((torch.randn(4, 2, 64),), {}))
    rows = [(p.teacher.name, p.teacher.map_shape, p.teacher.stride) for p in pairing.pairs]
    assert rows == [("stage1", (16, 32), 2), ("stage2", (32, 16), 4)]
    assert pairing.pairs[0].student.layout == "NCL"


class TokenNet(nn.Module):
    """Token ids (B, T) in; (B, T, C) sequences out of every block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(2)]
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 50)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.embed(ids))))


def test_token_sequences_are_channels_last_1d_maps():
    ids = torch.randint(0, 50, (4, 12))
    pairing = auto_pairs(TokenNet(32), TokenNet(16), example=((ids,), {}))
    (pair,) = pairing.pairs
    assert (pair.teacher.name, pair.teacher.layout, pair.teacher.map_shape) == (
        "blocks",
        "NLC",
        (32, 12),
    )
    assert pair.teacher.transform == ChannelsLastToFirst()
    infos = {i.name: i for i in probe(TokenNet(8), example=((ids,), {}))}
    assert infos["head"].note == "a classifier head"


class KeywordOnly(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.stage1, self.stage2 = conv(3, width, 2), conv(width, width, 2)

    def forward(self, *, x):
        return self.stage2(self.stage1(x)).mean((2, 3))


def test_keyword_only_forward():
    torch.manual_seed(0)
    teacher, student = KeywordOnly(8), KeywordOnly(4)
    with Distiller(teacher, student) as d:
        student(x=torch.randn(2, 3, 16, 16))
        assert d.pairs == [("stage1", "stage1"), ("stage2", "stage2")]
        assert torch.isfinite(d.loss())


class DictOut(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = DictStages(width)

    def forward(self, x):
        feats = self.body(x)
        return feats["c3"].mean((2, 3))


class DictStages(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = conv(3, width, 2), conv(width, width, 2), conv(width, width, 2)

    def forward(self, x):
        a = self.c1(x)
        b = self.c2(a)
        return {"c1": a, "c2": b, "c3": self.c3(b)}


def test_dict_outputs_give_one_stage_per_level():
    torch.manual_seed(0)
    teacher, student = DictOut(8), DictOut(4)
    with Distiller(teacher, student) as d:
        student(torch.randn(2, 3, 32, 32))
        labels = [(p.teacher.label, p.student.label) for p in d.pairing.pairs]
        assert labels == [
            ("body['c1']", "body['c1']"),
            ("body['c2']", "body['c2']"),
            ("body['c3']", "body['c3']"),
        ]
        assert torch.isfinite(d.loss())


class UNet(nn.Module):
    num_classes = 3

    def __init__(self, w: int) -> None:
        super().__init__()
        self.enc1, self.enc2, self.enc3 = conv(3, w), conv(w, 2 * w, 2), conv(2 * w, 4 * w, 2)
        self.bottleneck = conv(4 * w, 4 * w, 2)
        self.up3, self.dec3 = nn.Upsample(scale_factor=2), conv(8 * w, 2 * w)
        self.up2, self.dec2 = nn.Upsample(scale_factor=2), conv(4 * w, w)
        self.up1, self.dec1 = nn.Upsample(scale_factor=2), conv(2 * w, w)
        self.outc = nn.Conv2d(w, 3, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        b = self.bottleneck(e3)
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.outc(d1)


def test_unet_pairs_its_encoder_not_its_decoder():
    pairing = auto_pairs(UNet(8), UNet(4), example=((torch.randn(2, 3, 32, 32),), {}))
    assert [p.teacher.name for p in pairing.pairs] == ["enc1", "enc2", "enc3", "bottleneck"]


# ------------------------------------------------------------------ warnings


class PatchOnly(nn.Module):
    """A patch embedding, then an MLP on pooled tokens: its only map is the stem's."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 16, 16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.Linear(64, 10))

    def forward(self, x):
        return self.mlp(self.patch_embed(x).mean((2, 3)))


def test_a_stem_paired_with_a_deep_stage_warns_once_and_says_how_to_override():
    teacher, student = torchvision.models.resnet18(), PatchOnly()
    x = torch.randn(2, 3, 64, 64)
    with pytest.warns(athooks.PairingWarning) as record, Distiller(teacher, student) as d:
        student(x)
        student(x)
        d.loss()
    messages = [str(w.message) for w in record if issubclass(w.category, athooks.PairingWarning)]
    assert len(messages) == 1
    assert "teacher layer3 with student patch_embed" in messages[0]
    assert "stem or patch embedding patch_embed is paired with the deep layer3" in messages[0]
    assert "layers=[(teacher_name, student_name), ...]" in messages[0]
    assert "warning: layers='auto' paired" in str(d.pairing)
    assert all(len(line) <= 80 for line in str(d.pairing).splitlines())


def test_pair_warnings_flag_what_auto_never_picks():
    from athooks.discovery import LayerInfo, PairInfo, pair_warnings

    deep = LayerInfo("layer3", "Sequential", (8, 4, 4), (8, 4, 4), 16, position=0.7)
    for other, why in [
        (
            LayerInfo(
                "head", "Conv2d", (5, 4, 4), (5, 4, 4), 16, note="a classifier head", position=0.7
            ),
            "is a classifier head",
        ),
        (
            LayerInfo(
                "pos",
                "Conv2d",
                (8, 4, 4),
                (8, 4, 4),
                16,
                note="does not depend on the input",
                position=0.7,
            ),
            "does not depend",
        ),
        (LayerInfo("pool", "Pool", (8, 1, 1), (8, 1, 1), None, position=0.7), "a map of one cell"),
        (
            LayerInfo("late", "Sequential", (8, 4, 4), (8, 4, 4), 16, position=0.2),
            "through the teacher's forward",
        ),
    ]:
        (message,) = pair_warnings([PairInfo(deep, other)])
        assert why in message and "layers=[" in message
    assert pair_warnings([PairInfo(deep, deep)]) == []


class VideoTokens(nn.Module):
    """A 3-D patch embedding, then tokens (B, 1 + t*h*w, C) as in MViT."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv_proj = nn.Conv3d(3, width, (2, 4, 4), (2, 4, 4))
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)) for _ in range(2)]
        )

    def forward(self, x):
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)
        return self.blocks(tokens)[:, 0]


def test_video_tokens_lie_on_their_time_and_space_grid():
    x = torch.randn(2, 3, 8, 32, 32)
    info = {i.name: i for i in probe(VideoTokens(16), example=((x,), {}))}["blocks"]
    assert info.shape == (1 + 4 * 8 * 8, 16) and info.layout == "tokens"
    assert info.transform == TokensToMap(1, (4, 8, 8)) and info.map_shape == (16, 4, 8, 8)
    assert info.stride == 4


class Swin3dLike(nn.Module):
    """Channels-last video, (B, T, H, W, C), after a Permute: as torchvision's Swin3D."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(
            nn.Conv3d(3, width, (2, 4, 4), (2, 4, 4)),
            torchvision.ops.Permute([0, 2, 3, 4, 1]),
            nn.LayerNorm(width),
        )
        self.features = nn.Sequential(nn.Sequential(nn.Linear(width, width), nn.GELU()))

    def forward(self, x):
        return self.features(self.patch_embed(x)).mean((1, 2, 3))


def test_channels_last_video_and_the_stage_that_ends_last():
    x = torch.randn(2, 3, 4, 32, 32)
    (stage,) = stage_layers(Swin3dLike(8), infos=probe(Swin3dLike(8), example=((x,), {})))
    assert (stage.name, stage.layout, stage.map_shape) == ("features", "NTHWC", (8, 2, 8, 8))
    assert stage.transform == ChannelsLastToFirst() and stage.stride == 4


REAL = {
    "xcit_nano (pos_embed ignores the input)": (
        lambda: timm.create_model("xcit_nano_12_p16_224"),
        64,
        [("blocks.11", "layer3")],
    ),
    "mixer at its size": (
        lambda: timm.create_model("mixer_s16_224"),
        224,
        [("blocks.7", "layer3")],
    ),
    "levit at its size": (
        lambda: timm.create_model("levit_128s"),
        224,
        [("stages.0", "layer3"), ("stages.1", "layer4")],
    ),
    "efficientformerv2 at its size": (
        lambda: timm.create_model("efficientformerv2_s0"),
        224,
        [
            ("stages.0", "layer1"),
            ("stages.1", "layer2"),
            ("stages.2", "layer3"),
            ("stages.3", "layer4"),
        ],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REAL))
def test_real_timm_families_pair_with_a_resnet(case):
    build, size, expected = REAL[case]
    torch.manual_seed(0)
    teacher, student = build(), timm.create_model("resnet18")
    pairing = auto_pairs(teacher, student, example=((torch.randn(2, 3, size, size),), {}))
    assert [(p.teacher.name, p.student.name) for p in pairing.pairs] == expected
    assert all(p.teacher.map_shape[1:] == p.student.map_shape[1:] for p in pairing.pairs)
    if case.startswith("xcit"):
        infos = {i.name: i for i in probe(teacher, (3, 64, 64))}
        assert infos["pos_embed"].note == "does not depend on the input"


def test_a_4d_tensor_whose_axes_shrink_unevenly_is_not_a_stage():
    """coat's conv relative-position encoding returns (B, heads, 1 + N, C / heads): read as
    NCHW it is a 65x19 "map" of a 128x128 image (strides 2 and 8). Not a stage: it was paired
    as one, unwarned, in the zoo."""

    class HeadsTokens(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, h, w = x.shape
            tokens = torch.cat([x.new_zeros(b, c, 1), x.flatten(2)], dim=2)  # (B, C, 1 + N)
            return tokens.reshape(b, 4, c // 4, 1 + h * w).transpose(2, 3)  # (B, 4, 1+N, C/4)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), nn.ReLU())
            self.stage = nn.Sequential(nn.Conv2d(16, 16, 4, 4), nn.ReLU())
            self.crpe = HeadsTokens()
            self.fc = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stage(self.stem(x))
            return self.fc(y.mean((2, 3))) + self.crpe(y).mean()

    infos = {i.name: i for i in probe(Net(), (3, 128, 128))}
    assert infos["crpe"].map_shape == (4, 65, 4)  # 65x4 from 128x128: strides 2 and 32
    assert infos["crpe"].note == "its axes are not the input's"
    assert [s.name for s in stage_layers(Net(), (3, 128, 128))] == ["stem", "stage"]
