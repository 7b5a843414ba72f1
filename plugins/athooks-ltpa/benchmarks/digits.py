"""LTPA on the demo's cluttered digits: test error of WRN-16-1 with and without the LTPA head.

Same data, recipe and batch order as ``athooks demo`` (athooks.demo: SGD momentum 0.9, lr 0.1,
batch 32, weight decay 5e-4, cosine schedule, random shifts of up to 4 pixels), the same
initialisation of the backbone for both runs of a seed; the LTPA run adds the head of
``athooks_ltpa.attach(backbone)`` (layers "auto": the three WRN groups; g: the input of the
classifier) and classifies from its attention-weighted descriptors.

    python3 plugins/athooks-ltpa/benchmarks/digits.py --seeds 0 1 2

Prints a markdown table (one row per seed, then mean +- std) and the time of each run.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import athooks_ltpa
import torch

from athooks.demo.data import cluttered_digits
from athooks.demo.run import DemoConfig, evaluate, train
from athooks.models import create_model


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", type=int, default=1300, help="training images used")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--model", default="wrn16_1")
    parser.add_argument(
        "--layers",
        default="auto",
        help="'auto' or comma-separated layer names/patterns for the local features",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="train the LTPA runs only")
    parser.add_argument("--compatibility", default="pc", choices=["pc", "dp"])
    parser.add_argument("--normalise", default="softmax", choices=["softmax", "sigmoid"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x, y, x_test, y_test = cluttered_digits(0)
    x, y = x[: args.labels], y[: args.labels]
    base_config = DemoConfig(epochs=args.epochs, labels=args.labels)
    rows = []
    for seed in args.seeds:
        config = replace(base_config, seed=seed)
        torch.manual_seed(seed + 100)
        baseline = create_model(args.model, num_classes=10, in_chans=1)
        backbone = create_model(args.model, num_classes=10, in_chans=1)
        backbone.load_state_dict(baseline.state_dict())  # the same initialisation
        torch.manual_seed(seed + 200)
        layers = args.layers if args.layers == "auto" else args.layers.split(",")
        head = athooks_ltpa.attach(
            backbone,
            layers=layers,
            compatibility=args.compatibility,
            normalise=args.normalise,
            input_size=(1, 32, 32),
        )
        t_base, e_base = float("nan"), float("nan")
        if not args.skip_baseline:
            t_base = train(baseline, x, y, epochs=args.epochs, config=config, progress=False)
            e_base = evaluate(baseline, x_test, y_test)
        t_ltpa = train(head, x, y, epochs=args.epochs, config=config, progress=False)
        e_ltpa = evaluate(head, x_test, y_test)
        rows.append((seed, e_base, e_ltpa, t_base, t_ltpa))
        print(
            f"seed {seed}: baseline {100 * e_base:.1f}% ({t_base:.0f} s), "
            f"LTPA {100 * e_ltpa:.1f}% ({t_ltpa:.0f} s)",
            flush=True,
        )

    layers = ", ".join(s.name for s in head.local_layers)
    print()
    print(
        f"{args.model} on cluttered digits, {args.labels} training images, {args.epochs} epochs, "
        f"batch {base_config.batch}, lr {base_config.lr}; LTPA {args.compatibility}/"
        f"{args.normalise} at {layers}; test error on 497 images"
    )
    print()
    print("| seed | baseline error (%) | LTPA error (%) | baseline time (s) | LTPA time (s) |")
    print("|---|---|---|---|---|")
    for seed, e_base, e_ltpa, t_base, t_ltpa in rows:
        print(f"| {seed} | {100 * e_base:.1f} | {100 * e_ltpa:.1f} | {t_base:.0f} | {t_ltpa:.0f} |")
    if len(rows) > 1:
        base = [100 * r[1] for r in rows]
        ltpa = [100 * r[2] for r in rows]
        print(
            f"| mean +- std | {statistics.mean(base):.1f} +- {statistics.stdev(base):.1f} | "
            f"{statistics.mean(ltpa):.1f} +- {statistics.stdev(ltpa):.1f} | | |"
        )
        better = sum(r[2] < r[1] for r in rows)
        print(f"\nLTPA lower error in {better} of {len(rows)} seeds")


if __name__ == "__main__":
    main()
