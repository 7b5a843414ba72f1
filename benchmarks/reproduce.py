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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import athooks
from athooks import Distiller
from athooks.demo.run import TEACHER_BATCH, TEACHER_LR, TEACHER_SEED, DemoConfig, evaluate, train
from athooks.models import create_model

PAPER = {  # CIFAR-10 error (%) of the paper, WRN-16-1 student / WRN-16-2 teacher
    "student": 8.77,
    "AT": 7.93,
    "F-ActT": 8.51,
    "KD": 7.41,
    "AT+KD": 7.51,
    "teacher": 6.31,
    "F_sum": 7.99,
    "F_sum^2": 7.93,
    "F_sum^4": 8.09,
    "F_max^1": 8.08,
}
PAPER_T3 = {  # NIN-thin / NIN-wide, no BN, flip-only augmentation (not the same networks here)
    "baseline": 13.5,
    "min-l2": 12.5,
    "grad-AT": 12.1,
    "KD": 12.1,
    "symmetry": 11.8,
    "activation AT": 11.2,
}


@dataclass(frozen=True)
class Row:
    """One row: its table, its name, the losses (None: no transfer) and the CE factor."""

    table: int
    name: str
    losses: Callable[[float], list[Any]] | None
    ce_weight: float = 1.0


def rows(beta: float) -> list[Row]:
    """The rows of Tables 1-3."""
    kd = lambda: athooks.loss("kd", weight=0.9, temperature=4.0)  # noqa: E731
    return [
        Row(1, "student", None),
        Row(1, "AT", lambda b: [athooks.loss("at", beta=b)]),
        Row(1, "F-ActT", lambda b: [athooks.loss("fact")]),
        Row(1, "KD", lambda b: [kd()], ce_weight=0.1),
        Row(1, "AT+KD", lambda b: [athooks.loss("at", beta=b), kd()], ce_weight=0.1),
        Row(2, "F_sum", lambda b: [athooks.loss("at", beta=b, mapping="sum")]),
        Row(2, "F_sum^2", lambda b: [athooks.loss("at", beta=b, mapping="sum_p", p=2)]),
        Row(2, "F_sum^4", lambda b: [athooks.loss("at", beta=b, mapping="sum_p", p=4)]),
        Row(2, "F_max^1", lambda b: [athooks.loss("at", beta=b, mapping="max_p", p=1)]),
        Row(3, "baseline", None),
        Row(3, "min-l2", lambda b: [athooks.loss("input_grad_l2")]),
        Row(3, "grad-AT", lambda b: [athooks.loss("grad_at")]),
        Row(3, "KD", lambda b: [kd()], ce_weight=0.1),
        Row(3, "symmetry", lambda b: [athooks.loss("symmetry")]),
        Row(3, "activation AT", lambda b: [athooks.loss("at", beta=b)]),
    ]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--tables",
        nargs="+",
        default=["1", "2", "3"],
        choices=["1", "2", "3", "zoo"],
        help="the paper's Tables 1-3 and/or 'zoo': every athooks-zoo method (digits only)",
    )
    parser.add_argument("--zoo", action="store_true", help="the same as --tables zoo")
    parser.add_argument(
        "--methods",
        help="zoo table: only these rows (comma-separated loss names or student, AT, KD)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="zoo table: runs at once, in worker processes"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads per process (default: all cores / jobs)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="zoo table: keep the runs already in zoo-runs.csv"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="zoo table in seconds: 1 seed, 1 epoch, 64 labels, 3 methods",
    )
    parser.add_argument("--epochs", type=int, help="student epochs (digits 40, cifar 200)")
    parser.add_argument("--teacher-epochs", type=int, help="teacher epochs (digits 30, cifar 200)")
    parser.add_argument("--labels", type=int, help="student labels (digits 300, cifar all)")
    parser.add_argument("--beta", type=float, help="AT weight (digits 300, cifar 1000)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="reproduce-out")
    args = parser.parse_args(argv)
    zoo = args.zoo or args.smoke or "zoo" in args.tables
    if args.zoo or args.smoke:
        args.tables = [t for t in args.tables if t == "zoo"] or ["zoo"]
    tables = [int(t) for t in args.tables if t != "zoo"]
    if zoo and args.dataset != "digits":
        parser.error("the zoo table runs on the embedded digits only (--dataset digits)")
    if args.smoke:
        args.seeds = 1
        args.epochs = args.epochs or 1
        args.teacher_epochs = args.teacher_epochs or 1
        args.labels = args.labels or 64
    digits = args.dataset == "digits"
    x, y, xt, yt, chans = load_data(args)
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
    labels = args.labels or (config.labels if digits else len(x))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if zoo:
        zoo_table(args, config, labels, out)
    if not tables:
        return 0

    torch.manual_seed(TEACHER_SEED)
    teacher = create_model(config.teacher, num_classes=10, in_chans=chans).to(device)
    t_config = replace(config, seed=TEACHER_SEED)
    if digits:  # the demo's fixed teacher recipe; on CIFAR the paper's, as for the students
        t_config = replace(t_config, batch=TEACHER_BATCH, lr=TEACHER_LR)
    t_time = train(teacher, x, y, epochs=config.teacher_epochs, config=t_config, label="teacher")
    teacher_err = evaluate(teacher, xt, yt, args.device)
    print(f"teacher {config.teacher}: {100 * teacher_err:.2f}% ({t_time:.0f}s)", file=sys.stderr)

    results: dict[tuple[int, str], list[float]] = {}
    wanted = [r for r in rows(config.beta) if r.table in tables]
    for seed in range(args.seeds):
        torch.manual_seed(100 + seed)
        init = create_model(config.student, num_classes=10, in_chans=chans).state_dict()
        cfg = replace(config, seed=seed)
        for row in wanted:
            student = create_model(config.student, num_classes=10, in_chans=chans).to(device)
            student.load_state_dict(init)
            distiller = None
            if row.losses is not None:
                try:
                    distiller = Distiller(teacher, student, losses=row.losses(config.beta))
                except athooks.AthooksError as err:
                    print(f"{row.name}: skipped: {err}", file=sys.stderr)
                    continue
            try:
                train(
                    student,
                    x[:labels],
                    y[:labels],
                    epochs=config.epochs,
                    config=cfg,
                    distiller=distiller,
                    label=row.name[:10],
                    ce_weight=row.ce_weight,
                )
            except athooks.AthooksError as err:
                print(f"\n{row.name}: skipped: {err}", file=sys.stderr)
                continue
            results.setdefault((row.table, row.name), []).append(
                100 * evaluate(student, xt, yt, args.device)
            )
    write(results, teacher_err, config, labels, args, out)
    return 0


def write(
    results: dict[tuple[int, str], list[float]],
    teacher_err: float,
    config: DemoConfig,
    labels: int,
    args: argparse.Namespace,
    out: Path,
) -> None:
    """Print and save the table."""
    lines = [
        f"{args.dataset}: teacher {config.teacher} ({100 * teacher_err:.2f}% error), student "
        f"{config.student} on {labels} labels, {config.epochs} epochs, {args.seeds} seeds, "
        f"beta {config.beta:g}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        "",
        "| table | row | test error (%) mean +- std | seeds | paper (CIFAR-10) |",
        "|---|---|---|---|---|",
    ]
    with open(out / "reproduce.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["table", "row", "mean", "std", "errors"])
        for (table, name), errs in results.items():
            mean = statistics.mean(errs)
            std = statistics.stdev(errs) if len(errs) > 1 else 0.0
            writer.writerow(
                [table, name, f"{mean:.3f}", f"{std:.3f}", " ".join(f"{e:.2f}" for e in errs)]
            )
            paper = (PAPER if table < 3 else PAPER_T3).get(name, "")
            lines.append(f"| {table} | {name} | {mean:.2f} +- {std:.2f} | {len(errs)} | {paper} |")
    text = "\n".join(lines)
    (out / "reproduce.md").write_text(text + "\n")
    print(text)


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
) -> tuple[float, float]:
    """The demo's training loop (SGD momentum 0.9, cosine lr, random shifts, same batches).

    Returns the last epoch's mean cross-entropy and mean transfer term (for the runs' log).

    ``ce_weight`` 0 trains on the transfer loss alone; ``extras`` names what ``d.loss()`` is
    given: ``"index"``, the batch's indices into ``x``.
    """
    import math

    import torch.nn.functional as F  # noqa: N812

    from athooks.demo.run import random_shift

    device = torch.device(config.device)
    opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    steps = epochs * math.ceil(len(x) / config.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    seed = config.seed + 1 if order_seed is None else order_seed
    order = torch.Generator().manual_seed(seed)  # the demo's: the same batches for every row
    student.train()
    ce_sum = transfer_sum = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        ce_sum = transfer_sum = 0.0
        for i in range(0, len(x), config.batch):
            idx = perm[i : i + config.batch]
            xb = random_shift(x[idx], config.shift, order, config.pad_mode, config.flip)
            xb, yb = xb.to(device), y[idx].to(device)
            out = student(xb)
            ce = F.cross_entropy(out, yb)
            loss = ce_weight * ce if ce_weight else 0.0
            ce_sum += float(ce.detach()) * len(idx)
            if distiller is not None:
                given = {"index": idx.to(device)}
                transfer = distiller.loss(target=yb, **{k: given[k] for k in extras})
                transfer_sum += float(transfer.detach()) * len(idx)
                loss = loss + transfer
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
    return ce_sum / len(x), transfer_sum / len(x)


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
        last: tuple[float, float] = (float("nan"), float("nan"))
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
        result.update(last_ce=f"{last[0]:.4g}", last_transfer=f"{last[1]:.4g}")
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
