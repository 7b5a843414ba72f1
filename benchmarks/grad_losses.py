"""Step time of the gradient-based losses relative to a plain cross-entropy step.

Variants run interleaved (A B C ... A B C ...) after warm-up on the same models and batch; the
table gives the median step time of each and its ratio to the plain step. One step is forward,
loss, backward and an SGD update of the student.

Run: python3 benchmarks/grad_losses.py [--steps 20] [--batch 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F  # noqa: N812

import athooks
from athooks import Distiller
from athooks.models import create_model

VARIANTS = ["ce", "ce+at", "ce+grad_at", "ce+symmetry", "ce+input_grad_l2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--teacher", default="wrn16_2")
    parser.add_argument("--student", default="wrn16_1")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    teacher = create_model(args.teacher).to(device)
    student = create_model(args.student).to(device)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    distillers = {
        "ce+at": Distiller(teacher, student, losses="at"),
        "ce+grad_at": Distiller(teacher, student, losses=athooks.loss("grad_at", beta=1.0)),
        "ce+symmetry": Distiller(teacher, student, losses=athooks.loss("symmetry", beta=1.0)),
        "ce+input_grad_l2": Distiller(teacher, student, losses=athooks.loss("input_grad_l2")),
    }

    def step(variant: str) -> float:
        d = distillers.get(variant)
        if d is not None:
            d.attach()  # outside the timed region: a training run attaches once
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = student(x)
        loss = F.cross_entropy(out, y) if d is None else F.cross_entropy(out, y) + d.loss(target=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if d is not None:
            d.detach()
        return elapsed

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(args.warmup + args.steps):
        for variant in VARIANTS:
            elapsed = step(variant)
            if i >= args.warmup:
                times[variant].append(elapsed)
    base = statistics.median(times["ce"])
    print(
        f"{args.teacher} -> {args.student}, batch {args.batch}, 32x32, {args.device}, "
        f"{args.steps} interleaved steps after {args.warmup} warm-up, torch {torch.__version__}"
    )
    print("| variant | median step (ms) | vs ce |")
    print("|---|---|---|")
    for variant in VARIANTS:
        med = statistics.median(times[variant])
        print(f"| {variant} | {med * 1e3:.1f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
