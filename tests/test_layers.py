"""Layer names, patterns, wrappers and pairing."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import TinyCNN
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import athooks
from athooks import Layer
from athooks.errors import ConfigurationError, LayerResolutionError
from athooks.layers import compile_pattern, match_modules, resolve_pairs, unwrap


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18()


def names(model, pattern):
    return [n for n, _ in match_modules(model, pattern)]


def test_single_star_stays_within_one_part(resnet18):
    # fnmatch's `*` would match 60+ names here (pitfall 9)
    assert names(resnet18, "layer*") == ["layer1", "layer2", "layer3", "layer4"]
    assert names(resnet18, "layer?") == ["layer1", "layer2", "layer3", "layer4"]
    assert names(resnet18, "layer1.*") == ["layer1.0", "layer1.1"]


def test_double_star_crosses_parts(resnet18):
    assert names(resnet18, "**.bn2") == [f"layer{i}.{j}.bn2" for i in range(1, 5) for j in (0, 1)]
    below = names(resnet18, "layer4.**")
    assert below[0] == "layer4.0" and "layer4.1.bn2" in below and "layer4" not in below
    assert names(resnet18, "layer1.**.conv1") == ["layer1.0.conv1", "layer1.1.conv1"]
    assert len(names(resnet18, "**")) == len([n for n, _ in resnet18.named_modules() if n])


def test_character_sets_and_regex(resnet18):
    assert names(resnet18, "layer[23]") == ["layer2", "layer3"]
    assert names(resnet18, "layer[!23]") == ["layer1", "layer4"]
    assert names(resnet18, r"re:layer\d\.1") == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    # a regex must match the whole name
    assert names(resnet18, "re:layer1") == ["layer1"]


def test_matches_are_in_module_order(resnet18):
    assert names(resnet18, "re:layer(4|1)") == ["layer1", "layer4"]


@given(st.lists(st.sampled_from(["a", "b1", "x_y"]), min_size=1, max_size=4))
def test_plain_name_pattern_matches_itself_only(parts):
    name = ".".join(parts)
    rx = compile_pattern(name)
    assert rx.fullmatch(name)
    assert not rx.fullmatch(name + ".z")
    assert not rx.fullmatch("z." + name)


def test_no_match_suggests_close_names(resnet18):
    with pytest.raises(LayerResolutionError) as info:
        match_modules(resnet18, "layr?", side="student")
    msg = str(info.value)
    assert "pattern 'layr?' matched no module of the student" in msg
    assert "close names: layer1" in msg and "athooks layers" in msg


def test_no_match_without_close_names_lists_top_level(resnet18):
    with pytest.raises(LayerResolutionError, match="top-level modules: conv1, bn1, relu"):
        match_modules(resnet18, "zzzzzz")


def test_bad_regex_and_empty_pattern(resnet18):
    with pytest.raises(ConfigurationError, match="invalid regular expression"):
        match_modules(resnet18, "re:layer(")
    with pytest.raises(ConfigurationError, match="empty layer pattern"):
        match_modules(resnet18, "")


def test_wrappers_are_transparent(resnet18):
    dp = nn.DataParallel(resnet18)
    inner, prefixes = unwrap(dp)
    assert inner is resnet18 and prefixes == ("module.",)
    assert names(dp, "layer?") == ["layer1", "layer2", "layer3", "layer4"]
    assert names(dp, "module.layer2") == ["layer2"]  # the prefixed name is accepted too


def test_compiled_model_names_are_unprefixed():
    net = TinyCNN()
    compiled = torch.compile(net, backend="eager")
    assert unwrap(compiled)[0] is net
    assert names(compiled, "bn?") == ["bn1", "bn2", "bn3"]
    assert names(compiled, "_orig_mod.bn1") == ["bn1"]


def test_forms_of_the_layers_argument():
    t, s = torchvision.models.resnet34(), torchvision.models.resnet18()

    def pairs(layers):
        return [(p.teacher_name, p.student_name) for p in resolve_pairs(t, s, layers)]

    assert pairs("layer?") == [(f"layer{i}",) * 2 for i in range(1, 5)]
    assert pairs([("layer2", "layer2"), ("layer3", "layer3")]) == [("layer2",) * 2, ("layer3",) * 2]
    assert pairs({"layer3": "layer3", "layer4.2": "layer4.1"}) == [
        ("layer3", "layer3"),
        ("layer4.2", "layer4.1"),
    ]
    assert pairs(["layer1", Layer("layer2")]) == [("layer1",) * 2, ("layer2",) * 2]
    assert pairs([("layer4.[01]", "layer4.*")]) == [
        ("layer4.0", "layer4.0"),
        ("layer4.1", "layer4.1"),
    ]


def test_unequal_counts_list_both_sides():
    t, s = torchvision.models.resnet34(), torchvision.models.resnet18()
    with pytest.raises(LayerResolutionError) as info:
        resolve_pairs(t, s, "layer3.*")
    msg = str(info.value)
    assert "matched 6 modules" in msg and "matched 2" in msg
    assert "teacher: layer3.0, layer3.1, layer3.2, layer3.3, layer3.4, layer3.5" in msg
    assert "student: layer3.0, layer3.1" in msg


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ([], "layers is empty"),
        (42, "layers must be"),
        ([("a", "b", "c")], "tuple of 3 items"),
        ([3], r"layers\[0\]: expected a layer name"),
    ],
)
def test_malformed_layers_argument(layers, match):
    with pytest.raises(ConfigurationError, match=match):
        resolve_pairs(TinyCNN(), TinyCNN(), layers)


def test_layer_pattern_must_be_a_string():
    with pytest.raises(ConfigurationError, match="Layer pattern must be a string"):
        Layer(3)  # type: ignore[arg-type]


def test_list_layers_is_public_and_unwraps():
    rows = athooks.list_layers(nn.DataParallel(TinyCNN()))
    assert rows[:3] == [("conv1", "Conv2d"), ("bn1", "BatchNorm2d"), ("relu1", "ReLU")]
