"""What each athooks-zoo method costs per step: time and peak memory over the floor, side by side.

For every row of the zoo table (``benchmarks/reproduce.py --zoo``: AT, KD and every loss whose
provider is athooks-zoo, with the recipe's layers, options and cross-entropy weight), one
training step through ``athooks.Distiller`` (SGD over the student's and ``d.parameters()``),
measured against the floor of ``benchmarks/overhead.py`` (the teacher's forward under
``no_grad``, then the student's cross-entropy step) and, where torchdistill has the same method
as a loss module taking hooked tensors (AT, KD, PKT, RKD, SP, FSP, DIST, logit standardisation;
and, with its own auxiliary modules built from its classes, AB, FT, VID, CC and CRD),
torchdistill's implementation of it on the same layers, with its ``ForwardHookManager``.

* Step time: one process, every variant once per round in an order rotated from round to round,
  after warm-up rounds (``overhead.interleaved``); the median of the round-by-round CPU-time
  ratios to the floor, with their interquartile range; ``floor (A/A)`` is a second floor.
* Peak memory: a fresh process per variant doing 3 steps (``MALLOC_MMAP_THRESHOLD_=65536``),
  peak RSS over the floor's, as ``overhead.py`` measures it.
* Agreement: the transfer loss of athooks and of torchdistill on the same weights and batch,
  each with the weight of the authors' recipe (RepDistiller's betas): their ratio is 1 where
  both follow the same formula.

Settings: ``wrn16_2->wrn16_1`` (athooks.models, the zoo table's pair) at 32x32 and
``resnet34->resnet18`` (timm) at 64x64, batch 32, random data. The recipe's layers map onto
each model: ``auto`` is the stage outputs, the last WRN stage is the last stage of either model.
A method's step is its recipe's ``ce_weight * CE + d.loss()`` in every case (for AB and FSP,
whose recipe runs the method in an init stage only, that is the init stage's step plus CE). CRD's
memory bank holds ``--n-data`` entries (50,000: CIFAR's training set).

Run: python3 benchmarks/zoo_cost.py [--out zoo-cost.md] [--rounds 12] [--methods a,b]
     [--only timing memory] [--smoke]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

HERE = pathlib.Path(__file__).resolve().parent


def _load(name: str) -> Any:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


overhead = _load("overhead")
reproduce = _load("reproduce")

import athooks  # noqa: E402

Setting = overhead.Setting
Step = Callable[[Tensor, Tensor], Tensor]
CONTROL = "floor (A/A)"
N_DATA = 50_000
MEMORY_STEPS = 3
#: torchdistill's weight for its loss module, from RepDistiller's scripts (the CRD benchmark),
#: so that its transfer loss and athooks' can be compared value for value.
TD_WEIGHTS = {"at": 1000.0, "pkt": 30000.0, "sp": 3000.0, "fsp": 50.0, "rkd": 1.0}


def have_torchdistill() -> bool:
    return importlib.util.find_spec("torchdistill") is not None


def settings_for(smoke: bool, batch: int) -> list[Any]:
    if smoke:
        return [Setting("athooks:wrn16_2", "athooks:wrn16_1", 16, 4)]
    return [
        Setting("athooks:wrn16_2", "athooks:wrn16_1", 32, batch),
        Setting("timm:resnet34", "timm:resnet18", 64, batch),
    ]


def layers_on(recipe: Any, model: nn.Module) -> list[str]:
    """The recipe's layers on this model: ``auto`` the stages; WRN's last stage the last one."""
    stages = overhead.tap_names(model, "stages")
    if recipe.layers == "auto":
        return stages
    if {"layer1", "layer3"} <= set(recipe.layers):  # every stage (FSP): every stage here
        return [n for n in recipe.layers if not n.startswith("layer")] + stages
    wrn_last = {"layer3": stages[-1], "relu": "relu" if hasattr(model, "relu") else stages[-1]}
    return [wrn_last.get(n, n) for n in recipe.layers]


def reads(row: Any) -> str:
    """What the row's loss reads when it taps no feature map: the embedding or the logits."""
    loss = athooks.loss(row.loss, **loss_options(row))
    if loss.captures():
        return ""
    return "embedding" if getattr(loss, "needs_embedding", False) else "logits"


