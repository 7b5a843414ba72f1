"""The timm families of the zoo benchmark and the smallest model of each (cached in zoo_timm.json).

A *family* is the architecture module that registers a model (``timm.models.resnet``) together
with the model name's first word stripped of its trailing size digits (``resnet50d`` ->
``resnet``; a short prefix joins the next word: ``tf_efficientnet``, ``legacy_seresnet``). So
``resnet``, ``resnext``, ``seresnet`` and ``wide_resnet`` of ``timm.models.resnet`` are four
families, and ``vit`` in ``vision_transformer`` and in ``vision_transformer_hybrid`` are two.
The smallest variant is the one with the fewest parameters at timm's defaults, counted by building
the model on the ``meta`` device (no memory, no initialisation); a model that cannot be built there
counts as largest. Run ``python benchmarks/zoo_timm.py`` to rebuild the cache for another timm.
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import sys
import warnings

import timm
import torch
from timm.models._registry import _model_to_module

CACHE = pathlib.Path(__file__).with_name("zoo_timm.json")
JOIN = {"tf", "legacy", "gc", "cs", "dm", "nf", "eca", "ese", "res", "wide", "tiny", "test",
        "bat", "halo", "lambda", "sam"}  # fmt: skip


def family(name: str) -> str:
    """The family of a timm model name: ``"resnet:resnet"`` for ``resnet50d``."""
    words = name.split("_")
    head = words[0]
    if head in JOIN and len(words) > 1:
        head = f"{head}_{words[1]}"
    head = re.sub(r"\d+[a-z]?$", "", head) or head
    return f"{_model_to_module[name]}:{head}"


def count_params(name: str) -> int | None:
    """Parameters of ``name`` at timm's defaults, built on the meta device; None if that fails."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def build_cache() -> dict:
    """Count every model's parameters and keep the smallest per family."""
    members = collections.defaultdict(list)
    for name in timm.list_models():
        members[family(name)].append(name)
    families = {}
    for fam, names in sorted(members.items()):
        counted = [(count_params(n), n) for n in names]
        ranked = sorted(counted, key=lambda c: (c[0] is None, c[0] or 0, c[1]))
        params, model = ranked[0]
        families[fam] = {"model": model, "params": params, "variants": len(names)}
        print(f"{fam:40s} {model:45s} {params}", file=sys.stderr, flush=True)
    return {"timm": timm.__version__, "families": families}


def smallest_per_family() -> dict[str, dict]:
    """``{family: {"model", "params", "variants"}}``, from the cache (rebuilt for another timm)."""
    if CACHE.exists():
        data = json.loads(CACHE.read_text())
        if data.get("timm") == timm.__version__:
            return data["families"]
    data = build_cache()
    CACHE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data["families"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    CACHE.unlink(missing_ok=True)
    print(len(smallest_per_family()), "families")
