"""athooks.viz and `athooks show`: maps, figures, overlays, the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import OrderedDict

import matplotlib
import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

import athooks
from athooks.cli import build_model, load_checkpoint, main
from athooks.errors import CaptureError, ConfigurationError
from athooks.viz import (
    AttentionMaps,
    attention_maps,
    compare,
    load_image,
    overlay,
    plot_across_p,
    plot_maps,
    upsample,
)

SIZE = 32
OBJECT = 6


def hand_built_cnn() -> nn.Module:
    """A CNN with fixed, designed weights: brightness and centre-surround detectors.

    stage1 (stride 2): channel 0 = relu(x - 0.5), channel 1 = relu(laplacian(x)), then 2x2 max pool.
    stage2 (stride 4): a 3x3 box filter on each channel, relu, 2x2 average pool.
    """
    conv1 = nn.Conv2d(1, 2, 3, padding=1)
    conv2 = nn.Conv2d(2, 2, 3, padding=1, groups=2, bias=False)
    with torch.no_grad():
        conv1.weight.zero_()
        conv1.weight[0, 0, 1, 1] = 1.0
        conv1.bias[0] = -0.5
        conv1.weight[1, 0] = torch.tensor(
            [[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]]
        )
        conv1.bias[1] = 0.0
        conv2.weight.fill_(1.0 / 9.0)
    stage1 = nn.Sequential(conv1, nn.ReLU(), nn.MaxPool2d(2))
    stage2 = nn.Sequential(conv2, nn.ReLU(), nn.AvgPool2d(2))
    return nn.Sequential(OrderedDict(stage1=stage1, stage2=stage2))


def object_image(top: int, left: int, seed: int = 0) -> torch.Tensor:
    """A flat background (0.2 plus faint noise) with one bright square object."""
    g = torch.Generator().manual_seed(seed)
    img = 0.2 + 0.01 * torch.randn(1, SIZE, SIZE, generator=g)
    img[:, top : top + OBJECT, left : left + OBJECT] = 0.9
    return img


@settings(max_examples=25, deadline=None)
@given(
    top=st.integers(0, SIZE - OBJECT),
    left=st.integers(0, SIZE - OBJECT),
    p=st.sampled_from([1.0, 2.0, 4.0]),
)
def test_the_hottest_cell_lies_on_the_object(top, left, p):
    model = hand_built_cnn()
    maps = attention_maps(model, object_image(top, left)[None], layers="auto", p=p)
    assert list(maps) == ["stage1", "stage2"]
    for name, amap in maps.items():
        stride = maps.info[name].stride
        assert stride == {"stage1": 2, "stage2": 4}[name]
        i, j = divmod(int(amap[0].flatten().argmax()), amap.shape[-1])
        # the cell covers pixels [i*stride, (i+1)*stride): it must overlap the object's box
        assert i * stride < top + OBJECT and (i + 1) * stride > top, (name, i, top)
        assert j * stride < left + OBJECT and (j + 1) * stride > left, (name, j, left)


def test_maps_are_the_papers_formula_on_the_layer_output():
    # F_sum^p(A) = sum_c |A_c|^p (Zagoruyko & Komodakis, Sec. 3.1), on outputs read by our own hook
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    seen = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
        for n in ("layer2", "layer4")
    ]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    for p in (1.0, 2.0, 4.0):
        maps = attention_maps(model, images, layers=["layer2", "layer4"], p=p)
        for name in ("layer2", "layer4"):
            expected = seen[name].abs().pow(p).sum(1)
            torch.testing.assert_close(maps[name], expected, rtol=1e-5, atol=1e-6)
    maps = attention_maps(model, images, layers="layer4", mapping="max_p", p=2)
    torch.testing.assert_close(maps["layer4"], seen["layer4"].abs().pow(2).amax(1))


def test_model_state_is_restored_and_no_hook_is_left():
    model = torchvision.models.resnet18()
    model.train()
    model.layer1.eval()
    attention_maps(model, torch.rand(1, 3, 64, 64))
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(not m._forward_hooks for m in model.modules())


def test_layers_arguments():
    model = torchvision.models.resnet18()
    x = torch.rand(1, 3, 64, 64)
    assert list(attention_maps(model, x, "blocks")) == [
        f"layer{i}.{j}" for i in range(1, 5) for j in range(2)
    ]
    assert list(attention_maps(model, x, "layer[23]")) == ["layer2", "layer3"]
    maps = attention_maps(model, x[0], athooks.Layer("layer3"), mapping="sum")
    assert isinstance(maps, AttentionMaps) and maps["layer3"].shape == (1, 4, 4)
    assert maps.info["layer3"].title() == "layer3 · stride 16 · sum"
    with pytest.raises(athooks.LayerResolutionError, match="close names"):
        attention_maps(model, x, "layr3")
    with pytest.raises(ConfigurationError, match="images must be a tensor"):
        attention_maps(model, [x], "layer3")


def test_tokens_of_a_vit_become_maps_on_the_patch_grid():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=64)
    maps = attention_maps(vit, torch.rand(2, 3, 64, 64), "blocks.1")
    assert maps["blocks.1"].shape == (2, 4, 4) and maps.info["blocks.1"].stride == 16


def test_a_layer_that_does_not_run_is_a_clear_error():
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(3, 4, 3)
            self.unused = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(CaptureError, match="'unused' did not run"):
        attention_maps(Skips(), torch.rand(1, 3, 8, 8), ["used", "unused"])


def test_plot_maps_has_one_panel_per_image_and_layer_with_titles():
    model = hand_built_cnn()
    images = torch.stack([object_image(2, 3), object_image(20, 10), object_image(9, 25)])
    maps = attention_maps(model, images, p=2)
    fig = plot_maps(images, maps)
    assert len(fig.axes) == 3 * 2
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["stage1 · stride 2 · sum_p(p=2)", "stage2 · stride 4 · sum_p(p=2)"]
    assert all(len(ax.get_images()) == 1 for ax in fig.axes)
    # a plain dict works too; its keys are the titles
    fig = plot_maps(images, {"a": maps["stage1"]})
    assert [ax.get_title() for ax in fig.axes] == ["a"] * 3
    with pytest.raises(ConfigurationError, match="one map per input"):
        plot_maps(images[:2], maps)


def test_overlay_blends_the_upsampled_map_over_the_image():
    image = torch.zeros(1, 16, 16)
    image[:, :8] = 1.0  # top half white
    amap = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    heat = overlay(image, amap, alpha=1.0)
    assert heat.shape == (16, 16, 3) and heat.dtype == np.float32
    viridis = matplotlib.colormaps["viridis"]
    # alpha 1: only the colour map, scaled to [0, 1]: the hot quadrant is bright yellow
    np.testing.assert_allclose(heat[0, 15], viridis(1.0)[:3], atol=1e-6)
    np.testing.assert_allclose(heat[15, 0], viridis(0.0)[:3], atol=1e-6)
    # alpha 0: only the image, in grey
    plain = overlay(image, amap, alpha=0.0)
    np.testing.assert_allclose(plain[0, 0], [1, 1, 1])
    np.testing.assert_allclose(plain[15, 0], [0, 0, 0])
    # a half blend, and other image layouts
    half = overlay(image, amap, alpha=0.5)
    np.testing.assert_allclose(half, 0.5 * plain + 0.5 * heat, atol=1e-6)
    for layout in (image[0], image[0].numpy()[:, :, None], image.expand(3, 16, 16)):
        np.testing.assert_allclose(overlay(layout, amap, alpha=0.5), half, atol=1e-6)
    assert half.min() >= 0.0 and half.max() <= 1.0
    with pytest.raises(ConfigurationError, match="one map"):
        overlay(image, amap[None])


def test_upsample_is_bilinear_without_corner_alignment():
    amap = torch.arange(4.0).reshape(2, 2)
    out = upsample(amap, (4, 4))
    expected = torch.nn.functional.interpolate(
        amap[None, None], size=(4, 4), mode="bilinear", align_corners=False
    )[0, 0]
    torch.testing.assert_close(out, expected)
    assert upsample(amap[None], (4, 4)).shape == (1, 4, 4)


def test_compare_pairs_stages_and_lays_out_models():
    torch.manual_seed(0)
    teacher = torchvision.models.resnet34()
    students = {"student": torchvision.models.resnet18(), "AT": torchvision.models.resnet18()}
    images = torch.rand(2, 3, 64, 64)
    fig = compare(teacher, students, images)
    assert len(fig.axes) == 2 * 3 * 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "teacher\nlayer1 · stride 4 · sum_p(p=2)"
    assert titles[4] == "student\nlayer1 · stride 4 · sum_p(p=2)"
    assert titles[8 + 3] == "AT\nlayer4 · stride 32 · sum_p(p=2)"
    fig = compare(teacher, students["AT"], images[:1], [("layer3", "layer3")], models_as="columns")
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == ["teacher", "student"]
    with pytest.raises(ConfigurationError, match="models_as"):
        compare(teacher, students["AT"], images, models_as="diagonal")


def test_plot_across_p_rows_are_images_times_p():
    model = hand_built_cnn()
    images = torch.stack([object_image(2, 3), object_image(20, 10)])
    fig = plot_across_p(model, images, ps=(1, 2, 4))
    assert len(fig.axes) == 2 * 3 * 2
    assert fig.axes[2].get_title() == "stage1 · stride 2 · sum_p(p=2)"
    fig = plot_across_p(model, images, ps=None, mapping="sum")
    assert len(fig.axes) == 2 * 2


def test_load_image_resizes_and_converts(tmp_path):
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :, 0] = 255
    Image.fromarray(pixels).save(tmp_path / "red.png")
    rgb = load_image(tmp_path / "red.png", (8, 12))
    assert rgb.shape == (3, 8, 12)
    torch.testing.assert_close(rgb[0], torch.ones(8, 12))
    grey = load_image(tmp_path / "red.png", (8, 12), channels=1)
    assert grey.shape == (1, 8, 12) and 0.2 < float(grey.mean()) < 0.4  # L = 0.299 R
    with pytest.raises(ConfigurationError, match="cannot read image"):
        load_image(tmp_path / "missing.png", (8, 8))


def write_object_png(path, top=10, left=20) -> None:
    pixels = np.full((64, 64, 3), 40, np.uint8)
    pixels[top : top + 12, left : left + 12] = 250
    Image.fromarray(pixels).save(path)


def test_show_writes_a_png_of_the_expected_size(tmp_path, capsys):
    write_object_png(tmp_path / "a.png")
    write_object_png(tmp_path / "b.png", 40, 5)
    out = tmp_path / "maps.png"
    args = ["show", "athooks:wrn16_1", str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    args += ["--input-size", "3", "32", "32", "--p", "1", "2", "--out", str(out), "--dpi", "50"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    # 3 stages (columns) x (2 images x 2 p) rows, 2-inch panels at 50 dpi
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (3 * 100, 4 * 100)


def test_show_writes_pdf_and_loads_a_checkpoint(tmp_path, capsys):
    write_object_png(tmp_path / "a.png")
    torch.manual_seed(3)
    trained = build_model("athooks:wrn16_1", num_classes=10, in_chans=1)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}},
        tmp_path / "w.pt",
    )
    loaded = load_checkpoint(
        build_model("athooks:wrn16_1", num_classes=10, in_chans=1), str(tmp_path / "w.pt")
    )
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    out = tmp_path / "maps.pdf"
    args = ["show", "athooks:wrn16_1", str(tmp_path / "a.png"), "--in-chans", "1"]
    args += ["--num-classes", "10", "--input-size", "1", "32", "32", "--layers", "layer2"]
    args += ["--checkpoint", str(tmp_path / "w.pt"), "--out", str(out)]
    assert main(args) == 0
    assert out.read_bytes()[:5] == b"%PDF-"
    # the wrong model for the checkpoint
    args[args.index("--num-classes") + 1] = "7"
    assert main(args) == 2
    assert "does not fit the model" in capsys.readouterr().err


class NotATensor:
    pass


def test_checkpoints_are_never_unpickled(tmp_path):
    torch.save({"state_dict": {}, "extra": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigurationError, match="weights_only=True"):
        load_checkpoint(nn.Linear(2, 2), str(tmp_path / "evil.pt"))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ConfigurationError, match="holds no state dict"):
        load_checkpoint(nn.Linear(2, 2), str(tmp_path / "list.pt"))
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_checkpoint(nn.Linear(2, 2), str(tmp_path / "none.pt"))


def test_pretrained_weights_that_cannot_be_had_are_a_clear_error(tmp_path, monkeypatch, capsys):
    import timm

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return nn.Identity()

    monkeypatch.setattr(timm, "create_model", offline)
    write_object_png(tmp_path / "a.png")
    assert main(["show", "resnet18", str(tmp_path / "a.png"), "--pretrained"]) == 2
    err = capsys.readouterr().err
    assert "could not get the pretrained weights of 'resnet18'" in err
    assert "--checkpoint" in err and "network" in err
    assert main(["show", "athooks:wrn16_1", str(tmp_path / "a.png"), "--pretrained"]) == 2
    assert "has no published weights" in capsys.readouterr().err
    assert main(["show", "athooks:wrn16_1", str(tmp_path / "a.png"), "--out", "x.jpg"]) == 2
    assert ".png or .pdf" in capsys.readouterr().err


def test_the_show_command_runs_as_a_program(tmp_path):
    write_object_png(tmp_path / "a.png")
    out = tmp_path / "m.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "athooks.cli",
            "show",
            "athooks:wrn16_1",
            str(tmp_path / "a.png"),
            "--input-size",
            "3",
            "32",
            "32",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    with Image.open(out) as png:
        assert png.size == (3 * 200, 1 * 200)


def test_matplotlib_is_imported_only_to_draw():
    code = textwrap.dedent(
        """
        import sys
        import torch
        import athooks
        from athooks.demo import run
        t = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
        s = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
        with athooks.Distiller(t, s, layers="0") as d:
            s(torch.rand(1, 3, 8, 8))
            d.loss().backward()
        maps = athooks.viz.attention_maps(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)),
                                          torch.rand(1, 3, 8, 8))
        assert "matplotlib" not in sys.modules, "imported"
        athooks.viz.overlay(torch.rand(8, 8), maps["0"][0])
        assert "matplotlib" in sys.modules
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ 1-D signals and videos


