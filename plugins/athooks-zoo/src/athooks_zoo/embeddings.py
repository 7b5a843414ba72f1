"""Losses on the pre-logit vectors (embeddings): PKT, RKD, SP, CC, VID, CRD and in-batch CRD.

Each loss declares ``needs_embedding = True`` and reads ``t, s = step.embedding()``, the vectors
``(B, D_t)`` and ``(B, D_s)`` that feed the two models' classifiers (SP and VID can read the tapped
feature maps instead, ``on="features"``). The defaults are those of RepDistiller (Tian et al.'s
code for the CRD benchmark, ``github.com/HobbitLong/RepDistiller``) unless a method's own authors
publish others; each docstring says which. Widths of teacher and student may differ everywhere:
the methods that compare vectors one to one (CC, VID, CRD) map them through learned heads
(:class:`athooks.plugin.Connector`), the others compare batch-by-batch relations.

Only the public plugin API is used (``athooks.plugin`` and ``athooks``' error classes).
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import athooks
from athooks.plugin import Connector, Connectors, Features, Loss, LossSpec, Step
from athooks_zoo._checks import real as _real

__all__ = ["CC", "CRD", "PKT", "RKD", "SP", "VID", "CRDInBatch", "SPECS"]

_NEGATIVE_WEIGHT = " (a negative weight would push the student away from the teacher)"


# --------------------------------------------------------------------------- option checks


def _integer(value: Any, *, owner: str, option: str, minimum: int, why: str = "") -> int:
    """``value`` as an int ``>= minimum``, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise athooks.ConfigurationError(
            f"{owner}: {option} must be an integer >= {minimum}, got {type(value).__name__} "
            f"{value!r:.60}{why}"
        )
    if int(value) < minimum:
        raise athooks.ConfigurationError(
            f"{owner}: {option} must be an integer >= {minimum}, got {int(value)}{why}"
        )
    return int(value)


def _choice(value: Any, *, owner: str, option: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, or a clear error listing them."""
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise athooks.ConfigurationError(
            f"{owner}: {option} must be one of {listed}, got {value!r:.60}"
        )
    return value


def _flag(value: Any, *, owner: str, option: str) -> bool:
    """``value`` if it is a bool, or a clear error."""
    if not isinstance(value, bool):
        raise athooks.ConfigurationError(
            f"{owner}: {option} must be True or False, got {value!r:.60}"
        )
    return value


def _weight(value: Any, owner: str, option: str = "beta") -> float:
    """A loss weight: finite and ``>= 0``."""
    return _real(value, owner=owner, option=option, why=_NEGATIVE_WEIGHT)


# ------------------------------------------------------------------------------ tensor helpers


def _at_least_float32(x: Tensor) -> Tensor:
    """Half-precision tensors as float32 (the relational terms need it); others as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _full_precision(forward: Callable[[Any, Step], Tensor]) -> Callable[[Any, Step], Tensor]:
    """Run a loss's ``forward`` with autocast off, on float32 (or float64) inputs.

    Gram matrices, kernels and ``exp(score / 0.07)`` lose too much (or overflow) in float16 and
    bfloat16, so these losses compute in full precision whatever the surrounding autocast.
    """

    @functools.wraps(forward)
    def wrapper(self: Any, step: Step) -> Tensor:
        with contextlib.ExitStack() as stack:
            for device in _AUTOCAST_DEVICES:
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device_type=device, enabled=False))
            return forward(self, step)

    return wrapper


_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps")


def _vectors(step: Step, owner: str, *, min_batch: int = 1) -> tuple[Tensor, Tensor]:
    """The ``(teacher, student)`` embeddings of the step, checked (teacher detached)."""
    t, s = step.embedding()
    return _check_pair(t.detach(), s, owner, "embedding", min_batch=min_batch)


def _check_pair(
    t: Tensor, s: Tensor, owner: str, what: str, *, min_batch: int = 1
) -> tuple[Tensor, Tensor]:
    """Batch sizes equal and at least ``min_batch``; half precision made float32."""
    if t.dim() == 0 or s.dim() == 0:
        raise athooks.CaptureError(
            f"{owner}: the {what}s must have a batch axis, got shapes teacher {tuple(t.shape)} "
            f"and student {tuple(s.shape)}"
        )
    if t.shape[0] != s.shape[0]:
        raise athooks.CaptureError(
            f"{owner}: the teacher's {what} has batch size {t.shape[0]} and the student's "
            f"{s.shape[0]}; the teacher must see the same batch as the student (check "
            "teacher_input)"
        )
    if t.shape[0] < min_batch:
        raise athooks.CaptureError(
            f"{owner}: compares the samples of a batch with each other, so it needs at least "
            f"{min_batch} samples per batch, got {t.shape[0]}; train with a larger batch"
        )
    return _at_least_float32(t), _at_least_float32(s)


def _unit(x: Tensor) -> Tensor:
    """Rows divided by their L2 norm, with no epsilon (RepDistiller's ``Normalize(2)``)."""
    return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


_POOLS: dict[int, Any] = {
    1: F.adaptive_avg_pool1d,
    2: F.adaptive_avg_pool2d,
    3: F.adaptive_avg_pool3d,
}


