"""The loss interface: a :class:`Loss` reads one step's captures through a :class:`Step`."""

from __future__ import annotations

import copy
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from athooks.connectors import Connectors
from athooks.errors import CaptureError, ConfigurationError, PluginError
from athooks.mappings import Mapping
from athooks.registry import build

__all__ = ["Loss", "Step", "StepRunner", "logits_of", "loss", "resize_map"]

#: "Not given" for :meth:`Step.replace` and :meth:`Step.extra`.
_KEEP: Any = object()


#: The interpolation of an upsampled map, by the number of its spatial dimensions.
_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resize_map(amap: Tensor, size: Sequence[int]) -> Tensor:
    """Resize attention maps ``(B, *S)`` to ``(B, *size)``, over all spatial axes.

    ``S`` is one to three spatial dimensions: ``(B, T)`` for 1-D signals, ``(B, H, W)`` for
    images, ``(B, T, H, W)`` for videos. Shrinking (or keeping) every axis averages the cells
    each output cell covers (area interpolation, so the map's mass per region is kept); anything
    else is linear, bilinear or trilinear interpolation (``align_corners=False``).

    Args:
        amap: The maps.
        size: The target spatial size, as many numbers as ``amap`` has spatial dimensions.

    Returns:
        The resized maps, ``(B, *size)``.

    Raises:
        ConfigurationError: If ``size`` does not have one number per spatial dimension, or
            there are not 1 to 3 of them.

    Example:
        ```python
        import torch
        from athooks.losses.base import resize_map

        m = torch.arange(16.0).reshape(1, 4, 4)
        assert resize_map(m, (2, 2)).tolist() == [[[2.5, 4.5], [10.5, 12.5]]]
        signal = torch.tensor([[1.0, 3.0, 5.0, 7.0]])  # (B, T)
        assert resize_map(signal, (2,)).tolist() == [[2.0, 6.0]]
        assert resize_map(torch.rand(2, 4, 8, 8), (2, 4, 4)).shape == (2, 2, 4, 4)  # video
        ```
    """
    spatial = tuple(amap.shape[1:])
    target = tuple(int(n) for n in size)
    if len(target) != len(spatial) or len(spatial) not in _LINEAR_MODES:
        raise ConfigurationError(
            f"resize_map: maps of shape {tuple(amap.shape)} (B, *S) cannot be resized to "
            f"{target}; give one size per spatial dimension (1 to 3 of them: (T,), (H, W) or "
            "(T, H, W))"
        )
    x = amap.unsqueeze(1)
    if all(t <= n for t, n in zip(target, spatial, strict=True)):
        out = F.interpolate(x, size=target, mode="area")
    else:
        out = F.interpolate(x, size=target, mode=_LINEAR_MODES[len(spatial)], align_corners=False)
    return out.squeeze(1)


def logits_of(output: Any, who: str, loss_name: str) -> Tensor:
    """The class logits ``(B, classes)`` in a model's output.

    A tensor is used as it is; a dict (or an object such as a Hugging Face ``ModelOutput``)
    gives its ``"logits"``; a tuple or list gives its first element.

    Args:
        output: What the model returned.
        who: ``"student"`` or ``"teacher"``, for the message.
        loss_name: The loss that needs the logits, for the message.

    Returns:
        The logits.

    Raises:
        CaptureError: If no ``(B, classes)`` tensor can be found.

    Example:
        ```python
        import torch
        from athooks.losses.base import logits_of

        z = torch.randn(2, 10)
        assert logits_of({"logits": z, "aux": 0}, "student", "kd") is z
        ```
    """
    found: Any = output
    if isinstance(output, MappingABC):
        found = output.get("logits")
    elif not isinstance(output, Tensor) and hasattr(output, "logits"):
        found = output.logits
    elif isinstance(output, (tuple, list)) and output:
        found = output[0]
    if not isinstance(found, Tensor) or found.dim() != 2 or not found.is_floating_point():
        got = (
            f"a tensor of shape {tuple(found.shape)}"
            if isinstance(found, Tensor)
            else f"a {type(output).__name__}"
            + (f" with keys {sorted(map(str, output))}" if isinstance(output, MappingABC) else "")
        )
        raise CaptureError(
            f"loss {loss_name!r} needs the {who}'s class logits (B, classes), but the {who} "
            f"returned {got}. Return logits (or a dict with 'logits') from the model's forward"
        )
    return found


