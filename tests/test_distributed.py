"""torch.distributed: two CPU processes (gloo) running the Distiller with DDP and FSDP2.

Each rank trains on its own shard of one batch. Each rank's ``d.loss()`` must equal a
single-process computation on that shard, and after ``backward()`` the student's gradients must be
the same on both ranks and equal to the mean of the per-shard gradients of the single-process runs
(what data-parallel training means).
"""

from __future__ import annotations

import faulthandler
import os
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F  # noqa: N812
from conftest import ref_at_loss_code, tiny_pair
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817

from athooks import Distiller
from athooks.plugin import Connectors, Features, Loss

WORLD = 2
X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
Y = torch.arange(8) % 5
LAYERS = "relu?"  # written as for the bare model: no "module." prefix

# how each variant wraps the models, and which object the Distiller is given
VARIANTS = [
    "ddp_student",  # DDP(student), bare teacher, Distiller given the wrapper
    "ddp_both",  # DDP(student), DDP(teacher), Distiller given both wrappers
    "ddp_bare_handle",  # DDP(student), Distiller given the bare student, the wrapper called
    "fsdp2_both",  # fully_shard(student), fully_shard(teacher)
]


def shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = X.shape[0] // WORLD
    return X[rank * n : (rank + 1) * n], Y[rank * n : (rank + 1) * n]


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a parameter or gradient (FSDP2 shards them as DTensors)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_variant(variant: str, rank: int) -> dict:
    teacher, student = tiny_pair(inplace=False)
    bare_student = student
    if variant == "fsdp2_both":
        from torch.distributed.fsdp import fully_shard

        fully_shard(teacher)
        fully_shard(student)
        given_t, given_s, call = teacher, student, student
    else:
        wrapped = DDP(student)
        if variant == "ddp_both":
            teacher = DDP(teacher)
        given_t = teacher
        given_s = student if variant == "ddp_bare_handle" else wrapped
        call = wrapped
    x, y = shard(rank)
    with Distiller(given_t, given_s, layers=LAYERS) as d:
        out = call(x)
        at = d.loss()
        (F.cross_entropy(out, y) + at).backward()
        pairs = d.pairs
    grads = {n: full(p.grad).clone() for n, p in bare_student.named_parameters()}
    return {"loss": at.item(), "grads": grads, "pairs": pairs}


class Hint(Loss):
    """FitNets' hint through one connector per pair (1x1 conv + BN built on the first step)."""

    name = "hint"

    def __init__(self) -> None:
        super().__init__()
        self.features = Features()
        self.connectors = Connectors()

    def captures(self):
        return (self.features,)

    def forward(self, step):
        pairs = step.features(self.features)
        return self.sum_pairs(
            [(self.connectors[i](s, t) - t).pow(2).mean() for i, (t, s) in enumerate(pairs)]
        )


CONNECTOR_VARIANTS = ["ddp_connectors", "fsdp2_connectors"]


def run_connectors(variant: str, rank: int) -> dict:
    """A loss with connectors, whose random initial values differ per rank before the build."""
    teacher, student = tiny_pair(inplace=False)
    torch.manual_seed(100 + rank)  # each rank would initialise the connectors differently
    if variant == "fsdp2_connectors":
        from torch.distributed.fsdp import fully_shard

        fully_shard(teacher)
        fully_shard(student)
        call = given = student
    else:
        call = DDP(student)
        given = call
    d = Distiller(teacher, given, layers=["relu2", "relu3"], losses=[Hint(), "at"])
    params = list(d.parameters())  # placeholders, before the first step
    x, y = shard(rank)
    with d:
        out = call(x)
        loss = d.loss()
        initial = {k: v.clone() for k, v in d.state_dict().items() if k.startswith("losses.")}
        (F.cross_entropy(out, y) + loss).backward()
    names = [n for n, _ in d.named_parameters()]
    return {
        "initial": initial,
        "grads": {n: p.grad.clone() for n, p in zip(names, params, strict=True)},
        "loss": loss.item(),
    }


def single_connectors(rank: int, initial: dict) -> dict:
    teacher, student = tiny_pair(inplace=False)
    d = Distiller(teacher, student, layers=["relu2", "relu3"], losses=[Hint(), "at"])
    d.load_state_dict(initial, strict=False)  # rank 0's connectors, built from the state
    d.parameters()
    x, y = shard(rank)
    with d:
        out = student(x)
        loss = d.loss()
        (F.cross_entropy(out, y) + loss).backward()
    return {"grads": {n: p.grad.clone() for n, p in d.named_parameters()}, "loss": loss.item()}