def _pool_to_common(t: Tensor, s: Tensor, owner: str) -> tuple[Tensor, Tensor]:
    """Average-pool the larger feature map to the smaller one's spatial size (as RepDistiller)."""
    if t.shape[2:] == s.shape[2:]:
        return t, s
    if t.dim() != s.dim() or t.dim() - 2 not in _POOLS:
        raise athooks.CaptureError(
            f"{owner}: feature maps of shapes teacher {tuple(t.shape)} and student "
            f"{tuple(s.shape)} have different layouts (or more than 3 spatial axes); pair "
            "layers of the same layout, (B, C, *S) with 1 to 3 spatial axes on both sides"
        )
    size = tuple(min(a, b) for a, b in zip(t.shape[2:], s.shape[2:], strict=True))
    pool = _POOLS[t.dim() - 2]
    if tuple(t.shape[2:]) != size:
        t = pool(t, size)
    if tuple(s.shape[2:]) != size:
        s = pool(s, size)
    return t, s


# ------------------------------------------------------------------------------------------ PKT


def _pkt_probabilities(x: Tensor, eps: float, keep_diagonal: bool) -> Tensor:
    """The row-normalised cosine kernel ``(1 + cos) / 2`` of the batch (PKT's ``p_{j|i}``)."""
    x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    k = (x @ x.t() + 1.0) / 2.0
    if not keep_diagonal:
        k = k * (1.0 - torch.eye(k.shape[0], dtype=k.dtype, device=k.device))
    return k / k.sum(1, keepdim=True)


class PKT(Loss):
    """Probabilistic knowledge transfer on the embeddings.

    Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
    ECCV 2018. Each model's batch of vectors becomes a distribution per sample over the other
    samples, from the cosine-similarity kernel ``K(a, b) = (1 + cos(a, b)) / 2``:
    ``p_{j|i} = K(t_i, t_j) / sum_k K(t_i, t_k)`` (``q`` likewise for the student), and the
    student matches the teacher's by KL divergence:

        ``form="code"`` (default, the authors' and RepDistiller's ``cosine_similarity_loss``):
            ``beta * mean_{i,j} p_{j|i} * log((p_{j|i} + eps) / (q_{j|i} + eps))``,
            over all ``B^2`` entries, the diagonal ``j = i`` included; vectors are divided by
            ``||x|| + eps`` first.
        ``form="paper"``: the paper's equations, ``k != i`` in the normaliser and the sum
            ``beta * sum_i sum_{j != i} p_{j|i} log(...)`` (``B^2`` times larger in scale).

    Args:
        beta: The weight (RepDistiller's ``-b 30000`` for PKT): finite, ``>= 0``.
        eps: ``1e-7`` as the authors' code: finite, ``> 0``.
        form: ``"code"`` or ``"paper"``, as above.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.embeddings import PKT

        pkt = PKT()
        t, s = torch.randn(4, 16), torch.randn(4, 8, requires_grad=True)  # widths may differ
        step = Step([("fc", "fc")], [{}], [{}], embeddings=[(t, s)])
        print(pkt(step))
        ```
    """

    name = "pkt"
    needs_embedding = True

    def __init__(self, beta: float = 3e4, eps: float = 1e-7, form: str = "code") -> None:
        super().__init__()
        self.beta = _weight(beta, "pkt")
        self.eps = _real(
            eps, owner="pkt", option="eps", strict=True, why=" (it keeps log(0) away; 1e-7)"
        )
        self.form = _choice(form, owner="pkt", option="form", choices=("code", "paper"))

    @_full_precision
    def forward(self, step: Step) -> Tensor:
        """The PKT term of the step."""
        t, s = _vectors(step, self.name, min_batch=2)
        code = self.form == "code"
        p_t = _pkt_probabilities(t.flatten(1), self.eps, keep_diagonal=code)
        p_s = _pkt_probabilities(s.flatten(1), self.eps, keep_diagonal=code)
        kl = p_t * torch.log((p_t + self.eps) / (p_s + self.eps))
        return self.beta * (kl.mean() if code else kl.sum())

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return f"beta={self.beta:g}, eps={self.eps:g}, form={self.form!r}"


# ------------------------------------------------------------------------------------------ RKD


