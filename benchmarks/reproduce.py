"""Reproduce the rows of the paper's Tables 1-3 with athooks, over several seeds.

On the embedded cluttered digits (default, CPU-sized: a WRN-16-2 teacher trained on all 1,300
images, WRN-16-1 students on 300 labels, as in ``athooks demo``) or on CIFAR-10 with the
authors' protocol (``--dataset cifar10 --data-dir DIR``: 200 epochs, SGD momentum 0.9, lr 0.1
x0.2 at epochs 60/120/160, weight decay 5e-4, batch 128, reflect-pad 4 + crop 32 + flip,
beta 1e3, KD alpha 0.9 T 4).

Prints mean +- std of the test error per row and writes ``reproduce.csv`` and ``reproduce.md``.

``--tables zoo`` (or ``--zoo``) trains, on the embedded digits, every distillation method of the
plugin package athooks-zoo (every loss whose provider is ``athooks-zoo``) with its authors' recipe
(see :data:`RECIPES`), next to the student, AT and KD rows and the published CIFAR-100 numbers of
the CRD benchmark (WRN-40-2 -> WRN-16-2), and writes ``zoo.csv``, ``zoo-runs.csv`` (one line per
finished run, so an interrupted table can be resumed with ``--resume``) and ``zoo.md``.

Run: python3 benchmarks/reproduce.py [--seeds 3] [--tables 1 2 3] [--out DIR]
     python3 benchmarks/reproduce.py --zoo [--epochs 30] [--jobs 2] [--methods a,b] [--smoke]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import athooks
from athooks import Distiller
from athooks.demo.run import TEACHER_BATCH, TEACHER_LR, TEACHER_SEED, DemoConfig, evaluate, train
from athooks.models import create_model

#: The paper's CIFAR-10 error (%), Table 1 (median of 5 runs) by pair, and Table 2 (pair A).
PAPER: dict[str, dict[str, float]] = {
    "A": {"student": 8.77, "AT": 7.93, "F-ActT": 8.51, "KD": 7.41, "AT+KD": 7.51, "teacher": 6.31},
    "B": {"student": 8.77, "AT": 8.25, "F-ActT": 8.62, "KD": 8.39, "AT+KD": 8.01, "teacher": 6.58},
    "C": {"student": 6.31, "AT": 5.85, "F-ActT": 6.24, "KD": 6.08, "AT+KD": 5.71, "teacher": 5.23},
}
PAPER_T2 = {"student": 8.77, "F_sum": 7.99, "AT": 7.93, "F_sum^4": 8.09, "F_max^1": 8.08}
PAPER_T3 = {  # NIN-thin / NIN-wide, no BN, flip-only augmentation (not the same networks here)
    "student": 13.5,
    "min-l2": 12.5,
    "grad-AT": 12.1,
    "KD": 12.1,
    "symmetry": 11.8,
    "AT": 11.2,
}


@dataclass(frozen=True)
class Pair:
    """A teacher and a student of the paper's Table 1."""

    key: str
    teacher: str
    student: str

    @property
    def label(self) -> str:
        """``WRN-16-1 <- WRN-16-2``."""
        return f"{pretty(self.student)} <- {pretty(self.teacher)}"


def pretty(model: str) -> str:
    """``wrn16_1`` -> ``WRN-16-1``."""
    return model.upper().replace("WRN", "WRN-").replace("_", "-")


PAIRS = {
    "A": Pair("A", "wrn16_2", "wrn16_1"),
    "B": Pair("B", "wrn40_1", "wrn16_1"),
    "C": Pair("C", "wrn40_2", "wrn16_2"),
}

Setting = dict[str, float]

#: Every method of Tables 1-3: its untuned setting (the authors' values; athooks' defaults where
#: the paper gives none) and the sweep ``--tune`` runs on validation. ``{beta}`` in the AT rows'
#: grid is scaled by the data set's default beta (digits 300, CIFAR 1e3).
AT_GRID = (0.1, 1 / 3, 1.0, 10 / 3)
KD_GRID = tuple({"alpha": a, "T": t} for a in (0.5, 0.9) for t in (1.0, 2.0, 4.0, 8.0, 16.0))
GRAD_GRID = tuple({"beta": b} for b in (0.001, 0.01, 0.1, 1.0))
FACT_GRID = tuple({"beta": b} for b in (1e-5, 1e-4, 1e-3, 1e-2))
AT_MAPPINGS = {  # Table 2: the AT row is F_sum^2
    "AT": {},
    "F_sum": {"mapping": "sum"},
    "F_sum^4": {"mapping": "sum_p", "p": 4},
    "F_max^1": {"mapping": "max_p", "p": 1},
}
GRADIENT_LOSSES = {"min-l2": "input_grad_l2", "grad-AT": "grad_at", "symmetry": "symmetry"}
#: AT+KD takes the settings chosen for AT and for KD (the paper combined its two rows' values).
COMBINED = {"AT+KD": ("AT", "KD")}


def default_setting(method: str, beta: float) -> Setting:
    """The untuned setting of a method."""
    if method in AT_MAPPINGS:
        return {"beta": beta}
    if method == "KD":
        return {"alpha": 0.9, "T": 4.0}
    if method == "F-ActT":
        return {"beta": 1e-3}
    if method in GRADIENT_LOSSES:
        return {"beta": 1.0}
    if method == "AT+KD":
        return {"beta": beta, "alpha": 0.9, "T": 4.0}
    return {}


def grid(method: str, beta: float) -> tuple[Setting, ...]:
    """The settings ``--tune`` tries for a method (empty: nothing to tune)."""
    if method in AT_MAPPINGS:
        return tuple({"beta": round(beta * f, 6)} for f in AT_GRID)
    if method == "KD":
        return KD_GRID
    if method == "F-ActT":
        return FACT_GRID
    if method in GRADIENT_LOSSES:
        return GRAD_GRID
    return ()


def build(method: str, setting: Setting) -> tuple[list[Any], float]:
    """The losses of a method with a setting, and the factor of the cross-entropy.

    KD follows the authors' weighting: ``(1 - alpha) * CE + alpha * T^2 * KL`` (``kd`` with
    ``weight=alpha``); ``ce`` in the setting overrides the CE factor (the KD analysis).
    """
    losses: list[Any] = []
    ce = 1.0
    if method in AT_MAPPINGS or method == "AT+KD":
        options = AT_MAPPINGS.get(method, {})
        losses.append(athooks.loss("at", beta=setting["beta"], **options))
    if method in ("KD", "AT+KD"):
        alpha = setting["alpha"]
        losses.append(athooks.loss("kd", weight=alpha, temperature=setting["T"]))
        ce = 1.0 - alpha
    if method == "F-ActT":
        losses.append(athooks.loss("fact", beta=setting["beta"]))
    if method in GRADIENT_LOSSES:
        losses.append(athooks.loss(GRADIENT_LOSSES[method], beta=setting["beta"]))
    return losses, setting.get("ce", ce)


def at_edge(settings: Sequence[Setting], chosen: Setting) -> list[str]:
    """Which of ``chosen``'s values are the smallest or largest its sweep tried (3 or more).

    A sweep's optimum at its edge means a value beyond the sweep may be better still.

    Example:
        ```python
        grid = ({"beta": 1.0}, {"beta": 2.0}, {"beta": 3.0})
        assert at_edge(grid, {"beta": 1.0}) == ["smallest beta"]
        assert at_edge(grid, {"beta": 2.0}) == []
        ```
    """
    out = []
    for key, value in chosen.items():
        values = sorted({s[key] for s in settings if key in s})
        if len(values) >= 3 and value == values[0]:
            out.append(f"smallest {key}")
        elif len(values) >= 3 and value == values[-1]:
            out.append(f"largest {key}")
    return out


def show(setting: Setting) -> str:
    """A setting in a few characters: ``beta=300``, ``alpha=0.9 T=4``."""
    return " ".join(f"{k}={v:g}" for k, v in setting.items()) or "-"


@dataclass(frozen=True)
class Cell:
    """One row of a table: a method on a pair, with or without the unlabeled images."""

    table: str
    pair: str
    method: str
    unlabeled: bool = False

    @property
    def group(self) -> tuple[str, str, bool]:
        """What shares one setting: the pair, the method and the data."""
        return (self.pair, self.method, self.unlabeled)


