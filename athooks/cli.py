"""The ``athooks`` command line.

* ``athooks layers MODEL``: every module with its output shape and stride; the stages that
  ``layers="auto"`` would use are marked.
* ``athooks layers TEACHER --student STUDENT [--blocks]``: the pairs ``"auto"`` (or ``"blocks"``)
  picks, as a table.
* ``athooks plugins``: every mapping and loss with the distribution and version providing it,
  and the plugins that failed to load.
* ``athooks list``: the registered mapping and loss names.

MODEL is a timm name (``resnet18``), ``athooks:wrn16_1`` (the WRNs of :mod:`athooks.models`),
``torchvision:NAME``, or an import path ``package.module:callable`` that returns an
``nn.Module``. Models are built with random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from torch import nn

from athooks.errors import AthooksError, ConfigurationError

__all__ = ["build_model", "main"]


def build_model(spec: str) -> nn.Module:
    """Build a model with random weights from a command-line model spec.

    Args:
        spec: ``"resnet18"`` (timm), ``"timm:resnet18"``, ``"athooks:wrn16_1"``,
            ``"torchvision:resnet18"``, or ``"package.module:callable"`` (called with no
            arguments).

    Returns:
        The model.

    Raises:
        ConfigurationError: If the spec cannot be resolved.

    Example:
        ```python
        from athooks.cli import build_model

        net = build_model("torchvision:resnet18")
        print(type(net).__name__)
        ```
    """
    source, _, name = spec.rpartition(":")
    try:
        if source == "athooks" or (source == "" and name.startswith("wrn")):
            from athooks.models import create_model

            return create_model(name)
        if source in ("", "timm"):
            import timm

            net: nn.Module = timm.create_model(name, pretrained=False)
            return net
        if source == "torchvision":
            import torchvision

            model: nn.Module = torchvision.models.get_model(name, weights=None)
            return model
        module = importlib.import_module(source)
        factory = getattr(module, name)
    except (ImportError, AttributeError, RuntimeError, KeyError, ValueError) as err:
        raise ConfigurationError(
            f"cannot build model {spec!r}: {type(err).__name__}: {err}. Give a timm name "
            "(resnet18), torchvision:NAME, or package.module:callable"
        ) from None
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _cmd_layers(args: argparse.Namespace) -> int:
    from athooks.discovery import auto_pairs, format_table, probe, stage_layers
    from athooks.layers import match_modules

    size = tuple(args.input_size) if args.input_size else None
    model = build_model(args.model)
    if args.student:
        student = build_model(args.student)
        print(auto_pairs(model, student, "blocks" if args.blocks else "auto", size))
        return 0
    infos = probe(model, size)
    stages = {i.name for i in stage_layers(model, infos=infos)}
    if args.pattern:
        hits = {n for n, _ in match_modules(model, args.pattern, side="model")}
        infos = [i for i in infos if i.name in hits]
    rows = [("name", "type", "output", "stride", "auto")]
    for info in infos:
        shape = "x".join(str(v) for v in info.shape) if info.shape else "-"
        rows.append(
            (
                info.name,
                info.kind,
                shape,
                str(info.stride) if info.stride else "",
                "*" if info.name in stages else "",
            )
        )
    print(format_table(rows, widths=(34, 18, 14, 6, 4)))
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from athooks.discovery import format_table
    from athooks.registry import load_errors, registered

    rows = [("kind", "name", "provided by", "summary")]
    for kind, name, provider, summary in registered():
        short = summary if len(summary) <= 25 else summary[:24] + "…"  # prose: cut at the end
        rows.append((kind, name, provider, short))
    print(format_table(rows, widths=(7, 16, 26, 25)))
    errors = load_errors()
    if errors:
        print("\nplugins that failed to load:")
        for message in errors.values():
            print(f"  {message}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from athooks.demo.run import DemoConfig, run_demo

    config = DemoConfig()
    changes = {
        "epochs": args.epochs,
        "teacher_epochs": args.teacher_epochs,
        "seed": args.seed,
        "teacher": args.teacher,
        "student": args.student,
        "beta": args.beta,
        "labels": args.labels,
        "device": args.device,
    }
    config = replace(config, **{k: v for k, v in changes.items() if v is not None})
    print(
        f"athooks demo: teacher {config.teacher} on all 1300 training digits, student "
        f"{config.student} on {config.labels} of them, with and without attention transfer "
        f"(beta {config.beta:g}), seed {config.seed}",
        flush=True,
    )
    try:
        import matplotlib  # noqa: F401

        figure = True
    except ImportError:
        figure = False
    result = run_demo(config, args.out, figure=figure)
    print()
    print(result.table())
    if result.figure:
        print(f"attention maps: {result.figure}")
    else:
        print("no figure: matplotlib is not installed (python3 -m pip install 'athooks[viz]')")
    print(f"results: {args.out}/results.md, {args.out}/results.json")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from athooks.registry import list_losses, list_mappings

    print("mappings: " + ", ".join(list_mappings()))
    print("losses:   " + ", ".join(list_losses()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``athooks`` command.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(prog="athooks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_layers = sub.add_parser(
        "layers",
        help="list a model's modules with output shapes and strides, or the pairs 'auto' picks",
    )
    p_layers.add_argument(
        "model",
        help="timm name, athooks:wrn16_1, torchvision:NAME or package.module:callable",
    )
    p_layers.add_argument("--student", help="show the teacher/student pairs 'auto' picks")
    p_layers.add_argument(
        "--blocks", action="store_true", help="with --student: the pairs of layers='blocks'"
    )
    p_layers.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="dummy input size for the probe (default: the model's own, else 3 224 224)",
    )
    p_layers.add_argument("--pattern", help="show only modules matching this layer pattern")
    p_layers.set_defaults(func=_cmd_layers)
    p_plugins = sub.add_parser(
        "plugins", help="every mapping and loss with the distribution that provides it"
    )
    p_plugins.set_defaults(func=_cmd_plugins)
    p_demo = sub.add_parser(
        "demo",
        help="attention transfer on embedded handwritten digits, on CPU, in a few minutes",
    )
    p_demo.add_argument("--epochs", type=int, help="student epochs (default 40)")
    p_demo.add_argument("--teacher-epochs", type=int, help="teacher epochs (default 30)")
    p_demo.add_argument("--seed", type=int, help="seed of initialisation and batches (default 0)")
    p_demo.add_argument("--teacher", help="teacher model (default wrn16_2)")
    p_demo.add_argument("--student", help="student model (default wrn16_1)")
    p_demo.add_argument("--beta", type=float, help="AT weight (default 100)")
    p_demo.add_argument("--labels", type=int, help="labelled images for the student (default 300)")
    p_demo.add_argument(
        "--out", default="athooks-demo", help="output folder (default athooks-demo)"
    )
    p_demo.add_argument("--device", help="cpu or cuda (default cpu)")
    p_demo.set_defaults(func=_cmd_demo)
    p_list = sub.add_parser("list", help="list registered mappings and losses")
    p_list.set_defaults(func=_cmd_list)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except AthooksError as err:
        print(f"athooks: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
