"""Train the demo's default teacher and ship it: ``athooks/demo/weights/``.

``athooks demo`` with its default settings loads these weights (``weights_only=True``) instead of
training its teacher for about two minutes; ``athooks demo --train-teacher`` trains it anyway.
The record next to the weights holds the settings (the demo's cache key), the test error the
weights reach on the 497 test digits (a test checks it), and how and where they were trained.

Usage:
    python3 benchmarks/train_demo_teacher.py
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict

import torch

import athooks
from athooks.demo.data import cluttered_digits
from athooks.demo.run import (
    TEACHER_BATCH,
    TEACHER_LR,
    TEACHER_SEED,
    WEIGHTS_DIR,
    DemoConfig,
    _teacher_key,
    evaluate,
    train_teacher,
)


def main() -> None:
    config = DemoConfig()
    x, y, x_test, y_test = cluttered_digits(config.data_seed)
    teacher, seconds = train_teacher(config, x, y)
    error = evaluate(teacher, x_test, y_test, config.device)
    stem = f"demo-teacher-{config.teacher}-{_teacher_key(config)}"
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), WEIGHTS_DIR / f"{stem}.pt")
    record = {
        "teacher": config.teacher,
        "test_error": error,  # a fraction of the 497 test digits, as DemoResult.teacher_error
        "settings": {
            **{k: v for k, v in asdict(config).items() if k != "train_teacher"},
            "teacher_seed": TEACHER_SEED,
            "teacher_batch": TEACHER_BATCH,
            "teacher_lr": TEACHER_LR,
        },
        "trained": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(seconds, 1),
            "torch": torch.__version__,
            "athooks": athooks.__version__,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "command": "python3 benchmarks/train_demo_teacher.py",
        },
    }
    (WEIGHTS_DIR / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{stem}: {100 * error:.2f}% test error, trained in {seconds:.0f} s")


if __name__ == "__main__":
    main()
