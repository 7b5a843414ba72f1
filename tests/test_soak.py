"""Soak test: many training steps on a tiny pair, then nothing left behind.

Marked ``soak``: run it alone with ``python3 -m pytest -m soak``. The default (CI) length is 200
steps; ``ATHOOKS_SOAK_STEPS=2000 python3 -m pytest -m soak`` runs the full 2,000.

After warm-up (the first 10% of the steps, at least 20), sampled every tenth of the run:
- the number of live tensors (Python tensor objects the garbage collector knows) is constant;
- hook handles (forward, forward-pre and backward hooks of every module) are constant;
- the process RSS grows by less than a small tolerance (RSS moves in allocator-sized chunks; a
  leak of one attention map per step would add 1 KiB x steps per layer, a leaked autograd graph
  about 400 KiB per step).
After the ``with`` block, once the user drops the models, weak references to them, to the
Distiller and to every capture are dead.
"""

from __future__ import annotations

import gc
import os
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import held_captures, tiny_pair
from timm.utils import ModelEmaV3

from athooks import Distiller

STEPS = int(os.environ.get("ATHOOKS_SOAK_STEPS", "200"))
RSS_TOLERANCE = 8 * 2**20  # bytes of RSS growth allowed after warm-up


def live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): isinstance reads __class__, which some proxies override
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        return None


def hooks(*models: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for model in models
        for m in model.modules()
    )


@pytest.fixture
def one_thread():
    # tiny tensors: one thread is fastest, and spares a shared machine the spin-waiting of two
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.soak
def test_long_run_holds_no_growing_state_and_leaves_nothing_behind(one_thread):
    torch.manual_seed(0)
    teacher, student = tiny_pair()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    warmup = max(20, STEPS // 10)
    every = max(1, STEPS // 10)
    samples: list[tuple[int, int, int | None, int]] = []

    d = Distiller(teacher, student, layers="relu?")
    with d:
        ema = ModelEmaV3(student, decay=0.99)  # a deep copy inside the block (copies hooks)
        base_hooks = hooks(teacher, student, ema.module)
        for step in range(1, STEPS + 1):
            x = torch.randn(8, 3, 16, 16, generator=gen)
            y = torch.randint(0, 5, (8,), generator=gen)
            loss = F.cross_entropy(student(x), y) + d.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(student, step=step)
            del x, y, loss
            if (step >= warmup and (step - warmup) % every == 0) or step == STEPS:
                samples.append((step, live_tensors(), rss(), hooks(teacher, student, ema.module)))
        last_terms = d.terms
    assert torch.isfinite(last_terms["at"])

    steps = [s[0] for s in samples]
    counts = [s[1] for s in samples]
    assert counts == [counts[0]] * len(counts), f"live tensors at steps {steps}: {counts}"
    assert all(s[3] == base_hooks for s in samples), "hook handles changed during the run"
    rss_values = [s[2] for s in samples if s[2] is not None]
    if rss_values:
        growth = max(rss_values) - rss_values[0]
        mib = [round(v / 2**20, 1) for v in rss_values]
        assert growth < RSS_TOLERANCE, f"RSS (MiB) at steps {steps}: {mib}"
    print(
        f"\nsoak: {STEPS} steps; live tensors {counts[0]} (constant); RSS (MiB) at steps "
        f"{steps}: {[round(v / 2**20, 2) for v in rss_values]}",
        file=sys.stderr,
    )

    # after the block: no hooks on the models; the EMA copy's hooks are inert leftovers of the
    # deep copy (they hold the Distiller weakly)
    assert hooks(teacher, student) == 0
    captures = [weakref.ref(v) for cap in held_captures(d) for v in cap.values.values()]
    assert not captures, "captures survived the with block"
    refs = {
        "teacher": weakref.ref(teacher),
        "student": weakref.ref(student),
        "distiller": weakref.ref(d),
        "ema": weakref.ref(ema.module),
    }
    del teacher, student, opt, d, ema, last_terms
    gc.collect()
    alive = [name for name, ref in refs.items() if ref() is not None]
    assert not alive, f"still alive after the user dropped them: {alive}"