def loss_options(row: Any) -> dict[str, Any]:
    # CRD's bank holds N_DATA entries; FT's paraphraser trains for 1 step, then is frozen (the
    # step measured is FT's after its init stage, as torchdistill's stage 2)
    given = {reproduce.N_DATA: N_DATA, reproduce.INIT_STEPS: 1}
    return {k: given.get(v, v) for k, v in row.recipe.options.items()}


def update_fn(params: Sequence[nn.Parameter]) -> Callable[[Tensor], Tensor]:
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def update(loss: Tensor) -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return update


def prepare(teacher: nn.Module, student: nn.Module) -> None:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()


def floor_variant(teacher: nn.Module, student: nn.Module) -> tuple[Step, Callable[..., Tensor]]:
    prepare(teacher, student)
    update = update_fn(list(student.parameters()))

    def step(x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            teacher(x)
        return update(F.cross_entropy(student(x), y))

    return step, lambda x, y: torch.zeros(())


def athooks_variant(
    row: Any, teacher: nn.Module, student: nn.Module
) -> tuple[Step, Callable[..., Tensor]]:
    """``Distiller`` with the recipe's loss and layers, attached once; its step and transfer."""
    prepare(teacher, student)
    names = [] if reads(row) else layers_on(row.recipe, student)
    d = athooks.Distiller(
        teacher,
        student,
        layers=[(n, n) for n in names],
        losses=athooks.loss(row.loss, **loss_options(row)),
    )
    d.attach()
    update = update_fn([*student.parameters(), *d.parameters()])
    ce_weight = row.recipe.ce_weight

    def extras(y: Tensor) -> dict[str, Tensor]:
        if "index" not in row.recipe.extras:
            return {}
        return {"index": torch.arange(len(y), device=y.device) * 7 % N_DATA}

    def step(x: Tensor, y: Tensor) -> Tensor:
        loss = ce_weight * F.cross_entropy(student(x), y) + d.loss(target=y, **extras(y))
        return update(loss)

    def transfer(x: Tensor, y: Tensor) -> Tensor:
        student(x)
        return d.loss(target=y, **extras(y))

    return step, transfer


def torchdistill_methods() -> set[str]:
    return {"at", "kd", "pkt", "rkd", "sp", "fsp", "dist", "logit_std", *TD_LEARNED}


#: Methods whose torchdistill variant has learned modules of its own (built from
#: torchdistill's classes, randomly initialised): their transfer losses are not compared.
TD_LEARNED = {"ab", "ft", "vid", "cc", "crd"}
#: ... and those whose athooks side has learned connectors in the recipe (FSP here).
NO_RATIO = {*TD_LEARNED, "fsp"}


def probe(model: nn.Module, names: Sequence[str], x: Tensor, inputs: bool = False) -> list[Any]:
    """The shapes of the named modules' outputs (or first inputs) on ``x``."""
    seen: dict[str, Any] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: seen.__setitem__(n, (a[0] if inputs else out).shape)
        )
        for n in names
    ]
    with torch.no_grad():
        was = model.training
        model.eval()
        model(x)
        model.train(was)
    for h in handles:
        h.remove()
    return [seen[n] for n in names]