TABLES: dict[str, list[tuple[str, str, bool]]] = {
    "1": [("A", m, False) for m in ("student", "AT", "F-ActT", "KD", "AT+KD")],
    "2": [("A", m, False) for m in ("student", "F_sum", "AT", "F_sum^4", "F_max^1")],
    "3": [("A", m, False) for m in ("student", "min-l2", "grad-AT", "KD", "symmetry", "AT")],
    "pairs": [
        (p, m, False) for p in ("B", "C") for m in ("student", "AT", "F-ActT", "KD", "AT+KD")
    ],
    "unlabeled": [("A", "student", False)]
    + [("A", m, u) for m in ("AT", "KD", "AT+KD") for u in (False, True)],
}
DISPLAY = {
    ("2", "student"): "none",
    ("2", "AT"): "F_sum^2 (AT)",
    ("3", "student"): "baseline",
    ("3", "AT"): "activation AT",
}
TABLE_TITLES = {
    "1": "Table 1: transfer methods, WRN-16-1 <- WRN-16-2",
    "2": "Table 2: attention mappings, WRN-16-1 <- WRN-16-2",
    "3": "Table 3: gradient-based attention (the paper: NIN networks without BN; here WRN-16)",
    "pairs": "Table 1, the other pairs",
    "unlabeled": "Distillation on unlabeled images, WRN-16-1 <- WRN-16-2",
}
#: KD analysis (``--tune``, pair A, on validation only): each a change of one thing from KD's
#: default (alpha 0.9, T 4, 0.1 CE, the epochs of the table).
KD_PROBES: list[tuple[str, str, Setting, int]] = [
    ("student, 2x epochs", "student", {}, 2),
    ("KD alpha 0.9 T 4, 2x epochs", "KD", {"alpha": 0.9, "T": 4.0}, 2),
    ("KD alpha 0.9 T 4, CE weight 1", "KD", {"alpha": 0.9, "T": 4.0, "ce": 1.0}, 1),
    ("KD alpha 0.9 T 1", "KD", {"alpha": 0.9, "T": 1.0}, 1),
    ("KD alpha 0.99 T 4", "KD", {"alpha": 0.99, "T": 4.0}, 1),
]
TUNE_SEED = 10  # the sweep's seed; the tables' seeds are 0, 1, ...


def cells(tables: list[str], pairs: list[str], unlabeled_ok: bool) -> list[Cell]:
    """The rows of the tables asked for, on the pairs asked for."""
    out = []
    for table in tables:
        for pair, method, unlabeled in TABLES[table]:
            if pair in pairs and (unlabeled_ok or table != "unlabeled"):
                out.append(Cell(table, pair, method, unlabeled))
    return out


def run_key(spec: dict[str, Any]) -> str:
    """What makes two runs the same: models, method, setting, data, epochs and seed.

    The student alone does not depend on the teacher, so pair B's student is pair A's.
    """
    teacher = spec["teacher"] if spec["method"] != "student" else "-"
    return "|".join(
        [
            teacher,
            spec["student"],
            spec["method"],
            show(spec["setting"]),
            "U" if spec["unlabeled"] else "L",
            str(spec["epochs"]),
            str(spec["seed"]),
        ]
    )


@dataclass
class Split:
    """The images of one run: labelled, unlabeled, validation and test."""

    x: Tensor
    y: Tensor
    x_unlabeled: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    chans: int


def split_data(args: argparse.Namespace, labels: int | None) -> Split:
    """Labelled images first, then unlabeled ones; the last ``--val`` training images validate.

    ``labels`` None: every training image but the validation ones has its label. The test
    images are never used to choose anything.
    """
    x, y, xt, yt, chans = load_data(args)
    n_val = args.val
    labels = len(x) - n_val if labels is None else labels
    if n_val >= len(x) or labels > len(x) - n_val:
        raise SystemExit(
            f"--val {n_val} and --labels {labels}: the {len(x)} training images cannot hold both"
        )
    cut = len(x) - n_val
    return Split(x[:labels], y[:labels], x[labels:cut], x[cut:], y[cut:], xt, yt, chans)


def load_data(args: argparse.Namespace) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """``(x_train, y_train, x_test, y_test, in_chans)``."""
    if args.dataset == "digits":
        from athooks.demo.data import cluttered_digits

        x, y, xt, yt = cluttered_digits(0)
        return x, y, xt, yt, 1
    import torchvision

    def as_tensors(train: bool) -> tuple[Tensor, Tensor]:
        ds = torchvision.datasets.CIFAR10(args.data_dir, train=train, download=args.download)
        x = torch.tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
        return x, torch.tensor(ds.targets)

    x, y = as_tensors(True)
    xt, yt = as_tensors(False)
    mean = x.mean((0, 2, 3), keepdim=True)
    std = x.std((0, 2, 3), keepdim=True)
    return (x - mean) / std, y, (xt - mean) / std, yt, 3


def weights_digest(model: torch.nn.Module) -> str:
    """A short digest of a model's weights (a resumed table must use the same teacher)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def teacher_file(config: DemoConfig, model: str, digits: bool, images: int | None) -> Path:
    """Where a pair's teacher is (the demo's shipped weights for WRN-16-2), or will be cached."""
    from athooks.demo.run import _teacher_key, cache_dir, shipped_teacher

    cfg = replace(config, teacher=model)
    shipped = shipped_teacher(cfg) if digits and images is None else None
    if shipped is not None:
        return shipped[0]
    part = f"-first{images}" if images else ""
    kind = "demo-teacher" if digits else "cifar10-teacher"
    return cache_dir() / f"{kind}-{model}-{_teacher_key(cfg)}{part}.pt"


_PAPER: dict[str, Any] = {}


def _init_paper_worker(state: dict[str, Any]) -> None:
    """Load the data of every run (in a worker process, or in this one)."""
    if state.get("threads"):
        torch.set_num_threads(state["threads"])
    _PAPER.clear()
    _PAPER.update(state)
    _PAPER["split"] = split_data(state["args"], state["labels"])
    _PAPER["teachers"] = {}


def train_paper_teacher(model: str, path: str) -> dict[str, Any]:
    """Train a pair's teacher on all the training images (the demo's recipe on digits)."""
    st = _PAPER
    config: DemoConfig = st["config"]
    args = st["args"]
    x, y, _, _, chans = load_data(args)
    if st["teacher_images"]:
        x, y = x[: st["teacher_images"]], y[: st["teacher_images"]]
    torch.manual_seed(TEACHER_SEED)
    teacher = create_model(model, num_classes=10, in_chans=chans).to(config.device)
    t_config = replace(config, seed=TEACHER_SEED)
    if args.dataset == "digits":
        t_config = replace(t_config, batch=TEACHER_BATCH, lr=TEACHER_LR)
    seconds = train(
        teacher, x, y, epochs=config.teacher_epochs, config=t_config, label=model, progress=False
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), path)
    return {"teacher": model, "seconds": seconds}


def _teacher(model: str) -> torch.nn.Module:
    st = _PAPER
    if model not in st["teachers"]:
        config: DemoConfig = st["config"]
        torch.manual_seed(TEACHER_SEED)
        t = create_model(model, num_classes=10, in_chans=st["split"].chans)
        path = st["teacher_paths"][model]
        t.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        st["teachers"][model] = t.to(config.device).eval()
    teacher: torch.nn.Module = st["teachers"][model]
    return teacher


def run_paper_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one student for one setting and seed; its validation and test errors (%).

    Returns the last epoch's validation and test error, the best validation epoch and the test
    error of the weights of that epoch, or why the run was skipped.
    """
    st = _PAPER
    config: DemoConfig = st["config"]
    split: Split = st["split"]
    device = torch.device(config.device)
    seed = spec["seed"]
    result: dict[str, Any] = {**spec, "key": run_key(spec), "setting": show(spec["setting"])}
    start = time.perf_counter()
    torch.manual_seed(100 + seed)  # one initialisation per seed, for every row
    student = create_model(spec["student"], num_classes=10, in_chans=split.chans)
    student.to(device)
    losses, ce_weight = build(spec["method"], spec["setting"])
    try:
        distiller = None
        if losses:
            teacher = _teacher(spec["teacher"])
            distiller = Distiller(teacher, student, losses=losses)
        with distiller if distiller is not None else _nothing():
            log = fit(
                student,
                split.x,
                split.y,
                epochs=spec["epochs"],
                config=replace(config, seed=seed),
                params=list(student.parameters()),
                distiller=distiller,
                ce_weight=ce_weight,
                unlabeled=split.x_unlabeled if spec["unlabeled"] else None,
                validation=(split.x_val, split.y_val),
            )
    except Exception as err:  # a method that cannot run on this pair is reported, not fatal
        result.update(skipped=f"{type(err).__name__}: {str(err).splitlines()[0]}")
        result["seconds"] = time.perf_counter() - start
        return result
    test_last = 100 * evaluate(student, split.x_test, split.y_test, config.device)
    student.load_state_dict(log["best_state"])
    test_best = 100 * evaluate(student, split.x_test, split.y_test, config.device)
    result.update(
        skipped="",
        val_last=log["val"][-1],
        val_best=min(log["val"]),
        best_epoch=log["best_epoch"],
        test_last=test_last,
        test_best=test_best,
        last_ce=f"{log['ce']:.4g}",
        last_transfer=f"{log['transfer']:.4g}",
        seconds=time.perf_counter() - start,
    )
    return result


