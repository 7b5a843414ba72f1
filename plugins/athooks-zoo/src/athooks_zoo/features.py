"""Feature-map methods: FitNet, NST, FSP, AB and CWD, each an athooks loss on whole feature maps.

Every loss here keeps the tapped feature maps whole (``Features``) and reads them with
``step.features``: one ``(teacher, student)`` pair of ``(B, C, *S)`` tensors per layer pair,
``S`` one to three spatial dimensions. Teacher and student may differ in width and in spatial
size; each method handles that as its authors' reference code does (see each class), or says
clearly why it cannot. Learned parts (FitNet's regressors, AB's connectors, CWD's and FSP's
optional connectors) are ``Connectors``: built lazily from the first step's real widths, but
registered from construction so that ``Distiller.parameters()`` hands them to the optimiser.

Only athooks' public plugin API is used (``athooks.plugin`` and the error classes at the top
level of ``athooks``).
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from athooks import CaptureError, ConfigurationError
from athooks.plugin import Connectors, Features, Loss, LossSpec, Step
from athooks_zoo._checks import real as _real

__all__ = ["AB", "CWD", "FSP", "NST", "SPECS", "FitNet"]

_NEGATIVE = " (a negative weight would push the student away from the teacher)"


# --------------------------------------------------------------------------- checks and helpers


def _choice(value: Any, *, owner: str, option: str, allowed: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``allowed`` (of the same type: ``True`` is not ``1``)."""
    if not any(value == a and type(value) is type(a) for a in allowed):
        listed = ", ".join(repr(a) for a in allowed)
        raise ConfigurationError(f"{owner}: {option} must be one of {listed}, got {value!r}")
    return value


def _f32(t: Tensor) -> Tensor:
    """``t`` in float32, or in its own dtype if wider (float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _feature_pairs(
    step: Step, features: Features, owner: str
) -> list[tuple[str, str, Tensor, Tensor]]:
    """Every pair's ``(teacher_name, student_name, teacher, student)`` feature maps, checked.

    Raises:
        CaptureError: If a pair's maps are not ``(B, C, *S)`` with one to three spatial
            dimensions, differ in their number of spatial dimensions, or in batch size.
    """
    out = []
    for (t_name, s_name), (t, s) in zip(step.pairs, step.features(features), strict=True):
        where = f"pair (teacher {t_name!r}, student {s_name!r})"
        for who, x in (("teacher", t), ("student", s)):
            if not isinstance(x, Tensor) or not 3 <= x.dim() <= 5:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise CaptureError(
                    f"{owner} needs feature maps (B, C, *S) with 1 to 3 spatial dimensions "
                    f"(B, C, T), (B, C, H, W) or (B, C, T, H, W); the {who}'s layer of {where} "
                    f"gave {shape}. Tap layers that return such maps (a token sequence "
                    "(B, N, D) needs an athooks.Layer(name, transform=...) that reshapes it)"
                )
        if t.shape[0] != s.shape[0]:
            raise CaptureError(
                f"{owner}: batch sizes differ in {where}: teacher {t.shape[0]}, student "
                f"{s.shape[0]}; the teacher must see the same batch as the student (check "
                "teacher_input)"
            )
        if t.dim() != s.dim():
            raise CaptureError(
                f"{owner}: the feature maps of {where} have different layouts: teacher "
                f"{tuple(t.shape)}, student {tuple(s.shape)} ({t.dim() - 2} and {s.dim() - 2} "
                "spatial dimensions). Pair layers of the same layout"
            )
        out.append((t_name, s_name, t, s))
    return out


def _need_setup(connectors: nn.ModuleList, step: Step, owner: str) -> None:
    """Refuse a step whose pairs outnumber the connectors (``setup`` was not called)."""
    if len(connectors) < len(step.pairs):
        raise CaptureError(
            f"{owner} has {len(connectors)} connectors for {len(step.pairs)} layer pairs: "
            "call loss.setup(pairs) once the pairs are known, before the first step (the "
            "Distiller does this itself)"
        )


def _pool(x: Tensor, size: Sequence[int]) -> Tensor:
    """Adaptive average pooling of ``(B, C, *S)`` to ``(B, C, *size)`` (unchanged if equal)."""
    target = tuple(int(n) for n in size)
    if tuple(x.shape[2:]) == target:
        return x
    if len(target) == 1:
        return F.adaptive_avg_pool1d(x, target[0])
    if len(target) == 2:
        return F.adaptive_avg_pool2d(x, target)
    return F.adaptive_avg_pool3d(x, (target[0], target[1], target[2]))


def _common_size(a: Tensor, b: Tensor) -> tuple[int, ...]:
    """The per-axis smaller spatial size of two ``(B, C, *S)`` maps."""
    return tuple(min(p, q) for p, q in zip(a.shape[2:], b.shape[2:], strict=True))


def _resample(x: Tensor, size: Sequence[int]) -> Tensor:
    """``(B, C, *S)`` to ``(B, C, *size)``: average pooling when shrinking, else interpolation."""
    size = tuple(int(n) for n in size)
    if tuple(x.shape[2:]) == size:
        return x
    if all(t <= n for t, n in zip(size, x.shape[2:], strict=True)):
        return _pool(x, size)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def _connect(connector: nn.Module, s: Tensor, width: int) -> Tensor:
    """The student's features through a connector, to ``width`` channels."""
    out: Tensor = connector(s, width)
    return out


