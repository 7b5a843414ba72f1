"""Feature-map methods with learned modules: FT, OFD, ReviewKD, and CAT-KD (which reads the heads).

Each learned part is built lazily by an :class:`athooks.plugin.Connector` from the first step's
real widths, into parameters that exist from the loss's set-up, so ``d.parameters()`` hands them
to the optimiser before the first step and ``d.state_dict()`` saves them.

* ``ft``: Factor Transfer (Kim, Park & Kwak, NeurIPS 2018): a paraphraser (autoencoder) on the
  teacher's features, a translator on the student's, L1 between L2-normalised factors.
* ``ofd``: A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019): a 1x1
  conv + BN connector on the student, the partial L2 distance to the teacher's pre-ReLU
  features with the teacher-side margin.
* ``reviewkd``: Distilling Knowledge via Knowledge Review (Chen et al., CVPR 2021):
  attention-based fusion (ABF) from the deepest to the shallowest pair, hierarchical context
  loss (HCL).
* ``catkd``: Class Attention Transfer Based Knowledge Distillation (Guo et al., CVPR 2023):
  class activation maps from the last tapped feature map and each model's classifier weights.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from athooks import CaptureError, ConfigurationError
from athooks.plugin import Connectors, Features, Loss, LossSpec, Mapping, Step
from athooks_zoo._checks import real as _real

__all__ = ["FT", "OFD", "SPECS", "CATKD", "ReviewKD", "ofd_margin"]

_NEGATIVE = " (a negative weight would push the student away from the teacher)"


# --------------------------------------------------------------------------------------------
# Option checks (the plugin's own: only the public plugin API is imported)
# --------------------------------------------------------------------------------------------


def _count(value: Any, owner: str, option: str, *, minimum: int = 0, why: str = "") -> int:
    """An integer option ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ConfigurationError(
            f"{owner}: {option} must be an integer >= {minimum}, got {value!r}{why}"
        )
    return int(value)


def _choice(value: Any, owner: str, option: str, choices: dict[str, str]) -> str:
    """One of ``choices`` (name -> meaning, for the message)."""
    if not isinstance(value, str) or value not in choices:
        listed = "; ".join(f"{name!r}: {meaning}" for name, meaning in choices.items())
        raise ConfigurationError(f"{owner}: {option} must be one of {listed}; got {value!r}")
    return value


def _distributed() -> bool:
    """Whether several processes of ``torch.distributed`` run together."""
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _float(x: Tensor) -> Tensor:
    """At least float32 (half-precision features are computed in float32)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _feature_pairs(
    step: Step, features: Mapping, owner: str, *, spatial_dims: int | None = 2
) -> list[tuple[str, str, Tensor, Tensor]]:
    """``(teacher_name, student_name, teacher, student)`` per pair, batch and layout checked."""
    out = []
    for (t_name, s_name), (t, s) in zip(step.pairs, step.features(features), strict=True):
        if t.shape[0] != s.shape[0]:
            raise CaptureError(
                f"{owner}: batch sizes differ in pair (teacher {t_name!r}, student {s_name!r}): "
                f"teacher {t.shape[0]}, student {s.shape[0]}; the teacher must see the same "
                "batch as the student (check teacher_input)"
            )
        for who, name, x in (("teacher", t_name, t), ("student", s_name, s)):
            if spatial_dims is not None and x.dim() != 2 + spatial_dims:
                raise CaptureError(
                    f"{owner}: the {who}'s layer {name!r} gave shape {tuple(x.shape)}, but "
                    f"{owner} works on image feature maps (B, C, H, W) as its authors' modules "
                    "(2-D convolutions) do. Tap convolutional stages, or give the layer an "
                    "athooks.Layer(name, transform=...) that reshapes it to (B, C, H, W)"
                )
        out.append((t_name, s_name, _float(t), _float(s)))
    if not out:
        raise CaptureError(f"{owner}: no layer pair was tapped (check layers=...)")
    return out


def _pool_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Average-pool ``(B, C, H, W)`` to ``size`` (shrinking), or bilinear (growing)."""
    h, w = int(size[0]), int(size[1])
    if tuple(x.shape[-2:]) == (h, w):
        return x
    if h <= x.shape[-2] and w <= x.shape[-1]:
        return F.adaptive_avg_pool2d(x, (h, w))
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------
# FT: Factor Transfer
# --------------------------------------------------------------------------------------------


def _paraphraser_encoder(in_channels: int, out_channels: int) -> nn.Module:
    """The authors' paraphraser encoder (and translator): three 3x3 convs with LeakyReLU(0.1)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.LeakyReLU(0.1),
    )


def _paraphraser_decoder(in_channels: int, out_channels: int) -> nn.Module:
    """The authors' paraphraser decoder: three 3x3 transposed convs with LeakyReLU(0.1)."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, in_channels, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.ConvTranspose2d(in_channels, out_channels, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.ConvTranspose2d(out_channels, out_channels, 3, padding=1),
        nn.LeakyReLU(0.1),
    )


