"""The demo: a teacher that has seen all the data, a student with few labels, with and without AT.

1. A teacher (WRN-16-2) is trained on all 1,300 training images (cached on disk, keyed by its
   settings, so later runs skip this).
2. A student (WRN-16-1) is trained on the first ``labels`` training images only, twice from the
   same initialisation and the same batch order: once with cross-entropy alone, once with
   cross-entropy plus attention transfer from the teacher.
3. Both are evaluated on the 497 test images; a table, a figure of attention maps and the three
   models' weights (`teacher.pt`, `student.pt`, `student-at.pt`) are written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from athooks.demo.data import cluttered_digits
from athooks.distiller import Distiller
from athooks.losses.base import loss as make_loss
from athooks.models import create_model

__all__ = ["DemoConfig", "DemoResult", "run_demo", "shipped_teacher", "train", "train_teacher"]

TEACHER_SEED = 0
TEACHER_BATCH = 32  # the teacher's recipe is fixed: the cache key below names it
TEACHER_LR = 0.1


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo.

    The defaults were chosen by measurement (seed 0, the same cached teacher; see the docs page
    "The demo" for the numbers): the student learns from 300 labels, where AT helps, and with
    random translations of up to 4 pixels. Without them the student memorised its 300 images
    (80% test error) and, at batch 64 with lr 0.05, 200 SGD steps left it at 53%. Batch 32 with
    lr 0.1 gave 16% without and 12% with AT at beta 100, in about 40 s for both students on two
    CPU cores. Over seeds 0-2, AT beat the baseline in 1 of 3 seeds at beta 30, 2 of 3 at 100
    and 3 of 3 at 300 (mean test error 13.9% against 16.0%), hence beta 300.
    """

    teacher: str = "wrn16_2"
    student: str = "wrn16_1"
    teacher_epochs: int = 30
    epochs: int = 40
    labels: int = 300
    beta: float = 300.0
    seed: int = 0
    data_seed: int = 0
    batch: int = 32
    lr: float = 0.1
    weight_decay: float = 5e-4
    shift: int = 4
    flip: bool = False  # horizontal flips (the paper's CIFAR protocol; wrong for digits)
    pad_mode: str = "constant"  # "reflect" in the paper's CIFAR protocol
    schedule: str = "cosine"  # or "paper": lr x0.2 at 30%, 60% and 80% of the epochs
    device: str = "cpu"
    train_teacher: bool = False  # train the teacher even where shipped weights fit the settings


@dataclass
class DemoResult:
    """What the demo measured."""

    config: DemoConfig
    teacher_error: float
    baseline_error: float
    at_error: float
    times: dict[str, float] = field(default_factory=dict)
    figure: str | None = None
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)
    """The trained models: ``teacher``, ``student`` (baseline) and ``student + AT``."""

    def as_dict(self) -> dict[str, Any]:
        """The results and settings, without the models (for JSON)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "models"}
        out["config"] = asdict(self.config)
        return out

    @property
    def relative_reduction(self) -> float:
        """``(baseline - at) / baseline``: the share of the baseline's errors AT removed."""
        return (self.baseline_error - self.at_error) / self.baseline_error

    def table(self) -> str:
        """The results as a markdown table."""
        c = self.config
        rows = [
            f"| teacher {c.teacher}, {c.teacher_epochs} epochs, all 1300 images | "
            f"{100 * self.teacher_error:.1f} | {self.times.get('teacher', 0):.0f} |",
            f"| student {c.student}, {c.labels} labels, {c.epochs} epochs | "
            f"{100 * self.baseline_error:.1f} | {self.times.get('baseline', 0):.0f} |",
            f"| student + AT (beta {c.beta:g}) | {100 * self.at_error:.1f} | "
            f"{self.times.get('at', 0):.0f} |",
        ]
        head = "| model | test error (%) | time (s) |\n|---|---|---|\n"
        tail = f"\nrelative error reduction by AT: {100 * self.relative_reduction:.1f}%"
        return head + "\n".join(rows) + tail