def _connector_option(value: Any, owner: str) -> bool | None:
    """Check a ``connector`` option: ``None`` (where widths differ), ``True`` or ``False``."""
    if value is not None and not isinstance(value, bool):
        raise ConfigurationError(
            f"{owner}: connector must be None (connect pairs of unequal widths), True or False, "
            f"got {value!r}"
        )
    return value


def _same_size(t: Tensor, s: Tensor, t_name: str, s_name: str, owner: str, what: str) -> None:
    """Refuse a pair whose maps differ in spatial size, for losses that compare positions."""
    if t.shape[2:] != s.shape[2:]:
        raise CaptureError(
            f"{owner} compares {what}, so the maps of a pair must have the same spatial size; "
            f"pair (teacher {t_name!r}, student {s_name!r}) has teacher {tuple(t.shape[2:])} "
            f"and student {tuple(s.shape[2:])}. Pair layers of the same stride "
            '(layers="auto" does)'
        )


def _maybe_connect(
    loss: AB | CWD, i: int, t: Tensor, s: Tensor, t_name: str, s_name: str
) -> Tensor:
    """The student's map of pair ``i``, through its connector where the option asks for one.

    Raises:
        CaptureError: If the widths differ and ``connector=False``.
    """
    if loss.connectors is not None and (loss.connector or t.shape[1] != s.shape[1]):
        return _connect(loss.connectors[i], s, int(t.shape[1]))
    if t.shape[1] != s.shape[1]:
        raise CaptureError(
            f"{loss.name} compares channels one to one; pair (teacher {t_name!r}, student "
            f"{s_name!r}) has teacher width {t.shape[1]} and student width {s.shape[1]}, and "
            "connector=False. Pass connector=None (or True) to map the student's maps to the "
            "teacher's width with a learned 1x1 convolution, or pair layers of equal width"
        )
    return s


class ConvReg(nn.Module):
    """FitNet's regressor at equal spatial size: RepDistiller's/mdistiller's ``ConvReg``.

    A 1x1 convolution with bias, batch normalisation and (``relu=True``, their default) a ReLU,
    on any layout ``(B, C, *S)``: the spatial axes are flattened, so the 1x1 convolution and the
    batch norm (statistics over the batch and every position) are those of ``Conv2d`` and
    ``BatchNorm2d`` on images. Its parameter names do not depend on the widths.

    Args:
        in_channels: The student's width.
        out_channels: The teacher's width.
        relu: Whether to end with a ReLU.

    Example:
        ```python
        import torch
        from athooks_zoo.features import ConvReg

        reg = ConvReg(8, 16)
        assert reg(torch.randn(2, 8, 4, 4)).shape == (2, 16, 4, 4)
        ```
    """

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=1)
        self.bn = nn.BatchNorm1d(out_channels)
        self.relu = bool(relu)

    def forward(self, x: Tensor) -> Tensor:
        """``relu(bn(conv1x1(x)))``, of shape ``(B, out_channels, *S)``."""
        y: Tensor = self.bn(self.conv(x.flatten(2)))
        if self.relu:
            y = F.relu(y)
        return y.reshape(x.shape[0], y.shape[1], *x.shape[2:])

    def extra_repr(self) -> str:
        """Whether it ends with a ReLU."""
        return f"relu={self.relu}"