def worker(rank: int, store: str, out: str) -> None:
    # What the process prints, C++ included (gloo's "terminate called ..."), goes to a log that
    # the fixture shows when a rank dies: a crash in a child is otherwise only "SIGABRT".
    log = open(f"{out}.{rank}.log", "w")  # noqa: SIM115 - open for the process's lifetime
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for variant in VARIANTS:
            try:
                results[variant] = run_variant(variant, rank)
            except Exception:
                results[variant] = traceback.format_exc()
        for variant in CONNECTOR_VARIANTS:
            try:
                results[variant] = run_connectors(variant, rank)
            except Exception:
                results[variant] = traceback.format_exc()
        torch.save(results, f"{out}.{rank}")
        # No rank tears gloo down while the other still talks to it: an early exit resets the
        # peer's connection, which gloo's I/O thread answers with abort().
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_ranks(tmp: Path) -> list[dict]:
    """Run the workers; retry once if a rank dies before saving its results (gloo set-up or
    teardown on a loaded machine), and fail with the ranks' own output if it happens again."""
    logs: list[str] = []
    for attempt in range(2):
        base = tmp / f"attempt{attempt}"
        base.mkdir()
        try:
            mp.spawn(worker, args=(str(base / "store"), str(base / "result")), nprocs=WORLD)
        except mp.ProcessExitedException as err:
            saved = all((base / f"result.{r}").exists() for r in range(WORLD))
            output = "\n".join(
                f"--- rank {r} ---\n{(base / f'result.{r}.log').read_text()}"
                for r in range(WORLD)
                if (base / f"result.{r}.log").exists()
            )
            if saved:  # the values were computed; only the teardown died: say so, check them
                warnings.warn(
                    f"a rank died after saving its results: {err}\n{output}", stacklevel=2
                )
                return load_results(base)
            logs.append(f"attempt {attempt}: {err}\n{output}")
            continue
        return load_results(base)
    pytest.fail("the distributed workers died twice:\n" + "\n".join(logs))


def load_results(base: Path) -> list[dict]:
    return [torch.load(base / f"result.{r}", weights_only=True) for r in range(WORLD)]


def single_process(rank: int) -> dict:
    teacher, student = tiny_pair(inplace=False)
    x, y = shard(rank)
    with Distiller(teacher, student, layers=LAYERS) as d:
        out = student(x)
        at = d.loss()
        (F.cross_entropy(out, y) + at).backward()
    with torch.no_grad():  # the paper's formula on hand-computed features
        ref = ref_at_loss_code(
            list(zip(teacher.eval().features(x), student.features(x), strict=True))
        )
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    return {"loss": at.item(), "ref": ref.item(), "grads": grads}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return spawn_ranks(tmp_path_factory.mktemp("dist"))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_rank_matches_a_single_process_run_on_its_shard(ranks, variant):
    singles = [single_process(r) for r in range(WORLD)]
    for rank in range(WORLD):
        got = ranks[rank][variant]
        assert isinstance(got, dict), f"rank {rank} failed:\n{got}"
        assert got["pairs"] == [("relu1", "relu1"), ("relu2", "relu2"), ("relu3", "relu3")]
        assert got["loss"] == pytest.approx(singles[rank]["loss"], rel=1e-5)
        assert got["loss"] == pytest.approx(singles[rank]["ref"], rel=1e-4)
    # the shards differ, so the two ranks' losses differ: each rank saw only its own
    assert ranks[0][variant]["loss"] != pytest.approx(ranks[1][variant]["loss"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_are_synchronised_across_ranks(ranks, variant):
    singles = [single_process(r) for r in range(WORLD)]
    g0, g1 = ranks[0][variant]["grads"], ranks[1][variant]["grads"]
    assert g0.keys() == singles[0]["grads"].keys()
    for name in g0:
        torch.testing.assert_close(
            g0[name], g1[name], msg=lambda m, n=name: f"{n} differs across ranks: {m}"
        )
        mean = (singles[0]["grads"][name] + singles[1]["grads"][name]) / WORLD
        # atol: conv biases before a BatchNorm have a zero gradient, up to rounding (~1e-6)
        torch.testing.assert_close(
            g0[name], mean, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("variant", CONNECTOR_VARIANTS)
def test_connectors_are_replicated_and_their_gradients_averaged(ranks, variant):
    got = [ranks[r][variant] for r in range(WORLD)]
    for rank, result in enumerate(got):
        assert isinstance(result, dict), f"rank {rank} failed:\n{result}"
    # built identical on both ranks (rank 0's values), although each rank seeded differently
    assert got[0]["initial"].keys() == got[1]["initial"].keys() and got[0]["initial"]
    for key, value in got[0]["initial"].items():
        if "running" in key or "num_batches" in key:
            continue  # BatchNorm statistics are each rank's own batch's, as in DDP's forward
        torch.testing.assert_close(value, got[1]["initial"][key], msg=key)
    singles = [single_connectors(r, got[0]["initial"]) for r in range(WORLD)]
    for rank in range(WORLD):
        assert got[rank]["loss"] == pytest.approx(singles[rank]["loss"], rel=1e-5)
    for name, grad in got[0]["grads"].items():
        torch.testing.assert_close(grad, got[1]["grads"][name], msg=name)
        mean = (singles[0]["grads"][name] + singles[1]["grads"][name]) / WORLD
        torch.testing.assert_close(grad, mean, rtol=1e-4, atol=1e-6, msg=name)
