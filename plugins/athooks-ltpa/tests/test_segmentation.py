"""segment(): the thresholding rules against their definitions."""

from __future__ import annotations

import athooks_ltpa
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from athooks_ltpa import otsu_threshold, segment

import athooks


def brute_force_otsu(values: np.ndarray) -> np.ndarray:
    """Otsu from the definition: try every split between distinct values, keep the one with the
    largest between-class variance w0 * w1 * (mu0 - mu1)^2; return the upper class."""
    distinct = np.unique(values)
    best, best_t = -1.0, None
    for t in distinct[:-1]:
        low, high = values[values <= t], values[values > t]
        score = len(low) * len(high) * (low.mean() - high.mean()) ** 2
        if score > best:
            best, best_t = score, t
    return values > best_t


def test_otsu_matches_the_definition_on_maps_with_few_levels():
    rng = np.random.default_rng(0)
    levels = np.array([0.0, 0.1, 0.15, 0.6, 0.7, 1.0], dtype=np.float32)
    for _ in range(20):
        maps = levels[rng.integers(0, len(levels), size=(3, 16, 16))]
        got = segment(torch.from_numpy(maps), (16, 16), rule="otsu")
        for b in range(3):
            want = brute_force_otsu(maps[b].ravel()).reshape(16, 16)
            assert np.array_equal(got[b].numpy(), want)


def test_otsu_separates_a_bimodal_map_and_its_threshold_lies_between_the_modes():
    a = torch.full((1, 8, 8), 0.01)
    a[0, 2:5, 3:6] = 0.5
    a = a + 0.001 * torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = segment(a, (8, 8))
    assert mask.dtype == torch.bool and mask.shape == (1, 8, 8)
    assert mask[0].nonzero().tolist() == [[r, c] for r in range(2, 5) for c in range(3, 6)]
    t = float(otsu_threshold(a.flatten(1))[0])
    assert 0.011 < t <= 0.5


def test_masks_are_at_image_resolution_after_bilinear_resizing():
    a = torch.zeros(2, 4, 4)
    a[:, 0, 0] = 1.0
    mask = segment(a, (32, 24), rule="fraction", fraction=0.5)
    up = F.interpolate(a.unsqueeze(1), size=(32, 24), mode="bilinear", align_corners=False)[:, 0]
    assert mask.shape == (2, 32, 24)
    assert torch.equal(mask, up >= 0.5 * up.amax(dim=(1, 2), keepdim=True))
    assert mask[:, :4, :3].all() and not mask[:, 16:, :].any()  # the top-left corner only
    one = segment(a[0], (32, 24))
    assert one.shape == (32, 24)


def test_mass_keeps_the_fewest_highest_positions_holding_that_share():
    a = torch.tensor([[[0.4, 0.3], [0.2, 0.1]]])
    assert segment(a, (2, 2), rule="mass", mass=0.5).tolist() == [[[True, True], [False, False]]]
    assert segment(a, (2, 2), rule="mass", mass=0.4).tolist() == [[[True, False], [False, False]]]
    assert segment(a, (2, 2), rule="mass", mass=0.75).tolist() == [[[True, True], [True, False]]]
    assert segment(a, (2, 2), rule="mass", mass=1.0).all()


def test_a_constant_map_gives_an_empty_otsu_mask():
    assert not segment(torch.full((1, 4, 4), 0.0625), (8, 8)).any()
    assert float(otsu_threshold(torch.ones(5))) == float("inf")


def test_on_a_heads_softmax_attention():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    )
    head = athooks_ltpa.attach(model, layers="0", input_size=(3, 16, 16))
    head(torch.randn(2, 3, 16, 16))
    amap = head.attention_maps["0"]
    for rule in ("otsu", "fraction", "mass"):
        mask = segment(amap, (16, 16), rule=rule)
        assert mask.shape == (2, 16, 16) and mask.any()


def test_bad_arguments():
    a = torch.rand(1, 4, 4)
    with pytest.raises(athooks.ConfigurationError, match="rule must be"):
        segment(a, (4, 4), rule="kmeans")
    with pytest.raises(athooks.ConfigurationError, match=r"in \(0, 1\]"):
        segment(a, (4, 4), rule="fraction", fraction=0)
    with pytest.raises(athooks.ConfigurationError, match="non-negative"):
        segment(a - 1, (4, 4), rule="mass")
    with pytest.raises(athooks.ConfigurationError, match=r"\(B, h, w\)"):
        segment(torch.rand(4), (4, 4))
