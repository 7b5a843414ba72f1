"""A :class:`LossSet`: the losses of one Distiller, their labels, and what they need of a step."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from athooks.connectors import Connector, Connectors, replicate
from athooks.errors import CaptureError, ConfigurationError
from athooks.losses.base import Loss, Step, loss
from athooks.mappings import Mapping
from athooks.schedules import value_at

__all__ = ["LossSet"]


def _as_losses(losses: Any) -> list[Loss]:
    items = [losses] if isinstance(losses, (str, Loss)) else losses
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise ConfigurationError(
            f"losses must be a loss name, a loss from athooks.loss(...), or a list of them; got "
            f"{type(losses).__name__}"
        )
    out: list[Loss] = []
    for item in items:
        if isinstance(item, str):
            out.append(loss(item))
        elif isinstance(item, Loss):
            out.append(item)
        else:
            raise ConfigurationError(
                f"losses: expected a loss name or athooks.loss(...), got {type(item).__name__}: "
                f"{item!r:.80}"
            )
    if not out:
        raise ConfigurationError("losses is empty; give at least one, e.g. losses='at'")
    return out


class LossSet:
    """The losses of a Distiller, evaluated together on one step.

    Args:
        losses: A loss name, a loss object, or a sequence of them.

    Attributes:
        modules: The losses, as an ``nn.ModuleList`` (their parameters and buffers).
        labels: The key of each loss in ``Distiller.terms``: its name, made unique (``at``,
            ``at_2``, ...).
        mappings: Every mapping the losses declared, each once, in order.
        needs_teacher_output: Whether some loss reads the teacher's output.
        needs_input_grad: Whether some loss needs the student's input to require grad.

    Example:
        ```python
        import athooks
        from athooks.losses.lossset import LossSet

        losses = LossSet(["at", athooks.loss("at", mapping="max_p"), "kd"])
        assert losses.labels == ["at", "at_2", "kd"] and len(losses.mappings) == 2
        ```
    """

    def __init__(self, losses: Any) -> None:
        items = _as_losses(losses)
        self.modules = nn.ModuleList(items)
        self.labels: list[str] = []
        for item in items:
            label, n = item.name, 2
            while label in self.labels:
                label, n = f"{item.name}_{n}", n + 1
            self.labels.append(label)
        self.mappings: list[Mapping] = []
        for item in items:
            for mapping in item.captures():
                if not any(mapping is m for m in self.mappings):
                    self.mappings.append(mapping)
        self.needs_teacher_output = any(item.needs_teacher_output for item in items)
        self.needs_input_grad = any(item.needs_input_grad for item in items)
        self.needs_embedding = any(item.needs_embedding for item in items)
        self.needs_classifier = any(item.needs_classifier for item in items)
        self.pairs: list[tuple[str, str]] | None = None
        self._handed_out = False
        self._replicated = False
        self.has_state = any(True for _ in self.modules.parameters()) or any(
            True for _ in self.modules.buffers()
        )
        self._where: tuple[torch.device, torch.dtype] | None = None

    def __iter__(self) -> Iterator[Loss]:
        return iter(self.modules)  # type: ignore[arg-type]

    def connector_lists(self) -> list[tuple[str, Connectors]]:
        """Every :class:`athooks.plugin.Connectors` of the losses, with its name."""
        return [(n, m) for n, m in self.modules.named_modules() if isinstance(m, Connectors)]

    @property
    def sized(self) -> bool:
        """Whether every per-pair connector list knows its number of pairs."""
        return all(m.sized for _, m in self.connector_lists())

    def setup(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Tell every loss the layer pairs (:meth:`athooks.plugin.Loss.setup`), once.

        Raises:
            ConfigurationError: If a loss's connectors already hold another number of pairs
                (a loaded state dict, or the loss object given to another Distiller).
        """
        if self.pairs is not None:
            return
        for label, item in zip(self.labels, self, strict=True):
            before = item.set_up_for
            if before is not None and before != len(pairs):
                raise ConfigurationError(
                    f"loss {label!r} was set up for {before} layer pairs by another Distiller "
                    f"and is now given {len(pairs)}; a loss with per-pair state (connectors) "
                    "belongs to one Distiller. Give each Distiller its own loss object "
                    "(athooks.loss(...) again)"
                )
        self.pairs = list(pairs)
        for item in self:
            item.setup(list(pairs))
            item.set_up_for = len(pairs)

    def replicate(self) -> None:
        """Under ``torch.distributed``, make the losses' state the same on every rank (once).

        Connectors built later replicate themselves when they are built.
        """
        if not self._replicated:
            self._replicated = True
            replicate(self.modules)

    def follow(self, model: nn.Module) -> None:
        """Move the losses' parameters and buffers to ``model``'s device and floating dtype."""
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        if ref is None:
            return
        where = (ref.device, ref.dtype)
        if where != self._where:
            self.modules.to(device=ref.device, dtype=ref.dtype)
            self._where = where

    def hand_out(self, layers: Any) -> None:
        """Note that the parameters are given to an optimiser, if they all exist yet.

        Args:
            layers: The Distiller's ``layers``, for the message.

        Raises:
            ConfigurationError: If a per-pair connector list is not sized yet (``"auto"``
                before the first call).
        """
        if not self.sized:
            indices = dict.fromkeys(int(n.split(".")[0]) for n, _ in self.connector_lists())
            labels = ", ".join(repr(self.labels[i]) for i in indices)
            raise ConfigurationError(
                f"loss {labels} has one connector per layer pair, and "
                f"layers={layers!r} is resolved on the student's first call, so its "
                "parameters do not exist yet. Pass input_size=(C, H, W) to resolve the layers "
                "now, or make the optimiser after the first step inside the block (the first "
                "d.loss() builds the connectors), or name the layers"
            )
        self._handed_out = True

    def warn_unused_parameters(self) -> None:
        """Warn once if trainable parameters were built but never handed to an optimiser."""
        if self._handed_out:
            return
        self._handed_out = True  # warn once
        built = (
            p
            for p in self.modules.parameters()
            if not isinstance(p, nn.parameter.UninitializedParameter)  # a connector left unused
        )
        if any(p.requires_grad for p in built):
            warnings.warn(
                f"the losses of this Distiller ({', '.join(self.labels)}) have "
                "trainable parameters (connectors, learnable mappings), but d.parameters() was "
                "never called, so no optimiser trains them. Give them to yours: "
                "SGD([*student.parameters(), *d.parameters()], ...)",
                stacklevel=4,
            )

    def evaluate(
        self, step: Step, at: int = 0, *, train: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Every loss on ``step``, each term multiplied by its loss's schedule at step ``at``.

        A validation step (``train=False``) runs the losses in eval mode, so that no running
        statistic or memory bank learns from it, and gives their modes back.

        Args:
            step: What the step captured.
            at: The training step (``Distiller.step``), for the losses' schedules.
            train: Whether it is a training step (the forward had gradient).

        Returns:
            The sum of the terms, and each term by label (scalars, with their graphs; a term
            with a :attr:`Loss.schedule` is ``schedule(at)`` times the loss's own value).

        Raises:
            CaptureError: If a loss returns something other than a scalar tensor.
            ConfigurationError: If a schedule returns something other than a finite number
                ``>= 0``.
        """
        if train:
            return self._evaluate(step, at)
        modules = list(self.modules.modules())
        modes = [m.training for m in modules]
        self.modules.eval()
        try:
            return self._evaluate(step, at)
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.training = mode

    def _evaluate(self, step: Step, at: int) -> tuple[Tensor, dict[str, Tensor]]:
        terms: dict[str, Tensor] = {}
        for label, loss_fn in zip(self.labels, self, strict=True):
            value = loss_fn.term(step)
            if not isinstance(value, Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, Tensor) else ""
                raise CaptureError(
                    f"loss {label!r} returned {type(value).__name__}{shape}; a loss must "
                    "return a scalar tensor"
                )
            schedule = loss_fn.schedule
            if schedule is not None:
                value = value * value_at(schedule, at, f"loss {label!r}")
            terms[label] = value.reshape(())
        values = list(terms.values())
        total = values[0]
        for value in values[1:]:
            total = total + value
        return total, terms

    def state_dict(self) -> dict[str, Any]:
        """The losses' parameters and buffers, keyed as in their ``nn.ModuleList``.

        A connector that is not built yet has no entry; loading a built one's entries builds it.
        """
        return dict(self.modules.state_dict())

    def _optional_keys(self) -> set[str]:
        """The keys of connectors not built yet: loaded if given (building them), else left."""
        optional: set[str] = set()
        for name, module in self.modules.named_modules():
            if isinstance(module, Connector) and not module.built:
                optional.update(f"{name}.{key}" for key in module.state_keys())
        return optional

    def _size_from(self, state: dict[str, Any]) -> None:
        """Size per-pair connector lists not sized yet to the number a state dict holds."""
        for name, connectors in self.connector_lists():
            if connectors.sized:
                continue
            prefix = f"{name}."
            indices = {
                int(k[len(prefix) :].split(".", 1)[0])
                for k in state
                if k.startswith(prefix) and k[len(prefix) :].split(".", 1)[0].isdigit()
            }
            if indices:
                connectors.resize(max(indices) + 1)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict`.

        Args:
            state: The saved state, keys without the Distiller's ``"losses."`` prefix.
            strict: Whether every key of this set must be given, and no other.

        Raises:
            ConfigurationError: With ``strict``, naming the missing and unexpected keys.
        """
        self._size_from(state)
        if strict:
            expected = set(self.modules.state_dict())
            missing = sorted(expected - set(state))
            unexpected = sorted(set(state) - expected - self._optional_keys())
            if missing or unexpected:
                parts = []
                if missing:
                    parts.append(f"missing {', '.join(f'losses.{k}' for k in missing)}")
                if unexpected:
                    parts.append(f"unexpected {', '.join(f'losses.{k}' for k in unexpected)}")
                raise ConfigurationError(
                    f"the state dict does not fit this Distiller's losses: {'; '.join(parts)}. "
                    "Build the Distiller with the same losses as the one saved, or pass "
                    "strict=False to load what matches"
                )
        self.modules.load_state_dict(state, strict=False)