class Signal1d(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv1d(2, width, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x):
        return self.stage2(self.stage1(x)).mean(-1)


class Video3d(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv3d(3, width, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv3d(width, width, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x):
        return self.stage2(self.stage1(x)).mean((2, 3, 4))


def test_attention_maps_of_1d_signals_and_videos_are_the_formula():
    torch.manual_seed(0)
    net, x = Signal1d(), torch.randn(3, 2, 20)
    maps = attention_maps(net, x, layers="stage?")
    with torch.no_grad():
        s1 = net.stage1(x)
        s2 = net.stage2(s1)
    torch.testing.assert_close(maps["stage1"], s1.pow(2).sum(1))
    torch.testing.assert_close(maps["stage2"], s2.pow(2).sum(1))
    assert maps.info["stage1"].stride == 1 and maps.info["stage2"].stride == 2
    video, clip = Video3d(), torch.randn(2, 3, 4, 16, 16)
    maps = attention_maps(video, clip, layers=["stage1", "stage2"], mapping="max_p", p=4)
    with torch.no_grad():
        v2 = video.stage2(video.stage1(clip))
    assert maps["stage2"].shape == (2, 2, 8, 8)
    torch.testing.assert_close(maps["stage2"], v2.abs().amax(1).pow(4))
    assert maps.info["stage2"].stride == 2


def test_a_3d_input_is_one_image_unless_the_model_starts_with_a_1d_convolution():
    image_net = hand_built_cnn()
    assert attention_maps(image_net, torch.rand(1, 32, 32), "stage1")["stage1"].shape == (1, 16, 16)
    assert attention_maps(Signal1d(), torch.rand(4, 2, 8), "stage1")["stage1"].shape == (4, 8)


def test_plot_maps_draws_a_1d_map_as_a_strip_behind_the_signal():
    torch.manual_seed(1)
    net, x = Signal1d(), torch.randn(3, 2, 20)
    maps = attention_maps(net, x, layers="stage?")
    fig = plot_maps(x, maps)
    assert len(fig.axes) == 3 * 2  # one row per signal, one panel per layer
    ax = fig.axes[1]  # signal 0, stage2 (10 cells)
    assert len(ax.lines) == 2  # the two channels
    np.testing.assert_allclose(ax.lines[1].get_ydata(), x[0, 1].numpy())
    strip = np.asarray(ax.images[0].get_array())
    assert strip.shape == (1, 20)  # the map upsampled to the signal's length
    amap = maps["stage2"][0]
    up = torch.nn.functional.interpolate(amap[None, None], size=20, mode="linear")[0, 0]
    np.testing.assert_allclose(strip[0], ((up - up.min()) / (up.max() - up.min())).numpy(), 1e-5)
    assert "stage2" in ax.get_title()


def test_plot_maps_draws_a_video_map_frame_by_frame():
    torch.manual_seed(2)
    video, clip = Video3d(), torch.rand(2, 3, 4, 16, 16)
    maps = attention_maps(video, clip, layers="stage?")
    fig = plot_maps(clip, maps)
    # one row per video and layer, one panel per frame
    assert len(fig.axes) == 2 * 2 * 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:4] == [f"{maps.info['stage1'].title()}\nframe {k}" for k in range(4)]
    # stage2 has 2 frames for the 4 of the input: interpolated along time, frame 0 is its first
    frame0 = np.asarray(fig.axes[4].images[0].get_array())
    want = overlay(clip[0, :, 0], maps["stage2"][0, 0])
    np.testing.assert_allclose(frame0, want, atol=1e-6)


def test_compare_on_videos_and_signals():
    torch.manual_seed(3)
    fig = compare(Video3d(8), Video3d(4), torch.rand(1, 3, 4, 16, 16), layers="stage2")
    assert len(fig.axes) == 2 * 4  # teacher and student rows of 4 frames
    fig = compare(Signal1d(8), Signal1d(4), torch.randn(2, 2, 12), layers="stage?")
    assert len(fig.axes) == 2 * 2 * 2  # (teacher, student) x 2 signals, 2 layers
    assert all(len(ax.lines) == 2 for ax in fig.axes)


def test_several_keys_of_one_output_are_separate_maps():
    class Levels(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            f = self.conv(x)
            return {"p2": f, "p3": f[..., ::2, ::2]}

    net = nn.Sequential(Levels())
    for select in (("p2", "p3"), "*"):
        maps = attention_maps(net, torch.rand(1, 3, 8, 8), athooks.Layer("0", select=select))
        assert list(maps) == ["0['p2']", "0['p3']"]
        assert maps["0['p3']"].shape == (1, 4, 4)
    fig = compare(
        net, nn.Sequential(Levels()), torch.rand(1, 3, 8, 8), athooks.Layer("0", select="*")
    )
    assert len(fig.axes) == 2 * 2