def _pdist(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise Euclidean distances, diagonal 0 (RepDistiller's ``RKDLoss.pdist``)."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1.0 - torch.eye(e.shape[0], dtype=d.dtype, device=d.device))


def _angles(e: Tensor) -> Tensor:
    """``cos`` of the angle at ``e_i`` between ``e_j - e_i`` and ``e_k - e_i``, ``(B, B, B)``."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2))


class RKD(Loss):
    """Relational knowledge distillation: distance-wise and angle-wise terms on the embeddings.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019. With ``d_ij`` the
    Euclidean distance between samples ``i`` and ``j`` divided by its mean over the pairs
    ``i != j`` (per model), and ``a_ijk = cos`` of the angle at sample ``i`` between ``j`` and
    ``k``, and ``l`` the Huber loss (``smooth_l1``, ``delta = 1``):

        ``beta * (w_d * mean_{i,j} l(d^S_ij, d^T_ij) + w_a * mean_{i,j,k} l(a^S_ijk, a^T_ijk))``

    The means run over all ``B^2`` and ``B^3`` entries, degenerate ones (``i = j``, whose
    distance and angle are 0 on both sides) included, as the authors' code
    (``lenscloth/RKD``, copied by RepDistiller); ``form="paper"`` sums instead, as the paper
    writes ``L = sum_{(i,j)} ...`` and ``sum_{(i,j,k)} ...``.

    ``normalize=True`` (default) first L2-normalises both models' vectors, as the authors'
    classification script (``lenscloth/RKD``, ``run_distill_classification.py``, with the same
    weights 25 and 50); RepDistiller's benchmark feeds them as they are: ``normalize=False``
    reproduces it.

    Args:
        beta: The overall weight (RepDistiller's ``-b 1`` for RKD): finite, ``>= 0``.
        w_d: The distance-wise weight, 25 (the authors' CIFAR script's and RepDistiller's):
            finite, ``>= 0``.
        w_a: The angle-wise weight, 50 (the authors' CIFAR script's and RepDistiller's):
            finite, ``>= 0``.
        form: ``"code"`` (means) or ``"paper"`` (sums).
        normalize: Whether to L2-normalise the vectors first (the authors' script: True;
            RepDistiller: False).

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.embeddings import RKD

        rkd = RKD(w_d=25.0, w_a=50.0)
        t, s = torch.randn(4, 16), torch.randn(4, 8, requires_grad=True)
        print(rkd(Step([("fc", "fc")], [{}], [{}], embeddings=[(t, s)])))
        ```
    """

    name = "rkd"
    needs_embedding = True

    def __init__(
        self,
        beta: float = 1.0,
        w_d: float = 25.0,
        w_a: float = 50.0,
        form: str = "code",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.beta = _weight(beta, "rkd")
        self.normalize = _flag(normalize, owner="rkd", option="normalize")
        self.w_d = _weight(w_d, "rkd", "w_d")
        self.w_a = _weight(w_a, "rkd", "w_a")
        self.form = _choice(form, owner="rkd", option="form", choices=("code", "paper"))

    @_full_precision
    def forward(self, step: Step) -> Tensor:
        """The RKD term of the step."""
        t, s = _vectors(step, self.name, min_batch=2)
        t, s = t.flatten(1), s.flatten(1)
        if self.normalize:
            t, s = F.normalize(t, p=2, dim=1), F.normalize(s, p=2, dim=1)
        reduction = "mean" if self.form == "code" else "sum"
        with torch.no_grad():
            t_d = _pdist(t)
            t_d = t_d / t_d[t_d > 0].mean()
            t_a = _angles(t)
        s_d = _pdist(s)
        s_d = s_d / s_d[s_d > 0].mean()
        loss_d = F.smooth_l1_loss(s_d, t_d, reduction=reduction)
        loss_a = F.smooth_l1_loss(_angles(s), t_a, reduction=reduction)
        return self.beta * (self.w_d * loss_d + self.w_a * loss_a)

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return (
            f"beta={self.beta:g}, w_d={self.w_d:g}, w_a={self.w_a:g}, form={self.form!r}, "
            f"normalize={self.normalize}"
        )


# ------------------------------------------------------------------------------------------- SP


def _sp_term(t: Tensor, s: Tensor) -> Tensor:
    """``||norm(G_T) - norm(G_S)||_F^2 / b^2`` with ``G = Q Q^T`` (RepDistiller's Similarity)."""
    b = s.shape[0]
    q_s, q_t = s.reshape(b, -1), t.reshape(b, -1)
    g_s = F.normalize(q_s @ q_s.t())
    g_t = F.normalize(q_t @ q_t.t())
    return (g_t - g_s).pow(2).sum() / (b * b)


class SP(Loss):
    """Similarity-preserving knowledge distillation.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019. For each pair, the
    ``b x b`` similarity matrices of the batch, ``G = Q Q^T`` with ``Q`` the ``(b, -1)``
    flattened activations, are L2-normalised row by row and compared:

        ``beta * sum_pairs ||norm(G_T) - norm(G_S)||_F^2 / b^2``

    ``on="embedding"`` (default) uses the pre-logit vectors (one pair); ``on="features"`` uses
    every tapped layer pair's feature maps (widths and spatial sizes may differ: each side is
    flattened), as the paper and RepDistiller do (RepDistiller on the last stage's feature map,
    ``feat[-2]``: tap that layer to reproduce it). Paper and code agree.

    Args:
        beta: The weight ``gamma`` (3000, the paper's and RepDistiller's): finite, ``>= 0``.
        on: ``"embedding"`` or ``"features"``.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.embeddings import SP

        sp = SP(on="features")
        t, s = torch.randn(4, 16, 3, 3), torch.randn(4, 8, 5, 5, requires_grad=True)
        print(sp(Step([("b2", "b2")], [{sp.features: t}], [{sp.features: s}])))
        ```
    """

    name = "sp"
    needs_embedding = True

    def __init__(self, beta: float = 3000.0, on: str = "embedding") -> None:
        super().__init__()
        self.beta = _weight(beta, "sp")
        self.on = _choice(on, owner="sp", option="on", choices=("embedding", "features"))
        self.needs_embedding = self.on == "embedding"
        self.features = Features()

    def captures(self) -> tuple[Any, ...]:
        """The whole feature maps for ``on="features"``, nothing otherwise."""
        return (self.features,) if self.on == "features" else ()

    @_full_precision
    def forward(self, step: Step) -> Tensor:
        """The SP term of the step, summed over pairs."""
        if self.on == "embedding":
            t, s = _vectors(step, self.name)
            return self.beta * _sp_term(t, s)
        terms = [
            _sp_term(*_check_pair(t.detach(), s, self.name, "feature map"))
            for t, s in step.features(self.features)
        ]
        return self.beta * self.sum_pairs(terms)

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return f"beta={self.beta:g}, on={self.on!r}"


# ------------------------------------------------------------------------------------------- CC


class CC(Loss):
    """Correlation congruence on (embedded) vectors.

    Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019. Each model's
    vectors are mapped by a linear embed head to ``feat_dim`` (one learned
    ``Connector(kind="linear")`` per side, as RepDistiller's ``LinearEmbed`` to 128) and
    L2-normalised; the batch correlation matrix ``C_ij = k(f_i, f_j)`` uses the Gaussian RBF
    ``k(x, y) = exp(-gamma ||x - y||^2)``, approximated by its Taylor expansion of order ``P``
    (for unit vectors ``||x - y||^2 = 2 - 2 x.y``):

        ``k(x, y) ~= sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! * (x.y)^p``

    or the bilinear ``C_ij = f_i . f_j``; the loss is ``beta * ||C_T - C_S||_F^2 / B^2``.
    The paper's code is not public; RepDistiller's ``Correlation`` (credited to the authors'
    shared code) computes ``mean_i sum_d |f_s - f_t|_id |f_s - f_t|_(i+1)d`` on the embedded
    vectors instead, available as ``kernel="repdistiller"`` (there the embeds are not normalised
    unless ``normalize=True``). RepDistiller's weight 0.02 was tuned for that form; the paper's
    kernels give a much smaller term at the same ``beta``: tune it when you use them.

    Args:
        beta: The weight (RepDistiller's ``-b 0.02`` for CC): finite, ``>= 0``.
        kernel: ``"gaussian"`` (the paper's, default), ``"bilinear"`` or ``"repdistiller"``.
        gamma: The RBF's ``gamma``, 0.4 as the paper: finite, ``> 0``.
        order: The Taylor order ``P``, 2 as the paper: an integer ``>= 0``.
        feat_dim: The embed heads' width, 128 as RepDistiller: an integer ``>= 1``.
        embed: Whether to map both sides through the embed heads (True, as RepDistiller); with
            False the vectors are compared as they are and must have equal widths.
        normalize: Whether to L2-normalise the (embedded) vectors: True by default for the
            kernels (the Taylor form equals the RBF on unit vectors), False for
            ``"repdistiller"``, as its code.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.embeddings import CC

        cc = CC(feat_dim=4)
        t, s = torch.randn(4, 16), torch.randn(4, 8, requires_grad=True)
        print(cc(Step([("fc", "fc")], [{}], [{}], embeddings=[(t, s)])))
        ```
    """

    name = "cc"
    needs_embedding = True

    def __init__(
        self,
        beta: float = 0.02,
        kernel: str = "gaussian",
        gamma: float = 0.4,
        order: int = 2,
        feat_dim: int = 128,
        embed: bool = True,
        normalize: bool | None = None,
    ) -> None:
        super().__init__()
        self.beta = _weight(beta, "cc")
        self.kernel = _choice(
            kernel, owner="cc", option="kernel", choices=("gaussian", "bilinear", "repdistiller")
        )
        self.gamma = _real(
            gamma, owner="cc", option="gamma", strict=True, why=" (0.4 in the paper)"
        )
        self.order = _integer(order, owner="cc", option="order", minimum=0, why=" (2 in the paper)")
        self.feat_dim = _integer(feat_dim, owner="cc", option="feat_dim", minimum=1)
        self.embed = _flag(embed, owner="cc", option="embed")
        self.normalize = (
            self.kernel != "repdistiller"
            if normalize is None
            else _flag(normalize, owner="cc", option="normalize")
        )
        if embed:
            self.embed_s = Connector(kind="linear")
            self.embed_t = Connector(kind="linear")

    @_full_precision
    def forward(self, step: Step) -> Tensor:
        """The CC term of the step."""
        t, s = _vectors(step, self.name, min_batch=2)
        t, s = t.flatten(1), s.flatten(1)
        if self.embed:
            s = _at_least_float32(self.embed_s(s, self.feat_dim))
            t = _at_least_float32(self.embed_t(t, self.feat_dim))
        elif t.shape[1] != s.shape[1]:
            raise athooks.CaptureError(
                f"cc: with embed=False the vectors are compared as they are, but the teacher's "
                f"are {t.shape[1]} wide and the student's {s.shape[1]}; use embed=True (learned "
                "linear heads to feat_dim on both sides, as RepDistiller) or equal widths"
            )
        if self.normalize:
            s, t = _unit(s), _unit(t)
        if self.kernel == "repdistiller":
            delta = (s - t).abs()
            return self.beta * (delta[:-1] * delta[1:]).sum(1).mean()
        return (
            self.beta
            * (self._correlation(t) - self._correlation(s)).pow(2).sum()
            / (s.shape[0] ** 2)
        )

    def _correlation(self, f: Tensor) -> Tensor:
        """The batch correlation matrix of ``f`` under the chosen kernel."""
        dot = f @ f.t()
        if self.kernel == "bilinear":
            return dot
        two_gamma = 2.0 * self.gamma
        out = torch.ones_like(dot)
        for p in range(1, self.order + 1):
            out = out + two_gamma**p / math.factorial(p) * dot.pow(p)
        return math.exp(-two_gamma) * out

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return (
            f"beta={self.beta:g}, kernel={self.kernel!r}, gamma={self.gamma:g}, "
            f"order={self.order}, feat_dim={self.feat_dim}, embed={self.embed}, "
            f"normalize={self.normalize}"
        )


# ------------------------------------------------------------------------------------------ VID


class _Pointwise(nn.Module):
    """A bias-free 1x1 convolution over axis 1 of ``(B, C, *S)`` (or a linear map of ``(B, C)``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's and nn.Linear's init

    def forward(self, x: Tensor) -> Tensor:
        """Mix the channels of ``x``."""
        return F.linear(x.movedim(1, -1), self.weight).movedim(-1, 1)


class VIDHead(nn.Module):
    """VID's regressor and variance: RepDistiller's ``VIDLoss`` parameters for one pair.

    ``regressor``: 1x1 conv (``C_s -> C_t``), ReLU, 1x1 conv (``C_t -> C_t``), ReLU, 1x1 conv
    (``C_t -> C_t``), all without bias (RepDistiller's, the middle width being the teacher's);
    on vectors the same three maps are linear. ``log_scale``: ``alpha``, one per teacher
    channel, initialised so that ``softplus(alpha) + eps = init_pred_var``.

    Args:
        in_channels: The student's width.
        out_channels: The teacher's width.
        init_pred_var: The initial variance (5.0 as RepDistiller).
        eps: The variance's floor (1e-5 as RepDistiller).
    """

    def __init__(
        self, in_channels: int, out_channels: int, init_pred_var: float = 5.0, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            _Pointwise(in_channels, out_channels),
            nn.ReLU(),
            _Pointwise(out_channels, out_channels),
            nn.ReLU(),
            _Pointwise(out_channels, out_channels),
        )
        alpha = math.log(math.expm1(init_pred_var - eps))
        self.log_scale = nn.Parameter(torch.full((out_channels,), alpha))

    def forward(self, x: Tensor) -> Tensor:
        """The predicted teacher mean."""
        mean: Tensor = self.regressor(x)
        return mean


def _vid_head_of(conn: nn.Module) -> VIDHead:
    """The :class:`VIDHead` a built connector holds."""
    for module in conn.modules():
        if isinstance(module, VIDHead):
            return module
    raise athooks.CaptureError(  # pragma: no cover - only if Connector stops holding its module
        "vid: the connector holds no VIDHead after its first call; athooks' Connector must keep "
        "the module its builder made as a submodule"
    )


class VID(Loss):
    """Variational information distillation.

    Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for Knowledge
    Transfer", CVPR 2019. A regressor ``mu(s)`` predicts the teacher's activations from the
    student's, under a Gaussian with a learned variance per teacher channel
    ``sigma_c^2 = softplus(alpha_c) + eps``; the loss is the negative log-likelihood without its
    constant:

        ``beta * sum_pairs mean_{b,c,(h,w)} 0.5 * ((t - mu(s))^2 / sigma_c^2 + log sigma_c^2)``

    As RepDistiller's ``VIDLoss``: regressor 1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv,
    bias-free, middle width the teacher's; ``alpha`` initialised so that the variance starts at
    ``init_pred_var = 5``; feature maps of different spatial size are average-pooled to the
    smaller one first; the mean runs over all elements, where the paper sums over channels and
    positions (a scale the weight absorbs). ``on="embedding"`` (default) applies the same head to
    the pre-logit vectors (the 1x1 convs become linear maps, as on a 1x1 map);
    ``on="features"`` gives each tapped layer pair its head (RepDistiller taps the three
    intermediate stages, ``feat[1:-1]``). The heads are learned
    (:class:`athooks.plugin.Connector` with builder :class:`VIDHead`).

    Args:
        beta: The weight (RepDistiller's ``-b 1`` for VID): finite, ``>= 0``.
        on: ``"embedding"`` or ``"features"``.
        init_pred_var: The initial variance, 5.0 as RepDistiller: finite, ``> eps``.
        eps: The variance's floor, 1e-5 as RepDistiller: finite, ``> 0``.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.embeddings import VID

        vid = VID(on="features")
        vid.setup([("b1", "b1")])
        t, s = torch.randn(2, 16, 4, 4), torch.randn(2, 8, 8, 8, requires_grad=True)
        print(vid(Step([("b1", "b1")], [{vid.features: t}], [{vid.features: s}])))
        ```
    """

    name = "vid"
    needs_embedding = True

    def __init__(
        self,
        beta: float = 1.0,
        on: str = "embedding",
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.beta = _weight(beta, "vid")
        self.on = _choice(on, owner="vid", option="on", choices=("embedding", "features"))
        self.eps = _real(eps, owner="vid", option="eps", strict=True, why=" (1e-5 as RepDistiller)")
        self.init_pred_var = _real(
            init_pred_var,
            owner="vid",
            option="init_pred_var",
            minimum=self.eps,
            strict=True,
            why=" (the initial variance, above eps; 5.0 as RepDistiller)",
        )
        self.needs_embedding = self.on == "embedding"
        self.features = Features()
        builder = partial(VIDHead, init_pred_var=self.init_pred_var, eps=self.eps)
        if self.on == "embedding":
            self.regressor = Connector(builder, kind="linear")
        else:
            self.regressors = Connectors(builder, kind="conv")

    def captures(self) -> tuple[Any, ...]:
        """The whole feature maps for ``on="features"``, nothing otherwise."""
        return (self.features,) if self.on == "features" else ()

    def _nll(self, conn: nn.Module, t: Tensor, s: Tensor) -> Tensor:
        """The mean Gaussian NLL of ``t`` given the head's prediction from ``s``."""
        mean: Tensor = _at_least_float32(conn(s, t))
        if mean.shape != t.shape:
            raise athooks.CaptureError(
                f"vid: the regressor predicts {tuple(mean.shape)} but the teacher's tensor is "
                f"{tuple(t.shape)}; a head is built for one teacher width: keep the same layers "
                "(and widths) from step to step"
            )
        alpha: Tensor = _vid_head_of(conn).log_scale
        var = (F.softplus(_at_least_float32(alpha)) + self.eps).view(1, -1, *([1] * (t.dim() - 2)))
        return (0.5 * ((mean - t).pow(2) / var + torch.log(var))).mean()

    @_full_precision
    def forward(self, step: Step) -> Tensor:
        """The VID term of the step, summed over pairs."""
        if self.on == "embedding":
            t, s = _vectors(step, self.name)
            return self.beta * self._nll(self.regressor, t.flatten(1), s.flatten(1))
        feats = step.features(self.features)
        if len(self.regressors) != len(feats):
            raise athooks.CaptureError(
                f"vid: {len(feats)} layer pairs but {len(self.regressors)} regressors; "
                "loss.setup(pairs) sizes them (the Distiller calls it)"
            )
        terms = []
        for conn, (t, s) in zip(self.regressors, feats, strict=True):
            t, s = _check_pair(t.detach(), s, self.name, "feature map")
            if t.dim() < 3 or s.dim() < 3:
                raise athooks.CaptureError(
                    f"vid: on='features' needs feature maps (B, C, *S), got teacher "
                    f"{tuple(t.shape)} and student {tuple(s.shape)}; use on='embedding' for "
                    "vectors"
                )
            t, s = _pool_to_common(t, s, self.name)
            terms.append(self._nll(conn, t, s))
        return self.beta * self.sum_pairs(terms)

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return (
            f"beta={self.beta:g}, on={self.on!r}, init_pred_var={self.init_pred_var:g}, "
            f"eps={self.eps:g}"
        )


# ------------------------------------------------------------------------------------------ CRD


class _Embedded(Loss):
    """Shared by CRD and in-batch CRD: linear heads to ``feat_dim``, then L2-normalised."""

    needs_embedding = True

    def __init__(self, beta: float, feat_dim: int, temperature: float, owner: str) -> None:
        super().__init__()
        self.beta = _weight(beta, owner)
        self.feat_dim = _integer(feat_dim, owner=owner, option="feat_dim", minimum=1)
        self.temperature = _real(
            temperature,
            owner=owner,
            option="temperature",
            strict=True,
            why=" (the scores are divided by it; 0.07 as the authors)",
        )
        self.embed_s = Connector(kind="linear")
        self.embed_t = Connector(kind="linear")

    def _embedded(self, step: Step) -> tuple[Tensor, Tensor]:
        """The unit embeddings ``(f_t, f_s)``, ``(B, feat_dim)`` each."""
        t, s = _vectors(step, self.name)
        f_s = _unit(_at_least_float32(self.embed_s(s.flatten(1), self.feat_dim)))
        f_t = _unit(_at_least_float32(self.embed_t(t.flatten(1), self.feat_dim)))
        return f_t, f_s


class CRD(_Embedded):
    """Contrastive representation distillation with a momentum memory bank (NCE).

    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020, as the authors'
    code (RepDistiller's ``CRDLoss``, ``ContrastMemory``, ``ContrastLoss``). Both vectors go
    through a linear head to ``feat_dim`` and are L2-normalised (``f_s``, ``f_t``). Two memory
    banks of ``n_data`` rows (one per model, buffers saved in ``d.state_dict()``) keep a
    momentum average of each sample's embedding. For each sample ``i``, ``K + 1`` bank rows are
    drawn (row 0 its own index, then ``K`` uniformly random ones, nothing excluded, as the
    authors' ``AliasMethod`` over uniform weights); the scores are
    ``P(j | f) = exp(m_j . f / T) / Z``, with ``Z = mean(exp(...)) * n_data`` fixed on the first
    batch; the student's vector is scored against the teacher's bank and the teacher's against
    the student's, and each side takes NCE's loss with noise ``Pn = 1 / n_data``:

        ``NCE = -1/B sum_i [log(P_i0 / (P_i0 + K Pn + 1e-7))``
        ``+ sum_{j>=1} log(K Pn / (P_ij + K Pn + 1e-7))]``

        ``beta * (NCE(student vs teacher bank) + NCE(teacher vs student bank))``

    after which the banks' rows of the batch move to ``m * row + (1 - m) * f``, renormalised.
    Call ``d.loss(target=y, index=idx)`` with the samples' dataset indices ``(B,)`` in
    ``[0, n_data)``. ``d.loss(..., contrast_index=c)`` gives the ``(B, K + 1)`` rows instead of
    random ones (RepDistiller's CIFAR loader draws the negatives from other classes this way).

    Args:
        n_data: The dataset size, rows of each bank (required, no default): an integer
            ``>= 1``.
        beta: The weight (RepDistiller's ``-b 0.8`` for CRD): finite, ``>= 0``.
        feat_dim: The heads' width, 128 as the authors: an integer ``>= 1``.
        nce_k: The negatives per sample ``K``, 16384 as the authors: an integer ``>= 1``.
        nce_t: The temperature ``T``, 0.07 as the authors: finite, ``> 0``.
        nce_m: The banks' momentum, 0.5 as the authors: in ``[0, 1]``.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.embeddings import CRD

        crd = CRD(n_data=100, nce_k=8)
        t, s = torch.randn(4, 16), torch.randn(4, 8, requires_grad=True)
        idx = torch.tensor([0, 5, 17, 99])  # the samples' dataset indices
        step = Step([("fc", "fc")], [{}], [{}], embeddings=[(t, s)], extras={"index": idx})
        print(crd(step))
        ```
    """

    name = "crd"
    memory_s: Tensor
    memory_t: Tensor
    z: Tensor

    def __init__(
        self,
        n_data: int | None = None,
        beta: float = 0.8,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
    ) -> None:
        super().__init__(beta, feat_dim, nce_t, "crd")
        if n_data is None:
            raise athooks.ConfigurationError(
                "crd: n_data is required: the dataset size, the rows of each memory bank (e.g. "
                "athooks.loss('crd', n_data=len(train_set))); or use 'crd_inbatch', which needs "
                "no bank"
            )
        self.n_data = _integer(
            n_data, owner="crd", option="n_data", minimum=1, why=" (the dataset size)"
        )
        self.nce_k = _integer(nce_k, owner="crd", option="nce_k", minimum=1)
        self.nce_m = _real(nce_m, owner="crd", option="nce_m", why=" (0.5 as the authors)")
        if self.nce_m > 1:
            raise athooks.ConfigurationError(
                f"crd: nce_m must be in [0, 1], got {self.nce_m:g} (the banks' momentum; 0.5 as "
                "the authors)"
            )
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        self.register_buffer(
            "memory_s", torch.rand(self.n_data, self.feat_dim).mul_(2 * stdv).add_(-stdv)
        )
        self.register_buffer(
            "memory_t", torch.rand(self.n_data, self.feat_dim).mul_(2 * stdv).add_(-stdv)
        )
        #: ``[Z_s, Z_t]``, the normalisers of the student's and teacher's scores; -1 until set.
        self.register_buffer("z", torch.tensor([-1.0, -1.0]))

    def _index(self, step: Step, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The batch's dataset indices ``(B,)`` and the bank rows to score ``(B, K + 1)``."""
        idx = step.extra("index", default=None)
        if idx is None:
            raise athooks.CaptureError(
                "crd: needs each sample's dataset index for its memory bank: call "
                "d.loss(target=y, index=idx) with idx the (B,) indices in [0, n_data) (return "
                "them from your Dataset), or use 'crd_inbatch', which needs none"
            )
        idx = self._check_rows(torch.as_tensor(idx), "index", (batch,))
        idx = idx.to(device)
        contrast = step.extra("contrast_index", default=None)
        if contrast is None:
            contrast = torch.randint(self.n_data, (batch, self.nce_k + 1), device=device)
            contrast[:, 0] = idx
        else:
            contrast = self._check_rows(torch.as_tensor(contrast), "contrast_index", None)
            if contrast.dim() != 2 or contrast.shape[0] != batch or contrast.shape[1] < 2:
                raise athooks.CaptureError(
                    f"crd: contrast_index must be (B, K + 1) = ({batch}, K + 1) with K >= 1 "
                    f"(column 0 the positives, as RepDistiller), got {tuple(contrast.shape)}"
                )
            contrast = contrast.to(device)
        return idx, contrast

    def _check_rows(self, rows: Tensor, option: str, shape: tuple[int, ...] | None) -> Tensor:
        """Integer bank rows in ``[0, n_data)`` of the expected shape."""
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise athooks.CaptureError(
                f"crd: {option} must hold integer dataset indices, got dtype {rows.dtype}; pass "
                "a torch.long tensor"
            )
        if shape is not None and tuple(rows.shape) != shape:
            raise athooks.CaptureError(
                f"crd: {option} must have shape {shape} (one dataset index per sample of the "
                f"batch), got {tuple(rows.shape)}"
            )
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.n_data):
            raise athooks.CaptureError(
                f"crd: {option} must lie in [0, n_data) = [0, {self.n_data}), got values from "
                f"{int(rows.min())} to {int(rows.max())}; set n_data to the dataset's size"
            )
        return rows.long()

    def _nce(self, p: Tensor) -> Tensor:
        """RepDistiller's ``ContrastLoss`` of scores ``(B, K + 1)``, column 0 the positives."""
        m = p.shape[1] - 1
        noise = m / float(self.n_data)
        log_d1 = torch.log(p[:, 0] / (p[:, 0] + noise + 1e-7))
        log_d0 = torch.log(noise / (p[:, 1:] + noise + 1e-7))
        return -(log_d1.sum() + log_d0.sum()) / p.shape[0]

    @_full_precision
    def forward(self, step: Step) -> Tensor:
        """The CRD term of the step; updates the banks (in training mode)."""
        f_t, f_s = self._embedded(step)
        idx, contrast = self._index(step, f_s.shape[0], f_s.device)
        mem_s, mem_t = self.memory_s.to(f_s.dtype), self.memory_t.to(f_s.dtype)
        out_s = torch.exp(_bank_scores(mem_t, f_s, contrast) / self.temperature)
        out_t = torch.exp(_bank_scores(mem_s, f_t, contrast) / self.temperature)
        with torch.no_grad():
            for k, out in ((0, out_s), (1, out_t)):
                if self.z[k] < 0:
                    self.z[k] = out.mean() * self.n_data
        loss = self._nce(out_s / self.z[0].to(out_s.dtype)) + self._nce(
            out_t / self.z[1].to(out_t.dtype)
        )
        if self.training:
            with torch.no_grad():
                for bank, f in ((self.memory_s, f_s), (self.memory_t, f_t)):
                    rows = bank[idx] * self.nce_m + f.detach().to(bank.dtype) * (1 - self.nce_m)
                    bank.index_copy_(0, idx, _unit(rows))
        return self.beta * loss

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return (
            f"n_data={self.n_data}, beta={self.beta:g}, feat_dim={self.feat_dim}, "
            f"nce_k={self.nce_k}, nce_t={self.temperature:g}, nce_m={self.nce_m:g}"
        )


def _bank_scores(bank: Tensor, f: Tensor, rows: Tensor) -> Tensor:
    """``<bank[rows[b, k]], f[b]>`` for every sample ``b`` and drawn row ``k``: ``(B, K + 1)``.

    The drawn rows are gathered with ``index_select`` (as RepDistiller), a copy: the bank is
    updated in place later in the same forward, and backward must see the rows as they were.
    """
    picked = torch.index_select(bank.detach(), 0, rows.reshape(-1)).view(*rows.shape, -1)
    return torch.bmm(picked, f.unsqueeze(2)).squeeze(2)


class CRDInBatch(_Embedded):
    """Contrastive representation distillation with in-batch negatives (InfoNCE), no bank.

    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020: the same
    heads as :class:`CRD` (linear to ``feat_dim``, L2-normalised); each student vector's
    positive is its own sample's teacher vector and its negatives the other samples' teacher
    vectors in the batch, and symmetrically for the teacher (the paper's symmetric form, the two
    directions summed as RepDistiller sums its two NCE terms):

        ``beta * (CE(f_s f_t^T / T, arange(B)) + CE(f_t f_s^T / T, arange(B)))``

    (``CE`` averaged over the batch). Needs no dataset index; ``B - 1`` negatives instead of
    16384, so larger batches help.

    Args:
        beta: The weight, 0.8 as the bank version's (RepDistiller's ``-b 0.8``): finite, ``>= 0``.
        feat_dim: The heads' width, 128 as the authors: an integer ``>= 1``.
        temperature: ``T``, 0.07 as the authors: finite, ``> 0``.

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.embeddings import CRDInBatch

        crd = CRDInBatch(feat_dim=4)
        t, s = torch.randn(4, 16), torch.randn(4, 8, requires_grad=True)
        print(crd(Step([("fc", "fc")], [{}], [{}], embeddings=[(t, s)])))
        ```
    """

    name = "crd_inbatch"

    def __init__(self, beta: float = 0.8, feat_dim: int = 128, temperature: float = 0.07) -> None:
        super().__init__(beta, feat_dim, temperature, "crd_inbatch")

    @_full_precision
    def forward(self, step: Step) -> Tensor:
        """The in-batch CRD term of the step."""
        f_t, f_s = self._embedded(step)
        logits = f_s @ f_t.t() / self.temperature
        labels = torch.arange(logits.shape[0], device=logits.device)
        return self.beta * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return f"beta={self.beta:g}, feat_dim={self.feat_dim}, temperature={self.temperature:g}"


SPECS: list[LossSpec] = [
    LossSpec("pkt", PKT, "PKT (Passalis & Tefas 2018): cosine-kernel probabilities, KL"),
    LossSpec("rkd", RKD, "RKD (Park et al. 2019): distance- and angle-wise relations"),
    LossSpec("sp", SP, "SP (Tung & Mori 2019): batch similarity matrices"),
    LossSpec("cc", CC, "CC (Peng et al. 2019): correlation congruence, RBF kernel"),
    LossSpec("vid", VID, "VID (Ahn et al. 2019): Gaussian likelihood of the teacher"),
    LossSpec("crd", CRD, "CRD (Tian et al. 2020): NCE with momentum memory banks"),
    LossSpec("crd_inbatch", CRDInBatch, "CRD with in-batch negatives (InfoNCE), no bank"),
]