class FT(Loss):
    r"""Factor Transfer: match the student's translated factor to the teacher's paraphrased one.

    Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018. A *paraphraser* (an autoencoder of 3x3 convolutions, LeakyReLU 0.1) compresses
    the teacher's feature map ``x_T`` (``C`` channels) into a factor ``F_T = E(x_T)`` of
    ``round(k*C)`` channels (``k`` the factor rate, 0.5); a *translator* (the encoder's
    structure) maps the student's features to ``F_S = T(x_S)`` of the same width. Per pair:

    ``L_FT = beta * mean_{b, j} | F_S[b]/||F_S[b]||_2 - F_T[b]/||F_T[b]||_2 |_j``

    (the factors flattened per sample, L2-normalised, L1 distance with ``p = 1``), summed over
    the pairs. The teacher's factor is a constant for the student and the translator.

    **Training the paraphraser in one phase.** The paper first trains the paraphraser alone on
    the reconstruction ``L_rec = ||x_T - D(E(x_T))||``, then freezes it and trains the student.
    Inside one training loop, by default (``paraphraser_steps=0``) the paraphraser is trained
    *jointly*: the term adds ``reconstruction_weight * L_rec``, whose gradient reaches only the
    paraphraser (the student cannot change it); early factors are those of an untrained
    paraphraser, which is the deviation from the paper. ``paraphraser_steps=N`` follows the
    paper's two phases instead: the first ``N`` training calls return only
    ``reconstruction_weight * L_rec`` (no FT term: the student learns from its task loss
    alone), after which the paraphraser is frozen (no reconstruction term, no gradient) and the
    term is FT alone. Calls are counted in a buffer (saved in ``d.state_dict()``) while the
    loss is in training mode.

    Defaults are the authors' code (github.com/Jangho-Kim/Factor-Transfer-pytorch, CIFAR-10
    ResNet-56 -> ResNet-20): ``beta = 500``, ``k = 0.5`` rounded as ``round(k*C)``, no batch
    norm in the paraphraser or translator, an L1 reconstruction loss (``nn.L1Loss``), and the
    FT distance as ``nn.L1Loss`` (the mean over the batch *and* the factor's elements). Where
    they differ: the paper writes the reconstruction as a squared L2 norm
    (``reconstruction="l2"``: the mean squared error, as RepDistiller) and ``L_FT`` as the
    per-sample L1 norm (``distance="paper"``: summed over the factor's elements, averaged over
    the batch; ``beta`` then needs rescaling). RepDistiller (``-b 200``) takes
    ``normalize(mean_c(F^2))``, an attention map of the factor, instead of the flattened factor:
    ``factor="repdistiller"``. The authors transfer one layer (the last stage); athooks applies
    FT to every tapped pair (one paraphraser and translator each). When the two factors differ
    in spatial size, the larger is average-pooled to the smaller (RepDistiller).

    Args:
        beta: The weight ``beta`` (500 in the authors' code, 200 in RepDistiller): finite,
            ``>= 0``.
        rate: The factor rate ``k`` (0.5): finite, ``> 0``.
        reconstruction: ``"l1"`` (the authors' code) or ``"l2"`` (the paper, RepDistiller).
        reconstruction_weight: The weight of the paraphraser's reconstruction term: finite,
            ``>= 0`` (1; 0 turns the paraphraser's training off, e.g. after loading a
            pre-trained one into ``d.state_dict()``).
        paraphraser_steps: How many first training calls train the paraphraser alone before FT
            starts with it frozen (0: joint training from the first step).
        distance: ``"code"`` (mean over batch and elements) or ``"paper"`` (per-sample L1 norm,
            mean over the batch).
        factor: ``"flat"`` (the paper and the authors' code) or ``"repdistiller"``.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.learned import FT

        ft = FT()
        ft.setup([("layer3", "layer3")])
        t, s = torch.randn(2, 16, 4, 4), torch.randn(2, 8, 4, 4, requires_grad=True)
        loss = ft(Step([("layer3", "layer3")], [{ft.features: t}], [{ft.features: s}]))
        loss.backward()  # the student, the translator and the paraphraser get gradients
        print(loss.item(), ft.translators[0])
        ```
    """

    name = "ft"

    def __init__(
        self,
        beta: float = 500.0,
        rate: float = 0.5,
        reconstruction: str = "l1",
        reconstruction_weight: float = 1.0,
        paraphraser_steps: int = 0,
        distance: str = "code",
        factor: str = "flat",
    ) -> None:
        super().__init__()
        self.beta = _real(beta, "ft", "beta", why=_NEGATIVE)
        self.rate = _real(
            rate, "ft", "rate", strict=True, why=" (the factor has round(rate * C) channels)"
        )
        self.reconstruction = _choice(
            reconstruction,
            "ft",
            "reconstruction",
            {"l1": "mean absolute error (authors' code)", "l2": "mean squared error (paper)"},
        )
        self.reconstruction_weight = _real(
            reconstruction_weight, "ft", "reconstruction_weight", why=_NEGATIVE
        )
        self.paraphraser_steps = _count(paraphraser_steps, "ft", "paraphraser_steps")
        if self.paraphraser_steps > 0 and self.reconstruction_weight == 0:
            raise ConfigurationError(
                f"ft: paraphraser_steps={self.paraphraser_steps} trains the paraphraser alone "
                "first, on its reconstruction, but reconstruction_weight=0 turns that term off; "
                "give reconstruction_weight > 0, or paraphraser_steps=0 to skip the first phase"
            )
        self.distance = _choice(
            distance,
            "ft",
            "distance",
            {"code": "mean over batch and elements", "paper": "per-sample L1 norm"},
        )
        self.factor = _choice(
            factor,
            "ft",
            "factor",
            {"flat": "the flattened factor", "repdistiller": "normalize(mean_c(F^2))"},
        )
        self.features = Features()
        self.paraphrasers = Connectors(builder=_paraphraser_encoder)
        self.decoders = Connectors(builder=_paraphraser_decoder)
        self.translators = Connectors(builder=_paraphraser_encoder)
        self.steps: Tensor
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def captures(self) -> tuple[Mapping, ...]:
        """FT reads the feature maps whole."""
        return (self.features,)

    def width(self, channels: int) -> int:
        """The factor's width for a teacher layer of ``channels`` channels: ``round(k*C)``."""
        return max(1, round(channels * self.rate))

    def _factor(self, f: Tensor) -> Tensor:
        if self.factor == "repdistiller":
            f = f.pow(2).mean(1)
        return F.normalize(f.flatten(1), dim=1)

    def _reconstruction(self, i: int, t: Tensor, factor: Tensor) -> Tensor:
        rec: Tensor = self.decoders[i](factor, t.shape[1])
        if self.reconstruction == "l1":
            return (rec - t).abs().mean()
        return (rec - t).pow(2).mean()

    def forward(self, step: Step) -> Tensor:
        """The FT term of the step (with the paraphraser's reconstruction, see above)."""
        pairs = _feature_pairs(step, self.features, "ft")
        first_phase = int(self.steps) < self.paraphraser_steps
        train_paraphraser = first_phase or (
            self.paraphraser_steps == 0 and self.reconstruction_weight > 0
        )
        terms = []
        for i, (_, _, t, s) in enumerate(pairs):
            t = t.detach()
            width = self.width(t.shape[1])
            with torch.set_grad_enabled(train_paraphraser and torch.is_grad_enabled()):
                factor = self.paraphrasers[i](t, width)
            rec = (
                self.reconstruction_weight * self._reconstruction(i, t, factor)
                if train_paraphraser
                else None
            )
            if first_phase:
                assert rec is not None
                terms.append(rec)
                continue
            factor_t, factor_s = factor.detach(), self.translators[i](s, width)
            (h_t, w_t), (h_s, w_s) = factor_t.shape[-2:], factor_s.shape[-2:]
            if h_s * w_s > h_t * w_t:
                factor_s = F.adaptive_avg_pool2d(factor_s, (h_t, w_t))
            elif h_s * w_s < h_t * w_t:
                factor_t = F.adaptive_avg_pool2d(factor_t, (h_s, w_s))
            gap = (self._factor(factor_s) - self._factor(factor_t)).abs()
            ft = gap.mean() if self.distance == "code" else gap.sum(1).mean()
            terms.append(self.beta * ft if rec is None else self.beta * ft + rec)
        if self.training:
            self.steps += 1
        return self.sum_pairs(terms)

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return (
            f"beta={self.beta:g}, rate={self.rate:g}, reconstruction={self.reconstruction!r}, "
            f"reconstruction_weight={self.reconstruction_weight:g}, "
            f"paraphraser_steps={self.paraphraser_steps}, distance={self.distance!r}, "
            f"factor={self.factor!r}"
        )