# --------------------------------------------------------------------------- FitNet


class FitNet(Loss):
    """FitNet's hint loss: a learned regressor on the student's features, MSE to the teacher's.

    Romero, Ballas, Kahou, Chassang, Gatta and Bengio, "FitNets: Hints for Thin Deep Nets",
    ICLR 2015. For every layer pair ``j`` (the paper's hint/guided layers):

    ``beta * sum_j mean((r_j(F_S^j) - F_T^j)^2)``

    the mean running over the batch, channels and positions (``nn.MSELoss()``, as
    RepDistiller's ``HintLoss`` and mdistiller's ``FitNet``). ``r_j`` is the regressor of
    RepDistiller's/mdistiller's ``ConvReg`` for equal spatial sizes: a 1x1 convolution (with
    bias) to the teacher's width, batch norm, ReLU (:class:`ConvReg`), one per pair, built from
    the first step's widths and trained with the student.

    Spatial sizes: where the student's map is larger or smaller than the teacher's, ``ConvReg``
    learns the resampling (a 3x3 stride-2 convolution for twice the size, a 4x4 stride-2
    transposed convolution for half of it, a valid convolution of kernel ``1 + H_s - H_t``
    otherwise). athooks' regressors are built from the widths alone, so here the student's map
    is first resampled to the teacher's size (adaptive average pooling when shrinking, linear
    interpolation otherwise) and the 1x1 regressor applied; the MSE is, as in ``ConvReg``, at
    the teacher's resolution. Pairing layers of equal stride (``layers="auto"`` does) avoids
    the difference.

    Defaults: ``beta = 100`` (RepDistiller's ``scripts/run_cifar_distill.sh``, ``-b 100``;
    mdistiller's ``FITNET.LOSS.FEAT_WEIGHT = 100``), one hint layer in both (the middle stage,
    ``hint_layer = 2``): tap that one pair to reproduce them. The paper trains in two stages
    (hints first, then KD); both codes, and this loss, add the hint term to the task loss in
    one stage.

    Args:
        beta: The weight: finite, ``>= 0``.
        relu: Whether the regressor ends with a ReLU (``ConvReg``'s ``use_relu=True``).

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.features import FitNet

        loss = FitNet(beta=100.0)
        loss.setup([("t", "s")])
        t, s = torch.randn(2, 16, 4, 4), torch.randn(2, 8, 4, 4, requires_grad=True)
        value = loss(Step([("t", "s")], [{loss.features: t}], [{loss.features: s}]))
        value.backward()
        print(value.item(), s.grad.shape)
        ```
    """

    name = "fitnet"

    def __init__(self, beta: float = 100.0, relu: bool = True) -> None:
        super().__init__()
        self.beta = _real(beta, owner="fitnet", option="beta", why=_NEGATIVE)
        if not isinstance(relu, bool):
            raise ConfigurationError(f"fitnet: relu must be True or False, got {relu!r}")
        self.relu = relu
        self.features = Features()
        self.regressors = Connectors(partial(ConvReg, relu=relu))

    def captures(self) -> tuple[Features, ...]:
        """FitNet keeps the feature maps whole."""
        return (self.features,)

    def forward(self, step: Step) -> Tensor:
        """The hint term of the step."""
        _need_setup(self.regressors, step, self.name)
        terms = []
        for i, (_, _, t, s) in enumerate(_feature_pairs(step, self.features, self.name)):
            s = _resample(s, t.shape[2:])
            guess = _connect(self.regressors[i], s, int(t.shape[1]))
            terms.append(F.mse_loss(_f32(guess), _f32(t.detach())))
        return self.beta * self.sum_pairs(terms)

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return f"beta={self.beta:g}, relu={self.relu}"