def torchdistill_variant(
    row: Any, teacher: nn.Module, student: nn.Module, athooks_loss: Any, x_probe: Tensor
) -> tuple[Step, Callable[..., Tensor]]:
    """torchdistill's loss module for the same method, on tensors its hook managers keep."""
    from torchdistill.core.forward_hook import ForwardHookManager
    from torchdistill.losses import mid_level as td

    prepare(teacher, student)
    names = layers_on(row.recipe, student)
    method = row.loss
    t_hooks, s_hooks = (
        ForwardHookManager(torch.device("cpu")),
        ForwardHookManager(torch.device("cpu")),
    )

    def hook(path: str, *, inputs: bool = False) -> None:
        for hooks, model in ((t_hooks, teacher), (s_hooks, student)):
            hooks.add_hook(model, path, requires_input=inputs, requires_output=not inputs)

    weight = TD_WEIGHTS.get(method, 1.0)
    uses_logits = False
    extra_params: list[nn.Parameter] = []
    criterion: Callable[[dict[str, Any], dict[str, Any]], Tensor]
    if method == "at":
        for n in names:
            hook(n)
        pairs = {
            f"pair{i}": {
                "teacher": {"io": "output", "path": n},
                "student": {"io": "output", "path": n},
                "weight": 1,
            }
            for i, n in enumerate(names)
        }
        criterion = td.ATLoss(pairs, mode="code")
        weight = float(row.recipe.options.get("beta", weight))
    elif method in ("pkt", "rkd"):
        hook("fc", inputs=True)
        if method == "pkt":
            criterion = td.PKTLoss("fc", "input", "fc", "input")
        else:  # RKDLoss reads a module's output: the embedding is the classifier's input
            rkd = td.RKDLoss("fc", "fc", dist_factor=25.0, angle_factor=50.0, reduction="mean")

            def criterion(s_io: dict[str, Any], t_io: dict[str, Any]) -> Tensor:
                as_output = {"fc": {"output": s_io["fc"]["input"]}}
                out: Tensor = rkd(as_output, {"fc": {"output": t_io["fc"]["input"]}})
                return out
    elif method == "sp":
        hook(names[-1])
        criterion = td.SPKDLoss(names[-1], names[-1], reduction="batchmean")
    elif method == "fsp":
        for n in names:
            hook(n)
        pairs = {
            f"pair{i}": {
                "teacher_first": {"io": "output", "path": a},
                "teacher_second": {"io": "output", "path": b},
                "student_first": {"io": "output", "path": a},
                "student_second": {"io": "output", "path": b},
                "weight": 1,
            }
            for i, (a, b) in enumerate(itertools.pairwise(names))
        }
        criterion = td.FSPLoss(pairs)
    elif method in ("kd", "dist", "logit_std"):
        uses_logits = True
        if method == "kd":
            t = float(row.recipe.options.get("temperature", 4.0))
            kd = td.KDLoss("s", "output", "t", "output", temperature=t, alpha=0.0, beta=1.0)
            weight = float(row.recipe.options.get("weight", 0.9)) * t * t
        elif method == "logit_std":
            t = float(row.recipe.options.get("temperature", 2.0))
            kd = td.LogitStdKDLoss("s", "output", "t", "output", temperature=t, alpha=0.0, beta=1.0)
            weight = float(row.recipe.options.get("weight", 9.0)) * t * t
        else:
            tau = float(getattr(athooks_loss, "tau", getattr(athooks_loss, "temperature", 1.0)))
            kd = td.DISTLoss(
                "s",
                "output",
                "t",
                "output",
                beta=float(getattr(athooks_loss, "beta", 1.0)),
                gamma=float(getattr(athooks_loss, "gamma", 1.0)),
                tau=tau,
            )
        criterion = kd
    elif method in TD_LEARNED:
        from torchdistill.models import wrapper as tdw

        if method in ("cc", "crd"):
            hook("fc", inputs=True)
            (d_t,), (d_s,) = (
                probe(teacher, ["fc"], x_probe, True),
                probe(student, ["fc"], x_probe, True),
            )
            if method == "cc":
                heads = nn.ModuleList([nn.Linear(d_s[1], 128), nn.Linear(d_t[1], 128)])
                kernel = {"type": "gaussian", "gamma": 0.4, "max_p": 2}
                cc = td.CCKDLoss("s", "t", kernel_config=kernel, reduction="batchmean")
                weight = 0.02

                def criterion(s_io: dict[str, Any], t_io: dict[str, Any]) -> Tensor:
                    s_emb = heads[0](s_io["fc"]["input"].flatten(1))
                    t_emb = heads[1](t_io["fc"]["input"].flatten(1))
                    out: Tensor = cc({"s": {"output": s_emb}}, {"t": {"output": t_emb}})
                    return out

            else:
                heads = nn.ModuleList(
                    [
                        tdw.Normalizer4CRD(nn.Linear(d_s[1], 128)),
                        tdw.Normalizer4CRD(nn.Linear(d_t[1], 128)),
                    ]
                )
                nce_k = 16384
                crd = td.CRDLoss("s", "empty", "t", 128, N_DATA, nce_k, N_DATA, 0.07, 0.5)
                heads.append(crd)  # its memory banks are buffers: counted in its memory
                weight = 0.8

                def criterion(s_io: dict[str, Any], t_io: dict[str, Any]) -> Tensor:
                    s_emb = heads[0](s_io["fc"]["input"].flatten(1))
                    t_emb = heads[1](t_io["fc"]["input"].flatten(1))
                    b = s_emb.shape[0]
                    pos = torch.arange(b) * 7 % N_DATA
                    # torchdistill 1.1.5's own draw() reads a misspelt attribute: give it
                    # RepDistiller's uniform draw (the positive first)
                    contrast = torch.randint(0, N_DATA, (b, nce_k + 1))
                    contrast[:, 0] = pos
                    supp = {"pos_idx": pos, "contrast_idx": contrast}
                    out: Tensor = crd(
                        {"s": {"output": s_emb}, "empty": {"input": supp}}, {"t": {"output": t_emb}}
                    )
                    return out

        else:
            for n in names:
                hook(n)
            t_shapes, s_shapes = probe(teacher, names, x_probe), probe(student, names, x_probe)
            if method == "vid":
                heads = nn.ModuleList(
                    [
                        tdw.Regressor4VID(s[1], t[1], t[1], eps=1e-5, init_pred_var=5.0)
                        for s, t in zip(s_shapes, t_shapes, strict=True)
                    ]
                )
                vid = td.VIDLoss(
                    {
                        f"p{i}": {
                            "teacher": {"io": "output", "path": n},
                            "student": {"io": "output", "path": f"r{i}"},
                        }
                        for i, n in enumerate(names)
                    }
                )
            elif method == "ab":
                heads = nn.ModuleList(
                    [
                        nn.Sequential(nn.Conv2d(s[1], t[1], 1, bias=False), nn.BatchNorm2d(t[1]))
                        for s, t in zip(s_shapes, t_shapes, strict=True)
                    ]
                )
                vid = td.AltActTransferLoss(
                    {
                        f"p{i}": {
                            "teacher": {"io": "output", "path": n},
                            "student": {"io": "output", "path": f"r{i}"},
                        }
                        for i, n in enumerate(names)
                    },
                    margin=1.0,
                    reduction="mean",
                )
            else:  # ft: a frozen paraphraser's encoder on the teacher, a translator on the student
                (t_shape,), (s_shape,) = t_shapes[-1:], s_shapes[-1:]
                paraphraser = tdw.Paraphraser4FactorTransfer(0.5, t_shape[1], uses_decoder=False)
                for p in paraphraser.parameters():
                    p.requires_grad_(False)
                paraphraser.eval()
                translator = tdw.Translator4FactorTransfer(s_shape[1], int(t_shape[1] * 0.5))
                heads = nn.ModuleList([translator, paraphraser])
                ft = td.FTLoss(p=1, reduction="mean")
                weight = float(getattr(athooks_loss, "beta", 500.0))

                def criterion(s_io: dict[str, Any], t_io: dict[str, Any]) -> Tensor:
                    with torch.no_grad():
                        factor_t = paraphraser(t_io[names[-1]]["output"])
                    factor_s = translator(s_io[names[-1]]["output"])
                    out: Tensor = ft(
                        {"translator": {"output": factor_s}}, {"paraphraser": {"output": factor_t}}
                    )
                    return out

            if method in ("vid", "ab"):

                def criterion(s_io: dict[str, Any], t_io: dict[str, Any]) -> Tensor:
                    mapped = {
                        f"r{i}": {"output": head(s_io[n]["output"])}
                        for i, (n, head) in enumerate(zip(names, heads, strict=True))
                    }
                    out: Tensor = vid(mapped, t_io)
                    return out

        extra_params = [p for p in heads.parameters() if p.requires_grad]
    else:
        raise ValueError(f"no torchdistill variant for {method!r}")
    ce_weight = row.recipe.ce_weight
    update = update_fn([*student.parameters(), *extra_params])

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():  # torchdistill runs a frozen teacher first, without grad
            t_out = teacher(x)
        s_out = student(x)
        s_io, t_io = s_hooks.pop_io_dict(), t_hooks.pop_io_dict()
        if uses_logits:
            s_io, t_io = {"s": {"output": s_out}}, {"t": {"output": t_out}}
        return s_out, weight * criterion(s_io, t_io)

    def step(x: Tensor, y: Tensor) -> Tensor:
        logits, transfer = forward(x)
        return update(ce_weight * F.cross_entropy(logits, y) + transfer)

    return step, lambda x, y: forward(x)[1]


