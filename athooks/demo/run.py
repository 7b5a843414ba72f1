"""The demo: a teacher that has seen all the data, a student with few labels, with and without AT.

1. A teacher (WRN-16-2) is trained on all 1,300 training images (cached on disk, keyed by its
   settings, so later runs skip this).
2. A student (WRN-16-1) is trained on the first ``labels`` training images only, twice from the
   same initialisation and the same batch order: once with cross-entropy alone, once with
   cross-entropy plus attention transfer from the teacher.
3. With ``unlabeled=True``, a third student from the same initialisation learns with AT on the
   other training images as well, as unlabeled data: each step adds a batch of them to the
   labelled batch, cross-entropy on the labelled part, ``d.loss()`` on the whole.
4. The students are evaluated on the 497 test images; a table, a figure of attention maps and the
   models' weights (`teacher.pt`, `student.pt`, `student-at.pt`, and `student-at-unlabeled.pt`)
   are written.
"""

from __future__ import annotations

import copy
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
from tqdm import tqdm  # type: ignore[import-untyped]

from athooks.demo.data import N_TRAIN, cluttered_digits
from athooks.distiller import Distiller
from athooks.errors import ConfigurationError
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
    unlabeled: bool = False  # also a student with AT on the unlabelled training images


@dataclass
class DemoResult:
    """What the demo measured."""

    config: DemoConfig
    teacher_error: float
    baseline_error: float
    at_error: float
    times: dict[str, float] = field(default_factory=dict)
    figure: str | None = None
    unlabeled_error: float | None = None
    """The test error of the student with AT on the unlabeled images too (``None`` without
    ``config.unlabeled``)."""
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)
    """The trained models: ``teacher``, ``student`` (baseline), ``student + AT`` and, with
    ``config.unlabeled``, ``student + AT, unlabeled``."""

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
        if self.unlabeled_error is not None:
            rows.append(
                f"| student + AT, + {self.unlabeled_images} unlabeled images | "
                f"{100 * self.unlabeled_error:.1f} | {self.times.get('at_unlabeled', 0):.0f} |"
            )
        head = "| model | test error (%) | time (s) |\n|---|---|---|\n"
        tail = f"\nrelative error reduction by AT: {100 * self.relative_reduction:.1f}%"
        if self.unlabeled_error is not None:
            share = (self.baseline_error - self.unlabeled_error) / self.baseline_error
            tail += f"\nrelative error reduction by AT with unlabeled images: {100 * share:.1f}%"
        return head + "\n".join(rows) + tail

    @property
    def unlabeled_images(self) -> int:
        """How many training images the student has no label for (1300 - ``config.labels``)."""
        return max(N_TRAIN - self.config.labels, 0)


def _progress_bar(label: str, epochs: int, enabled: bool) -> Any:
    """One tqdm bar per run on stderr, in epochs, with an ETA (``enabled=False``: silent)."""
    return tqdm(
        total=epochs,
        desc=f"{label:<10}",
        unit="epoch",
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        bar_format="{desc} {bar:20} epoch {n_fmt:>3}/{total_fmt} [{elapsed}<{remaining}]{postfix}",
    )


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
    unlabeled: Tensor | None = None,
) -> float:
    """Train ``model`` with SGD (momentum 0.9, cosine learning rate) and return the time taken.

    An epoch is one pass over the labelled images ``x``. With ``unlabeled`` images, each step
    also draws as many of them as the labelled batch holds (cycling through them in an order of
    their own generator, so the labelled batches stay those of a run without them), runs the
    student once on both (concatenated), takes the cross-entropy on the labelled part only and
    ``distiller.loss()`` (without labels) on the whole batch.

    Args:
        model: The model to train.
        x: Training images.
        y: Training labels.
        epochs: Number of epochs.
        config: Batch size, learning rate, weight decay, seed.
        distiller: Adds ``distiller.loss(target=labels)`` to the cross-entropy when given
            (``distiller.loss()`` with ``unlabeled``: the batch has labels for its first part
            only).
        label: Name shown in the progress bar.
        progress: Whether to show the progress bar (tqdm, on stderr).
        ce_weight: Factor of the cross-entropy (``1 - alpha`` for KD as in the authors' code).
        unlabeled: Images without labels for the distiller, ``(M, C, H, W)``; needs
            ``distiller``.

    Returns:
        Seconds.

    Raises:
        ConfigurationError: If ``unlabeled`` is given without a distiller, or holds no image.

    Example:
        ```python
        import torch
        from athooks import Distiller, loss
        from athooks.demo.run import DemoConfig, train
        from athooks.models import create_model

        config = DemoConfig(batch=4)
        teacher = create_model("wrn16_1", num_classes=10, in_chans=1)
        student = create_model("wrn16_1", num_classes=10, in_chans=1)
        x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
        extra = torch.randn(6, 1, 32, 32)  # images without labels
        d = Distiller(teacher, student, losses=loss("at", beta=300))
        seconds = train(student, x, y, epochs=1, config=config, distiller=d, unlabeled=extra,
                        progress=False)
        ```
    """
    if unlabeled is not None and (distiller is None or len(unlabeled) == 0):
        raise ConfigurationError(
            "train(unlabeled=...): unlabeled images only reach the student through "
            "distiller.loss(), so they need a distiller and at least one image; got "
            f"distiller={'None' if distiller is None else 'a Distiller'} and "
            f"{len(unlabeled)} unlabeled images. Pass distiller=Distiller(teacher, model, ...), "
            "or leave unlabeled=None"
        )
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
    pool = _Cycle(unlabeled, config.seed + 2) if unlabeled is not None else None
    bar = _progress_bar(label, epochs, progress)
    start = time.perf_counter()
    model.train()
    context = distiller if distiller is not None else _Nothing()
    with context:
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=order)
            total, correct, seen = 0.0, 0, 0
            for i in range(0, len(x), config.batch):
                idx = perm[i : i + config.batch]
                xb = random_shift(x[idx], config.shift, order, config.pad_mode, config.flip)
                n = len(idx)
                if pool is not None:  # as many unlabeled images, augmented alike
                    extra = random_shift(
                        pool.take(n), config.shift, pool.generator, config.pad_mode, config.flip
                    )
                    xb = torch.cat([xb, extra])
                xb = xb.to(device)
                yb = y[idx].to(device)
                out = model(xb)
                loss = ce_weight * F.cross_entropy(out[:n], yb)
                if distiller is not None:
                    loss = loss + distiller.loss(target=yb if pool is None else None)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                sched.step()
                total += loss.item() * n
                correct += int((out[:n].argmax(1) == yb).sum())
                seen += n
            bar.set_postfix(
                {"loss": f"{total / seen:.4f}", "train acc": f"{100 * correct / seen:.1f}%"},
                refresh=False,
            )
            bar.update(1)
    bar.close()
    return time.perf_counter() - start