# --------------------------------------------------------------------------- NST


class NST(Loss):
    """Neuron selectivity transfer: MMD between the two models' per-channel spatial patterns.

    Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
    arXiv:1707.01219, 2017. Each channel ``i`` of a ``(B, C, *S)`` map is one sample
    ``f^i = F^i / ||F^i||_2`` of its ``|S|`` positions (L2-normalised over space, per sample and
    channel); the loss is the squared MMD between the teacher's ``C_T`` and the student's
    ``C_S`` samples with the polynomial kernel ``k(x, y) = (x^T y + c)^d``:

    ``MMD^2 = mean_{i,i'} k(f_T^i, f_T^i') + mean_{j,j'} k(f_S^j, f_S^j')
    - 2 mean_{i,j} k(f_S^j, f_T^i)``

    averaged over the batch and summed over the pairs, times ``beta``. No equal widths are
    needed. Where the spatial sizes differ, the larger map is adaptive-average-pooled to the
    smaller one (per axis), as RepDistiller's ``NSTLoss`` does.

    Defaults follow RepDistiller's ``NSTLoss`` (``full_loss=True``: the teacher-teacher term is
    kept, as a constant) with the paper's polynomial kernel ``d = 2, c = 0``, and
    ``beta = 50`` (``scripts/run_cifar_distill.sh``, ``-b 50``, on the middle stages
    ``feat[1:-1]``; mdistiller's ``NST.LOSS.FEAT_WEIGHT = 50`` too). The paper writes the
    term as ``lambda/2 * MMD^2``; here ``beta`` multiplies ``MMD^2`` directly, as RepDistiller
    does, so ``beta = lambda/2``.
    The paper's linear and Gaussian kernels are not offered.

    Args:
        beta: The weight: finite, ``>= 0``.
        degree: The kernel's degree ``d``: a positive integer.
        c: The kernel's offset ``c``: finite, ``>= 0``.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.features import NST

        loss = NST()
        t, s = torch.randn(2, 16, 8, 8), torch.randn(2, 8, 4, 4, requires_grad=True)
        value = loss(Step([("t", "s")], [{loss.features: t}], [{loss.features: s}]))
        value.backward()
        print(value.item())
        ```
    """

    name = "nst"

    def __init__(self, beta: float = 50.0, degree: int = 2, c: float = 0.0) -> None:
        super().__init__()
        self.beta = _real(beta, owner="nst", option="beta", why=_NEGATIVE)
        given: Any = degree  # any integral number (a NumPy integer too), not a bool
        if isinstance(given, bool) or not isinstance(given, numbers.Integral) or given < 1:
            raise ConfigurationError(
                f"nst: degree must be a positive integer (the polynomial kernel's power; the "
                f"paper uses 2), got {degree!r}"
            )
        self.degree = int(degree)
        self.c = _real(c, owner="nst", option="c", why=" (the polynomial kernel's offset)")
        self.features = Features()

    def captures(self) -> tuple[Features, ...]:
        """NST keeps the feature maps whole."""
        return (self.features,)

    def _kernel_mean(self, a: Tensor, b: Tensor) -> Tensor:
        gram = torch.bmm(a, b.transpose(1, 2))
        return (gram + self.c).pow(self.degree).mean()

    def forward(self, step: Step) -> Tensor:
        """The NST term of the step."""
        terms = []
        for _, _, t, s in _feature_pairs(step, self.features, self.name):
            size = _common_size(t, s)
            f_t = F.normalize(_f32(_pool(t.detach(), size)).flatten(2), dim=2)
            f_s = F.normalize(_f32(_pool(s, size)).flatten(2), dim=2)
            terms.append(
                self._kernel_mean(f_t, f_t).detach()
                + self._kernel_mean(f_s, f_s)
                - 2 * self._kernel_mean(f_s, f_t)
            )
        return self.beta * self.sum_pairs(terms)

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return f"beta={self.beta:g}, degree={self.degree}, c={self.c:g}"