class StepRunner(Protocol):
    """What the Distiller lends a :class:`Step` for losses that run the models again."""

    def student_input(self) -> Tensor:
        """The tensor input of the student's last forward (made to require grad if needed)."""
        ...

    def run_student_on(self, x: Tensor) -> Any:
        """Run the student again on ``x`` in place of its tensor input, capturing nothing."""
        ...

    def run_teacher_on(self, x: Tensor) -> Any:
        """Run the teacher on ``x`` (frozen, eval mode, gradient enabled), capturing nothing."""
        ...


class Step:
    """What one student forward (and the teacher's forward on the same input) captured.

    A :class:`Loss` receives a ``Step`` in :meth:`Loss.forward`. Attention maps are computed when
    each layer fires, so a loss asks for them by the mapping it declared in :meth:`Loss.captures`.

    Attributes:
        pairs: The ``(teacher_name, student_name)`` layer pairs, in order.
        target: The labels passed to ``Distiller.loss(target=...)``, or ``None``.

    Example:
        ```python
        import torch
        from athooks.plugin import Loss, Step

        class MeanMapGap(Loss):
            '''Squared gap between mean attention of teacher and student (illustration).'''

            name = "mean_map_gap"

            def __init__(self):
                super().__init__()
                self.mapping = __import__("athooks").mapping("sum_p", p=2)

            def captures(self):
                return (self.mapping,)

            def forward(self, step: Step) -> torch.Tensor:
                gaps = [(t.mean() - s.mean()) ** 2 for t, s in step.maps(self.mapping)]
                return torch.stack(gaps).sum()
        ```
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        teacher_values: Sequence[dict[Any, Tensor]],
        student_values: Sequence[dict[Any, Tensor]],
        *,
        student_output: Any = None,
        teacher_output: Any = None,
        target: Tensor | None = None,
        resize: str = "student",
        runner: StepRunner | None = None,
        embeddings: Sequence[tuple[Tensor, Tensor]] | None = None,
        classifiers: tuple[nn.Module | None, nn.Module | None] | None = None,
        extras: MappingABC[str, Any] | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.resize = resize
        self.runner = runner
        self.cache: dict[str, Any] = {}
        self._teacher_values = list(teacher_values)
        self._student_values = list(student_values)
        self._student_output = student_output
        self._teacher_output = teacher_output
        self._embeddings = None if embeddings is None else list(embeddings)
        self._classifiers = classifiers
        self._extras = dict(extras or {})
        self.target = target

    def replace(self, *, student_output: Any = _KEEP, teacher_output: Any = _KEEP) -> Step:
        """The same step with other model outputs, for modifiers of logit losses.

        The captures (maps, features, embeddings) are shared, not copied.

        Args:
            student_output: The student's output to use instead (default: unchanged).
            teacher_output: The teacher's output to use instead (default: unchanged).

        Returns:
            A new :class:`Step`.

        Example:
            ```python
            import torch
            from athooks.plugin import Step

            step = Step([], [], [], student_output=torch.zeros(2, 3))
            assert step.replace(student_output=torch.ones(2, 3)).student_output.sum() == 6
            ```
        """
        other = copy.copy(self)
        other.cache = {}
        if student_output is not _KEEP:
            other._student_output = student_output
        if teacher_output is not _KEEP:
            other._teacher_output = teacher_output
        return other

    def embedding(self) -> tuple[Tensor, Tensor]:
        """The teacher's and the student's pre-logit vectors ``(B, D_t)``, ``(B, D_s)``.

        Captured for losses that set ``needs_embedding = True``: the input of each model's
        classifier (``Distiller(..., embedding=...)`` names another layer). The teacher's carries
        no gradient.

        Returns:
            ``(teacher, student)``.

        Raises:
            CaptureError: If no embedding was captured (the loss did not declare
                ``needs_embedding``).
        """
        if not self._embeddings:
            raise CaptureError(
                "this step has no embedding (the pre-logit vectors): a loss that reads it must "
                "set needs_embedding = True, so that the Distiller taps each model's classifier "
                "input (or the layer given with Distiller(..., embedding=...))"
            )
        return self._embeddings[0]

    def classifier(self, side: str) -> nn.Module:
        """A model's classifier: the layer whose input is the pre-logit vector.

        Given to losses that set ``needs_classifier = True`` (class activation maps read its
        weight, ``(classes, D)`` for an ``nn.Linear``).

        Args:
            side: ``"teacher"`` or ``"student"``.

        Returns:
            The module.

        Raises:
            CaptureError: If the classifiers were not given (the loss did not declare
                ``needs_classifier``) or ``side`` is neither name.
        """
        if side not in ("teacher", "student"):
            raise CaptureError(
                f"step.classifier: side must be 'teacher' or 'student', got {side!r}"
            )
        found = None if self._classifiers is None else self._classifiers[side == "student"]
        if found is None:
            raise CaptureError(
                f"this step has no {side} classifier: a loss that reads it must set "
                "needs_classifier = True, so that the Distiller finds each model's classifier"
            )
        return found

    def extra(self, name: str, default: Any = _KEEP) -> Any:
        """What the user passed to ``Distiller.loss(target, **extras)`` under ``name``.

        Args:
            name: The keyword, e.g. ``"index"`` (the samples' dataset indices).
            default: Returned when it was not passed; without one, that is an error.

        Returns:
            The value.

        Raises:
            CaptureError: If it was not passed and no default is given.

        Example:
            ```python
            import torch
            from athooks.plugin import Step

            step = Step([], [], [], extras={"index": torch.arange(4)})
            assert step.extra("index").tolist() == [0, 1, 2, 3] and step.extra("x", None) is None
            ```
        """
        if name in self._extras:
            return self._extras[name]
        if default is not _KEEP:
            return default
        raise CaptureError(
            f"this loss needs {name!r}: pass it to the loss call, d.loss(target=y, {name}=...)"
        )

    def maps(self, mapping: Mapping) -> list[tuple[Tensor, Tensor]]:
        """The ``(teacher_map, student_map)`` of every pair for ``mapping``, each ``(B, *S)``.

        ``S`` is the layer's spatial shape: ``(T,)`` for 1-D signals, ``(H, W)`` for images,
        ``(T, H, W)`` for videos. Maps of one pair always have the same shape here.

        Args:
            mapping: A mapping the calling loss returned from :meth:`Loss.captures`.

        Returns:
            One ``(teacher, student)`` tuple per pair, float32. The teacher map carries no gradient.

        Raises:
            CaptureError: If the two maps of a pair differ in batch size or in their number of
                spatial dimensions (a video map and an image map), or in spatial size with
                ``resize="error"``. Otherwise maps of different spatial size are resized over
                all their spatial axes (:func:`resize_map`) before they are returned: the
                teacher's to the student's size (``resize="student"``, the default) or the
                other way round.
        """
        out: list[tuple[Tensor, Tensor]] = []
        for (t_name, s_name), t_vals, s_vals in zip(
            self.pairs, self._teacher_values, self._student_values, strict=True
        ):
            try:
                qt, qs = t_vals[mapping], s_vals[mapping]
            except KeyError:
                raise CaptureError(
                    f"mapping {mapping!r} was not captured; a loss must return every mapping it "
                    "reads from Loss.captures()"
                ) from None
            if qt.shape[0] != qs.shape[0]:
                raise CaptureError(
                    f"batch sizes differ in pair (teacher {t_name!r}, student {s_name!r}): "
                    f"teacher {qt.shape[0]}, student {qs.shape[0]}; the teacher must see the same "
                    "batch as the student (check teacher_input)"
                )
            if qt.shape[1:] != qs.shape[1:] and not mapping.is_attention_map:
                raise CaptureError(
                    f"mapping {mapping.name!r} gives the teacher's layer {t_name!r} a "
                    f"{tuple(qt.shape[1:])} result and the student's layer {s_name!r} a "
                    f"{tuple(qs.shape[1:])} one; it is not a spatial map, so athooks cannot "
                    "resize it. Pair layers for which it gives equal shapes (for channel "
                    "descriptors: layers of equal width)"
                )
            if qt.dim() != qs.dim():
                raise CaptureError(
                    f"attention maps of pair (teacher {t_name!r}, student {s_name!r}) have "
                    f"different layouts: teacher {tuple(qt.shape[1:])}, student "
                    f"{tuple(qs.shape[1:])} ({qt.dim() - 1} and {qs.dim() - 1} spatial "
                    "dimensions), so one cannot be resized to the other. Pair layers of the same "
                    "layout (both images, both videos, both 1-D), or give one side an "
                    "athooks.Layer(name, transform=...) that makes the layouts agree"
                )
            if qt.shape[1:] != qs.shape[1:]:
                if self.resize == "student":
                    qt = resize_map(qt, qs.shape[1:])
                elif self.resize == "teacher":
                    qs = resize_map(qs, qt.shape[1:])
                else:
                    raise CaptureError(
                        f"attention maps of pair (teacher {t_name!r}, student {s_name!r}) differ "
                        f"in spatial size: teacher {tuple(qt.shape[1:])}, student "
                        f"{tuple(qs.shape[1:])}, and resize='error'. Pair layers of the same "
                        "stride, or let athooks resize the maps (resize='student' or 'teacher')"
                    )
            out.append((qt, qs))
        return out

    def features(self, reduction: Mapping) -> list[tuple[Tensor, Tensor]]:
        """The ``(teacher, student)`` feature maps of every pair, kept whole at capture.

        Args:
            reduction: The :class:`athooks.mappings.Features` the calling loss declared.

        Returns:
            One ``(teacher, student)`` tuple per pair; the teacher's carries no gradient.
        """
        out: list[tuple[Tensor, Tensor]] = []
        for t_vals, s_vals in zip(self._teacher_values, self._student_values, strict=True):
            out.append((t_vals[reduction], s_vals[reduction]))
        return out

    @property
    def student_output(self) -> Any:
        """The value the student's last forward returned."""
        return self._student_output

    @property
    def teacher_output(self) -> Any:
        """What the teacher returned on the same input (for losses that declare they need it)."""
        return self._teacher_output

    def require_target(self, loss_name: str) -> Tensor:
        """The labels, or a clear error when ``Distiller.loss()`` was called without them.

        Args:
            loss_name: The name of the loss that needs them, for the message.

        Returns:
            The target tensor.

        Raises:
            CaptureError: If no target was given.
        """
        if self.target is None:
            raise CaptureError(
                f"loss {loss_name!r} needs the labels: call d.loss(target=y) with the batch's "
                "targets"
            )
        return self.target


class Loss(nn.Module):
    """Base class of transfer losses.

    A loss declares, through :meth:`captures`, the mappings to apply to every tapped layer as it
    fires (so no teacher feature map has to be kept), and computes a scalar from a :class:`Step`
    in :meth:`forward`. A loss with parameters registers them as usual for an ``nn.Module``.

    Attributes:
        name: The registry name, used as the key of ``Distiller.terms``.
        needs_teacher_output: Whether the Distiller must keep the teacher's output for this loss.
        needs_input_grad: Whether the student's tensor input must require grad before its
            forward (for losses built on the input gradient).

    Example:
        ```python
        import torch
        import athooks
        from athooks.plugin import Loss

        class L1AT(Loss):
            name = "l1_at"

            def __init__(self, weight: float = 1.0):
                super().__init__()
                self.weight = weight
                self.mapping = athooks.mapping("sum_p", p=2)

            def captures(self):
                return (self.mapping,)

            def forward(self, step):
                terms = []
                for t, s in step.maps(self.mapping):
                    t = torch.nn.functional.normalize(t.flatten(1), dim=1)
                    s = torch.nn.functional.normalize(s.flatten(1), dim=1)
                    terms.append((s - t).abs().mean())
                return self.weight * torch.stack(terms).sum()

        print(L1AT())
        ```
    """

    name: str = "loss"
    needs_teacher_output: bool = False
    needs_input_grad: bool = False
    needs_embedding: bool = False
    needs_classifier: bool = False
    #: Weights of the layer pairs' terms in :meth:`sum_pairs` (``None``: all 1).
    pair_weights: Sequence[float] | MappingABC[str, float] | None = None

    def setup(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Prepare for these layer pairs; called once they are known, before the first step.

        The Distiller calls it when the layers are resolved (at construction for named layers,
        on the student's first call for ``"auto"``). The default sizes every
        :class:`athooks.plugin.Connectors` of the loss to one connector per pair. A loss that
        overrides it calls ``super().setup(pairs)``.

        Args:
            pairs: The ``(teacher_name, student_name)`` pairs, in order.
        """
        for module in self.modules():
            if isinstance(module, Connectors):
                module.resize(len(pairs))

    def sum_pairs(self, terms: Sequence[Tensor]) -> Tensor:
        """The sum of per-pair terms, weighted by :attr:`pair_weights` when they are set.

        Args:
            terms: One scalar per layer pair, in the order of ``step.pairs``.

        Returns:
            The (weighted) sum.

        Raises:
            CaptureError: If there are no terms.
        """
        if not terms:
            raise CaptureError(
                f"loss {self.name!r} has no layer pair to sum over: the Distiller tapped no "
                "layer (check layers=...)"
            )
        weights = self.pair_weights
        if weights is None:
            return torch.stack(list(terms)).sum()
        values = list(weights.values()) if isinstance(weights, MappingABC) else list(weights)
        return torch.stack([w * t for w, t in zip(values, terms, strict=True)]).sum()

    def captures(self) -> tuple[Mapping, ...]:
        """The mappings to compute at every tapped layer, on both models.

        Returns:
            Mapping modules; :meth:`Step.maps` returns their results.
        """
        return ()

    def forward(self, step: Step) -> Tensor:  # pragma: no cover - abstract
        """Compute the loss of one step.

        Args:
            step: What the last forward captured.

        Returns:
            A scalar tensor.
        """
        raise NotImplementedError


def loss(name: str, **options: Any) -> Loss:
    """A configured transfer loss, by registry name.

    Args:
        name: A registered loss name (``athooks.list_losses()``).
        **options: The loss's options, e.g. ``beta=1e3, mapping="max_p", p=4`` for ``"at"``.

    Returns:
        An :class:`athooks.plugin.Loss` to pass to :class:`athooks.Distiller`.

    Raises:
        UnknownNameError: If no plugin registers ``name``.
        ConfigurationError: If an option is not accepted.
        PluginError: If the plugin's factory fails or builds something that is not a ``Loss``.

    Example:
        ```python
        import athooks

        at = athooks.loss("at", beta=1e3, mapping="max_p", p=4)
        print(at)
        ```
    """
    obj, provider = build("loss", name, options)
    if not isinstance(obj, Loss):
        raise PluginError(
            f"loss {name!r} from {provider} built a {type(obj).__name__}; a loss factory must "
            "return an athooks.plugin.Loss"
        )
    if obj.name == Loss.name:
        obj.name = name
    return obj
