"""athooks-cbam, through the installed entry point and athooks' public API only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import athooks
import athooks.registry
from athooks import Distiller


def cnn(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
    )


def test_names_are_registered_through_the_entry_point():
    assert {"cbam_spatial", "se_channel"} <= set(athooks.list_mappings())
    providers = {name: who for _, name, who, _ in athooks.registry.registered()}
    assert providers["cbam_spatial"] == "athooks-cbam 0.1.0"


def test_cbam_spatial_without_weights_matches_its_definition():
    a = torch.randn(2, 5, 4, 3)
    got = athooks.mapping("cbam_spatial")(a)
    want = (a.abs().mean(1) + a.abs().max(1).values) / 2
    torch.testing.assert_close(got, want)


def test_cbam_spatial_learned_is_cbams_gate_and_trains():
    m = athooks.mapping("cbam_spatial", learned=True, kernel_size=3)
    a = torch.randn(2, 5, 4, 3)
    want = torch.sigmoid(m.gate(torch.stack([a.mean(1), a.amax(1)], 1))).squeeze(1)
    torch.testing.assert_close(m(a), want)
    torch.manual_seed(0)
    teacher, student = cnn(8), cnn(4)
    with Distiller(teacher, student, layers="3", losses=athooks.loss("at", mapping=m)) as d:
        assert len(list(d.parameters())) == 2
        student(torch.randn(2, 3, 8, 8))
        d.loss().backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0


def test_se_channel_transfers_channel_descriptors():
    a = torch.randn(2, 5, 4, 3)
    torch.testing.assert_close(athooks.mapping("se_channel")(a), a.mean((2, 3)))
    torch.manual_seed(0)
    teacher, student = cnn(6), cnn(6)
    with Distiller(
        teacher, student, layers="3", losses=athooks.loss("at", mapping="se_channel")
    ) as d:
        x = torch.randn(2, 3, 8, 8)
        student(x)
        got = d.loss()
    teacher.eval()
    with torch.no_grad():
        st, ss = teacher(x).mean((2, 3)), student(x).mean((2, 3))
    nt = torch.nn.functional.normalize(st, dim=1)
    ns = torch.nn.functional.normalize(ss, dim=1)
    assert got.item() == pytest.approx(1e3 * (ns - nt).pow(2).mean().item(), rel=1e-5)


def test_se_channel_with_different_widths_is_a_clear_error():
    teacher, student = cnn(8), cnn(4)
    with Distiller(
        teacher, student, layers="3", losses=athooks.loss("at", mapping="se_channel")
    ) as d:
        student(torch.randn(2, 3, 8, 8))
        with pytest.raises(
            athooks.CaptureError,
            match=r"mapping 'se_channel' gives the teacher's layer '3' a \(8,\) result and the student's layer '3' a \(4,\) one",
        ):
            d.loss()


def test_bad_kernel_size():
    with pytest.raises(athooks.ConfigurationError, match="kernel_size must be odd"):
        athooks.mapping("cbam_spatial", learned=True, kernel_size=4)


@pytest.mark.parametrize("shape", [(2, 5, 7), (2, 5, 3, 4, 4)], ids=["1d", "video"])
def test_cbam_on_1d_and_video_maps(shape):
    a = torch.randn(*shape)
    spatial = athooks.mapping("cbam_spatial")(a)
    torch.testing.assert_close(spatial, (a.abs().mean(1) + a.abs().amax(1)) / 2)
    squeeze = athooks.mapping("se_channel")(a)
    torch.testing.assert_close(squeeze, a.reshape(*shape[:2], -1).mean(-1))
    with pytest.raises(athooks.CaptureError, match=r"learned=True.*\(B, C, H, W\)"):
        athooks.mapping("cbam_spatial", learned=True)(a)