def variant_names(rows: Sequence[Any], with_td: bool) -> list[str]:
    names = ["floor"]
    for row in rows:
        names.append(f"athooks:{row.name}")
        if with_td and row.loss in torchdistill_methods():
            names.append(f"torchdistill:{row.name}")
    return names


def make(
    variant: str, rows: dict[str, Any], teacher: nn.Module, student: nn.Module, x_probe: Tensor
) -> tuple[Step, Callable[..., Tensor]]:
    if variant in ("floor", CONTROL):
        return floor_variant(teacher, student)
    kind, name = variant.split(":", 1)
    row = rows[name]
    if kind == "athooks":
        return athooks_variant(row, teacher, student)
    athooks_loss = athooks.loss(row.loss, **loss_options(row))
    return torchdistill_variant(row, teacher, student, athooks_loss, x_probe)


def build_all(
    setting: Any, rows: dict[str, Any], variants: Sequence[str], control: bool = True
) -> tuple[dict[str, Step], dict[str, float], dict[str, str]]:
    """Every variant on its own copy of the same models; their transfer losses; failures."""
    teacher, student = overhead.fresh_pair(setting)
    x, y = overhead.Options(torch.device("cpu")).batch(setting, seed=1)
    steps: dict[str, Step] = {}
    losses: dict[str, float] = {}
    failed: dict[str, str] = {}
    for variant in [*variants, *([CONTROL] if control else [])]:
        try:
            step, transfer = make(
                variant, rows, copy.deepcopy(teacher), copy.deepcopy(student), x[:2]
            )
            value = float(transfer(x, y).detach())
            step(x, y)  # the first step builds connectors, probes in-place writes
        except Exception as err:
            failed[variant] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            continue
        steps[variant] = step
        losses[variant] = value
    return steps, losses, failed


