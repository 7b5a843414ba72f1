"""The ``athooks`` command line.

* ``athooks layers MODEL``: every module with its output shape and stride; the stages that
  ``layers="auto"`` would use are marked.
* ``athooks layers TEACHER --student STUDENT [--blocks]``: the pairs ``"auto"`` (or ``"blocks"``)
  picks, as a table.
* ``athooks plugins``: every mapping and loss with the distribution and version providing it,
  and the plugins that failed to load.
* ``athooks list``: the registered mapping and loss names.
* ``athooks show MODEL IMAGE... [--layers auto] [--p 1 2 4] --out maps.png``: attention maps
  over the images, one column per layer and one row per image and ``p`` (PNG or PDF).

MODEL is a timm name (``resnet18``), ``athooks:wrn16_1`` (the WRNs of :mod:`athooks.models`),
``torchvision:NAME``, or an import path ``package.module:callable`` that returns an
``nn.Module``. Models are built with random weights and nothing is downloaded, except with
``athooks show --pretrained``; ``--checkpoint`` loads weights with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Sequence
from typing import Any

from torch import nn

from athooks.errors import AthooksError, ConfigurationError

__all__ = ["build_model", "load_checkpoint", "main"]


def build_model(spec: str, *, pretrained: bool = False, **options: Any) -> nn.Module:
    """Build a model from a command-line model spec, with random weights unless ``pretrained``.

    Args:
        spec: ``"resnet18"`` (timm), ``"timm:resnet18"``, ``"athooks:wrn16_1"``,
            ``"torchvision:resnet18"``, or ``"package.module:callable"`` (called with
            ``options`` as keyword arguments).
        pretrained: Load the model's published weights (timm and torchvision models only; they
            are downloaded, or read from the local cache of timm/Hugging Face or torch hub).
        **options: Keyword arguments for the constructor, e.g. ``num_classes=10``,
            ``in_chans=1`` (None values are left out).

    Returns:
        The model.

    Raises:
        ConfigurationError: If the spec cannot be resolved, or pretrained weights cannot be had.

    Example:
        ```python
        from athooks.cli import build_model

        net = build_model("torchvision:resnet18", num_classes=10)
        print(type(net).__name__)
        ```
    """
    options = {k: v for k, v in options.items() if v is not None}
    source, _, name = spec.rpartition(":")
    kind = "athooks" if source == "athooks" or (source == "" and name.startswith("wrn")) else source
    if pretrained and kind not in ("", "timm", "torchvision"):
        raise ConfigurationError(
            f"--pretrained: {spec!r} has no published weights that athooks knows how to get "
            "(only timm and torchvision models do); load your own with --checkpoint PATH"
        )
    try:
        if kind == "athooks":
            from athooks.models import create_model

            return create_model(name, **options)
        if kind in ("", "timm"):
            import timm

            net: nn.Module = timm.create_model(name, pretrained=pretrained, **options)
            return net
        if kind == "torchvision":
            import torchvision

            weights = "DEFAULT" if pretrained else None
            builder = torchvision.models.get_model_builder(name)
            if not pretrained and "weights_backbone" in inspect.signature(builder).parameters:
                options.setdefault("weights_backbone", None)  # detectors, segmenters: no download
            model: nn.Module = builder(weights=weights, **options)
            return model
        module = importlib.import_module(source)
        factory = getattr(module, name)
    except Exception as err:
        if pretrained:
            reason = str(err).strip()[:300].rstrip(".")
            raise ConfigurationError(
                f"could not get the pretrained weights of {spec!r}: {type(err).__name__}: "
                f"{reason}. They are downloaded on first use, which needs network "
                "access (or a warm cache: HF_HOME for timm, TORCH_HOME for torchvision); "
                "without it, load weights you have with --checkpoint PATH"
            ) from None
        if not isinstance(err, (ImportError, AttributeError, RuntimeError, KeyError, ValueError)):
            raise
        raise ConfigurationError(
            f"cannot build model {spec!r}: {type(err).__name__}: {err}. Give a timm name "
            "(resnet18), athooks:wrn16_1, torchvision:NAME, or package.module:callable"
        ) from None
    model = (
        factory(**options) if callable(factory) and not isinstance(factory, nn.Module) else factory
    )
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


_STATE_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")


def load_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Load weights from ``path`` into ``model``, never unpickling anything but tensors.

    The file is read with ``torch.load(path, weights_only=True)``. It can be a state dict, or a
    dict holding one under ``state_dict``, ``model``, ``model_state_dict``, ``state_dict_ema`` or
    ``model_ema`` (the first found); ``module.`` and ``_orig_mod.`` prefixes (DDP,
    ``torch.compile``) are removed. Loading is strict.

    Args:
        model: The model to load into.
        path: The checkpoint file.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        ConfigurationError: If the file is missing, is not a weights-only checkpoint, or its
            keys or shapes do not fit the model.

    Example:
        ```python
        import tempfile
        import torch
        from athooks.cli import build_model, load_checkpoint

        net = build_model("athooks:wrn16_1", num_classes=10)
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"state_dict": net.state_dict()}, f"{folder}/w.pt")
            load_checkpoint(build_model("athooks:wrn16_1", num_classes=10), f"{folder}/w.pt")
        ```
    """
    import pickle

    import torch

    from athooks.layers import WRAPPER_PREFIXES

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigurationError(f"checkpoint {path!r} does not exist") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigurationError(
            f"checkpoint {path!r} cannot be read as weights only ({first}). athooks loads "
            "checkpoints with torch.load(..., weights_only=True) and never unpickles other "
            "objects; save the weights with torch.save(model.state_dict(), path)"
        ) from None
    state = obj
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigurationError(
            f"checkpoint {path!r} holds no state dict (a dict of tensors, or one under "
            f"{', '.join(_STATE_KEYS)}); save it with torch.save(model.state_dict(), path)"
        )
    cleaned = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    try:
        model.load_state_dict(cleaned, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise ConfigurationError(
            f"checkpoint {path!r} does not fit the model: {detail}. Build the model it was "
            "saved from (e.g. --num-classes, --in-chans)"
        ) from None
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
    stages = {i.label for i in stage_layers(model, infos=infos)}
    if args.pattern:
        hits = {n for n, _ in match_modules(model, args.pattern, side="model")}
        infos = [i for i in infos if i.name in hits]
    rows = [("name", "type", "output", "layout", "stride", "auto")]
    for info in infos:
        shape = "x".join(str(v) for v in info.shape) if info.shape else "-"
        rows.append(
            (
                info.label,
                info.kind,
                shape,
                info.layout,
                str(info.stride) if info.stride else "",
                "*" if info.label in stages else "",
            )
        )
    print(format_table(rows, widths=(24, 16, 12, 6, 6, 4)))
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
        "train_teacher": True if args.train_teacher else None,
        "unlabeled": True if args.unlabeled else None,
    }
    config = replace(config, **{k: v for k, v in changes.items() if v is not None})
    extra = (
        f", and with it on the other {1300 - config.labels} images, unlabeled"
        if config.unlabeled
        else ""
    )
    print(
        f"athooks demo: teacher {config.teacher} on all 1300 training digits, student "
        f"{config.student} on {config.labels} of them, with and without attention transfer "
        f"(beta {config.beta:g}){extra}, seed {config.seed}",
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


def _normalisation(model: nn.Module, channels: int) -> tuple[list[float], list[float]]:
    """Mean and std the model expects: its timm config's, else ImageNet's (3 channels)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict):
        mean, std = cfg.get("mean"), cfg.get("std")
        if (
            isinstance(mean, (tuple, list))
            and isinstance(std, (tuple, list))
            and len(mean) == len(std) == channels
        ):
            return [float(m) for m in mean], [float(v) for v in std]
    if channels == 3:
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return [0.5] * channels, [0.5] * channels


def _cmd_show(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from athooks.discovery import default_input_size
    from athooks.viz import load_image, plot_across_p

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".pdf"):
        raise ConfigurationError(
            f"--out {args.out!r}: the figure is written as PNG or PDF; end the name in .png or .pdf"
        )
    model = build_model(
        args.model, pretrained=args.pretrained, num_classes=args.num_classes, in_chans=args.in_chans
    )
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    model = model.to(args.device).eval()
    c, h, w = tuple(args.input_size) if args.input_size else default_input_size(model)
    pictures = torch.stack([load_image(path, (h, w), c) for path in args.images])
    mean, std = _normalisation(model, c)
    inputs = (pictures - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    layers = args.layers[0] if len(args.layers) == 1 else list(args.layers)
    fig = plot_across_p(
        model,
        inputs.to(args.device),
        ps=args.p,
        layers=layers,
        mapping=args.mapping,
        display=pictures,
        cmap=args.cmap,
        dpi=args.dpi,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    width, height = fig.get_size_inches() * args.dpi
    print(f"wrote {out} ({round(width)}x{round(height)} px)")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from athooks.registry import list_losses, list_mappings, registered

    print("mappings: " + ", ".join(list_mappings()))
    print("losses:   " + ", ".join(list_losses()))
    providers_of: dict[tuple[str, str], list[str]] = {}
    by_provider: dict[str, dict[str, list[str]]] = {}
    for kind, name, provider, _ in registered():  # one row per claim
        providers_of.setdefault((kind, name), []).append(provider)
        by_provider.setdefault(provider, {}).setdefault(kind, []).append(name)
    print("provided by:")
    for provider, kinds in by_provider.items():
        plural = {"mapping": "mappings", "loss": "losses"}
        parts = [
            f"{plural.get(kind, kind)} {', '.join(sorted(names))}" for kind, names in kinds.items()
        ]
        print(f"  {provider}: {'; '.join(parts)}")
    for (kind, name), providers in providers_of.items():
        if len(providers) < 2:
            continue
        print(
            f"warning: {kind} {name!r} is claimed by {len(providers)} plugins "
            f"({', '.join(providers)}); using it raises PluginError"
        )
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
    p_demo.add_argument("--beta", type=float, help="AT weight (default 300)")
    p_demo.add_argument("--labels", type=int, help="labelled images for the student (default 300)")
    p_demo.add_argument(
        "--out", default="athooks-demo", help="output folder (default athooks-demo)"
    )
    p_demo.add_argument("--device", help="cpu or cuda (default cpu)")
    p_demo.add_argument(
        "--train-teacher",
        action="store_true",
        help="train the teacher here (about 2 minutes) instead of loading the shipped weights",
    )
    p_demo.add_argument(
        "--unlabeled",
        action="store_true",
        help="also train a student with AT on the training images it has no label for",
    )
    p_demo.set_defaults(func=_cmd_demo)
    p_show = sub.add_parser(
        "show",
        help="draw a model's attention maps over images, across layers and p (PNG or PDF)",
    )
    p_show.add_argument(
        "model", help="timm name, athooks:wrn16_1, torchvision:NAME or package.module:callable"
    )
    p_show.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p_show.add_argument(
        "--layers",
        nargs="+",
        default=["auto"],
        help="auto (default), blocks, or layer names/patterns",
    )
    p_show.add_argument(
        "--p",
        type=float,
        nargs="+",
        help="exponents, one row each (default: the mapping's own, 2 for sum_p)",
    )
    p_show.add_argument(
        "--mapping", default="sum_p", help="mapping name (default sum_p; see `athooks list`)"
    )
    p_show.add_argument("--out", default="maps.png", help="output file, .png or .pdf")
    p_show.add_argument(
        "--checkpoint", help="weights to load (read with torch.load(..., weights_only=True))"
    )
    p_show.add_argument(
        "--pretrained",
        action="store_true",
        help="the model's published weights (timm, torchvision; downloaded on first use)",
    )
    p_show.add_argument("--num-classes", type=int, help="classes of the model to build")
    p_show.add_argument("--in-chans", type=int, help="input channels of the model to build")
    p_show.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="size the images are resized to (default: the model's own, else 3 224 224)",
    )
    p_show.add_argument("--cmap", default="viridis", help="matplotlib colour map (viridis)")
    p_show.add_argument("--dpi", type=int, default=100, help="dots per inch; a panel is 2 inches")
    p_show.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p_show.set_defaults(func=_cmd_show)
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