class _Cycle:
    """Batches of unlabeled images, cycling through them in a random order of their own."""

    def __init__(self, images: Tensor, seed: int) -> None:
        self.images = images
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(images), generator=self.generator)
        self.next = 0

    def take(self, n: int) -> Tensor:
        """The next ``n`` images (a new order each time the images run out)."""
        picked = []
        while n > 0:
            if self.next == len(self.order):
                self.order = torch.randperm(len(self.images), generator=self.generator)
                self.next = 0
            k = min(n, len(self.order) - self.next)
            picked.append(self.order[self.next : self.next + k])
            self.next, n = self.next + k, n - k
        return self.images[torch.cat(picked)]


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
        progress: Show a progress bar per run (tqdm, on stderr).
        figure: Write the attention-map figure (needs matplotlib).

    Returns:
        The result.

    Raises:
        ConfigurationError: If ``config.unlabeled`` is set but the student has labels for every
            training image (``labels >= 1300``).
    """
    config = config or DemoConfig()
    if config.unlabeled and config.labels >= N_TRAIN:
        raise ConfigurationError(
            f"DemoConfig(unlabeled=True, labels={config.labels}): the student has labels for "
            f"all {N_TRAIN} training images, so none is left as unlabeled data; give labels < "
            f"{N_TRAIN} (default 300), or unlabeled=False"
        )
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
    # a copy, not a third create_model: the global random state stays that of the default run
    with_unlabeled = copy.deepcopy(with_at) if config.unlabeled else None
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
    unlabeled_error = None
    if with_unlabeled is not None:
        unlabeled = x[config.labels :]  # the training images the student has no label for
        distiller = Distiller(teacher, with_unlabeled, losses=make_loss("at", beta=config.beta))
        times["at_unlabeled"] = train(
            with_unlabeled,
            x_few,
            y_few,
            epochs=config.epochs,
            config=config,
            distiller=distiller,
            label="AT+unlabeled",
            progress=progress,
            unlabeled=unlabeled,
        )
        unlabeled_error = evaluate(with_unlabeled, x_test, y_test, config.device)
    result = DemoResult(
        config=config,
        teacher_error=teacher_error,
        baseline_error=evaluate(baseline, x_test, y_test, config.device),
        at_error=evaluate(with_at, x_test, y_test, config.device),
        times=times,
        unlabeled_error=unlabeled_error,
    )
    if figure:
        from athooks.demo.figure import attention_figure

        path = out_dir / "attention-maps.png"
        attention_figure(teacher, baseline, with_at, x_test[:2], path, config.device)
        result.figure = str(path)
    result.models = {"teacher": teacher, "student": baseline, "student + AT": with_at}
    files = {"teacher": teacher, "student": baseline, "student-at": with_at}
    if with_unlabeled is not None:
        result.models["student + AT, unlabeled"] = with_unlabeled
        files["student-at-unlabeled"] = with_unlabeled
    for name, model in files.items():
        torch.save(model.state_dict(), out_dir / f"{name}.pt")
    (out_dir / "results.json").write_text(json.dumps(result.as_dict(), indent=2, default=str))
    (out_dir / "results.md").write_text(result.table() + "\n")
    return result