# --------------------------------------------------------------------------- FSP


class FSP(Loss):
    """The flow of solution procedure: Gram matrices between consecutive layers of each model.

    Yim, Joo, Bae and Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning", CVPR 2017. For consecutive tapped layers ``j`` and
    ``j + 1`` of one model, with maps ``F1`` ``(B, C_j, *S)`` and ``F2`` ``(B, C_{j+1}, *S)``,
    the FSP matrix is ``G = F1^T F2 / |S|`` (``G_ab = mean_s F1_a(s) F2_b(s)``, a
    ``C_j x C_{j+1}`` matrix per sample). The loss compares teacher and student matrices:

    - ``normalization="code"`` (default, RepDistiller's ``FSP``):
      ``beta * sum_j mean_{b,a,c} (G_S^j - G_T^j)^2``, the mean over the batch and the matrix;
    - ``normalization="paper"`` (the paper's ``1/N sum_x sum_j lambda_j ||G_T - G_S||_2^2``,
      equal ``lambda_j``): ``beta * sum_j mean_b sum_{a,c} (G_S^j - G_T^j)^2``.

    ``n`` layer pairs give ``n - 1`` matrices (at least two pairs are needed; per-pair weights,
    ``pair_weights``, do not apply). Where the two
    layers of one model differ in spatial size, the larger is adaptive-average-pooled to the
    smaller, as RepDistiller does.

    Widths: the matrices compare only if the teacher's and the student's layer ``j`` have the
    same width, for every ``j``, which RepDistiller requires (``ValueError``); here a pair of
    unequal widths is a clear error by default, and ``connector=True`` instead maps each
    student map to the teacher's width with a learned 1x1 convolution and batch norm (an
    athooks extension, not in the paper or RepDistiller) before its matrices are formed.

    Defaults: ``beta = 1``. Both the paper and RepDistiller use FSP as a first stage: the
    student is trained on the (unweighted) FSP loss alone (RepDistiller: ``init_epochs = 30``,
    ``loss = sum(loss_group)``), then on the task loss alone (there the ``-b 50`` of
    ``run_cifar_distill.sh`` multiplies a term set to 0). Reproduce that with a first
    Distiller phase on ``fsp`` only and a second without it; added to the task loss in one
    stage, ``beta`` needs tuning. RepDistiller taps the input of the residual stages and every
    stage output (``feat[:-1]``).

    Args:
        beta: The weight: finite, ``>= 0``.
        normalization: ``"code"`` or ``"paper"``, as above.
        connector: Map student maps to the teacher's widths with learned connectors.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.features import FSP

        loss = FSP()
        pairs = [("t1", "s1"), ("t2", "s2")]
        t = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
        s = [x.clone().requires_grad_() for x in (torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4))]
        step = Step(pairs, [{loss.features: x} for x in t], [{loss.features: x} for x in s])
        print(loss(step).item())
        ```
    """

    name = "fsp"

    def __init__(
        self, beta: float = 1.0, normalization: str = "code", connector: bool = False
    ) -> None:
        super().__init__()
        self.beta = _real(beta, owner="fsp", option="beta", why=_NEGATIVE)
        self.normalization = _choice(
            normalization, owner="fsp", option="normalization", allowed=("code", "paper")
        )
        if not isinstance(connector, bool):
            raise ConfigurationError(f"fsp: connector must be True or False, got {connector!r}")
        self.connector = connector
        self.features = Features()
        self.connectors = Connectors() if connector else None

    def captures(self) -> tuple[Features, ...]:
        """FSP keeps the feature maps whole."""
        return (self.features,)

    @staticmethod
    def matrices(maps: Sequence[Tensor]) -> list[Tensor]:
        """The FSP matrices ``(B, C_j, C_{j+1})`` of consecutive maps of one model.

        Args:
            maps: One model's feature maps ``(B, C_j, *S_j)``, in tapping order.

        Returns:
            ``len(maps) - 1`` matrices, ``G_ab = mean_s F_j[a](s) F_{j+1}[b](s)``.
        """
        out = []
        for bottom, top in itertools.pairwise(maps):
            size = _common_size(bottom, top)
            f1 = _f32(_pool(bottom, size)).flatten(2)
            f2 = _f32(_pool(top, size)).flatten(2)
            out.append(torch.bmm(f1, f2.transpose(1, 2)) / f1.shape[2])
        return out

    def forward(self, step: Step) -> Tensor:
        """The FSP term of the step."""
        found = _feature_pairs(step, self.features, self.name)
        if len(found) < 2:
            raise CaptureError(
                f"fsp compares matrices between consecutive tapped layers of each model, so it "
                f"needs at least two layer pairs; got {len(found)}. Tap two or more layers, "
                'e.g. layers=[("layer1", "layer1"), ("layer2", "layer2")]'
            )
        if self.connectors is not None:
            _need_setup(self.connectors, step, self.name)
        teacher, student = [], []
        for i, (t_name, s_name, t, s) in enumerate(found):
            if t.shape[1] != s.shape[1] and self.connectors is None:
                raise CaptureError(
                    f"fsp: pair (teacher {t_name!r}, student {s_name!r}) has teacher width "
                    f"{t.shape[1]} and student width {s.shape[1]}; FSP matrices compare entry "
                    "by entry, so every pair must have equal widths (RepDistiller refuses this "
                    "too). Pair layers of equal width, or pass connector=True to map the "
                    "student's maps to the teacher's widths with learned 1x1 convolutions"
                )
            if self.connectors is not None:
                s = _connect(self.connectors[i], s, int(t.shape[1]))
            teacher.append(t.detach())
            student.append(s)
        if self.pair_weights is not None:
            raise ConfigurationError(
                "fsp has one term per two consecutive layer pairs (n - 1 FSP matrices for n "
                "pairs), so per-pair weights (pair_weights) do not apply to it; scale it with "
                "beta instead"
            )
        terms = []
        for g_t, g_s in zip(self.matrices(teacher), self.matrices(student), strict=True):
            sq = (g_s - g_t).pow(2)
            terms.append(sq.mean() if self.normalization == "code" else sq.sum((1, 2)).mean())
        return self.beta * torch.stack(terms).sum()

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return (
            f"beta={self.beta:g}, normalization={self.normalization!r}, connector={self.connector}"
        )


