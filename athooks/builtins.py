"""The built-in plugin: athooks' own mappings and losses, registered through the public hookspecs.

This module is registered with the plugin manager exactly as a third-party plugin would be, and
uses nothing a third-party plugin could not.
"""

from __future__ import annotations

from athooks.hookspecs import hookimpl
from athooks.losses import AT, KD, FActT, GradAT, InputGradL2, Symmetry
from athooks.mappings import MaxP, Sum, SumP
from athooks.specs import LossSpec, MappingSpec


@hookimpl
def athooks_mappings() -> list[MappingSpec]:
    """The activation-based mappings of the paper (section 3.1)."""
    return [
        MappingSpec("sum", Sum, "F_sum: sum over channels of |A|"),
        MappingSpec("sum_p", SumP, "F_sum^p: sum over channels of |A|^p (p=2 default)"),
        MappingSpec("max_p", MaxP, "F_max^p: max over channels of |A|^p (p=2 default)"),
    ]


@hookimpl
def athooks_losses() -> list[LossSpec]:
    """Attention transfer and the paper's other transfer losses."""
    return [
        LossSpec("at", AT, "activation-based attention transfer (authors' code form by default)"),
        LossSpec("kd", KD, "knowledge distillation on the outputs (Hinton et al.)"),
        LossSpec("fact", FActT, "full-activation transfer: L2 between whole feature maps"),
        LossSpec("grad_at", GradAT, "gradient-based attention transfer (needs target)"),
        LossSpec(
            "symmetry",
            Symmetry,
            "flip-symmetry norm of the input gradient and the logits (needs target)",
        ),
        LossSpec(
            "input_grad_l2", InputGradL2, "min-l2: squared input-gradient norm (needs target)"
        ),
    ]
