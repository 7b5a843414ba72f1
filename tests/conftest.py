"""Shared helpers: small models with random weights, and a reference implementation of AT.

The reference functions below are written from the paper and the authors' code as described in
../shared/reference/attention-transfer.md, not from athooks' code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

torch.set_num_threads(2)


def ref_attention(a: torch.Tensor, mapping: str = "sum_p", p: float = 2.0) -> torch.Tensor:
    """Q of the paper, flattened and L2-normalised per sample (authors' `at`, generalised)."""
    a = a.double()
    if mapping == "sum":
        q = a.abs().mean(1)  # the authors' code averages over channels
    elif mapping == "sum_p":
        q = a.abs().pow(p).mean(1)
    elif mapping == "max_p":
        q = a.abs().pow(p).max(1).values
    else:  # pragma: no cover
        raise ValueError(mapping)
    return F.normalize(q.view(q.size(0), -1))


def ref_at_loss_code(pairs, beta=1e3, mapping="sum_p", p=2.0) -> torch.Tensor:
    """beta * sum over pairs of mean((at(s) - at(t))^2): the authors' reference code."""
    return beta * sum(
        (ref_attention(s, mapping, p) - ref_attention(t, mapping, p)).pow(2).mean()
        for t, s in pairs
    )


def ref_at_loss_paper(pairs, beta=1e3, mapping="sum_p", p=2.0) -> torch.Tensor:
    """Eq. 2: beta/2 * sum over pairs of the batch mean of ||q_s - q_t||_2."""
    total = 0.0
    for t, s in pairs:
        d = ref_attention(s, mapping, p) - ref_attention(t, mapping, p)
        total = total + d.pow(2).sum(1).sqrt().mean()
    return beta / 2 * total


def resnet_stage_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The four stage outputs of a torchvision or timm ResNet, by running its parts by hand."""
    act = model.relu if hasattr(model, "relu") else model.act1
    h = model.maxpool(act(model.bn1(model.conv1(x))))
    outs = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        h = stage(h)
        outs.append(h)
    return outs


class TinyCNN(nn.Module):
    """conv-bn-relu(inplace) x 3 with strides 1, 2, 2, then a linear head."""

    def __init__(self, width: int = 8, classes: int = 5, inplace: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.relu3 = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(4 * width, classes)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.relu1(self.bn1(self.conv1(x)))
        b = self.relu2(self.bn2(self.conv2(a)))
        c = self.relu3(self.bn3(self.conv3(b)))
        return [a, b, c]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.features(x)[-1]
        return self.head(c.mean((2, 3)))


def tiny_pair(seed: int = 0, inplace: bool = True) -> tuple[TinyCNN, TinyCNN]:
    torch.manual_seed(seed)
    return TinyCNN(16, inplace=inplace), TinyCNN(8, inplace=inplace)


class MapSpy(__import__("athooks").Loss):
    """A loss of value 0 that records each step's (teacher, student) maps, for tests to read.

    Put it next to the loss under test: ``losses=["at", spy]``; ``spy.seen[k][j]`` is the
    ``(teacher_map, student_map)`` of pair ``j`` at step ``k`` (detached).
    """

    name = "spy"

    def __init__(self, mapping: str = "sum_p", **options) -> None:
        super().__init__()
        import athooks

        self.mapping = athooks.mapping(mapping, **options)
        self.seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def captures(self):
        return (self.mapping,)

    def forward(self, step):
        maps = step.maps(self.mapping)
        self.seen.append([(t.detach(), s.detach()) for t, s in maps])
        return maps[0][1].sum() * 0 if maps else torch.zeros(())


def held_captures(d, side: str | None = None) -> list:
    """What a Distiller holds for this thread's last step: its Captures (white-box, for the
    memory tests; the one place the tests read the step's internals)."""
    record = d._recorder._state.last
    if record is None:
        return []
    stores = {"teacher": record.teacher, "student": record.student}
    return [
        cap
        for name, store in stores.items()
        if store is not None and side in (None, name)
        for cap in store.values()
    ]


def data_parallel_replica(model: torch.nn.Module) -> torch.nn.Module:
    """A replica of ``model`` made as ``torch.nn.parallel.replicate`` makes one per GPU: every
    module copied with ``_replicate_for_data_parallel()`` (sharing hook dicts and tensors),
    children rewired to the copies. (replicate itself needs CUDA devices.)"""
    copies = {id(m): m._replicate_for_data_parallel() for m in model.modules()}
    for module in model.modules():
        replica = copies[id(module)]
        for name, child in module._modules.items():
            replica._modules[name] = copies[id(child)] if child is not None else None
        replica._parameters = module._parameters
    return copies[id(model)]


SMALL_BATCHES = [
    torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)
]


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after, so no test reuses another's compiled code."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
