"""Logit methods: DKD, DIST, and logit standardisation (a modifier of other logit losses).

These losses read the two models' outputs (``needs_teacher_output = True``), never a feature map:
the class logits ``(B, classes)`` of what the student returned and of what the teacher returned on
the same input. The logits are found as in athooks' ``kd``: a tensor as it is, a dict's
``"logits"``, an object's ``.logits``, a tuple's (or list's) first element.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

import athooks
from athooks.plugin import Loss, LossSpec, Step, logits_of
from athooks_zoo._checks import real as _real

__all__ = ["DIST", "DKD", "SPECS", "LogitStandardization"]

_NEGATIVE_WEIGHT = " (a negative weight would push the student away from the teacher)"


# -- small helpers (the zoo uses only athooks' public API, so it checks its options itself) ------


def _count(value: Any, *, owner: str, option: str) -> int:
    """``value`` as an int ``>= 0``, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise athooks.ConfigurationError(
            f"{owner}: {option} must be a whole number >= 0 (0 switches it off), got "
            f"{type(value).__name__} {value!r:.60}"
        )
    return int(value)


def _float_enough(x: Tensor) -> Tensor:
    """Half-precision logits in float32 (softmax and logs lose too much in fp16/bf16)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _both_logits(step: Step, loss_name: str) -> tuple[Tensor, Tensor]:
    """The student's and the (detached) teacher's logits, checked to be of the same shape."""
    z_s = logits_of(step.student_output, "student", loss_name)
    z_t = logits_of(step.teacher_output, "teacher", loss_name).detach()
    if z_s.shape[0] != z_t.shape[0]:
        raise athooks.CaptureError(
            f"{loss_name}: the student's logits are for {z_s.shape[0]} samples and the "
            f"teacher's for {z_t.shape[0]}; the teacher must see the same batch as the student "
            "(check teacher_input)"
        )
    if z_s.shape[1] != z_t.shape[1]:
        raise athooks.ConfigurationError(
            f"{loss_name}: the student has {z_s.shape[1]} classes and the teacher "
            f"{z_t.shape[1]} (logits {tuple(z_s.shape)} and {tuple(z_t.shape)}); {loss_name} "
            "compares class distributions, so both models need the same classes. Give them "
            "the same head (num_classes), or map one model's output onto the other's classes"
        )
    z_s, z_t = _float_enough(z_s), _float_enough(z_t)
    if z_t.dtype != z_s.dtype:
        z_t = z_t.to(z_s.dtype)
    return z_s, z_t


# -- DKD -------------------------------------------------------------------------------------------


class DKD(Loss):
    r"""Decoupled knowledge distillation: target-class (TCKD) and non-target-class (NCKD) terms.

    With ``p = softmax(z / T)`` for each model, the binary distribution
    ``b = [p_gt, sum_{k != gt} p_k]`` and the distribution over the non-target classes
    ``p^_k = p_k / (1 - p_gt)`` (``k != gt``)::

        TCKD = T^2 / B * sum_i KL(b_T || b_S)
        NCKD = T^2 / B * sum_i KL(p^_T || p^_S)
        DKD  = w(step) * (alpha * TCKD + beta * NCKD)

    where ``gt`` is the sample's label. As in the authors' code (mdistiller's ``dkd_loss``): ``b``
    sums the masked probabilities, ``p^`` is ``softmax(z / T - 1000 * onehot(gt))`` (the target
    class masked out of the softmax), KL is summed over the batch (``size_average=False``) and
    divided by ``B``, and both terms are multiplied by ``T^2``.

    Zhao, Cui, Song, Qiu and Liang, "Decoupled Knowledge Distillation", CVPR 2022; defaults from
    mdistiller (``configs/cifar100/dkd``, ``CFG.DKD``): ``alpha = 1``, ``beta = 8``, ``T = 4``
    (the CIFAR-100 ResNet32x4 -> ResNet8x4 setting; mdistiller's other pairs use ``beta`` 1 to 8,
    its ImageNet configs ``beta = 0.5``, ``T = 1``), with the task loss weighted 1.

    The authors ramp the loss in linearly over the first 20 epochs
    (``min(epoch / 20, 1)``). ``warmup_steps`` does the same per training step:
    ``w(step) = min(n / warmup_steps, 1)`` at the ``n``-th step with gradient (``n`` from 1, so
    ``warmup_steps = 20 * steps_per_epoch`` is the authors' ramp, step by step instead of epoch
    by epoch); the count is a buffer, saved in ``d.state_dict()``. The default ``0`` means
    ``w = 1``: leave the warm-up to a generic schedule on the term instead, if you use one.

    Args:
        alpha: The TCKD weight: finite, ``>= 0``.
        beta: The NCKD weight: finite, ``>= 0``.
        temperature: ``T``: finite, ``> 0``.
        warmup_steps: Steps of the linear warm-up (``0``: none).

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.logits import DKD

        dkd = DKD(alpha=1.0, beta=8.0, temperature=4.0)
        z_s = torch.randn(4, 10, requires_grad=True)
        step = Step([], [], [], student_output=z_s, teacher_output=torch.randn(4, 10),
                    target=torch.tensor([0, 3, 9, 3]))
        dkd(step).backward()
        print(dkd, z_s.grad.shape)
        ```
    """

    name = "dkd"
    needs_teacher_output = True

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.alpha = _real(alpha, owner="dkd", option="alpha", why=_NEGATIVE_WEIGHT)
        self.beta = _real(beta, owner="dkd", option="beta", why=_NEGATIVE_WEIGHT)
        self.temperature = _real(
            temperature,
            owner="dkd",
            option="temperature",
            strict=True,
            why=" (the logits are divided by it; the authors use 4 on CIFAR-100)",
        )
        self.warmup_steps = _count(warmup_steps, owner="dkd", option="warmup_steps")
        if self.warmup_steps:
            self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def _labels(self, step: Step, z_s: Tensor) -> Tensor:
        """The labels as a ``(B,)`` index tensor, checked against the logits."""
        target = step.require_target(self.name)
        batch, classes = z_s.shape
        if not isinstance(target, Tensor):
            raise athooks.CaptureError(
                f"dkd: the target must be a tensor of class indices, got "
                f"{type(target).__name__}; call d.loss(target=y) with y of shape ({batch},)"
            )
        if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
            raise athooks.CaptureError(
                f"dkd: the target must hold class indices (an integer tensor of shape "
                f"({batch},)), got a {target.dtype} tensor of shape {tuple(target.shape)}. DKD "
                "splits each sample's distribution at its label, so soft or one-hot labels do "
                "not work: pass y.argmax(1) for one-hot labels"
            )
        labels = target.reshape(-1)
        if labels.numel() != batch:
            raise athooks.CaptureError(
                f"dkd: the target has {labels.numel()} labels (shape {tuple(target.shape)}) but "
                f"the logits are for {batch} samples; pass the batch's labels, shape ({batch},)"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise athooks.CaptureError(
                f"dkd: labels must be class indices in [0, {classes}) for logits of {classes} "
                f"classes; got labels from {int(labels.min())} to {int(labels.max())}"
            )
        return labels.to(device=z_s.device, dtype=torch.long)

    def _ramp(self, z_s: Tensor) -> float:
        """The warm-up factor of this step (and the step counted, for a training step)."""
        if not self.warmup_steps:
            return 1.0
        steps = cast(Tensor, self.steps_done)
        if torch.is_grad_enabled() and z_s.requires_grad:
            steps.add_(1)
        return min(max(int(steps), 1) / self.warmup_steps, 1.0)

    def forward(self, step: Step) -> Tensor:
        """The DKD term of the step."""
        z_s, z_t = _both_logits(step, self.name)
        labels = self._labels(step, z_s)
        t = self.temperature
        batch = z_s.shape[0]
        gt = F.one_hot(labels, z_s.shape[1]).to(z_s.dtype)
        other = 1.0 - gt
        p_s = F.softmax(z_s / t, dim=1)
        p_t = F.softmax(z_t / t, dim=1)
        b_s = torch.stack([(p_s * gt).sum(1), (p_s * other).sum(1)], dim=1)
        b_t = torch.stack([(p_t * gt).sum(1), (p_t * other).sum(1)], dim=1)
        tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * t**2 / batch
        log_q_s = F.log_softmax(z_s / t - 1000.0 * gt, dim=1)
        q_t = F.softmax(z_t / t - 1000.0 * gt, dim=1)
        nckd = F.kl_div(log_q_s, q_t, reduction="sum") * t**2 / batch
        value: Tensor = self._ramp(z_s) * (self.alpha * tckd + self.beta * nckd)
        return value

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        ramp = f", warmup_steps={self.warmup_steps}" if self.warmup_steps else ""
        return f"alpha={self.alpha:g}, beta={self.beta:g}, temperature={self.temperature:g}{ramp}"


# -- DIST ------------------------------------------------------------------------------------------


def _pearson_rows(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (the authors' form)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    corr: Tensor = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return corr


class DIST(Loss):
    r"""DIST: match the teacher's inter- and intra-class relations, by Pearson correlation.

    With ``Y = softmax(z / tau)`` for each model, ``(B, C)``, and
    ``d(u, v) = 1 - pearson(u, v)``::

        inter = tau^2 / B * sum_i d(Y_S[i, :], Y_T[i, :])    (each sample, over the classes)
        intra = tau^2 / C * sum_j d(Y_S[:, j], Y_T[:, j])    (each class, over the batch)
        DIST  = beta * inter + gamma * intra

    ``pearson(u, v) = <u - mean u, v - mean v> / (|u - mean u| |v - mean v| + eps)``, as the
    authors' ``cosine_similarity`` with ``eps = 1e-8``; the paper's ``d_p`` has no ``eps``
    (``eps=0``), which is NaN for a constant row, e.g. the intra term with a batch of one.

    Huang, You, Wang, Qian and Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS
    2022; defaults from the authors' code (hunto/image_classification_sota,
    ``lib/models/losses/dist_kd.py`` and ``kd_loss.py``: ``kd_method='dist'`` is
    ``DIST(beta=1, gamma=1, tau=1)``, their ImageNet setting, with the task loss weighted 1).
    ``kd_method='dist_t4'`` there is ``tau = 4``, with ``beta = gamma = 1``.

    The intra-class term needs more than one sample: with a batch of one it is a constant with
    no gradient, and DIST warns once.

    Args:
        beta: The inter-class weight: finite, ``>= 0``.
        gamma: The intra-class weight: finite, ``>= 0``.
        tau: The temperature: finite, ``> 0``.
        eps: Added to the Pearson denominator: finite, ``>= 0`` (``1e-8`` as the authors' code,
            ``0`` as the paper's formula).

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.logits import DIST

        dist = DIST(beta=1.0, gamma=1.0, tau=1.0)
        z_s = torch.randn(4, 10, requires_grad=True)
        step = Step([], [], [], student_output=z_s, teacher_output=torch.randn(4, 10))
        dist(step).backward()
        print(dist, z_s.grad.shape)
        ```
    """

    name = "dist"
    needs_teacher_output = True

    def __init__(
        self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.beta = _real(beta, owner="dist", option="beta", why=_NEGATIVE_WEIGHT)
        self.gamma = _real(gamma, owner="dist", option="gamma", why=_NEGATIVE_WEIGHT)
        self.tau = _real(
            tau,
            owner="dist",
            option="tau",
            strict=True,
            why=" (the logits are divided by it; the authors use 1 on ImageNet)",
        )
        self.eps = _real(
            eps, owner="dist", option="eps", why=" (it keeps the Pearson denominator > 0)"
        )
        self._warned_single = False

    def forward(self, step: Step) -> Tensor:
        """The DIST term of the step."""
        z_s, z_t = _both_logits(step, self.name)
        if z_s.shape[0] == 1 and self.gamma and not self._warned_single:
            self._warned_single = True
            warnings.warn(
                "dist: a batch of one sample has no intra-class relation (each class's "
                "column is a single number), so the intra term is a constant without gradient; "
                "distil with batches of more than one sample",
                stacklevel=2,
            )
        y_s = F.softmax(z_s / self.tau, dim=1)
        y_t = F.softmax(z_t / self.tau, dim=1)
        scale = self.tau**2
        inter = scale * (1 - _pearson_rows(y_s, y_t, self.eps).mean())
        intra = scale * (1 - _pearson_rows(y_s.t(), y_t.t(), self.eps).mean())
        return self.beta * inter + self.gamma * intra

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return f"beta={self.beta:g}, gamma={self.gamma:g}, tau={self.tau:g}, eps={self.eps:g}"


# -- logit standardisation -------------------------------------------------------------------------


#: The authors' settings for a wrapped loss built here by name (their ``tools/train.py`` with
#: ``--logit-stand``: ``--base-temp 2 --kd-weight 9``; for DKD, alpha and beta times 9 and
#: ``T = 2``). A name not listed is built with its own defaults.
AUTHORS_OPTIONS: dict[str, dict[str, float]] = {
    "kd": {"temperature": 2.0, "weight": 9.0},
    "dkd": {"temperature": 2.0, "alpha": 9.0, "beta": 72.0},
}

_FORMS = ("code", "paper")


class LogitStandardization(Loss):
    r"""Logit standardisation: Z-score both models' logits, then evaluate a logit loss on them.

    Each sample's logits ``z`` (``C`` classes) become::

        Z(z) = (z - mean(z)) / (std(z) + 1e-7)          form="code" (the authors' normalize)
        Z(z) = (z - mean(z)) / sqrt(mean((z - mean z)^2))   form="paper"

    for the student and the teacher, and the wrapped loss runs on ``Z(z_S)`` and ``Z(z_T)``
    instead of the raw logits. The wrapped loss's own temperature is the paper's base
    temperature ``tau`` (the softmax sees ``Z(z) / tau``) and its ``tau^2`` factor stays, as in
    the authors' code; so standardised KD is
    ``weight * tau^2 * KL(softmax(Z(z_T)/tau) || softmax(Z(z_S)/tau))``.
    ``form="code"`` is the authors' ``normalize`` (``torch.std``, with Bessel's correction
    ``C - 1``, plus ``1e-7``); ``form="paper"`` is the paper's ``sigma`` (divided by ``C``, no
    ``epsilon``): the two differ by the factor ``sqrt(C / (C - 1))`` on the standardised logits.

    Sun, Ren, Li, Wang and Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024;
    code: sunshangquan/logit-standardization-KD (mdistiller-based). A loss given by name is
    built with the authors' settings for it unless you pass them (their ``tools/train.py``
    with ``--logit-stand`` and its defaults ``--base-temp 2 --kd-weight 9``): ``kd`` with
    ``temperature=2, weight=9`` (task loss weighted 1), ``dkd`` with ``temperature=2``,
    ``alpha=9, beta=72`` (DKD's 1 and 8, times 9). A loss object is used as it is.

    Its key in ``Distiller.terms`` is ``logit_std(<wrapped name>)``, e.g. ``logit_std(kd)``.

    Args:
        loss: The wrapped logit loss: a registered name (``"kd"``, ``"dkd"``, ``"dist"``) or an
            ``athooks.plugin.Loss`` that reads the models' outputs.
        form: ``"code"`` (the authors' ``normalize``) or ``"paper"`` (the paper's ``sigma``).
        **options: Options of the wrapped loss, when it is given by name (they override the
            authors' settings above).

    Example:
        ```python
        import torch
        from athooks.plugin import Step
        from athooks_zoo.logits import DKD, LogitStandardization

        std_kd = LogitStandardization("kd")  # KD with temperature 2, weight 9 on Z-scores
        std_dkd = LogitStandardization(DKD(alpha=9.0, beta=72.0, temperature=2.0))
        z_s = torch.randn(4, 10, requires_grad=True)
        step = Step([], [], [], student_output=z_s, teacher_output=torch.randn(4, 10),
                    target=torch.tensor([1, 2, 3, 4]))
        (std_kd(step) + std_dkd(step)).backward()
        print(std_kd.name, std_dkd.name)
        ```
    """

    name = "logit_std"
    needs_teacher_output = True

    def __init__(self, loss: str | Loss = "kd", form: str = "code", **options: Any) -> None:
        super().__init__()
        if not (isinstance(form, str) and form in _FORMS):
            raise athooks.ConfigurationError(
                f"logit_std: form must be 'code' (the authors' normalize: std with C - 1, plus "
                f"1e-7) or 'paper' (the paper's sigma: divided by C), got {form!r}"
            )
        self.form = form
        self.inner = self._wrapped(loss, options)
        self.name = f"logit_std({self.inner.name})"
        self.needs_input_grad = self.inner.needs_input_grad
        self.needs_embedding = self.inner.needs_embedding
        self.needs_classifier = self.inner.needs_classifier

    @staticmethod
    def _wrapped(loss: Any, options: dict[str, Any]) -> Loss:
        """The wrapped loss, built from its name or checked."""
        if isinstance(loss, str):
            merged = {**AUTHORS_OPTIONS.get(loss, {}), **options}
            own = {spec.name: spec.factory for spec in SPECS if spec.name != "logit_std"}
            if loss in own:
                try:
                    built = own[loss](**merged)
                except TypeError as err:
                    raise athooks.ConfigurationError(
                        f"logit_std: the wrapped loss {loss!r} does not take the options "
                        f"{sorted(merged)}: {err}"
                    ) from None
            else:
                built = athooks.loss(loss, **merged)
            inner: Loss = built
        elif isinstance(loss, Loss):
            if options:
                raise athooks.ConfigurationError(
                    f"logit_std: options {sorted(options)} go to a wrapped loss given by name; "
                    f"the loss object {loss.name!r} is already built: set them when you build "
                    f"it, e.g. athooks.loss({loss.name!r}, ...)"
                )
            inner = loss
        else:
            raise athooks.ConfigurationError(
                f"logit_std: loss must be a logit loss's name (e.g. 'kd', 'dkd', 'dist') or "
                f"a loss from athooks.loss(...), got {type(loss).__name__} {loss!r:.60}"
            )
        if isinstance(inner, LogitStandardization):
            raise athooks.ConfigurationError(
                f"logit_std: {inner.name!r} already standardises its logits; wrap the loss "
                "itself, once"
            )
        if not inner.needs_teacher_output:
            raise athooks.ConfigurationError(
                f"logit_std standardises the models' logits, so it wraps a loss that reads "
                f"them (needs_teacher_output), such as 'kd', 'dkd' or 'dist'; "
                f"{inner.name!r} reads none. Add {inner.name!r} to the Distiller's losses "
                "beside the standardised one instead"
            )
        return inner

    def standardize(self, z: Tensor) -> Tensor:
        """Z-score each row of ``z`` ``(B, C)`` as ``form`` says."""
        centred = z - z.mean(dim=-1, keepdim=True)
        if self.form == "code":
            return centred / (1e-7 + z.std(dim=-1, keepdim=True))
        return centred / centred.pow(2).mean(dim=-1, keepdim=True).sqrt()

    def captures(self) -> tuple[Any, ...]:
        """What the wrapped loss captures."""
        return tuple(self.inner.captures())

    def setup(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Set up the wrapped loss for the layer pairs."""
        super().setup(pairs)
        self.inner.setup(pairs)

    def forward(self, step: Step) -> Tensor:
        """The wrapped loss on the standardised logits."""
        z_s, z_t = _both_logits(step, self.name)
        if z_s.shape[1] < 2:
            raise athooks.ConfigurationError(
                f"logit_std: logits of {z_s.shape[1]} class cannot be standardised (their "
                "spread is 0); it needs two classes or more"
            )
        return cast(
            Tensor,
            self.inner(
                step.replace(
                    student_output=self.standardize(z_s), teacher_output=self.standardize(z_t)
                )
            ),
        )

    def extra_repr(self) -> str:
        """The form, for ``repr``."""
        return f"form={self.form!r}"


SPECS: list[LossSpec] = [
    LossSpec("dkd", DKD, "decoupled KD: target and non-target class terms (Zhao et al., 2022)"),
    LossSpec("dist", DIST, "DIST: inter/intra-class Pearson relations (Huang et al., 2022)"),
    LossSpec(
        "logit_std",
        LogitStandardization,
        "Z-score both models' logits before a logit loss (Sun et al., 2024)",
    ),
]