# --------------------------------------------------------------------------- AB


class AB(Loss):
    """Activation boundaries: the student's connected neurons on the teacher's side of zero.

    Heo, Lee, Yun and Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed
    by Hidden Neurons", AAAI 2019. With ``r = c_j(F_S^j)`` the student's map through a learned
    connector to the teacher's width and ``t = F_T^j`` the teacher's, the piecewise (margin
    ``mu``) loss of each neuron is

    ``(r + mu)^2 [r > -mu and t <= 0] + (r - mu)^2 [r <= mu and t > 0]``

    (the paper's ``rho(t) max(mu - r, 0)^2 + (1 - rho(t)) max(mu + r, 0)^2``, ``rho(t) = [t >
    0]``), summed over neurons. The authors' code (``bhheo/AB_distillation``, copied by
    RepDistiller's ``ABLoss``) then divides by the batch size, scales by ``3/1000`` and weights
    pair ``j`` (counted from 0) of ``n`` by ``2^(j - n + 1)``: the last pair 1, each earlier one
    half the next (``layer_weights="code"``, the default; ``"equal"`` gives every pair weight 1,
    still ``/B * 3/1000``). The total is ``beta * sum_j w_j * L_j``.

    Connector: a 1x1 convolution without bias and a batch norm, as the authors' code, built from
    the first step's widths. As there (and in RepDistiller), it is the identity for a pair whose
    widths already agree (``connector=None``, the default); ``True`` builds one for every pair,
    ``False`` none (unequal widths are then an error). The authors initialise it with
    ``normal(0, sqrt(2 / out_channels))`` weights; athooks' connectors use PyTorch's default
    initialisation. Maps of a pair must have the same spatial size (neurons correspond one to
    one): pair layers of equal stride.

    Pre-activations: the paper transfers the boundaries of the neurons *before* their ReLU. The
    authors' code (and RepDistiller, ``preact=True``) takes, for a pre-activation WRN, the
    output of the batch norm that precedes the next block's ReLU (``block2.layer[0].bn1``,
    ``block3.layer[0].bn1``, the final ``bn1``). athooks taps what the named layers return: the
    stage outputs of a pre-activation WRN/ResNet are pre-ReLU too (but before that batch norm),
    and a layer ending in a ReLU gives maps that are never negative (the teacher's ``t <= 0``
    then means ``t == 0``). Tap the batch norm before the ReLU to follow the authors exactly.

    Defaults: ``margin = 1.0`` (the authors' code and RepDistiller), ``beta = 1``
    (RepDistiller's ``-b 1``). Like the paper, both codes use AB in a first stage only, on the
    AB loss alone (training the student and the connectors; RepDistiller: ``init_epochs =
    30``), then train on the task loss (with KD in the authors' code): reproduce that with a
    first Distiller phase on ``ab`` only.

    Args:
        beta: The weight: finite, ``>= 0``.
        margin: ``mu``: finite, ``>= 0``.
        layer_weights: ``"code"`` (``2^(j - n + 1)``) or ``"equal"``.
        connector: ``None`` (connect pairs of unequal widths), ``True`` or ``False``.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.features import AB

        loss = AB(margin=1.0)
        loss.setup([("t", "s")])
        t, s = torch.randn(2, 16, 4, 4), torch.randn(2, 8, 4, 4, requires_grad=True)
        print(loss(Step([("t", "s")], [{loss.features: t}], [{loss.features: s}])).item())
        ```
    """

    name = "ab"

    def __init__(
        self,
        beta: float = 1.0,
        margin: float = 1.0,
        layer_weights: str = "code",
        connector: bool | None = None,
    ) -> None:
        super().__init__()
        self.beta = _real(beta, owner="ab", option="beta", why=_NEGATIVE)
        self.margin = _real(
            margin, owner="ab", option="margin", why=" (the distance kept from the boundary)"
        )
        self.layer_weights = _choice(
            layer_weights, owner="ab", option="layer_weights", allowed=("code", "equal")
        )
        self.connector = _connector_option(connector, "ab")
        self.features = Features()
        self.connectors = Connectors() if connector is not False else None

    def captures(self) -> tuple[Features, ...]:
        """AB keeps the feature maps whole."""
        return (self.features,)

    def forward(self, step: Step) -> Tensor:
        """The AB term of the step."""
        if self.connectors is not None:
            _need_setup(self.connectors, step, self.name)
        found = _feature_pairs(step, self.features, self.name)
        n, m = len(found), self.margin
        terms = []
        for i, (t_name, s_name, t, s) in enumerate(found):
            _same_size(t, s, t_name, s_name, self.name, "neurons one to one")
            r = _f32(_maybe_connect(self, i, t, s, t_name, s_name))
            t = _f32(t.detach())
            on = t > 0
            loss = (r + m).pow(2) * ((r > -m) & ~on) + (r - m).pow(2) * ((r <= m) & on)
            w = 2.0 ** (i - n + 1) if self.layer_weights == "code" else 1.0
            terms.append(w * loss.sum() / t.shape[0] / 1000 * 3)
        return self.beta * self.sum_pairs(terms)

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return (
            f"beta={self.beta:g}, margin={self.margin:g}, layer_weights={self.layer_weights!r}, "
            f"connector={self.connector}"
        )