# --------------------------------------------------------------------------------------------
# OFD: A Comprehensive Overhaul of Feature Distillation
# --------------------------------------------------------------------------------------------


def ofd_margin(mean: Tensor, std: Tensor) -> Tensor:
    """The OFD margin per channel: ``E[x | x < 0]`` for ``x ~ N(mean, std^2)``, as the authors.

    ``m = mean - std * phi(mean/std) / Phi(-mean/std)`` where ``Phi(-mean/std) > 0.001``, else
    ``-3 * std`` (clovaai/overhaul-distillation's ``get_margin_from_BN``, which takes
    ``mean = bn.bias`` and ``std = |bn.weight|`` of the batch norm before the teacher's ReLU).

    Args:
        mean: The per-channel mean of the teacher's pre-ReLU responses, ``(C,)``.
        std: Their standard deviation, ``(C,)`` (its absolute value is used).

    Returns:
        The margins, ``(C,)``, float64, all ``<= 0``.

    Example:
        ```python
        import torch
        from athooks_zoo.learned import ofd_margin

        bn = torch.nn.BatchNorm2d(4)  # the teacher's BN before a ReLU, as the authors read it
        print(ofd_margin(bn.bias.detach(), bn.weight.detach()))  # -0.7979 = -sqrt(2/pi) each
        ```
    """
    m = mean.detach().to(torch.float64)
    s = std.detach().to(torch.float64).abs().clamp_min(1e-12)
    cdf = torch.special.ndtr(-m / s)
    pdf = torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
    return torch.where(cdf > 1e-3, -s * pdf / cdf.clamp_min(1e-3) + m, -3 * s)


def _ofd_connector(in_channels: int, out_channels: int) -> nn.Module:
    """The authors' connector: a 1x1 conv (no bias) and a BN, initialised as theirs."""
    conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
    bn = nn.BatchNorm2d(out_channels)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / out_channels))
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


