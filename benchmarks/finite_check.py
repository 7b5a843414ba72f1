"""Cost of Distiller(..., check_finite=True): step time with and without the NaN/Inf check.

The check stacks one ``isfinite(map).all()`` flag per captured map and reads the result once per
step, so its cost is a handful of small reductions plus one device synchronisation (on a GPU the
synchronisation is the part that matters: it stalls the queue of asynchronous kernels). The two
variants run interleaved (A B A B ...) after warm-up, on the same models and batch; the table gives
median step times and their ratio. One step is forward, loss, backward and an SGD update. On a
busy machine the ratio is noisy; the time of the check alone, measured last, is not.

Run: python3 benchmarks/finite_check.py [--steps 30] [--batch 32] [--layers blocks] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F  # noqa: N812

from athooks import Distiller
from athooks.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--teacher", default="wrn16_2")
    parser.add_argument("--student", default="wrn16_1")
    parser.add_argument("--layers", default="auto", help="'auto' (3 stages) or 'blocks'")
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
        "no check": Distiller(teacher, student, layers=args.layers),
        "check_finite": Distiller(teacher, student, layers=args.layers, check_finite=True),
    }
    n_maps = 2 * len(distillers["no check"].pairs)

    def step(d: Distiller) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with d:
            loss = F.cross_entropy(student(x), y) + d.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in distillers}
    for i in range(args.warmup + args.steps):
        for name, d in distillers.items():
            elapsed = step(d)
            if i >= args.warmup:
                times[name].append(elapsed)
    base = statistics.median(times["no check"])
    print(
        f"{args.teacher} -> {args.student}, batch {args.batch}, {n_maps} maps checked per step, "
        f"{args.device}, {args.steps} steps each, interleaved"
    )
    print("| variant | median step (ms) | ratio |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.1f} | {median / base:.3f} |")

    # the check alone, on the captures of one step: robust to a busy machine, unlike the ratio
    d = distillers["check_finite"]
    with d:
        student(x)
        t_values, s_values = d._collect_values(d._check_ready())
        check: list[float] = []
        for _ in range(200):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            d._check_finite(t_values, s_values)  # ends with its own synchronisation
            check.append(time.perf_counter() - start)
        d.loss()
    alone = statistics.median(check)
    print(
        f"the check alone: median {alone * 1e3:.3f} ms per step "
        f"({alone / base:.2%} of the step without it)"
    )


if __name__ == "__main__":
    main()