# --------------------------------------------------------------------------- CWD


class CWD(Loss):
    """Channel-wise distillation: each channel a distribution over positions, KL to the teacher's.

    Shu, Liu, Gao, Yan and Shen, "Channel-wise Knowledge Distillation for Dense Prediction",
    ICCV 2021. Each channel ``c`` of a ``(B, C, *S)`` map becomes a distribution over its
    ``|S|`` positions, ``phi(y_c) = softmax(y_c / tau)``; the loss is

    ``weight * tau^2 / (B * C) * sum_{b,c} sum_s phi(T_c)(s) log(phi(T_c)(s) / phi(S_c)(s))``

    summed over the pairs: the KL divergence summed over positions, averaged over channels and
    batch, as the authors' ``CriterionCWD(norm_type="channel", divergence="kl")`` (``loss /=
    n * c``, times ``temperature ** 2``), which is also the paper's formula. Where widths
    differ, the student's map first goes through a learned connector to the teacher's width (a
    1x1 convolution and batch norm), built from the first step's widths (``connector=None``,
    the default: only for pairs of unequal widths; ``True``: for every pair; ``False``: never,
    unequal widths are an error). The maps of a pair must have the same spatial size, as the
    authors' code requires: pair layers of equal stride.

    Defaults: ``tau = 4`` and ``weight = 3``, the paper's and the authors' setting for
    segmentation logit maps (``temperature=4``). mmrazor's re-implementation
    (``ChannelWiseDivergence``) uses other values in its configs (``tau=1``, ``loss_weight``
    3 to 10): pass them to reproduce those.

    Args:
        weight: The loss weight: finite, ``>= 0``.
        tau: The temperature: finite, ``> 0``.
        connector: ``None`` (connect pairs of unequal widths), ``True`` or ``False``.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.features import CWD

        loss = CWD(tau=4.0)
        loss.setup([("t", "s")])
        t, s = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4, requires_grad=True)
        print(loss(Step([("t", "s")], [{loss.features: t}], [{loss.features: s}])).item())
        ```
    """

    name = "cwd"

    def __init__(
        self, weight: float = 3.0, tau: float = 4.0, connector: bool | None = None
    ) -> None:
        super().__init__()
        self.weight = _real(weight, owner="cwd", option="weight", why=_NEGATIVE)
        self.tau = _real(
            tau,
            owner="cwd",
            option="tau",
            strict=True,
            why=" (the maps are divided by it; the authors use 4)",
        )
        self.connector = _connector_option(connector, "cwd")
        self.features = Features()
        self.connectors = Connectors() if connector is not False else None

    def captures(self) -> tuple[Features, ...]:
        """CWD keeps the feature maps whole."""
        return (self.features,)

    def forward(self, step: Step) -> Tensor:
        """The CWD term of the step."""
        if self.connectors is not None:
            _need_setup(self.connectors, step, self.name)
        terms = []
        for i, (t_name, s_name, t, s) in enumerate(_feature_pairs(step, self.features, self.name)):
            _same_size(
                t, s, t_name, s_name, self.name, "each channel's distribution over positions"
            )
            s = _maybe_connect(self, i, t, s, t_name, s_name)
            b, c = t.shape[:2]
            log_p_t = F.log_softmax(_f32(t.detach()).flatten(2) / self.tau, dim=2)
            log_p_s = F.log_softmax(_f32(s).flatten(2) / self.tau, dim=2)
            kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
            terms.append(kl * self.tau**2 / (b * c))
        return self.weight * self.sum_pairs(terms)

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return f"weight={self.weight:g}, tau={self.tau:g}, connector={self.connector}"


SPECS: list[LossSpec] = [
    LossSpec("fitnet", FitNet, "FitNet hints: learned 1x1 regressor, MSE to the teacher's maps"),
    LossSpec("nst", NST, "neuron selectivity transfer: polynomial-kernel MMD of channel patterns"),
    LossSpec("fsp", FSP, "FSP matrices between consecutive layers, L2 to the teacher's"),
    LossSpec("ab", AB, "activation boundaries: margin loss on connected pre-ReLU maps"),
    LossSpec("cwd", CWD, "channel-wise distillation: spatial softmax per channel, KL, tau^2"),
]
