"""The loss interface: a :class:`Loss` reads one step's captures through a :class:`Step`."""

from __future__ import annotations

import copy
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from athooks.checks import NEGATIVE_WEIGHT, check_real
from athooks.connectors import Connectors
from athooks.errors import CaptureError, ConfigurationError, PluginError
from athooks.mappings import Mapping
from athooks.registry import build
from athooks.schedules import Schedule, as_schedule

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
        schedule: The term's weight over training steps (:attr:`schedule`; ``None``: 1).
        pair_weights: Weights of the layer pairs in :meth:`sum_pairs` (:attr:`pair_weights`).

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
                return self.weight * self.sum_pairs(terms)  # so pair_weights work

        print(L1AT())
        ```
    """

    name: str = "loss"
    needs_teacher_output: bool = False
    needs_input_grad: bool = False
    needs_embedding: bool = False
    needs_classifier: bool = False
    #: The number of layer pairs a Distiller set this loss up for (``None`` until then).
    set_up_for: int | None = None
    _schedule: Schedule | None = None
    _pair_weights: tuple[float, ...] | dict[str, float] | None = None
    _step_pairs: list[tuple[str, str]] | None = None  # the pairs of the last step in term()
    _sums: int = 0  # sum_pairs calls (term() checks that forward made one; only ever grows)

    @property
    def schedule(self) -> Schedule | None:
        """The weight of the term over time: ``d.loss()`` multiplies the term by ``schedule(step)``.

        ``None`` (default): no multiplier. Set it with ``athooks.loss(name, schedule=S)`` or
        ``loss.schedule = S``: a preset of :mod:`athooks.schedules`, any callable of the
        training step (0-based, ``Distiller.step``) that returns a finite number ``>= 0``, or a
        number (a constant).
        """
        return self._schedule

    @schedule.setter
    def schedule(self, value: Schedule | float | None) -> None:
        self._schedule = None if value is None else as_schedule(value, f"loss {self.name!r}")

    @property
    def pair_weights(self) -> tuple[float, ...] | dict[str, float] | None:
        """Weights of the layer pairs' terms in :meth:`sum_pairs` (``None``: all 1).

        A list gives one weight per pair, in the order of ``d.pairs``; a dict is keyed by the
        *student* layer name (the second of each pair), and a pair it leaves out weighs 1.
        Weights are finite and ``>= 0``. Set it with ``athooks.loss(name, pair_weights=W)`` or
        ``loss.pair_weights = W``; the number of weights and the names are checked against the
        pairs at the first step. Only losses whose forward sums per-pair terms with
        :meth:`sum_pairs` take them: any other raises at its first step.
        """
        return self._pair_weights

    @pair_weights.setter
    def pair_weights(self, value: Sequence[float] | MappingABC[str, float] | None) -> None:
        self._pair_weights = _check_pair_weights(value, self.name)

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

    def sum_pairs(
        self, terms: Sequence[Tensor], pairs: Sequence[tuple[str, str]] | None = None
    ) -> Tensor:
        """The sum of per-pair terms, weighted by :attr:`pair_weights` when they are set.

        A loss made of one term per layer pair returns ``self.sum_pairs(terms)`` (times its own
        weight) from :meth:`forward`, so that ``pair_weights`` work for it.

        Args:
            terms: One scalar per layer pair, in the order of ``step.pairs``.
            pairs: The step's pairs (``step.pairs``), for dict weights and messages; default:
                those of the last step a Distiller evaluated this loss on (:meth:`term`).

        Returns:
            The (weighted) sum: ``sum_j w_j * terms[j]``.

        Raises:
            CaptureError: If there are no terms, or not one per pair.
            ConfigurationError: If the weights do not fit the pairs (see :attr:`pair_weights`).

        Example:
            ```python
            import torch
            import athooks

            at = athooks.loss("at", pair_weights={"layer3": 2.0})
            pairs = [("layer2", "layer2"), ("layer3", "layer3")]
            total = at.sum_pairs([torch.tensor(1.0), torch.tensor(3.0)], pairs)
            assert total.item() == 1.0 + 2.0 * 3.0
            ```
        """
        self._sums += 1
        if not terms:
            raise CaptureError(
                f"loss {self.name!r} has no layer pair to sum over: the Distiller tapped no "
                "layer (check layers=...)"
            )
        weights = self._pair_weights
        if weights is None:
            return torch.stack(list(terms)).sum()
        known = pairs if pairs is not None else self._step_pairs
        factors = _pair_factors(weights, known, len(terms), self.name)
        return torch.stack([t * w for t, w in zip(terms, factors, strict=True)]).sum()

    def term(self, step: Step) -> Tensor:
        """The loss's term of one step, as a Distiller computes it (before its :attr:`schedule`).

        Calls :meth:`forward` and checks that a loss given :attr:`pair_weights` summed its pairs
        with :meth:`sum_pairs` (so that no loss ignores them silently).

        Args:
            step: What the step captured.

        Returns:
            What :meth:`forward` returned.

        Raises:
            CaptureError: If the loss has ``pair_weights`` and its forward did not call
                :meth:`sum_pairs`.
        """
        # A counter, not a flag: a step of another thread (steps are per thread) can only add
        # to it, so it never makes this check fail; the pairs are the Distiller's, the same in
        # every thread.
        self._step_pairs, before = list(step.pairs), self._sums
        value: Tensor = self(step)
        if self._pair_weights is not None and self._sums == before:
            raise CaptureError(
                f"loss {self.name!r} was given pair_weights, but its forward() did not sum "
                "per-pair terms with self.sum_pairs(terms), so the weights would be ignored. "
                "A loss without layer pairs (on logits or input gradients) takes no "
                "pair_weights: remove them; a loss of one term per pair returns "
                "self.sum_pairs(terms) from forward()"
            )
        return value

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


def _check_pair_weights(value: Any, loss_name: str) -> tuple[float, ...] | dict[str, float] | None:
    """``pair_weights`` as a tuple of floats or a dict of floats, checked (finite, ``>= 0``)."""
    if value is None:
        return None
    owner = f"loss {loss_name!r}"
    if isinstance(value, MappingABC) and all(isinstance(k, str) for k in value):
        return {
            k: check_real(
                w, owner=owner, option=f"pair_weights[{k!r}]", minimum=0.0, reason=NEGATIVE_WEIGHT
            )
            for k, w in value.items()
        }
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, MappingABC)):
        return tuple(
            check_real(
                w, owner=owner, option=f"pair_weights[{i}]", minimum=0.0, reason=NEGATIVE_WEIGHT
            )
            for i, w in enumerate(value)
        )
    raise ConfigurationError(
        f"{owner}: pair_weights must be a list of numbers (one per layer pair, in the order of "
        "d.pairs) or a dict {student layer name: number} (pairs left out weigh 1), got "
        f"{type(value).__name__} {value!r:.60}; for an array or a tensor, pass .tolist()"
    )


def _pair_factors(
    weights: tuple[float, ...] | dict[str, float],
    pairs: Sequence[tuple[str, str]] | None,
    count: int,
    loss_name: str,
) -> list[float]:
    """The weight of each of ``count`` per-pair terms, checked against the step's pairs."""
    if pairs is not None and len(pairs) != count:
        raise CaptureError(
            f"loss {loss_name!r} passed {count} terms to sum_pairs for {len(pairs)} layer "
            "pairs; give one term per pair, in the order of step.pairs"
        )
    listing = (
        ", ".join(f"(teacher {t!r}, student {s!r})" for t, s in pairs)
        if pairs is not None
        else f"{count} pairs"
    )
    if isinstance(weights, tuple):
        if len(weights) != count:
            raise ConfigurationError(
                f"loss {loss_name!r}: pair_weights has {len(weights)} weights for {count} layer "
                f"pairs: {listing}; give one weight per pair, in this order, or a dict keyed by "
                "student layer name (pairs left out weigh 1)"
            )
        return list(weights)
    if pairs is None:
        raise CaptureError(
            f"loss {loss_name!r}: pair_weights keyed by layer name need the step's pairs; "
            "call self.sum_pairs(terms, step.pairs) in forward()"
        )
    students = [s for _, s in pairs]
    unknown = sorted(set(weights) - set(students))
    if unknown:
        raise ConfigurationError(
            f"loss {loss_name!r}: pair_weights names {', '.join(map(repr, unknown))}, which "
            f"{'is' if len(unknown) == 1 else 'are'} not the student layer of any pair: "
            f"{listing}. Key pair_weights by the student layer name (the second of each pair); "
            "pairs left out weigh 1"
        )
    return [weights.get(s, 1.0) for s in students]


def loss(name: str, **options: Any) -> Loss:
    """A configured transfer loss, by registry name.

    Args:
        name: A registered loss name (``athooks.list_losses()``).
        **options: The loss's options, e.g. ``beta=1e3, mapping="max_p", p=4`` for ``"at"``.
            Two are taken by athooks for every loss, whatever its plugin: ``schedule``
            (:attr:`Loss.schedule`, the term's weight over training steps) and
            ``pair_weights`` (:attr:`Loss.pair_weights`, for losses summed over layer pairs).

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
        kd = athooks.loss("kd", schedule=athooks.schedules.warmup(1000))  # 0 -> 1 in 1000 steps
        deep = athooks.loss("at", pair_weights=[0.5, 1.0, 2.0])  # for three layer pairs
        print(at, kd.schedule, deep.pair_weights)
        ```
    """
    reserved = {k: options.pop(k) for k in ("schedule", "pair_weights") if k in options}
    obj, provider = build("loss", name, options)
    if not isinstance(obj, Loss):
        raise PluginError(
            f"loss {name!r} from {provider} built a {type(obj).__name__}; a loss factory must "
            "return an athooks.plugin.Loss"
        )
    if obj.name == Loss.name:
        obj.name = name
    for key, value in reserved.items():  # checked by the properties' setters
        setattr(obj, key, value)
    return obj
