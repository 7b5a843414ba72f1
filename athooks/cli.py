"""The ``athooks`` command line.

``athooks layers MODEL`` lists the named modules of a model; ``athooks list`` lists the registered
mappings and losses. MODEL is a timm name (``resnet18``), ``torchvision:NAME``, or an import path
``package.module:callable`` that returns an ``nn.Module``; models are built with random weights.
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
        spec: ``"resnet18"`` (timm), ``"timm:resnet18"``, ``"torchvision:resnet18"``, or
            ``"package.module:callable"`` (called with no arguments).

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
    from athooks.layers import list_layers, match_modules

    model = build_model(args.model)
    rows = list_layers(model)
    if args.pattern:
        hits = {n for n, _ in match_modules(model, args.pattern, side="model")}
        rows = [r for r in rows if r[0] in hits]
    width = min(max([4, *(len(n) for n, _ in rows)]), 60)
    print(f"{'name':<{width}}  type")
    for name, kind in rows:
        print(f"{name:<{width}}  {kind}")
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
    p_layers = sub.add_parser("layers", help="list the named modules of a model")
    p_layers.add_argument("model", help="timm name, torchvision:NAME or package.module:callable")
    p_layers.add_argument("--pattern", help="show only modules matching this layer pattern")
    p_layers.set_defaults(func=_cmd_layers)
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