class _nothing:  # noqa: N801
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


PAPER_FIELDS = [
    "key",
    "phase",
    "pair",
    "teacher",
    "student",
    "method",
    "setting",
    "unlabeled",
    "epochs",
    "seed",
    "val_last",
    "val_best",
    "best_epoch",
    "test_last",
    "test_best",
    "seconds",
    "skipped",
    "last_ce",
    "last_transfer",
    "teacher_digest",
    "commit",
]


@dataclass
class Plan:
    """What the tables need: the sweeps, then the chosen settings over the seeds."""

    cells: list[Cell]
    seeds: int
    tune: bool
    beta: float
    epochs: int
    probes: bool
    limit: int | None = None  # the smoke run's sweeps: their first settings only
    choices: dict[tuple[str, str, bool], Setting] = field(default_factory=dict)

    def settings(self, method: str) -> tuple[Setting, ...]:
        """The settings the sweep of a method tries."""
        return grid(method, self.beta)[: self.limit]

    def groups(self) -> list[tuple[str, str, bool]]:
        """Every (pair, method, unlabeled) that needs a setting, AT+KD's parts included."""
        seen: dict[tuple[str, str, bool], None] = {}
        for c in self.cells:
            for part in COMBINED.get(c.method, ()):
                seen[(c.pair, part, c.unlabeled)] = None
            seen[c.group] = None
        return list(seen)

    def spec(
        self, pair: str, method: str, setting: Setting, unlabeled: bool, seed: int, phase: str
    ) -> dict[str, Any]:
        """A run of a method."""
        p = PAIRS[pair]
        epochs = int(self.epochs * setting.get("epochs", 1))
        setting = {k: v for k, v in setting.items() if k != "epochs"}
        return {
            "phase": phase,
            "pair": pair,
            "teacher": p.teacher,
            "student": p.student,
            "method": method,
            "setting": setting,
            "unlabeled": unlabeled,
            "epochs": epochs,
            "seed": seed,
        }

    def tuning(self) -> list[dict[str, Any]]:
        """The sweeps' runs (one seed), the baselines' runs at that seed and the KD probes."""
        if not self.tune:
            return []
        runs = []
        for pair, method, unlabeled in self.groups():
            if method in COMBINED:
                continue
            for s in self.settings(method) or ({},):
                runs.append(self.spec(pair, method, s, unlabeled, TUNE_SEED, "tune"))
        if self.probes and any(c.pair == "A" and c.method == "KD" for c in self.cells):
            for _, method, s, factor in KD_PROBES:
                runs.append(
                    self.spec("A", method, {**s, "epochs": factor}, False, TUNE_SEED, "probe")
                )
        return runs

    def ready(self, group: tuple[str, str, bool], done: dict[str, dict[str, Any]]) -> bool:
        """Whether the group's setting is known (its sweep, and its parts', have finished)."""
        if not self.tune:
            return True
        pair, method, unlabeled = group
        parts = COMBINED.get(method, (method,))
        for part in parts:
            for s in self.settings(part):
                key = run_key(self.spec(pair, part, s, unlabeled, TUNE_SEED, "tune"))
                if key not in done:
                    return False
        return True

    def choose(self, group: tuple[str, str, bool], done: dict[str, dict[str, Any]]) -> Setting:
        """The setting of a group: the lowest last-epoch validation error of its sweep.

        Ties go to the earlier setting of the grid (the smaller weight). Without ``--tune``:
        the default setting. AT+KD: AT's and KD's chosen settings together.
        """
        if group in self.choices:
            return self.choices[group]
        pair, method, unlabeled = group
        if method in COMBINED:
            setting: Setting = {}
            for part in COMBINED[method]:
                setting.update(self.choose((pair, part, unlabeled), done))
        elif not self.tune or not self.settings(method):
            setting = default_setting(method, self.beta)
        else:
            best: tuple[float, int] | None = None
            setting = default_setting(method, self.beta)
            for i, s in enumerate(self.settings(method)):
                r = done.get(run_key(self.spec(pair, method, s, unlabeled, TUNE_SEED, "tune")))
                if r is None or r.get("skipped"):
                    continue
                score = (float(r["val_last"]), i)
                if best is None or score < best:
                    best, setting = score, dict(s)
        self.choices[group] = setting
        return setting

    def final(self, group: tuple[str, str, bool], done: dict[str, dict[str, Any]]) -> list[Any]:
        """The group's runs over the seeds, with its chosen setting."""
        pair, method, unlabeled = group
        setting = self.choose(group, done)
        return [
            self.spec(pair, method, setting, unlabeled, seed, "final") for seed in range(self.seeds)
        ]