def memory_child(setting: Any, variant: str, methods: list[str] | None) -> dict[str, Any]:
    rows = {r.name: r for r in cost_rows(methods)}
    teacher, student = overhead.fresh_pair(setting)
    x, y = overhead.Options(torch.device("cpu")).batch(setting)
    step, _ = make(variant, rows, teacher, student, x[:2])
    before = overhead.current_rss()
    peak = overhead.peak_rss()
    for _ in range(MEMORY_STEPS):
        overhead.reset_peak_rss()
        step(x, y)
        peak = max(peak, overhead.peak_rss())
    return {"peak": float(peak), "before": float(before)}


def measure_memory(setting: Any, variant: str, methods: list[str] | None) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", "1"]
    cmd += ["--child", json.dumps(dataclasses.asdict(setting)), variant]
    if methods:
        cmd += ["--methods", ",".join(methods)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:160]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def cost_rows(methods: list[str] | None) -> list[Any]:
    """The zoo table's rows that train with a loss (the student row has nothing to measure)."""
    return [r for r in reproduce.zoo_rows(1e3, methods) if r.loss is not None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--methods", help="only these rows (comma-separated)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 12)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--jobs", type=int, default=2, help="memory children at once")
    parser.add_argument("--only", nargs="+", choices=("timing", "memory"), help="parts to run")
    parser.add_argument("--no-torchdistill", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",") if args.methods else None
    if args.smoke and methods is None:
        methods = ["AT", "KD", *[r.name for r in cost_rows(None) if r.provider][:2]]
    if args.child:
        setting = Setting(**json.loads(args.child[0]))
        print(json.dumps(memory_child(setting, args.child[1], methods)))
        return 0
    rounds = args.rounds if args.rounds is not None else (2 if args.smoke else 12)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    parts = set(args.only or ("timing", "memory"))
    with_td = have_torchdistill() and not args.no_torchdistill
    rows = {r.name: r for r in cost_rows(methods)}
    variants = variant_names(list(rows.values()), with_td)
    report = overhead.Report()
    started = datetime.datetime.now(datetime.timezone.utc)
    command = "python3 benchmarks/zoo_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    versions = f"torch {torch.__version__}"
    if with_td:
        import torchdistill

        versions += f", torchdistill {torchdistill.__version__}"
    report(f"## The zoo's cost per step{' (smoke)' if args.smoke else ''}")
    report()
    report(f"- date: {started:%Y-%m-%d %H:%M} UTC")
    report(f"- command: `{command.strip()}`")
    report(f"- machine: {reproduce.machine()}; {torch.get_num_threads()} torch thread(s)")
    report(f"- {versions}, Python {platform.python_version()}, commit {reproduce.commit()}")
    report(f"- load average at start (1, 5, 15 min): {overhead.load()}")
    report()
    t0 = time.perf_counter()
    timing: dict[str, Any] = {}
    memory: dict[str, dict[str, dict[str, Any]]] = {}
    agreement: dict[str, dict[str, float]] = {}
    failures: dict[str, dict[str, str]] = {}
    settings = settings_for(args.smoke, args.batch)
    for setting in settings:
        if "timing" in parts:
            steps, losses, failed = build_all(setting, rows, variants)
            agreement[setting.label] = losses
            failures[setting.label] = failed
            x, y = overhead.Options(torch.device("cpu")).batch(setting)
            start_load = overhead.load()
            budget = None if args.smoke else 150.0
            timing[setting.label] = overhead.interleaved(
                steps, x, y, torch.device("cpu"), warmup, rounds, budget=budget
            )
            n = len(timing[setting.label].cpu["floor"])
            report.progress(f"{setting.label}: {n} rounds, load {start_load} -> {overhead.load()}")
        if "memory" in parts:
            with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
                futures = {
                    v: pool.submit(measure_memory, setting, v, methods)
                    for v in [v for v in variants if v not in failures.get(setting.label, {})]
                }
                memory[setting.label] = {v: f.result() for v, f in futures.items()}
    write_tables(report, settings, rows, variants, timing, memory, agreement, failures)
    report(
        f"Load average at the end: {overhead.load()}; total time {time.perf_counter() - t0:.0f} s."
    )
    if args.out:
        pathlib.Path(args.out).write_text("\n".join(report.lines) + "\n")
    return 0


