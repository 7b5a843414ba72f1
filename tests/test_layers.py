"""Layer names, patterns, wrappers and pairing."""

from __future__ import annotations

from collections import OrderedDict

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


# ------------------------------------------------------------------ several tensors of one output


class Levels(nn.Module):
    """An FPN-like neck: four levels at strides 1, 2, 4, 8 of its input, as an OrderedDict."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(3 if i == 0 else width, width, 3, 1 if i == 0 else 2, 1) for i in range(4)
        )

    def forward(self, x):
        out = OrderedDict()
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            out[f"p{i + 2}"] = x
        return out


class Detector(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.neck = Levels(width)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        levels = self.neck(x)
        return self.head(sum(v.mean((2, 3)) for v in levels.values()))


def test_select_of_several_keys_is_a_tuple_and_expands_in_order():
    layer = Layer("neck", select=["p2", "p3"])
    assert layer.select == ("p2", "p3") and hash(layer) == hash(Layer("neck", select=("p2", "p3")))
    assert layer.multiple and Layer("neck", select="*").multiple and not Layer("neck").multiple
    assert [x.select for x in layer.expand()] == ["p2", "p3"]
    assert Layer("neck", select=0).expand() == [Layer("neck", select=0)]
    assert [x.select for x in Layer("neck", select="*").expand(["a", 1])] == ["a", 1]


@pytest.mark.parametrize(
    "select,match",
    [
        ((), "non-empty tuple"),
        (("p2", True), "non-empty tuple"),
        (("p2", "*"), "non-empty tuple"),
        (("p2", 1.5), "non-empty tuple"),
        (("p2", "p2"), "names a key twice"),
    ],
)
def test_bad_key_lists_are_refused(select, match):
    with pytest.raises(ConfigurationError, match=match):
        Layer("neck", select=select)


def test_one_layer_with_several_keys_gives_one_pair_per_key_named_with_it():
    teacher, student = Detector(8), Detector(4)
    pairs = resolve_pairs(teacher, student, Layer("neck", select=("p2", "p3", "p5")))
    assert [(p.teacher_label, p.student_label) for p in pairs] == [
        ("neck['p2']", "neck['p2']"),
        ("neck['p3']", "neck['p3']"),
        ("neck['p5']", "neck['p5']"),
    ]
    assert {p.teacher_name for p in pairs} == {"neck"}  # module names stay module names
    # explicit pairs with different keys on the two sides, paired in order
    pairs = resolve_pairs(
        teacher, student, [(Layer("neck", select=("p3", "p4")), Layer("neck", select=[2, 3]))]
    )
    assert [(p.teacher_label, p.student_label) for p in pairs] == [
        ("neck['p3']", "neck[2]"),
        ("neck['p4']", "neck[3]"),
    ]


@pytest.mark.parametrize(
    "layers,match",
    [
        ([(Layer("neck", select=("p2", "p3")), Layer("neck", select="p2"))], "2 tensors.*1 tensor"),
        ([(Layer("neck", select="*"), Layer("neck", select=("p2",)))], r"every tensor.*1 tensor"),
        ([Layer("neck", select=("p2", "p3")), Layer("neck", select="p3")], "given twice"),
    ],
)
def test_selections_that_do_not_pair_up_are_refused(layers, match):
    with pytest.raises(LayerResolutionError, match=match):
        resolve_pairs(Detector(8), Detector(4), layers)


def _levels_by_hand(model, x):
    with torch.no_grad():
        return model.neck(x)


def _at_by_hand(t_maps, s_maps):
    """1e3 * mean((q_S - q_T)^2) with q = normalised sum_c A_c^2, in float64."""
    total = 0.0
    for t, s in zip(t_maps, s_maps, strict=True):
        q_t = t.double().pow(2).sum(1).flatten(1)
        q_s = s.double().pow(2).sum(1).flatten(1)
        q_t = q_t / q_t.norm(dim=1, keepdim=True)
        q_s = q_s / q_s.norm(dim=1, keepdim=True)
        total = total + 1e3 * (q_s - q_t).pow(2).mean()
    return total


@pytest.mark.parametrize("select", [("p2", "p3", "p4", "p5"), "*"])
def test_distiller_on_every_level_of_an_ordered_dict_output(select):
    torch.manual_seed(0)
    teacher, student = Detector(8), Detector(4)
    x = torch.randn(2, 3, 32, 32)
    t_levels, s_levels = _levels_by_hand(teacher, x), _levels_by_hand(student, x)
    with athooks.Distiller(teacher, student, layers=Layer("neck", select=select)) as d:
        # one forward hook on the neck however many levels are read (plus none elsewhere)
        student(x)
        assert len(student.neck._forward_hooks) == 1 and len(teacher.neck._forward_hooks) == 1
        loss = d.loss()
    names = ["neck['p2']", "neck['p3']", "neck['p4']", "neck['p5']"]
    assert d.pairs == list(zip(names, names, strict=True))
    keys = ["p2", "p3", "p4", "p5"]
    want = _at_by_hand([t_levels[k] for k in keys], [s_levels[k] for k in keys])
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert all(c.weight.grad.abs().sum() > 0 for c in student.neck.convs)
    state = d.state_dict()
    assert sorted(state) == sorted([*(f"taps.{n}.copy" for n in names), "schedule.step"])
    fresh = athooks.Distiller(teacher, student, layers=Layer("neck", select=select))
    fresh.load_state_dict(state)
    with fresh:
        student(x)
        assert fresh.state_dict().keys() == state.keys()
        assert fresh.loss().item() == pytest.approx(want.item(), rel=1e-5)


def test_torchvision_fpn_backbones_one_pair_per_level():
    """resnet_fpn_backbone's OrderedDict ('0'..'3', 'pool'): one pair per level, the values of
    a hand computation from the backbones' own outputs."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    teacher = resnet_fpn_backbone(backbone_name="resnet34", weights=None, trainable_layers=5)
    student = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t_out, s_out = teacher.eval()(x), student(x)
    levels = ["0", "1", "2", "3"]
    body = Layer("body", select=tuple(levels))  # the backbone's stages, C2..C5
    fpn = Layer("fpn", select=tuple(levels))  # the FPN levels P2..P5
    with athooks.Distiller(teacher, student, layers=[body, fpn]) as d:
        student(x)
        loss = d.loss()
    assert d.pairs == [(f"{m}['{k}']", f"{m}['{k}']") for m in ("body", "fpn") for k in levels]
    t_body = teacher.body(x)
    s_body = student.body(x)
    want = _at_by_hand(
        [t_body[k] for k in levels] + [t_out[k] for k in levels],
        [s_body[k] for k in levels] + [s_out[k] for k in levels],
    )
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    loss.backward()
    assert student.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    # select="*" takes every level, 'pool' too (1x1 here: warned, its term is constant)
    with (
        pytest.warns(UserWarning, match="single cell"),
        athooks.Distiller(teacher, student, layers=Layer("fpn", select="*")) as d,
    ):
        student(x)
        d.loss()
    assert [t for t, _ in d.pairs] == [f"fpn['{k}']" for k in (*levels, "pool")]
    # the default freezes conv1 and layer1: body['0'] has no gradient, which is warned (the
    # body's later stages train, so it is not an error)
    frozen = resnet_fpn_backbone(backbone_name="resnet18", weights=None)
    with (
        pytest.warns(UserWarning, match=r"body\['0'\]\" carries no gradient"),
        athooks.Distiller(teacher, frozen, layers=body) as d,
    ):
        frozen(x)
        d.loss()