def paper_tables(
    args: argparse.Namespace, config: DemoConfig, labels: int | None, out: Path
) -> None:
    """The paper's Tables 1-3, the other pairs and the unlabeled setting, over the seeds.

    With ``--tune``, every weight and temperature is first chosen on the validation images by
    a sweep at seed ``TUNE_SEED``; runs are written to ``paper-runs.csv`` as they finish, so an
    interrupted table resumes with ``--resume``.
    """
    import concurrent.futures
    import multiprocessing
    import os

    from tqdm import tqdm

    started = time.time()
    digits = args.dataset == "digits"
    pairs = [p for p in args.pairs.split(",")]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        raise SystemExit(f"--pairs: unknown pair(s) {unknown}; the pairs are A, B, C")
    tables = [t for t in args.tables if t != "zoo"]
    split = split_data(args, labels)
    labels = len(split.x)
    unlabeled_ok = len(split.x_unlabeled) > 0
    if "unlabeled" in tables and not unlabeled_ok:
        print("unlabeled table: skipped, every training image has a label", file=sys.stderr)
    plan = Plan(
        cells(tables, pairs, unlabeled_ok),
        args.seeds,
        args.tune,
        config.beta,
        config.epochs,
        probes=not args.smoke,
        limit=2 if args.smoke else None,
    )
    teacher_images = labels if args.smoke else None
    needed = sorted({PAIRS[c.pair].teacher for c in plan.cells})
    paths = {m: str(teacher_file(config, m, digits, teacher_images)) for m in needed}
    runs_path = out / "paper-runs.csv"
    done: dict[str, dict[str, Any]] = {}
    if (args.resume or args.report) and runs_path.exists():
        with open(runs_path) as fh:
            for r in csv.DictReader(fh):
                done[r["key"]] = r
    else:
        with open(runs_path, "w", newline="") as fh:
            csv.DictWriter(fh, PAPER_FIELDS).writeheader()

    jobs = max(1, args.jobs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    state = {
        "args": args,
        "config": config,
        "labels": labels,
        "teacher_paths": paths,
        "teacher_images": teacher_images,
        "threads": threads,
    }
    digests: dict[str, str] = {}
    version = commit()

    def digest(model: str) -> str:
        if model not in digests:
            t = create_model(model, num_classes=10, in_chans=split.chans)
            t.load_state_dict(torch.load(paths[model], map_location="cpu", weights_only=True))
            digests[model] = weights_digest(t)
        return digests[model]

    def record(result: dict[str, Any]) -> None:
        if "key" not in result:  # a teacher
            check_resumed(result["teacher"])
            bar.write(f"teacher {result['teacher']}: trained ({result['seconds']:.0f}s)")
            return
        result["teacher_digest"] = (
            digest(result["teacher"]) if result["method"] != "student" else ""
        )
        result["commit"] = version
        done[result["key"]] = {k: str(v) for k, v in result.items()}
        with open(runs_path, "a", newline="") as fh:
            csv.DictWriter(fh, PAPER_FIELDS, extrasaction="ignore").writerow(result)
        err = result["skipped"] or f"val {result['val_last']:.2f}% test {result['test_last']:.2f}%"
        bar.write(
            f"{result['phase']} {PAIRS[result['pair']].label} {result['method']}"
            f"{' +U' if result['unlabeled'] else ''} {result['setting']} seed {result['seed']}: "
            f"{err} ({result['seconds']:.0f}s)"
        )

    def check_resumed(model: str) -> None:
        """Resumed runs must come from the same teacher (a retrained one may differ)."""
        for r in done.values():
            if r.get("teacher") == model and r.get("teacher_digest") not in (
                "",
                None,
                digest(model),
            ):
                raise SystemExit(
                    f"--resume: {runs_path} has runs with another {model} teacher "
                    f"({r['teacher_digest']}, here {digest(model)}); start a new --out"
                )

    for m in needed:
        if Path(paths[m]).exists():
            check_resumed(m)
    missing_teachers = [m for m in needed if not Path(paths[m]).exists()]
    tuning = [s for s in plan.tuning() if run_key(s) not in done]
    groups = plan.groups()
    wanted = {c.group for c in plan.cells}
    total = (
        len(missing_teachers)
        + len(tuning)
        + args.seeds * len({run_key(plan.spec(g[0], g[1], {}, g[2], 0, "final")) for g in wanted})
    )
    bar = tqdm(
        total=total,
        desc="runs",
        unit="run",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=args.report,  # nothing trains
    )
    pending_groups = [g for g in groups if g in wanted]
    queued: set[str] = set()
    phases = {"tune": 1, "probe": 2, "final": 3}

    def priority(task: tuple[Callable[..., Any], Any]) -> tuple[int, int]:
        """Teachers first, then the sweeps, then the tables seed after seed."""
        fn, fn_args = task
        if fn is train_paper_teacher:
            return (0, 0)
        return (phases[fn_args[0]["phase"]], fn_args[0]["seed"])

    def ready_tasks() -> list[tuple[Callable[..., Any], Any]]:
        """What can run now: teachers, the sweeps, then the finals of settled groups."""
        tasks: list[tuple[Callable[..., Any], Any]] = []
        for m in missing_teachers:
            if m not in queued:
                queued.add(m)
                tasks.append((train_paper_teacher, (m, paths[m])))
        have = {m for m in needed if Path(paths[m]).exists()}
        later: list[dict[str, Any]] = []
        for s in tuning:
            k = run_key(s)
            if k not in queued and (s["method"] == "student" or s["teacher"] in have):
                later.append(s)
        for g in list(pending_groups):
            teacher_ok = g[1] == "student" or PAIRS[g[0]].teacher in have
            if teacher_ok and plan.ready(g, done):
                pending_groups.remove(g)
                later += plan.final(g, done)
        for s in later:
            k = run_key(s)
            if k in queued:
                continue
            queued.add(k)
            if k in done:
                if s["phase"] == "final":
                    bar.update(1)
                continue
            tasks.append((run_paper_task, (s,)))
        return tasks

    backlog: list[tuple[Callable[..., Any], Any]] = []

    def refill() -> None:
        backlog.extend(ready_tasks())
        backlog.sort(key=priority)

    if args.report:  # the tables of the runs so far, nothing trained
        pass
    elif jobs == 1:
        saved = torch.get_num_threads()
        _init_paper_worker({**state, "threads": args.threads})
        refill()
        while backlog:
            fn, fn_args = backlog.pop(0)
            record(fn(*fn_args))
            bar.update(1)
            refill()
        torch.set_num_threads(saved)
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=ctx, initializer=_init_paper_worker, initargs=(state,)
        ) as pool:
            running: set[concurrent.futures.Future[Any]] = set()
            refill()
            while backlog or running:
                while backlog and len(running) < jobs:
                    fn, fn_args = backlog.pop(0)
                    running.add(pool.submit(fn, *fn_args))
                finished, running = concurrent.futures.wait(
                    running, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in finished:
                    record(future.result())
                    bar.update(1)
                refill()
    bar.close()
    teacher_errors = {}
    for m in [m for m in needed if Path(paths[m]).exists()]:
        t = create_model(m, num_classes=10, in_chans=split.chans)
        t.load_state_dict(torch.load(paths[m], map_location="cpu", weights_only=True))
        teacher_errors[m] = 100 * evaluate(t, split.x_test, split.y_test, "cpu")
    write_paper(plan, done, teacher_errors, config, labels, args, out, started, jobs, threads)


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {std:.2f}"


def write_paper(
    plan: Plan,
    done: dict[str, dict[str, Any]],
    teacher_errors: dict[str, float],
    config: DemoConfig,
    labels: int,
    args: argparse.Namespace,
    out: Path,
    started: float,
    jobs: int,
    threads: int,
) -> None:
    """Print and save the tables (``reproduce.md``, ``reproduce.csv``) and the sweeps."""
    split_note = (
        f"{labels} labelled images, {args.val} validation images (the last training images; "
        "never the test images)"
    )
    chosen = "settings chosen on validation (--tune)" if plan.tune else "untuned settings"
    lines = [
        f"{args.dataset}{' (smoke)' if args.smoke else ''}: students on {split_note}, "
        f"{config.epochs} epochs, batch {config.batch}, lr {config.lr:g} {config.schedule}, "
        f"{args.seeds} seeds, {chosen}, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC, {machine()}, "
        f"{jobs} process(es) x {threads} thread(s), commit {commit()}, "
        f"{(time.time() - started) / 60:.1f} min",
        "",
        "Teachers (trained on all the training images): "
        + ", ".join(f"{pretty(m)} {e:.2f}% test error" for m, e in teacher_errors.items()),
    ]

    def runs(group: tuple[str, str, bool]) -> list[dict[str, Any]]:
        setting = plan.choose(group, done)
        out_ = []
        for s in plan.final(group, done):
            r = done.get(run_key(s))
            if r is not None:
                out_.append(r)
        del setting
        return out_

    csv_rows = []
    partial = False
    for table in [t for t in TABLE_TITLES if any(c.table == t for c in plan.cells)]:
        lines += [
            "",
            f"### {TABLE_TITLES[table]}",
            "",
            "| pair | row | setting | test error (%), last epoch | at the best validation "
            "epoch | seeds better than the student | seeds | paper (CIFAR-10) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in [c for c in plan.cells if c.table == table]:
            rs = runs(c.group)
            name = DISPLAY.get((table, c.method), c.method)
            name += " + unlabeled" if c.unlabeled else ""
            skipped = [r["skipped"] for r in rs if r.get("skipped")]
            good = [r for r in rs if not r.get("skipped")]
            base = {
                r["seed"]: float(r["test_last"])
                for r in runs((c.pair, "student", False))
                if not r.get("skipped")
            }
            if table == "3":
                paper = PAPER_T3.get(c.method, "")
            elif table == "2":
                paper = PAPER_T2.get(c.method, "")
            elif table == "unlabeled":
                paper = ""
            else:
                paper = PAPER[c.pair].get(c.method, "")
            if not good:
                reason = f"skipped: {skipped[0].split(';')[0]}" if skipped else "not run"
                lines.append(f"| {PAIRS[c.pair].label} | {name} | | {reason} | | | 0 | {paper} |")
                continue
            partial = partial or len(good) < plan.seeds
            last = [float(r["test_last"]) for r in good]
            best = [float(r["test_best"]) for r in good]
            wins = sum(
                1 for r in good if r["seed"] in base and float(r["test_last"]) < base[r["seed"]]
            )
            versus = "" if c.method == "student" and not c.unlabeled else f"{wins}/{len(good)}"
            setting = good[0]["setting"]
            lines.append(
                f"| {PAIRS[c.pair].label} | {name} | {setting} | {_mean_std(last)} | "
                f"{_mean_std(best)} | {versus} | {len(good)} | {paper} |"
            )
            csv_rows.append(
                [
                    table,
                    c.pair,
                    name,
                    setting,
                    f"{statistics.mean(last):.3f}",
                    f"{statistics.stdev(last) if len(last) > 1 else 0.0:.3f}",
                    f"{statistics.mean(best):.3f}",
                    versus,
                    " ".join(f"{e:.2f}" for e in last),
                    " ".join(f"{e:.2f}" for e in best),
                ]
            )
    if partial:
        lines[0] += "; PARTIAL: some rows have fewer seeds than asked (see the seeds column)"
    lines += [
        "",
        "Last epoch: the test error of the weights after the last epoch; at the best validation "
        "epoch: of the weights of the epoch with the lowest validation error. Seeds better than "
        "the student: in how many seeds the row's last-epoch test error is below the student's "
        "of the same seed (the same initialisation and batches).",
    ]
    if plan.tune:
        lines += [
            "",
            "### The sweeps (validation error (%), last epoch, seed "
            f"{TUNE_SEED}; * the chosen setting)",
            "",
        ]
        lines += ["| pair | row | settings tried |", "|---|---|---|"]
        for g in plan.groups():
            pair, method, unlabeled = g
            if method in COMBINED:
                continue
            tried = []
            chosen = plan.choose(g, done)
            for s in plan.settings(method) or ({},):
                r = done.get(run_key(plan.spec(pair, method, s, unlabeled, TUNE_SEED, "tune")))
                if r is None:
                    continue
                value = "skipped" if r["skipped"] else f"{float(r['val_last']):.2f}"
                picked = s == chosen and not r["skipped"] and len(plan.settings(method)) > 1
                mark = "*" if picked else ""
                tried.append(f"{show(s)}: {value}{mark}")
            name = method + (" + unlabeled" if unlabeled else "")
            ran = any(not t.endswith("skipped") for t in tried)
            edges = at_edge(plan.settings(method), chosen) if ran else []
            note = f" (at the {', '.join(edges)} of the sweep)" if edges else ""
            lines.append(f"| {PAIRS[pair].label} | {name} | {'; '.join(tried)}{note} |")
        probes = [p for p in KD_PROBES if plan.probes]
        if probes and any(c.pair == "A" and c.method == "KD" for c in plan.cells):
            lines += [
                "",
                f"### KD analysis (WRN-16-1 <- WRN-16-2, validation error (%), seed {TUNE_SEED})",
                "",
                "| change | validation error, last epoch | best epoch |",
                "|---|---|---|",
            ]
            for label, method, s, factor in probes:
                spec = plan.spec("A", method, {**s, "epochs": factor}, False, TUNE_SEED, "probe")
                r = done.get(run_key(spec))
                if r is None or r.get("skipped"):
                    continue
                lines.append(
                    f"| {label} | {float(r['val_last']):.2f} | {float(r['val_best']):.2f} |"
                )
    text = "\n".join(lines)
    (out / "reproduce.md").write_text(text + "\n")
    with open(out / "reproduce.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "table",
                "pair",
                "row",
                "setting",
                "mean",
                "std",
                "mean_best_val",
                "better",
                "errors",
                "errors_best_val",
            ]
        )
        writer.writerows(csv_rows)
    print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--tables",
        nargs="+",
        default=["1", "2", "3", "pairs", "unlabeled"],
        choices=["1", "2", "3", "pairs", "unlabeled", "zoo"],
        help="the paper's Tables 1-3, 'pairs' (Table 1's other pairs), 'unlabeled' (distillation "
        "on the images without labels) and/or 'zoo': every athooks-zoo method (digits only)",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="choose every weight and temperature on the validation images first (a sweep)",
    )
    parser.add_argument(
        "--pairs",
        default="A,B,C",
        help="teacher/student pairs: A WRN-16-1<-WRN-16-2, B WRN-16-1<-WRN-40-1, "
        "C WRN-16-2<-WRN-40-2 (Tables 1-3 and 'unlabeled' are on A, 'pairs' on B and C)",
    )
    parser.add_argument(
        "--val", type=int, help="validation images, the last training ones (digits 300, cifar 5000)"
    )
    parser.add_argument("--zoo", action="store_true", help="the same as --tables zoo")
    parser.add_argument(
        "--methods",
        help="zoo table: only these rows (comma-separated loss names or student, AT, KD)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, in worker processes")
    parser.add_argument(
        "--threads", type=int, help="torch threads per process (default: all cores / jobs)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in paper-runs.csv / zoo-runs.csv of the same --out",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="paper tables: write the tables of the runs in paper-runs.csv, train nothing",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: 1 epoch, 64 labels, 64 validation images, 2 seeds, 2 settings per sweep "
        "(the zoo: 1 seed, 3 methods)",
    )
    parser.add_argument("--epochs", type=int, help="student epochs (digits 40, cifar 200)")
    parser.add_argument("--teacher-epochs", type=int, help="teacher epochs (digits 30, cifar 200)")
    parser.add_argument("--labels", type=int, help="student labels (digits 300, cifar all)")
    parser.add_argument("--beta", type=float, help="AT weight (digits 300, cifar 1000)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="reproduce-out")
    args = parser.parse_args(argv)
    if args.zoo:
        args.tables = ["zoo"]
    zoo = "zoo" in args.tables
    tables = [t for t in args.tables if t != "zoo"]
    if zoo and args.dataset != "digits":
        parser.error("the zoo table runs on the embedded digits only (--dataset digits)")
    digits = args.dataset == "digits"
    if args.smoke:
        args.seeds = min(args.seeds, 2 if tables else 1)
        args.epochs = args.epochs or 1
        args.teacher_epochs = args.teacher_epochs or 1
        args.labels = args.labels or 64
        args.val = args.val or 64
    if args.val is None:
        args.val = 300 if digits else 5000
    config = DemoConfig(device=args.device)
    if not digits:  # the authors' CIFAR protocol
        config = replace(
            config,
            batch=128,
            lr=0.1,
            epochs=200,
            teacher_epochs=200,
            flip=True,
            pad_mode="reflect",
            schedule="paper",
        )
    config = replace(
        config,
        epochs=args.epochs or config.epochs,
        teacher_epochs=args.teacher_epochs or config.teacher_epochs,
        beta=args.beta or (config.beta if digits else 1e3),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if zoo:
        zoo_table(args, config, args.labels or config.labels, out)
    if tables:
        paper_tables(args, config, args.labels or (config.labels if digits else None), out)
    return 0


# --------------------------------------------------------------------------- the zoo table

ZOO_PROVIDER = "athooks-zoo"
#: The zoo's methods in the order of the docs: feature maps, learned modules, embeddings, logits.
ZOO_ORDER = (
    "fitnet",
    "nst",
    "fsp",
    "ab",
    "ft",
    "ofd",
    "cwd",
    "reviewkd",
    "catkd",
    "pkt",
    "rkd",
    "sp",
    "cc",
    "vid",
    "crd",
    "crd_inbatch",
    "dkd",
    "dist",
    "logit_std",
)
#: CIFAR-100 top-1 accuracy (%) published for WRN-40-2 -> WRN-16-2: Tian et al., ICLR 2020
#: (CRD), Table 1, except DKD (Zhao et al., CVPR 2022, Table 1), ReviewKD (Chen et al., CVPR
#: 2021, Table 1) and OFD (as reported in Zhao et al.'s table; "?": not checked against the
#: paper here). Methods without a number there are left blank.
PUBLISHED = {
    "teacher": "75.61",
    "student": "73.26",
    "KD": "74.92",
    "AT": "74.08",
    "fitnet": "73.58",
    "sp": "73.83",
    "cc": "72.97",
    "vid": "74.11",
    "rkd": "73.35",
    "pkt": "74.54",
    "ab": "72.50",
    "ft": "73.25",
    "fsp": "72.91",
    "nst": "73.68",
    "crd": "75.48",
    "dkd": "76.24",
    "reviewkd": "76.12",
    "ofd": "75.24?",
}
N_DATA = "<n_data>"  # an option value the harness replaces by the number of training images
INIT_STEPS = "<init_steps>"  # replaced by the number of steps of the recipe's init stage
INIT_FRACTION = 30 / 240  # RepDistiller's init stage: 30 epochs before the 240 of training


@dataclass(frozen=True)
class Recipe:
    """How the authors train with a method, as the harness applies it.

    Attributes:
        options: The loss's options beyond its defaults (``N_DATA``: the number of images).
        ce_weight: The factor of the cross-entropy.
        layers: ``"auto"`` (athooks' stage outputs: ``layer1..3`` of the WRNs) or the layer
            names, the same on both models.
        init: RepDistiller's init stage, ``INIT_FRACTION`` of the epochs before training:
            ``"student"``: the student's feature layers and the loss's modules train on the
            method's loss alone, then the student trains on the cross-entropy alone (AB, FSP);
            ``"loss"``: only the loss's own modules train on it, then CE + method (FT's
            paraphraser).
        extras: What ``d.loss()`` is given besides the target: ``"index"`` (dataset indices).
        warmup: The fraction of the training steps over which the loss's weight rises
            linearly from 0 (mdistiller's 20 of 240 epochs): the loss's own option
            ``warmup_option`` (DKD's ``warmup_steps``), else ``athooks.schedules.warmup``.
        source: Where the recipe comes from.
    """

    options: dict[str, Any] = field(default_factory=dict)
    ce_weight: float = 1.0
    layers: str | tuple[str, ...] = "auto"
    init: str | None = None
    extras: tuple[str, ...] = ()
    warmup: float = 0.0
    warmup_option: str | None = None
    source: str = "RepDistiller (CRD benchmark): CE + beta * method, no KD"


REPDISTILLER = "RepDistiller (CRD benchmark): CE + beta * method, no KD"
MDISTILLER = "mdistiller: CE + method"
RECIPES: dict[str, Recipe] = {
    "fitnet": Recipe(layers=("layer2",), source=REPDISTILLER + "; hint layer 2"),
    "nst": Recipe(),
    "fsp": Recipe(
        options={"connector": True},  # WRN-16-2 and WRN-16-1 differ in width (RepDistiller: equal)
        layers=("conv1", "layer1", "layer2", "layer3"),
        init="student",
        source="RepDistiller: FSP alone in the init stage, then CE alone",
    ),
    "ab": Recipe(init="student", source="RepDistiller: AB alone in the init stage, then CE alone"),
    "ft": Recipe(
        options={"paraphraser_steps": INIT_STEPS},
        layers=("layer3",),
        init="loss",
        source=REPDISTILLER + "; the paraphraser trains alone first (init stage), then frozen",
    ),
    "ofd": Recipe(source=MDISTILLER),
    "cwd": Recipe(source="CE + method (the loss's defaults)"),
    "reviewkd": Recipe(warmup=20 / 240, source=MDISTILLER + ", weight warm-up 20 of 240 epochs"),
    "catkd": Recipe(layers=("relu",), source=MDISTILLER + " (CAT-KD's code): last feature map"),
    "pkt": Recipe(),
    "rkd": Recipe(),
    "sp": Recipe(options={"on": "features"}, layers=("layer3",), source=REPDISTILLER),
    "cc": Recipe(),
    "vid": Recipe(options={"on": "features"}, source=REPDISTILLER + "; a regressor per stage"),
    "crd": Recipe(options={"n_data": N_DATA}, extras=("index",)),
    "crd_inbatch": Recipe(source="CE + method (in-batch negatives: no memory bank)"),
    "dkd": Recipe(
        warmup=20 / 240,
        warmup_option="warmup_steps",
        source=MDISTILLER + ", weight warm-up 20 of 240 epochs",
    ),
    "dist": Recipe(source="DIST's CIFAR code: CE + method"),
    "logit_std": Recipe(
        options={"loss": "kd"},
        source="logit-standardization-KD (mdistiller cfg): CE + KD on Z-scores, KD weight 9, "
        "base temperature 2 (the loss's defaults for kd)",
    ),
}


@dataclass(frozen=True)
class ZooRow:
    """One row of the zoo table: a loss (None: the student alone) and its recipe."""

    name: str
    loss: str | None
    recipe: Recipe
    provider: str = ""


def ensure_zoo() -> None:
    """Register athooks-zoo by hand when it is importable but not installed (``PYTHONPATH``)."""
    import importlib.util

    import athooks.registry

    if any(p.startswith(ZOO_PROVIDER) for _, _, p, _ in athooks.registry.registered()):
        return
    if importlib.util.find_spec("athooks_zoo") is None:
        return
    from athooks_zoo import plugin

    manager = athooks.get_plugin_manager()
    if not manager.is_registered(plugin):
        manager.register(plugin, name=ZOO_PROVIDER)


def zoo_losses() -> dict[str, str]:
    """Every loss whose provider is athooks-zoo, by name: its provider label."""
    import athooks.registry

    ensure_zoo()
    found = {
        name: provider
        for kind, name, provider, _ in athooks.registry.registered()
        if kind == "loss" and provider.startswith(ZOO_PROVIDER)
    }
    order = {name: i for i, name in enumerate(ZOO_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def zoo_rows(beta: float, methods: list[str] | None = None) -> list[ZooRow]:
    """The reference rows (student, AT, KD), then every athooks-zoo loss with its recipe.

    ``methods`` keeps only the named rows, in the order given; it may name any registered loss
    (a core one too), which then runs with its defaults and CE + loss.
    """
    reference = [
        ZooRow("student", None, Recipe(source="CE alone")),
        ZooRow("AT", "at", Recipe(options={"beta": beta}, source="CE + AT (Table 1's row)")),
        ZooRow(
            "KD",
            "kd",
            Recipe(
                options={"weight": 0.9, "temperature": 4.0},
                ce_weight=0.1,
                source="0.1 CE + 0.9 KD at T 4 (Table 1's row; RepDistiller's too)",
            ),
        ),
    ]
    rows_ = reference + [
        ZooRow(name, name, RECIPES.get(name, Recipe(source="CE + method (no recipe here)")), p)
        for name, p in zoo_losses().items()
    ]
    if methods is None:
        return rows_
    by_name = {r.name: r for r in rows_}
    picked = []
    for name in methods:
        if name not in by_name:
            if name not in athooks.list_losses():
                raise SystemExit(f"--methods: no row or loss {name!r}")
            by_name[name] = ZooRow(name, name, Recipe(source="CE + method (no recipe here)"))
        picked.append(by_name[name])
    return picked


def describe(row: ZooRow) -> str:
    """The recipe in a few words, for the table."""
    r = row.recipe
    if row.loss is None:
        return "CE"
    shown = {N_DATA: "N", INIT_STEPS: "init steps"}
    opts = ", ".join(f"{k}={shown.get(v, v)}" for k, v in r.options.items())
    ce = "CE" if r.ce_weight == 1 else f"{r.ce_weight:g} CE"
    text = f"{ce} + {row.loss}({opts})"
    if r.init == "student":
        text = f"init: {row.loss}({opts}) alone; then CE alone"
    elif r.init == "loss":
        text += "; init: its modules first"
    if r.layers != "auto":
        text += f" on {', '.join(r.layers)}"
    if r.warmup:
        text += f"; warm-up {r.warmup:.3g} of the steps"
    if r.extras:
        text += f"; d.loss({', '.join(f'{e}=...' for e in r.extras)})"
    return text


_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    """Load what every run needs (in a worker process, or in this one)."""
    threads = state.get("threads")
    if threads:
        torch.set_num_threads(threads)
    from athooks.demo.data import cluttered_digits

    x, y, xt, yt = cluttered_digits(0)
    config: DemoConfig = state["config"]
    torch.manual_seed(TEACHER_SEED)
    teacher = create_model(config.teacher, num_classes=10, in_chans=1)
    teacher.load_state_dict(torch.load(state["teacher_path"], weights_only=True))
    teacher.to(config.device)
    labels = state["labels"]
    _STATE.update(
        config=config,
        teacher=teacher,
        x=x[:labels],
        y=y[:labels],
        xt=xt,
        yt=yt,
        rows={r.name: r for r in zoo_rows(config.beta, state.get("methods"))},
    )


def _params_except_classifier(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    from athooks.layers import find_classifier

    name, _ = find_classifier(model, "student")
    return [p for n, p in model.named_parameters() if not n.startswith(name + ".")]


def fit(
    student: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    config: DemoConfig,
    params: list[torch.nn.Parameter],
    distiller: Distiller | None = None,
    ce_weight: float = 1.0,
    extras: tuple[str, ...] = (),
    order_seed: int | None = None,
    unlabeled: Tensor | None = None,
    validation: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """The demo's training loop (SGD momentum 0.9, cosine lr, random shifts, same batches).

    ``ce_weight`` 0 trains on the transfer loss alone; ``extras`` names what ``d.loss()`` is
    given: ``"index"``, the batch's indices into ``x``.

    ``unlabeled``: images without labels. Each step then adds a batch of them, as many as the
    labelled batch, drawn in turn with a generator of their own (so the labelled batches and
    their shifts are those of the runs without them); the student sees both in one forward,
    the cross-entropy takes the labelled part and ``d.loss()`` (without a target) the whole
    batch.

    ``validation``: images and labels evaluated after every epoch (in eval mode).

    Returns:
        ``ce`` and ``transfer``: the last epoch's mean cross-entropy and transfer term; ``val``:
        the validation error (%) after each epoch; ``best_epoch`` and ``best_state``: the
        first epoch with the lowest validation error and a copy of the weights after it.
    """
    import copy
    import math

    import torch.nn.functional as F  # noqa: N812

    from athooks.demo.run import random_shift

    device = torch.device(config.device)
    opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    steps = epochs * math.ceil(len(x) / config.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    seed = config.seed + 1 if order_seed is None else order_seed
    order = torch.Generator().manual_seed(seed)  # the demo's: the same batches for every row
    other = torch.Generator().manual_seed(seed + 7919)  # the unlabeled images' own
    pool = torch.empty(0, dtype=torch.long)
    log: dict[str, Any] = {"val": [], "best_epoch": 0, "best_state": None}
    student.train()
    ce_sum = transfer_sum = 0.0
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(x), generator=order)
        ce_sum = transfer_sum = 0.0
        for i in range(0, len(x), config.batch):
            idx = perm[i : i + config.batch]
            xb = random_shift(x[idx], config.shift, order, config.pad_mode, config.flip)
            xb, yb = xb.to(device), y[idx].to(device)
            if unlabeled is not None:
                while len(pool) < len(idx):
                    pool = torch.cat([pool, torch.randperm(len(unlabeled), generator=other)])
                ub, pool = unlabeled[pool[: len(idx)]], pool[len(idx) :]
                ub = random_shift(ub, config.shift, other, config.pad_mode, config.flip)
                out = student(torch.cat([xb, ub.to(device)]))[: len(idx)]
            else:
                out = student(xb)
            ce = F.cross_entropy(out, yb)
            loss = ce_weight * ce if ce_weight else 0.0
            ce_sum += float(ce.detach()) * len(idx)
            if distiller is not None:
                given = {"index": idx.to(device)}
                target = None if unlabeled is not None else yb
                transfer = distiller.loss(target=target, **{k: given[k] for k in extras})
                transfer_sum += float(transfer.detach()) * len(idx)
                loss = loss + transfer
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
        if validation is not None:
            err = 100 * evaluate(student, *validation, config.device)
            if not log["val"] or err < min(log["val"]):
                log["best_epoch"] = epoch
                log["best_state"] = copy.deepcopy(student.state_dict())
            log["val"].append(err)
            student.train()
    log.update(ce=ce_sum / len(x), transfer=transfer_sum / len(x))
    return log


def run_zoo_task(seed: int, name: str) -> dict[str, Any]:
    """Train one row's student for one seed; its test error (%) or why it was skipped."""
    import math

    st = _STATE
    config: DemoConfig = st["config"]
    row: ZooRow = st["rows"][name]
    recipe = row.recipe
    x, y, teacher = st["x"], st["y"], st["teacher"]
    device = torch.device(config.device)
    torch.manual_seed(100 + seed)  # the paper tables' initialisation of this seed
    init = create_model(config.student, num_classes=10, in_chans=1).state_dict()
    student = create_model(config.student, num_classes=10, in_chans=1).to(device)
    student.load_state_dict(init)
    cfg = replace(config, seed=seed)
    start = time.perf_counter()
    init_epochs = max(1, round(INIT_FRACTION * config.epochs)) if recipe.init else 0
    result: dict[str, Any] = {"row": name, "seed": seed, "init_epochs": init_epochs}
    try:
        last: dict[str, Any] = {"ce": float("nan"), "transfer": float("nan")}
        if row.loss is None:
            last = fit(
                student, x, y, epochs=config.epochs, config=cfg, params=list(student.parameters())
            )
        else:
            init_steps = init_epochs * math.ceil(len(x) / config.batch)
            given = {N_DATA: len(x), INIT_STEPS: init_steps}
            options = {k: given.get(v, v) for k, v in recipe.options.items()}
            if recipe.warmup:
                steps = config.epochs * math.ceil(len(x) / config.batch)
                ramp = max(1, round(recipe.warmup * steps))
                if recipe.warmup_option:
                    options[recipe.warmup_option] = ramp
                else:
                    from athooks import schedules  # type: ignore[attr-defined]

                    options["schedule"] = schedules.warmup(ramp)
            loss = athooks.loss(row.loss, **options)
            if recipe.layers == "auto":
                d = Distiller(teacher, student, losses=loss, input_size=(1, *x.shape[2:]))
            else:
                pairs = [(n, n) for n in recipe.layers]
                d = Distiller(teacher, student, layers=pairs, losses=loss)
            with d:
                if recipe.init:
                    own = list(d.parameters())
                    if recipe.init == "student":
                        own += _params_except_classifier(student)
                    order_seed = 1000 + seed
                    fit(
                        student,
                        x,
                        y,
                        epochs=init_epochs,
                        config=cfg,
                        params=own,
                        distiller=d,
                        ce_weight=0.0,
                        extras=recipe.extras,
                        order_seed=order_seed,
                    )
                if recipe.init != "student":
                    last = fit(
                        student,
                        x,
                        y,
                        epochs=config.epochs,
                        config=cfg,
                        params=[*student.parameters(), *d.parameters()],
                        distiller=d,
                        ce_weight=recipe.ce_weight,
                        extras=recipe.extras,
                    )
            if recipe.init == "student":  # then CE alone, as RepDistiller
                last = fit(
                    student,
                    x,
                    y,
                    epochs=config.epochs,
                    config=cfg,
                    params=list(student.parameters()),
                )
    except Exception as err:  # a method that cannot run here is reported, not fatal
        result.update(error="", skipped=f"{type(err).__name__}: {str(err).splitlines()[0]}")
    else:
        result.update(error=100 * evaluate(student, st["xt"], st["yt"], config.device), skipped="")
        result.update(last_ce=f"{last['ce']:.4g}", last_transfer=f"{last['transfer']:.4g}")
    result["seconds"] = time.perf_counter() - start
    return result


#: One line per run; ``last_ce`` and ``last_transfer``: the last epoch's mean cross-entropy and
#: transfer term (a term that grows, or a cross-entropy that stays high, shows a method that
#: does not train well with its authors' weight on this data).
RUN_FIELDS = [
    "row",
    "seed",
    "error",
    "seconds",
    "init_epochs",
    "skipped",
    "last_ce",
    "last_transfer",
]


def zoo_teacher(
    config: DemoConfig, images: int | None = None
) -> tuple[torch.nn.Module, Path, float]:
    """The demo's teacher: loaded from the demo's cache, else trained and cached; its time.

    ``images`` trains it on the first images only (the smoke run's teacher, cached apart).
    """
    from athooks.demo.data import cluttered_digits
    from athooks.demo.run import _teacher_key, cache_dir

    torch.manual_seed(TEACHER_SEED)
    teacher = create_model(config.teacher, num_classes=10, in_chans=1).to(config.device)
    part = f"-first{images}" if images else ""
    cached = cache_dir() / f"demo-teacher-{config.teacher}-{_teacher_key(config)}{part}.pt"
    if cached.exists():
        teacher.load_state_dict(torch.load(cached, map_location=config.device, weights_only=True))
        print(f"teacher: loaded from {cached}", file=sys.stderr)
        return teacher, cached, 0.0
    x, y, _, _ = cluttered_digits(config.data_seed)
    x, y = x[:images], y[:images]
    t_config = replace(config, seed=TEACHER_SEED, batch=TEACHER_BATCH, lr=TEACHER_LR)
    seconds = train(teacher, x, y, epochs=config.teacher_epochs, config=t_config, label="teacher")
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), cached)
    return teacher, cached, seconds


def zoo_table(args: argparse.Namespace, config: DemoConfig, labels: int, out: Path) -> None:
    """Train every zoo row over the seeds; write zoo-runs.csv as runs finish, then the table."""
    import concurrent.futures
    import multiprocessing
    import os

    started = time.time()
    methods = args.methods.split(",") if args.methods else None
    all_rows = zoo_rows(config.beta, methods)
    if args.smoke and methods is None:  # 3 methods: the first zoo ones, else core stand-ins
        zoo = [r for r in all_rows if r.provider]
        all_rows = zoo[:3] if len(zoo) >= 3 else zoo_rows(config.beta, ["student", "AT", "KD"])
    names = [r.name for r in all_rows]
    teacher, teacher_path, _ = zoo_teacher(config, labels if args.smoke else None)
    from athooks.demo.data import cluttered_digits

    _, _, xt, yt = cluttered_digits(config.data_seed)
    teacher_err = 100 * evaluate(teacher, xt, yt, config.device)
    runs_path = out / "zoo-runs.csv"
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if args.resume and runs_path.exists():
        with open(runs_path) as fh:
            for r in csv.DictReader(fh):
                done[(r["row"], int(r["seed"]))] = r
        with open(runs_path, "w", newline="") as fh:  # the current columns, the runs kept
            writer = csv.DictWriter(fh, RUN_FIELDS)
            writer.writeheader()
            for r in done.values():
                writer.writerow({k: r.get(k) or "" for k in RUN_FIELDS})
    else:
        with open(runs_path, "w", newline="") as fh:
            csv.DictWriter(fh, RUN_FIELDS).writeheader()
    tasks = [(s, n) for s in range(args.seeds) for n in names if (n, s) not in done]
    jobs = max(1, args.jobs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    state = {
        "config": config,
        "teacher_path": str(teacher_path),
        "labels": labels,
        "methods": methods if methods is not None else None,
        "threads": threads,
    }
    if args.smoke and methods is None:
        state["methods"] = names

    def record(result: dict[str, Any]) -> None:
        done[(result["row"], result["seed"])] = result
        with open(runs_path, "a", newline="") as fh:
            csv.DictWriter(fh, RUN_FIELDS).writerow({k: result.get(k, "") for k in RUN_FIELDS})
        err = f"{result['error']:.2f}%" if result["error"] != "" else result["skipped"]
        print(
            f"[{len(done)}/{len(done) + len(tasks) - finished[0]}] seed {result['seed']} "
            f"{result['row']}: {err} ({result['seconds']:.0f}s)",
            file=sys.stderr,
            flush=True,
        )

    finished = [0]
    if jobs == 1:
        saved = torch.get_num_threads()
        _init_worker({**state, "threads": args.threads})
        for seed, name in tasks:
            finished[0] += 1
            record(run_zoo_task(seed, name))
        torch.set_num_threads(saved)
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=ctx, initializer=_init_worker, initargs=(state,)
        ) as pool:
            futures = [pool.submit(run_zoo_task, s, n) for s, n in tasks]
            for future in concurrent.futures.as_completed(futures):
                finished[0] += 1
                record(future.result())
    write_zoo(done, names, all_rows, teacher_err, config, labels, args, out, started, jobs, threads)


def commit() -> str:
    """The checkout's commit (``+`` when athooks/ or plugins/ have uncommitted changes)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "athooks", "plugins"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return "?"
    return (head or "?") + ("+" if dirty else "")


def machine() -> str:
    """``nproc``, the CPU model and torch's version, for the table's header."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({model}), torch {torch.__version__}"


def write_zoo(
    done: dict[tuple[str, int], dict[str, Any]],
    names: list[str],
    all_rows: list[ZooRow],
    teacher_err: float,
    config: DemoConfig,
    labels: int,
    args: argparse.Namespace,
    out: Path,
    started: float,
    jobs: int,
    threads: int,
) -> None:
    """Print and save the zoo table (``zoo.md``, ``zoo.csv``)."""
    by_name = {r.name: r for r in all_rows}
    stats: dict[str, dict[str, Any]] = {}
    for name in names:
        runs = [r for (n, _), r in sorted(done.items()) if n == name]
        errs = [float(r["error"]) for r in runs if str(r["error"]) != ""]
        skipped = [r["skipped"] for r in runs if r["skipped"]]
        secs = [float(r["seconds"]) for r in runs if str(r["error"]) != ""]
        stats[name] = {
            "errs": errs,
            "mean": statistics.mean(errs) if errs else None,
            "std": statistics.stdev(errs) if len(errs) > 1 else 0.0,
            "skipped": skipped[0] if skipped and not errs else "",
            "seconds": statistics.mean(secs) if secs else None,
        }
    base = stats.get("student", {}).get("mean")
    measured = sorted((s["mean"], n) for n, s in stats.items() if s["mean"] is not None)
    rank_here = {n: i + 1 for i, (_, n) in enumerate(measured)}
    published = {n: float(PUBLISHED[n].rstrip("?")) for n in names if n in PUBLISHED}
    ranked_pub = sorted(((-v, n) for n, v in published.items()))
    rank_pub = {n: i + 1 for i, (_, n) in enumerate(ranked_pub)}
    init_epochs = max(1, round(INIT_FRACTION * config.epochs))
    partial = any(len(stats[n]["errs"]) < args.seeds and not stats[n]["skipped"] for n in names)
    teacher_note = ", trained on the first labels" if args.smoke else ""
    lines = [
        f"digits{' (smoke)' if args.smoke else ''}: teacher {config.teacher} "
        f"({teacher_err:.2f}% error{teacher_note}), students {config.student} on {labels} labels, "
        f"{config.epochs} epochs (+{init_epochs} init-stage epochs where the recipe has one), "
        f"batch {config.batch}, lr {config.lr:g} cosine, {args.seeds} seeds, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC, {machine()}, "
        f"{jobs} process(es) x {threads} thread(s), commit {commit()}, "
        f"{(time.time() - started) / 60:.1f} min"
        + ("; PARTIAL: some seeds missing" if partial else ""),
        "",
        "| row | recipe | test error (%) mean +- std | seeds | vs student (points) | rank | "
        "s per run | CIFAR-100 top-1 (%) published | vs student | rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher | {config.teacher}, all 1300 images | {teacher_err:.2f} | 1 | | | | "
        f"{PUBLISHED['teacher']} | | |",
    ]
    pub_student = float(PUBLISHED["student"])
    with open(out / "zoo.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["row", "mean", "std", "seeds", "errors", "seconds", "published", "skipped"]
        )
        for name in names:
            s = stats[name]
            row = by_name[name]
            pub = PUBLISHED.get(name, "")
            pub_delta = f"{published[name] - pub_student:+.2f}" if name in published else ""
            if s["mean"] is None:
                reason = f"skipped: {s['skipped']}" if s["skipped"] else "not run"
                cells = [reason, "0", "", "", ""]
            else:
                delta = f"{base - s['mean']:+.2f}" if base is not None else ""
                cells = [
                    f"{s['mean']:.2f} +- {s['std']:.2f}",
                    str(len(s["errs"])),
                    delta if name != "student" else "",
                    str(rank_here[name]),
                    f"{s['seconds']:.0f}",
                ]
            lines.append(
                f"| {name} | {describe(row)} | {' | '.join(cells)} | {pub} | "
                f"{pub_delta if name != 'student' else ''} | {rank_pub.get(name, '')} |"
            )
            writer.writerow(
                [
                    name,
                    "" if s["mean"] is None else f"{s['mean']:.3f}",
                    f"{s['std']:.3f}",
                    len(s["errs"]),
                    " ".join(f"{e:.2f}" for e in s["errs"]),
                    "" if s["seconds"] is None else f"{s['seconds']:.1f}",
                    pub,
                    s["skipped"],
                ]
            )
    lines += [
        "",
        "vs student: the student's error minus the row's (points; above 0 the method helps); "
        "published: the method's top-1 minus the student's. Ranks: 1 is the best of the rows "
        "measured here (lowest error) and of the rows with a published number (highest top-1).",
    ]
    text = "\n".join(lines)
    (out / "zoo.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
