"""athooks.tensors: the one rule for finding tensors in inputs and outputs."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from athooks.errors import CaptureError
from athooks.tensors import all_tensors, first_tensor, non_tensor_input, select_tensor, slice_batch


@dataclass
class Output:
    logits: torch.Tensor
    features: list


def test_first_tensor_goes_depth_first_through_every_container():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert first_tensor(a) is a
    assert first_tensor((None, [b, a])) is b
    assert first_tensor(OrderedDict(x="s", y=c)) is c
    assert first_tensor(Output(logits=c, features=[a])) is c
    assert first_tensor(["x", 3, None]) is None
    deep: object = a
    for _ in range(6):
        deep = [deep]
    assert first_tensor(deep) is None  # more than five levels down


def test_all_tensors_in_order():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert all_tensors(((a, 1), {"k": [b]}, Output(c, []))) == [a, b, c]


def test_select_tensor_by_index_key_attribute_and_callable():
    a, b = torch.zeros(2), torch.ones(3)
    assert select_tensor((a, b), 1, "x") is b
    assert select_tensor({"out": b}, "out", "x") is b
    assert select_tensor(Output(b, []), "logits", "x") is b
    assert select_tensor((a, (b,)), 1, "x") is b  # a container picked: its first tensor
    assert select_tensor((a, b), lambda o: o[0], "x") is a
    with pytest.raises(CaptureError, match="select=5 failed"):
        select_tensor((a,), 5, "x")
    with pytest.raises(CaptureError, match="gave a str, not a tensor"):
        select_tensor(("s",), 0, "x")


def test_slice_batch_cuts_every_batch_tensor_and_keeps_the_rest():
    x, mask, ids = torch.randn(8, 3, 4, 4), torch.ones(4, 4), torch.arange(8 * 5).view(8, 5)
    args = slice_batch(((x, mask), {"ids": ids, "scale": 2.0}), batch=8)
    (sx, smask), kw = args
    assert sx.shape == (1, 3, 4, 4) and smask is mask
    assert kw["ids"].shape == (1, 5) and kw["scale"] == 2.0
    torch.testing.assert_close(sx, x[:1])


def test_non_tensor_input_describes_plain_data_only():
    assert non_tensor_input((np.zeros(3),), {}) == "(ndarray)"
    assert non_tensor_input((), {"x": [1, 2]}) == "(x=list)"
    assert non_tensor_input((), {}) == "no arguments"
    assert non_tensor_input((Output(torch.zeros(1), []),), {}) is None
    assert non_tensor_input((object(),), {}) is None  # may hold tensors athooks cannot see
