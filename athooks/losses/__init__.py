"""Transfer losses. Each is registered as a plugin (see :mod:`athooks.builtins`)."""

from athooks.losses.at import AT
from athooks.losses.base import Loss, Step, loss
from athooks.losses.fact import FActT
from athooks.losses.gradient import GradAT, InputGradL2, Symmetry
from athooks.losses.kd import KD

__all__ = ["AT", "KD", "FActT", "GradAT", "InputGradL2", "Loss", "Step", "Symmetry", "loss"]
