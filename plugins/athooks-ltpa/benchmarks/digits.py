"""LTPA on the demo's cluttered digits: test error of WRN-16-1 with and without the LTPA head.

Same data, recipe and batch order as ``athooks demo`` (athooks.demo: SGD momentum 0.9, lr 0.1,
batch 32, weight decay 5e-4, cosine schedule, random shifts of up to 4 pixels), the same
initialisation of the backbone for both runs of a seed; the LTPA run adds the head of
``athooks_ltpa.attach(backbone)`` (layers "auto": the three WRN groups; g: the input of the
classifier) and classifies from its attention-weighted descriptors.

    python3 plugins/athooks-ltpa/benchmarks/digits.py --seeds 0 1 2 --threads 1 \
        --layers auto layer2.0.relu1,layer3.0.relu1,relu

One LTPA run per ``--layers`` value, against one baseline per seed. Prints a markdown table (one
row per seed, then mean +- std) with the time of each run, and in how many seeds each LTPA run
beat the baseline. The measured table is in the package's README.
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
        nargs="+",
        default=["auto"],
        help="one LTPA run per value: 'auto' or comma-separated layer names/patterns",
    )
    parser.add_argument("--compatibility", default="pc", choices=["pc", "dp"])
    parser.add_argument("--normalise", default="softmax", choices=["softmax", "sigmoid"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x, y, x_test, y_test = cluttered_digits(0)
    x, y = x[: args.labels], y[: args.labels]
    base_config = DemoConfig(epochs=args.epochs, labels=args.labels)
    names = ["baseline"] + [f"LTPA {spec}" for spec in args.layers]
    errors: dict[str, list[float]] = {name: [] for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    chosen: dict[str, str] = {}
    for seed in args.seeds:
        config = replace(base_config, seed=seed)
        torch.manual_seed(seed + 100)
        baseline = create_model(args.model, num_classes=10, in_chans=1)
        init = baseline.state_dict()
        models: dict[str, torch.nn.Module] = {"baseline": baseline}
        for spec, name in zip(args.layers, names[1:], strict=True):
            backbone = create_model(args.model, num_classes=10, in_chans=1)
            backbone.load_state_dict(init)  # the same initialisation as the baseline
            torch.manual_seed(seed + 200)  # the same head initialisation for every seed
            head = athooks_ltpa.attach(
                backbone,
                layers=spec if spec == "auto" else spec.split(","),
                compatibility=args.compatibility,
                normalise=args.normalise,
                input_size=(1, 32, 32),
            )
            chosen[name] = ", ".join(s.name for s in head.local_layers)
            models[name] = head
        line = []
        for name, model in models.items():
            seconds = train(model, x, y, epochs=args.epochs, config=config, progress=False)
            error = evaluate(model, x_test, y_test)
            errors[name].append(100 * error)
            times[name].append(seconds)
            line.append(f"{name} {100 * error:.1f}% ({seconds:.0f} s)")
        print(f"seed {seed}: " + ", ".join(line), flush=True)

    print()
    print(
        f"{args.model} on cluttered digits, {args.labels} training images, {args.epochs} epochs, "
        f"batch {base_config.batch}, lr {base_config.lr}; LTPA {args.compatibility}/"
        f"{args.normalise}; test error (%) on 497 images, training time (s) in brackets"
    )
    for name, layers in chosen.items():
        print(f"- {name}: local features at {layers}")
    print()
    print("| seed | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for k, seed in enumerate(args.seeds):
        cells = [f"{errors[n][k]:.1f} ({times[n][k]:.0f})" for n in names]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    if len(args.seeds) > 1:
        cells = [
            f"{statistics.mean(errors[n]):.1f} +- {statistics.stdev(errors[n]):.1f}" for n in names
        ]
        print("| mean +- std | " + " | ".join(cells) + " |")
        print()
        for name in names[1:]:
            better = sum(e < b for e, b in zip(errors[name], errors["baseline"], strict=True))
            print(f"{name}: lower error than the baseline in {better} of {len(args.seeds)} seeds")


if __name__ == "__main__":
    main()
