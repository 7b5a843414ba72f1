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


# ------------------------------------------------------------- issue 14, group A


def pair_names(t, s, layers):
    return [(p.teacher_name, p.student_name) for p in resolve_pairs(t, s, layers)]


@pytest.mark.parametrize(
    "layers",
    [
        ("relu3", "relu2"),
        (Layer("relu3"), "relu2"),
        (Layer("relu1", select=0), Layer("relu1")),  # same pattern, different select
    ],
)
def test_a_top_level_pair_of_different_specs_is_ambiguous(layers):
    with pytest.raises(ConfigurationError) as info:
        resolve_pairs(TinyCNN(16), TinyCNN(8), layers)
    msg = str(info.value)
    assert "ambiguous" in msg
    # both readings, each with how to write it
    assert "two layers, each used on both models" in msg and "layers=[" in msg
    assert "one (teacher, student) pair" in msg and "layers=[(" in msg


def test_a_top_level_pair_of_modules_is_ambiguous_and_names_them_shortly():
    t, s = TinyCNN(16), TinyCNN(8)
    with pytest.raises(ConfigurationError) as info:
        resolve_pairs(t, s, (t.relu3, s.relu2))
    msg = str(info.value)
    assert "ambiguous" in msg
    assert "layers=[teacher.relu3, student.relu2]" in msg
    assert "layers=[(teacher.relu3, student.relu2)]" in msg
    assert "ReLU(inplace" not in msg  # no module reprs


@pytest.mark.parametrize("layers", [("relu3", "relu3"), ("relu3", Layer("relu3"))])
def test_a_top_level_pair_of_equal_specs_is_one_pair(layers):
    assert pair_names(TinyCNN(16), TinyCNN(8), layers) == [("relu3", "relu3")]


def test_a_top_level_pair_of_the_same_module_object_is_one_pair():
    s = TinyCNN(8)
    assert pair_names(TinyCNN(16), s, (s.relu3, s.relu3)) == [("relu3", "relu3")]


def test_lists_and_tuples_of_other_lengths_are_unchanged():
    t, s = TinyCNN(16), TinyCNN(8)
    assert pair_names(t, s, ["relu3", "relu2"]) == [("relu3", "relu3"), ("relu2", "relu2")]
    assert pair_names(t, s, [("relu3", "relu2")]) == [("relu3", "relu2")]
    assert pair_names(t, s, ("relu1", "relu2", "relu3")) == [(f"relu{i}",) * 2 for i in (1, 2, 3)]
    assert pair_names(t, s, ("relu1",)) == [("relu1", "relu1")]
    # a tuple of two pairs (or of a name and a pair) is a sequence of entries
    assert pair_names(t, s, (("relu1", "relu2"), ("relu2", "relu3"))) == [
        ("relu1", "relu2"),
        ("relu2", "relu3"),
    ]
    assert pair_names(t, s, ("relu1", ("relu2", "relu3"))) == [
        ("relu1", "relu1"),
        ("relu2", "relu3"),
    ]


def test_overlapping_patterns_that_give_a_pair_twice_raise(resnet18):
    with pytest.raises(LayerResolutionError) as info:
        resolve_pairs(resnet18, torchvision.models.resnet18(), ["layer?", "layer4"])
    msg = str(info.value)
    assert "(teacher 'layer4', student 'layer4')" in msg
    assert "layers[0] ('layer?')" in msg and "layers[1] ('layer4')" in msg
    assert "counted twice" in msg


def test_a_pair_given_twice_by_a_pattern_and_a_pair_or_a_dict_raises():
    t, s = TinyCNN(16), TinyCNN(8)
    with pytest.raises(LayerResolutionError, match=r"\(teacher 'relu2', student 'relu2'\)"):
        resolve_pairs(t, s, [("relu?", "relu?"), ("relu2", s.relu2)])
    with pytest.raises(
        LayerResolutionError, match="by the entry 'relu\\?': 'relu\\?' and by the entry 'relu3'"
    ):
        resolve_pairs(t, s, {"relu?": "relu?", "relu3": "relu3"})
    # the same pair reached through a module object and through its name
    with pytest.raises(LayerResolutionError, match="counted twice"):
        resolve_pairs(t, s, [s.relu1, "relu1"])


def test_the_same_modules_read_differently_are_not_duplicates():
    t, s = TinyCNN(16), TinyCNN(8)

    def double(x):
        return 2 * x

    pairs = resolve_pairs(t, s, ["relu1", Layer("relu1", transform=double)])
    assert [(p.teacher_name, p.student_name) for p in pairs] == [("relu1", "relu1")] * 2
    assert pairs[1].student_layer.transform is double
    # one teacher layer for two student layers is fine too
    assert pair_names(t, s, [("relu3", "relu2"), ("relu3", "relu3")]) == [
        ("relu3", "relu2"),
        ("relu3", "relu3"),
    ]