class _Progress:
    """A one-line progress report per run, on stderr."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.start = time.perf_counter()

    def update(self, epoch: int, loss: float, acc: float) -> None:
        if not self.enabled:
            return
        done = int(20 * epoch / self.total)
        bar = "#" * done + "." * (20 - done)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(
            f"\r{self.label:<10} [{bar}] epoch {epoch:>3}/{self.total} loss {loss:7.4f} "
            f"train acc {100 * acc:5.1f}% {elapsed:5.0f}s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    config: DemoConfig,
    distiller: Distiller | None = None,
    label: str = "train",
    progress: bool = True,
    ce_weight: float = 1.0,
) -> float:
    """Train ``model`` with SGD (momentum 0.9, cosine learning rate) and return the time taken.

    Args:
        model: The model to train.
        x: Training images.
        y: Training labels.
        epochs: Number of epochs.
        config: Batch size, learning rate, weight decay, seed.
        distiller: Adds ``distiller.loss(target=labels)`` to the cross-entropy when given.
        label: Name shown in the progress line.
        progress: Whether to show the progress line.
        ce_weight: Factor of the cross-entropy (``1 - alpha`` for KD as in the authors' code).

    Returns:
        Seconds.
    """
    device = torch.device(config.device)
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(x) / config.batch)
    sched: torch.optim.lr_scheduler.LRScheduler
    if config.schedule == "paper":  # 60/120/160 of 200 epochs, in steps
        marks = [int(f * epochs) * steps_per_epoch for f in (0.3, 0.6, 0.8)]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, marks, gamma=0.2)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(config.seed + 1)  # the same batches for every run
    bar = _Progress(label, epochs, progress)
    start = time.perf_counter()
    model.train()
    context = distiller if distiller is not None else _Nothing()
    with context:
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(len(x), generator=order)
            total, correct, seen = 0.0, 0, 0
            for i in range(0, len(x), config.batch):
                idx = perm[i : i + config.batch]
                xb = random_shift(x[idx], config.shift, order, config.pad_mode, config.flip)
                xb = xb.to(device)
                yb = y[idx].to(device)
                out = model(xb)
                loss = ce_weight * F.cross_entropy(out, yb)
                if distiller is not None:
                    loss = loss + distiller.loss(target=yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                correct += int((out.argmax(1) == yb).sum())
                seen += len(idx)
            bar.update(epoch, total / seen, correct / seen)
    bar.close()
    return time.perf_counter() - start


def random_shift(
    x: Tensor,
    shift: int,
    generator: torch.Generator,
    pad_mode: str = "constant",
    flip: bool = False,
) -> Tensor:
    """Translate each image by up to ``shift`` pixels (pad, crop at random), maybe flip it.

    The CIFAR protocol of the paper reflect-pads by 4, crops and flips horizontally; digits
    must not be flipped, and are padded with their background.

    Args:
        x: Images ``(N, C, H, W)``; the background is the smallest value.
        shift: The largest translation in pixels (0: none).
        generator: The random generator.
        pad_mode: ``"constant"`` (the background) or ``"reflect"``.
        flip: Flip half of the images horizontally, at random.

    Returns:
        The augmented images.
    """
    if flip:
        mask = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = (shift, shift, shift, shift)
    if pad_mode == "reflect":
        padded = F.pad(x, pad, mode="reflect")
    else:
        padded = F.pad(x, pad, value=float(x.min()))
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator)
    return torch.stack(
        [padded[i, :, r : r + h, c : c + w] for i, (r, c) in enumerate(offsets.tolist())]
    )


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, device: str = "cpu") -> float:
    """Test error (fraction misclassified) in eval mode."""
    model.eval()
    wrong = 0
    for i in range(0, len(x), 256):
        out = model(x[i : i + 256].to(device))
        wrong += int((out.argmax(1).cpu() != y[i : i + 256]).sum())
    return wrong / len(x)


def cache_dir() -> Path:
    """Where trained demo teachers are kept: ``$ATHOOKS_CACHE``, else ``~/.cache/athooks``."""
    root = os.environ.get("ATHOOKS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "athooks"
    )
    return Path(root)


def _teacher_key(config: DemoConfig) -> str:
    settings = {
        "model": config.teacher,
        "epochs": config.teacher_epochs,
        "data_seed": config.data_seed,
        "batch": TEACHER_BATCH,
        "lr": TEACHER_LR,
        "weight_decay": config.weight_decay,
        "shift": config.shift,
        "version": 3,  # 2 cached teachers trained with the student's batch and lr
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


#: Where the package keeps the demo's default teacher (trained by
#: ``benchmarks/train_demo_teacher.py``, with its settings and test error next to it).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def shipped_teacher(config: DemoConfig) -> tuple[Path, dict[str, Any]] | None:
    """The shipped teacher weights that fit ``config``'s teacher settings, and their record.

    Args:
        config: The demo's settings.

    Returns:
        The weights file and its record (settings, test error, how it was trained), or ``None``
        when none fits (another teacher model, epochs, data seed...).
    """
    stem = f"demo-teacher-{config.teacher}-{_teacher_key(config)}"
    weights, record = WEIGHTS_DIR / f"{stem}.pt", WEIGHTS_DIR / f"{stem}.json"
    if not weights.exists() or not record.exists():
        return None
    return weights, json.loads(record.read_text())


def train_teacher(
    config: DemoConfig, x: Tensor, y: Tensor, *, progress: bool = True
) -> tuple[nn.Module, float]:
    """Train the demo's teacher with its fixed recipe (seed, batch and lr of the cache key).

    Args:
        config: The demo's settings (its teacher, epochs, data and augmentation).
        x: The training images.
        y: Their labels.
        progress: Show a progress line.

    Returns:
        The teacher and the seconds its training took.
    """
    torch.manual_seed(TEACHER_SEED)
    teacher = create_model(config.teacher, num_classes=10, in_chans=1).to(config.device)
    teacher_config = replace(config, seed=TEACHER_SEED, batch=TEACHER_BATCH, lr=TEACHER_LR)
    seconds = train(
        teacher,
        x,
        y,
        epochs=config.teacher_epochs,
        config=teacher_config,
        label="teacher",
        progress=progress,
    )
    return teacher, seconds


def run_demo(
    config: DemoConfig | None = None,
    out: str | os.PathLike[str] = "athooks-demo",
    *,
    progress: bool = True,
    figure: bool = True,
) -> DemoResult:
    """Run the demo end to end and return what it measured.

    Args:
        config: The settings (defaults: :class:`DemoConfig`).
        out: Folder for the figure and the results.
        progress: Show a progress line per run.
        figure: Write the attention-map figure (needs matplotlib).

    Returns:
        The result.
    """
    config = config or DemoConfig()
    device = torch.device(config.device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    x, y, x_test, y_test = cluttered_digits(config.data_seed)
    times: dict[str, float] = {}

    torch.manual_seed(TEACHER_SEED)  # one teacher for every student seed (and one cache entry)
    teacher: nn.Module = create_model(config.teacher, num_classes=10, in_chans=1).to(device)
    shipped = None if config.train_teacher else shipped_teacher(config)
    cached = cache_dir() / f"demo-teacher-{config.teacher}-{_teacher_key(config)}.pt"
    if shipped is not None:
        teacher.load_state_dict(torch.load(shipped[0], map_location=device, weights_only=True))
        times["teacher"] = 0.0
        if progress:
            print(
                f"teacher: the shipped weights ({100 * shipped[1]['test_error']:.2f}% test error; "
                "--train-teacher trains it here)",
                file=sys.stderr,
            )
    elif cached.exists() and not config.train_teacher:
        teacher.load_state_dict(torch.load(cached, map_location=device, weights_only=True))
        times["teacher"] = 0.0
        if progress:
            print(f"teacher: loaded from {cached}", file=sys.stderr)
    else:
        teacher, times["teacher"] = train_teacher(config, x, y, progress=progress)
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), cached)
    teacher_error = evaluate(teacher, x_test, y_test, config.device)

    x_few, y_few = x[: config.labels], y[: config.labels]
    torch.manual_seed(config.seed + 100)
    baseline = create_model(config.student, num_classes=10, in_chans=1).to(device)
    with_at = create_model(config.student, num_classes=10, in_chans=1).to(device)
    with_at.load_state_dict(baseline.state_dict())  # the same initialisation
    times["baseline"] = train(
        baseline,
        x_few,
        y_few,
        epochs=config.epochs,
        config=config,
        label="baseline",
        progress=progress,
    )
    distiller = Distiller(teacher, with_at, losses=make_loss("at", beta=config.beta))
    times["at"] = train(
        with_at,
        x_few,
        y_few,
        epochs=config.epochs,
        config=config,
        distiller=distiller,
        label="AT",
        progress=progress,
    )
    result = DemoResult(
        config=config,
        teacher_error=teacher_error,
        baseline_error=evaluate(baseline, x_test, y_test, config.device),
        at_error=evaluate(with_at, x_test, y_test, config.device),
        times=times,
    )
    if figure:
        from athooks.demo.figure import attention_figure

        path = out_dir / "attention-maps.png"
        attention_figure(teacher, baseline, with_at, x_test[:2], path, config.device)
        result.figure = str(path)
    result.models = {"teacher": teacher, "student": baseline, "student + AT": with_at}
    for name, model in (("teacher", teacher), ("student", baseline), ("student-at", with_at)):
        torch.save(model.state_dict(), out_dir / f"{name}.pt")
    (out_dir / "results.json").write_text(json.dumps(result.as_dict(), indent=2, default=str))
    (out_dir / "results.md").write_text(result.table() + "\n")
    return result