class _Moments(nn.Module):
    """The running per-channel mean and variance of every feature map it is shown (float64).

    Merged batch by batch (Chan et al.'s parallel update), over the batch and spatial positions;
    under ``torch.distributed`` each update merges the batch of every rank (two all-reduces of
    ``C`` values), so the estimate is the same everywhere. Its buffers are sized on the first
    update and restored from a checkpoint whatever their size.
    """

    count: Tensor
    mean: Tensor
    m2: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # not cast by .to()
        self.register_buffer("mean", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(0, dtype=torch.float64))

    @property
    def channels(self) -> int:
        """The number of channels (0 before the first update)."""
        return int(self.mean.numel())

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Merge the statistics of ``x`` ``(B, C, *S)`` into the running ones."""
        c = x.shape[1]
        flat = x.detach().transpose(0, 1).reshape(c, -1).to(torch.float64)
        if self.channels == 0:
            self.mean = torch.zeros(c, dtype=torch.float64, device=x.device)
            self.m2 = torch.zeros(c, dtype=torch.float64, device=x.device)
        head = torch.cat([flat.new_tensor([flat.shape[1]]), flat.sum(1)])
        if _distributed():  # the statistics of the whole (global) batch, on every rank
            dist.all_reduce(head)
        n_b = round(float(head[0]))
        mean_b = head[1:] / n_b
        m2_b = (flat - mean_b[:, None]).pow(2).sum(1)
        if _distributed():
            dist.all_reduce(m2_b)
        n = int(self.count)
        total = n + n_b
        mean, m2 = self.mean.to(torch.float64), self.m2.to(torch.float64)
        delta = mean_b - mean
        # float64 arithmetic even if the Distiller cast the loss's buffers to the student's dtype
        self.mean.copy_(mean + delta * (n_b / total))
        self.m2.copy_(m2 + m2_b + delta.pow(2) * (n * n_b / total))
        self.count += n_b

    def std(self) -> Tensor:
        """The running standard deviation (biased, as a batch norm's)."""
        return (self.m2.to(torch.float64) / max(int(self.count), 1)).clamp_min(0.0).sqrt()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in ("mean", "m2"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved, device=self.count.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _vectors(value: Any, owner: str, option: str, what: str) -> list[Tensor]:
    """A list of 1-D finite tensors, one per pair."""
    if isinstance(value, Tensor) or not isinstance(value, Sequence) or not value:
        raise ConfigurationError(
            f"{owner}: {option} must be a non-empty list with one entry per layer pair "
            f"({what}), got {type(value).__name__}"
        )
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, Tensor) or v.dim() != 1 or not v.is_floating_point():
            got = f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            raise ConfigurationError(
                f"{owner}: {option}[{i}] must be a 1-D floating-point tensor with one value per "
                f"teacher channel, got {got}"
            )
        if not torch.isfinite(v).all():
            raise ConfigurationError(f"{owner}: {option}[{i}] has NaN or infinite values")
        out.append(v.detach().to(torch.float64).clone())
    return out


class OFD(Loss):
    r"""Overhaul of feature distillation: partial L2 to the teacher's pre-ReLU features, margin.

    Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature Distillation",
    ICCV 2019. The student's feature map goes through a connector ``r`` (1x1 conv + BN, to the
    teacher's width); the teacher's pre-ReLU map ``T`` is clipped from below by a per-channel
    margin ``m`` (the expected value of its negative responses), and the squared distance counts
    only where the student could change the teacher's post-ReLU response:

    ``d_p(T, S) = sum_i (S_i - max(T_i, m_i))^2  where  S_i > max(T_i, m_i)  or  T_i > 0``

    (``S = r(student)``). Per pair ``j`` of ``n`` (shallowest first) the term is
    ``weight * d_p / B / 2^(n-1-j)``: the authors' sum over all elements divided by the batch
    and their ``1/2^(n-1-j)`` factor, which halves each shallower stage
    (``stage_weights="equal"`` drops it); the terms are summed.

    **Margins.** The authors compute ``m`` from the teacher's batch norm before the ReLU,
    assuming its output per channel is Gaussian with mean ``bias`` and standard deviation
    ``|weight|``: ``m = E[x | x < 0]`` (:func:`ofd_margin`). Through hooks athooks sees the
    teacher's features, not that batch norm, so by default it estimates each channel's mean and
    standard deviation from the teacher's tapped features themselves (over batch and positions,
    accumulated over every training call into a buffer saved in ``d.state_dict()``, merged over
    the ranks under ``torch.distributed``; frozen in ``eval()`` mode) and applies the same
    Gaussian formula to them. That estimate matches the authors' in expectation when the tap is
    that BN's output and the BN normalises its input well. To use the authors' exact margins, pass
    ``stats=[(bn.bias, bn.weight.abs()), ...]`` (one per pair, from the teacher's BN before
    each tapped ReLU), or the margins themselves, ``margins=[m, ...]``.

    **What to tap.** The authors tap pre-ReLU features on both sides (the stage's output before
    its last ReLU). A stage whose output is post-ReLU gives ``T >= 0``: the loss is still
    defined (it is then L2 where ``T > 0`` and one-sided where ``T = 0``), the margin unused.

    Defaults: ``weight = 1e-3`` (clovaai/overhaul-distillation's CIFAR-100 code: ``loss_distill
    .sum() / batch_size / 1000``, "a = 1/1000 in eq. 6"; mdistiller ``OFD.LOSS.FEAT_WEIGHT``
    0.001; their ImageNet code divides by 10000); the connector initialised as theirs.

    Args:
        weight: The weight (1e-3 for CIFAR, 1e-4 for ImageNet in the authors' code): finite,
            ``>= 0``.
        margins: Per pair, the margins ``(C_t,)`` (values ``<= 0``); ``None``: computed.
        stats: Per pair, ``(mean, std)`` of the teacher's pre-ReLU responses per channel, from
            which the margins are computed; ``None``: estimated from the features.
        stage_weights: ``"halving"`` (the authors' ``1/2^(n-1-j)``) or ``"equal"``.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.learned import OFD

        ofd = OFD()
        pairs = [("layer2", "layer2"), ("layer3", "layer3")]
        ofd.setup(pairs)
        t = [{ofd.features: torch.randn(2, 16, 8, 8)}, {ofd.features: torch.randn(2, 32, 4, 4)}]
        s = [{ofd.features: torch.randn(2, 8, 8, 8)}, {ofd.features: torch.randn(2, 16, 4, 4)}]
        print(ofd(Step(pairs, t, s)), ofd.margins()[1].shape)  # margins (32,) of the 2nd pair
        ```
    """

    name = "ofd"

    def __init__(
        self,
        weight: float = 1e-3,
        margins: Sequence[Tensor] | None = None,
        stats: Sequence[tuple[Tensor, Tensor]] | None = None,
        stage_weights: str = "halving",
    ) -> None:
        super().__init__()
        self.weight = _real(weight, "ofd", "weight", why=_NEGATIVE)
        self.stage_weights = _choice(
            stage_weights,
            "ofd",
            "stage_weights",
            {"halving": "1/2^(n-1-j), the authors'", "equal": "every pair 1"},
        )
        if margins is not None and stats is not None:
            raise ConfigurationError(
                "ofd: give margins= or stats= (the margins are computed from the stats), not both"
            )
        given: list[Tensor] | None = None
        if margins is not None:
            given = _vectors(margins, "ofd", "margins", "a (C_t,) tensor of margins")
            for i, m in enumerate(given):
                if (m > 0).any():
                    raise ConfigurationError(
                        f"ofd: margins[{i}] has positive values (max {float(m.max()):g}); a "
                        "margin is the expected value of the teacher's negative responses, so "
                        "<= 0 (ofd_margin(mean, std) computes it)"
                    )
        elif stats is not None:
            if (
                isinstance(stats, Tensor)
                or not isinstance(stats, Sequence)
                or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in stats)
            ):
                raise ConfigurationError(
                    "ofd: stats must be a list of (mean, std) tensor pairs, one per layer pair, "
                    f"got {type(stats).__name__}"
                )
            means = _vectors([p[0] for p in stats], "ofd", "stats (means)", "(mean, std)")
            stds = _vectors([p[1] for p in stats], "ofd", "stats (stds)", "(mean, std)")
            for i, (mu, sd) in enumerate(zip(means, stds, strict=True)):
                if mu.shape != sd.shape:
                    raise ConfigurationError(
                        f"ofd: stats[{i}] has a mean of {mu.numel()} and a std of {sd.numel()} "
                        "values; give one of each per teacher channel"
                    )
            given = [ofd_margin(mu, sd) for mu, sd in zip(means, stds, strict=True)]
        self.source = "margins" if margins is not None else "stats" if stats else "estimated"
        self._given = 0 if given is None else len(given)
        for i, m in enumerate(given or []):
            self.register_buffer(f"margin{i}", m)
        self.features = Features()
        self.connectors = Connectors(builder=_ofd_connector)
        self.moments = nn.ModuleList()

    def captures(self) -> tuple[Mapping, ...]:
        """OFD reads the feature maps whole."""
        return (self.features,)

    def setup(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Size the connectors, and the running statistics when the margins are estimated."""
        super().setup(pairs)
        if self._given and self._given != len(pairs):
            raise ConfigurationError(
                f"ofd: {self.source}= has {self._given} entries but the Distiller taps "
                f"{len(pairs)} layer pairs; give one per pair, in the pairs' order"
            )
        if not self._given:
            while len(self.moments) < len(pairs):
                self.moments.append(_Moments())
            while len(self.moments) > len(pairs):
                del self.moments[len(self.moments) - 1]

    def margins(self) -> list[Tensor]:
        """The current margins of every pair, ``(C_t,)`` float64 (empty ones before any step)."""
        if self._given:
            return [getattr(self, f"margin{i}") for i in range(self._given)]
        moments = [self._moments(j) for j in range(len(self.moments))]
        return [ofd_margin(mom.mean, mom.std()) if mom.channels else mom.mean for mom in moments]

    def _moments(self, j: int) -> _Moments:
        found = self.moments[j]
        assert isinstance(found, _Moments)
        return found

    def forward(self, step: Step) -> Tensor:
        """The OFD term of the step."""
        pairs = _feature_pairs(step, self.features, "ofd")
        n = len(pairs)
        if not self._given and len(self.moments) != n:
            raise CaptureError(
                f"ofd was set up for {len(self.moments)} layer pairs and is given {n}: call "
                "loss.setup(pairs) with the pairs of the step (the Distiller does)"
            )
        terms = []
        for j, (t_name, _, t, s) in enumerate(pairs):
            t = t.detach()
            if not self._given:
                mom = self._moments(j)
                if mom.channels not in (0, t.shape[1]):
                    raise CaptureError(
                        f"ofd: the teacher's layer {t_name!r} has {t.shape[1]} channels, but "
                        f"its running statistics were made for {mom.channels}: the tapped "
                        "layers changed between steps; keep the layers the loss was set up with"
                    )
                if self.training or mom.channels == 0:
                    mom.update(t)
                margin = ofd_margin(mom.mean, mom.std())
            else:
                margin = getattr(self, f"margin{j}")
                if margin.numel() != t.shape[1]:
                    raise CaptureError(
                        f"ofd: {self.source}[{j}] has {margin.numel()} values but the teacher's "
                        f"layer {t_name!r} has {t.shape[1]} channels; give one per channel"
                    )
            s_hat = self.connectors[j](s, t)
            if s_hat.shape[-2:] != t.shape[-2:]:
                t = _pool_to(t, s_hat.shape[-2:])
            target = torch.max(t, margin.to(t).view(1, -1, 1, 1))
            mask = (s_hat > target) | (target > 0)
            term = ((s_hat - target).pow(2) * mask).sum() / t.shape[0]
            if self.stage_weights == "halving":
                term = term / 2 ** (n - 1 - j)
            terms.append(term)
        return self.weight * self.sum_pairs(terms)

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return (
            f"weight={self.weight:g}, margins={self.source!r}, stage_weights={self.stage_weights!r}"
        )


# --------------------------------------------------------------------------------------------
# ReviewKD: knowledge review
# --------------------------------------------------------------------------------------------


def _abf_in(in_channels: int, out_channels: int) -> nn.Module:
    """ABF's first convolution: 1x1, no bias, BN (kaiming-uniform ``a=1`` as the authors)."""
    conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


def _abf_out(in_channels: int, out_channels: int) -> nn.Module:
    """ABF's output convolution: 3x3, no bias, BN (kaiming-uniform ``a=1`` as the authors)."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


def _abf_attention(in_channels: int, out_channels: int) -> nn.Module:
    """ABF's attention: a 1x1 conv (with bias) to two maps, and a sigmoid."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.Sigmoid())


def _hcl(fs: Tensor, ft: Tensor) -> Tensor:
    """The authors' hierarchical context loss of one level (``hcl`` in their code)."""
    h = fs.shape[2]
    loss = F.mse_loss(fs, ft)
    cnt, tot = 1.0, 1.0
    for size in (4, 2, 1):
        if size >= h:
            continue
        cnt /= 2.0
        pooled_s = F.adaptive_avg_pool2d(fs, (size, size))
        pooled_t = F.adaptive_avg_pool2d(ft, (size, size))
        loss = loss + F.mse_loss(pooled_s, pooled_t) * cnt
        tot += cnt
    return loss / tot


class ReviewKD(Loss):
    r"""Knowledge review: fuse the student's stages deepest first (ABF), match every stage (HCL).

    Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021. The pairs are
    read from the deepest (the last) to the shallowest (the first). At pair ``j`` an
    attention-based fusion (ABF) maps the student's features to ``mid`` channels (1x1 conv + BN:
    ``x``) and, except at the deepest pair, fuses them with the output ``y`` of the next deeper
    ABF (nearest-upsampled to ``x``'s size): ``[a, b] = sigmoid(conv1x1([x, y]))``,
    ``x <- a*x + b*y``; ``x`` is then resized (nearest) to the teacher's spatial size when it
    differs, passed on to the next shallower ABF, and mapped to the teacher's width by a 3x3
    conv + BN: ``S_j``. The hierarchical context loss of a pair is

    ``HCL(S, T) = (mse(S, T) + sum_l w_l mse(pool_l(S), pool_l(T))) / (1 + sum_l w_l)``

    over the pyramid levels ``l = 4, 2, 1`` (adaptive average pooling to ``l x l``) that are
    smaller than the map's height, with weights ``w = 1/2, 1/4, 1/8`` (the authors' code:
    ``cnt`` halves at every level; the full-resolution level weighs 1), and the term is
    ``weight * sum_j HCL(S_j, T_j)``.

    Defaults are the authors' CIFAR-100 code (dvlab-research/ReviewKD, and mdistiller's
    ``ReviewKD``): ``weight = 5`` (``--kd-loss-weight 5.0`` for most CIFAR pairs, e.g. ResNet
    32x4 -> 8x4; 0.6 for ResNet-56 -> 20, 1.0 for 110 -> 32 and on ImageNet); ``mid`` =
    ``min(512, C)`` with ``C`` the student's deepest width (their CIFAR code; their ImageNet code
    fixes 512 for ResNet-18, 256 for MobileNet: ``mid_channels=``). Their ABFs initialise the
    convolutions kaiming-uniform (``a=1``). What differs from the authors: they add the
    student's pooled embedding as a deepest level (a ``1 x 1`` map matched with the teacher's
    pooled features); athooks keeps to the feature maps of the tapped pairs, so the deepest
    tapped pair has no fusion. They warm the term up linearly over the first epochs
    (``min(epoch / 20, 1)`` on CIFAR); athooks has no epochs, use the Distiller's schedules.
    They tap the teacher's pre-ReLU stage outputs and the student's post-ReLU ones.

    Args:
        weight: The weight: finite, ``>= 0``.
        mid_channels: The ABFs' width; ``None``: ``min(512, C)`` as above.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.learned import ReviewKD

        rkd = ReviewKD()
        pairs = [("layer2", "layer2"), ("layer3", "layer3")]  # shallowest first
        rkd.setup(pairs)
        t = [{rkd.features: torch.randn(2, 16, 8, 8)}, {rkd.features: torch.randn(2, 32, 4, 4)}]
        s = [{rkd.features: torch.randn(2, 8, 8, 8)}, {rkd.features: torch.randn(2, 16, 4, 4)}]
        print(rkd(Step(pairs, t, s)))
        ```
    """

    name = "reviewkd"

    def __init__(self, weight: float = 5.0, mid_channels: int | None = None) -> None:
        super().__init__()
        self.weight = _real(weight, "reviewkd", "weight", why=_NEGATIVE)
        self.mid_channels = (
            None
            if mid_channels is None
            else _count(mid_channels, "reviewkd", "mid_channels", minimum=1)
        )
        self.features = Features()
        self.reduce = Connectors(builder=_abf_in)
        self.expand = Connectors(builder=_abf_out)
        self.fuse = Connectors(builder=_abf_attention)

    def captures(self) -> tuple[Mapping, ...]:
        """ReviewKD reads the feature maps whole."""
        return (self.features,)

    def setup(self, pairs: Sequence[tuple[str, str]]) -> None:
        """One ABF per pair; the deepest (last) pair has no fusion."""
        super().setup(pairs)
        self.fuse.resize(max(len(pairs) - 1, 0))

    def forward(self, step: Step) -> Tensor:
        """The ReviewKD term of the step."""
        pairs = _feature_pairs(step, self.features, "reviewkd")
        n = len(pairs)
        for j in range(1, n):
            s_prev, s_name = step.pairs[j - 1][1], step.pairs[j][1]
            prev, here = pairs[j - 1][3].shape[-2:], pairs[j][3].shape[-2:]
            if here[0] * here[1] > prev[0] * prev[1]:
                raise CaptureError(
                    f"reviewkd fuses the stages from the deepest (the last pair) to the "
                    f"shallowest (the first), but the student's layer {s_name!r} (pair {j}, "
                    f"{tuple(here)}) is larger than {s_prev!r} (pair {j - 1}, {tuple(prev)}). "
                    "List the layer pairs from the shallowest to the deepest"
                )
        mid = self.mid_channels or min(512, pairs[-1][3].shape[1])
        terms: list[Tensor] = [torch.zeros(())] * n
        residual: Tensor | None = None
        for j in reversed(range(n)):
            _, _, t, s = pairs[j]
            x = self.reduce[j](s, mid)
            if residual is not None:
                y = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
                z = self.fuse[j](torch.cat([x, y], dim=1), 2)
                x = x * z[:, 0:1] + y * z[:, 1:2]
            if x.shape[-2:] != t.shape[-2:]:
                x = F.interpolate(x, size=t.shape[-2:], mode="nearest")
            residual = x
            terms[j] = _hcl(self.expand[j](x, t), t.detach())
        return self.weight * self.sum_pairs(terms)

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        mid = "min(512, C_student)" if self.mid_channels is None else str(self.mid_channels)
        return f"weight={self.weight:g}, mid_channels={mid}"


# --------------------------------------------------------------------------------------------
# CAT-KD: class attention transfer
# --------------------------------------------------------------------------------------------


def _classifier_weight(step: Step, side: str) -> Tensor:
    head = step.classifier(side)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        raise CaptureError(
            f"catkd: the {side}'s classifier is a {type(head).__name__} without a (classes, D) "
            "weight; CAT-KD needs a linear classifier (nn.Linear, or a 1x1 convolution) whose "
            "weight makes class activation maps"
        )
    if weight.dim() > 2:
        if any(k != 1 for k in weight.shape[2:]):
            raise CaptureError(
                f"catkd: the {side}'s classifier weight has shape {tuple(weight.shape)}; only a "
                "linear layer or a 1x1 convolution gives class activation maps"
            )
        weight = weight.flatten(1)
    return weight


class CATKD(Loss):
    r"""Class attention transfer: match the models' class activation maps, pooled to ``r x r``.

    Guo, Yan, Li & Lin, "Class Attention Transfer Based Knowledge Distillation", CVPR 2023.
    The class activation map of class ``k`` is the last feature map ``A`` weighted by that
    class's classifier weights: ``CAM_k = sum_c W_kc A_c``
    (no bias: the authors replace the classifier by a bias-free 1x1 convolution before global
    pooling). Both models' CAMs are average-pooled to ``r x r``, optionally L2-normalised per
    class map, and compared by the mean squared error over batch, classes and cells:

    ``L = weight * mean_{b,k,i} (phi(pool(CAM^S))_{bki} - phi(pool(CAM^T))_{bki})^2``

    CAT-KD reads the **last** tapped pair only: tap the feature map the classifier reads after
    global pooling (e.g. ``("layer4", "layer4")`` on a torchvision ResNet), which must have the
    classifier's input width. The classifiers are the ones the Distiller gives the step
    (``needs_classifier``: the layer whose input is each model's pre-logit vector, found by
    ``athooks.layers.find_classifier``: a timm model's ``get_classifier()``, torchvision's
    ``fc``/``classifier``/``heads``/``head``, else the last ``nn.Linear``); the
    teacher's weights are constants, the student's receive gradient (the authors train the
    student's 1x1 head through this loss too). Teacher and student need the same classes.

    Defaults are the authors' CAT-KD configs (github.com/GzyAftermath/CAT-KD): ``weight = 15``
    (``CAT_loss_weight``, CIFAR-100 ResNet-32x4 -> 8x4; other pairs use 0.7 to 12, ImageNet
    ResNet-34 -> 18 0.5 with ``r = 4``; they advise tuning it so the term is about 1 to 50 after
    the first epoch), ``r = 2`` (``CAM_RESOLUTION``), and no normalisation
    (``IF_NORMALIZE: False`` in every CAT-KD config). The paper's CAT normalises the
    transferred CAMs (its config default and the CAT-only experiments): ``normalize=True``
    (``F.normalize`` over the ``r x r`` cells of each class map). The authors' binarised and
    partial-class variants are not offered.

    Args:
        weight: ``beta``, the weight: finite, ``>= 0``.
        resolution: ``r``, the pooled size (a positive integer).
        normalize: L2-normalise each pooled class map.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.learned import CATKD

        cat = CATKD()
        t, s = torch.randn(2, 16, 4, 4), torch.randn(2, 8, 4, 4, requires_grad=True)
        heads = (torch.nn.Linear(16, 10), torch.nn.Linear(8, 10))  # (teacher, student)
        step = Step([("layer4", "layer4")], [{cat.features: t}], [{cat.features: s}],
                    classifiers=heads)
        print(cat(step))
        ```
    """

    name = "catkd"
    needs_classifier = True

    def __init__(self, weight: float = 15.0, resolution: int = 2, normalize: bool = False) -> None:
        super().__init__()
        self.weight = _real(weight, "catkd", "weight", why=_NEGATIVE)
        self.resolution = _count(
            resolution, "catkd", "resolution", minimum=1, why=" (the CAMs are pooled to r x r)"
        )
        if not isinstance(normalize, bool):
            raise ConfigurationError(
                f"catkd: normalize must be True or False, got {type(normalize).__name__}"
            )
        self.normalize = normalize
        self.features = Features()

    def captures(self) -> tuple[Mapping, ...]:
        """CAT-KD reads the feature maps whole (of the last pair)."""
        return (self.features,)

    def forward(self, step: Step) -> Tensor:
        """The CAT-KD term of the step."""
        t_name, s_name, t, s = _feature_pairs(step, self.features, "catkd")[-1]
        w_t = _float(_classifier_weight(step, "teacher")).detach()
        w_s = _float(_classifier_weight(step, "student"))
        if w_t.shape[0] != w_s.shape[0]:
            raise CaptureError(
                f"catkd: the teacher's classifier has {w_t.shape[0]} classes and the student's "
                f"{w_s.shape[0]}; class attention transfer needs the same classes on both models"
            )
        for who, name, feat, w in (("teacher", t_name, t, w_t), ("student", s_name, s, w_s)):
            if feat.shape[1] != w.shape[1]:
                raise CaptureError(
                    f"catkd: the {who}'s layer {name!r} has {feat.shape[1]} channels but its "
                    f"classifier reads {w.shape[1]} features; the last tapped pair must be the "
                    "feature map the classifier reads after global pooling (e.g. layer4 of a "
                    "ResNet)"
                )
        r = self.resolution
        cam_t = F.adaptive_avg_pool2d(torch.einsum("kc,bchw->bkhw", w_t, t.detach()), (r, r))
        cam_s = F.adaptive_avg_pool2d(torch.einsum("kc,bchw->bkhw", w_s.to(s.dtype), s), (r, r))
        if self.normalize:  # F.normalize over the r x r cells of each class map
            cam_t = cam_t / cam_t.flatten(2).norm(dim=2).clamp_min(1e-12)[..., None, None]
            cam_s = cam_s / cam_s.flatten(2).norm(dim=2).clamp_min(1e-12)[..., None, None]
        return self.weight * F.mse_loss(cam_s, cam_t.to(cam_s.dtype))

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return f"weight={self.weight:g}, resolution={self.resolution}, normalize={self.normalize}"


SPECS: list[LossSpec] = [
    LossSpec(
        "ft",
        FT,
        "Factor Transfer (Kim et al., NeurIPS 2018): paraphraser on the teacher, translator on "
        "the student, L1 of L2-normalised factors",
    ),
    LossSpec(
        "ofd",
        OFD,
        "Overhaul of feature distillation (Heo et al., ICCV 2019): connector, partial L2 to the "
        "teacher's pre-ReLU features with margin",
    ),
    LossSpec(
        "reviewkd",
        ReviewKD,
        "Knowledge review (Chen et al., CVPR 2021): attention-based fusion, hierarchical "
        "context loss",
    ),
    LossSpec(
        "catkd",
        CATKD,
        "Class attention transfer (Guo et al., CVPR 2023): pooled class activation maps, MSE",
    ),
]