def test_module_objects_are_found_by_identity():
    t = torchvision.models.resnet34()
    s = torchvision.models.resnet18()
    assert pair_names(t, s, s.layer3) == [("layer3", "layer3")]
    assert pair_names(t, s, [s.layer3]) == [("layer3", "layer3")]
    assert pair_names(t, s, [(t.layer3, s.layer2)]) == [("layer3", "layer2")]
    assert pair_names(t, s, {t.layer2: s.layer2}) == [("layer2", "layer2")]
    assert pair_names(t, s, {t.layer4: "layer4.1"}) == [("layer4", "layer4.1")]
    # a bare module of the teacher only: its name is used on the student too
    assert pair_names(t, s, [t.layer4[1]]) == [("layer4.1", "layer4.1")]
    pairs = resolve_pairs(t, s, [(t.layer3[5], s.layer3[1])])
    assert pairs[0].teacher_module is t.layer3[5] and pairs[0].student_module is s.layer3[1]


def test_module_objects_mixed_with_names():
    t = torchvision.models.resnet34()
    s = torchvision.models.resnet18()
    pairs = resolve_pairs(t, s, ["layer1", (t.layer3[5], "layer3.1"), s.layer4])
    assert [(p.teacher_name, p.student_name) for p in pairs] == [
        ("layer1", "layer1"),
        ("layer3.5", "layer3.1"),
        ("layer4", "layer4"),
    ]
    assert pairs[1].teacher_module is t.layer3[5] and pairs[1].student_module is s.layer3[1]
    assert pairs[2].teacher_module is t.layer4 and pairs[2].student_module is s.layer4
    # the resolved Layer carries the module's name, as a pattern-free Layer
    assert pairs[2].student_layer == Layer("layer4")


def test_module_objects_through_wrappers():
    t, s = TinyCNN(16), TinyCNN(8)
    assert pair_names(nn.DataParallel(t), nn.DataParallel(s), [s.relu2]) == [("relu2", "relu2")]


def test_a_module_of_neither_model_is_refused_shortly():
    t, s = TinyCNN(16), TinyCNN(8)
    big = torchvision.models.resnet18()
    with pytest.raises(LayerResolutionError) as info:
        resolve_pairs(t, s, [big])
    msg = str(info.value)
    assert "ResNet" in msg and "is a submodule of neither the teacher nor the student" in msg
    assert len(msg) < 400
    with pytest.raises(LayerResolutionError, match="is not a submodule of the teacher") as info:
        resolve_pairs(t, s, [(nn.Conv2d(3, 3, 1), "relu1")])
    assert "Conv2d" in str(info.value)


def test_a_pair_of_modules_given_the_wrong_way_round_says_so():
    t, s = TinyCNN(16), TinyCNN(8)
    with pytest.raises(LayerResolutionError) as info:
        resolve_pairs(t, s, [(s.relu1, t.relu1)])
    msg = str(info.value)
    assert msg.startswith("the teacher layer of layers[0] (student.relu1, teacher.relu1)")
    assert "not a submodule of the teacher; it is a submodule of the student ('relu1')" in msg
    assert "(teacher, student): swap the two" in msg


def test_a_whole_model_is_not_a_layer():
    t, s = TinyCNN(16), TinyCNN(8)
    with pytest.raises(LayerResolutionError, match="is the student itself"):
        resolve_pairs(t, s, s)
    with pytest.raises(LayerResolutionError, match="is the teacher itself"):
        resolve_pairs(t, s, [(t, "relu1")])


def test_a_module_named_with_glob_characters_is_found_by_its_name():
    def net():
        m = nn.Sequential()
        m.add_module("stage[0]", nn.Conv2d(3, 4, 3))
        m.add_module("stage0", nn.Conv2d(4, 4, 3))
        m.add_module("stage*", nn.ReLU())
        return m

    model = net()
    assert names(model, "stage[0]") == ["stage[0]"]  # not stage0, which the set would match
    assert names(model, "stage*") == ["stage*"]
    assert names(nn.DataParallel(model), "module.stage[0]") == ["stage[0]"]
    assert names(model, "stage?") == ["stage0", "stage*"]  # still a pattern when no name is equal
    # the automatic pairing builds Layer(name) from real names
    t, s = net(), net()
    pairs = resolve_pairs(t, s, [(Layer("stage[0]"), Layer("stage[0]"))])
    assert [(p.teacher_module, p.student_module) for p in pairs] == [(t[0], s[0])]
    assert pair_names(t, s, "stage[0]") == [("stage[0]", "stage[0]")]