def write_tables(
    report: Any,
    settings: Sequence[Any],
    rows: dict[str, Any],
    variants: Sequence[str],
    timing: dict[str, Any],
    memory: dict[str, dict[str, dict[str, Any]]],
    agreement: dict[str, dict[str, float]],
    failures: dict[str, dict[str, str]],
) -> None:
    """One table: per method and setting, athooks' and torchdistill's cost over the floor."""
    report(
        "Step time: median of the round-by-round CPU-time ratios to the floor (interquartile "
        "range in brackets), one process, variants interleaved; peak memory: peak RSS of a "
        "fresh process doing 3 steps over the floor's. `floor (A/A)` is a second floor: the "
        "resolution of the run. Transfer loss: the value of the method's term on the same "
        "weights and batch (athooks / torchdistill, each with RepDistiller's weight)."
    )
    report()
    for setting in settings:
        t = timing.get(setting.label)
        mem = memory.get(setting.label, {})
        fails = failures.get(setting.label, {})
        values = agreement.get(setting.label, {})
        floor_mem = mem.get("floor", {}).get("peak")
        if t is not None:
            n = len(t.cpu["floor"])
            report(
                f"### {setting.label}: {n} rounds; floor step "
                f"{t.median('floor', 'cpu') * 1e3:.1f} ms CPU"
            )
        else:
            report(f"### {setting.label}")
        report()

        def time_cell(variant: str, t: Any = t, fails: dict[str, str] = fails) -> str:
            if variant in fails:
                return "fails"
            if t is None or variant not in t.cpu:
                return "-"
            return overhead._ratio_cell(t, variant, "cpu")

        def mem_cell(variant: str, mem: Any = mem, floor_mem: Any = floor_mem) -> str:
            m = mem.get(variant)
            if not m or floor_mem is None:
                return "-"
            if "error" in m:
                return "fails"
            return f"{m['peak'] / floor_mem:.3f} ({m['peak'] / overhead.MB:,.0f} MB)"

        floor_cell = f"1.000 ({floor_mem / overhead.MB:,.0f} MB)" if floor_mem else "-"
        table = [
            ("floor", "", "1.000", "", floor_cell, "", "", ""),
            (CONTROL, "", time_cell(CONTROL), "", "", "", "", "a second floor"),
        ]
        for name, row in rows.items():
            a, td = f"athooks:{name}", f"torchdistill:{name}"
            has_td = td in variants
            ratio = ""
            if a in values and td in values and values[td] != 0 and row.loss not in NO_RATIO:
                ratio = f"{values[a] / values[td]:.4f}"
            note = fails.get(a, "")
            if has_td and td in fails:
                note = (note + "; " if note else "") + f"torchdistill: {fails[td]}"
            layers = reads(row) or ", ".join(
                layers_on(row.recipe, overhead.build_model(setting.student))
            )
            table.append(
                (
                    name,
                    layers,
                    time_cell(a),
                    time_cell(td) if has_td else "",
                    mem_cell(a),
                    mem_cell(td) if has_td else "",
                    ratio,
                    note,
                )
            )
        report.table(
            (
                "method",
                "layers",
                "athooks: step time vs floor",
                "torchdistill: step time vs floor",
                "athooks: peak memory vs floor",
                "torchdistill: peak memory vs floor",
                "transfer loss athooks / torchdistill",
                "note",
            ),
            table,
        )


if __name__ == "__main__":
    sys.exit(main())
