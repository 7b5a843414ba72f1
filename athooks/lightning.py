"""PyTorch Lightning integration: a callback that adds the transfer loss to the training step.

Install the optional extra: ``pip install "athooks[lightning]"``. Only this module imports
Lightning; ``import athooks`` never does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from athooks.distiller import Distiller
from athooks.errors import ConfigurationError

__all__ = ["AttentionTransfer"]


class AttentionTransfer(pl.Callback):
    """Add ``weight * d.loss()`` to the loss your ``training_step`` returns.

    During ``trainer.fit``, the callback keeps a :class:`athooks.Distiller` attached to the
    student network inside your LightningModule: every training forward of the student runs the
    teacher first, and after your ``training_step`` returns, the transfer loss is added to the
    loss it returned (a tensor, or the ``"loss"`` of a dict), so that Lightning backpropagates the
    sum. Each loss term is logged as ``"athooks/<name>"``. The Distiller is detached while
    validation runs (no teacher forward there) and when fitting ends or fails.

    The teacher is moved to the LightningModule's device when fitting starts. The student must be
    a submodule that your ``training_step`` calls (e.g. ``self.net(x)``), not the LightningModule
    itself: Lightning's distributed strategies call the LightningModule with the whole batch.

    Args:
        teacher: The trained teacher.
        student: The attribute path of the student network inside the LightningModule (e.g.
            ``"net"`` or ``"model.backbone"``), or the module itself.
        weight: Factor of the transfer loss in the total.
        target: For losses that need labels (``"kd"``): a callable taking the batch and
            returning the labels. By default none are passed.
        **distiller_options: Passed to :class:`athooks.Distiller` (``layers``, ``losses``,
            ``teacher_input``, ``resize``, ...).

    Example:
        ```python
        import lightning.pytorch as pl
        import torch
        import torch.nn.functional as F
        import torchvision
        from athooks.lightning import AttentionTransfer

        class Classifier(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torchvision.models.resnet18(num_classes=10)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        teacher = torchvision.models.resnet34(num_classes=10)
        data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            callbacks=[AttentionTransfer(teacher, student="net", layers="layer?")],
        )
        trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=4))
        ```
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: str | nn.Module,
        *,
        weight: float = 1.0,
        target: Callable[[Any], Tensor] | None = None,
        **distiller_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise ConfigurationError(
                f"teacher must be a torch.nn.Module, got {type(teacher).__name__}"
            )
        if not isinstance(student, (str, nn.Module)):
            raise ConfigurationError(
                f"student must be the attribute path of the student inside the LightningModule "
                f"(e.g. 'net') or the module itself, got {type(student).__name__}"
            )
        if target is not None and not callable(target):
            raise ConfigurationError(
                f"target must be a callable taking the batch, got {type(target).__name__}"
            )
        self.teacher = teacher
        self.student = student
        self.weight = float(weight)
        self.target = target
        self.distiller_options = distiller_options
        self.distiller: Distiller | None = None
        self._patched: Any = None
        self._pending_state: dict[str, Any] | None = None
        self._resume = False

    # ------------------------------------------------------------------ helpers

    def _student_of(self, pl_module: pl.LightningModule) -> nn.Module:
        if isinstance(self.student, nn.Module):
            if not any(m is self.student for m in pl_module.modules()):
                raise ConfigurationError(
                    "the student module given to AttentionTransfer is not part of the "
                    "LightningModule being fitted; give the attribute path (e.g. student='net')"
                )
            return self.student
        module: Any = pl_module
        for part in self.student.split("."):
            module = getattr(module, part, None)
            if module is None:
                raise ConfigurationError(
                    f"the LightningModule {type(pl_module).__name__} has no submodule "
                    f"{self.student!r}; give the attribute path of the student network, one of: "
                    f"{', '.join(n for n, _ in pl_module.named_children()) or '(none)'}"
                )
        if not isinstance(module, nn.Module):
            raise ConfigurationError(
                f"{self.student!r} of the LightningModule is a {type(module).__name__}, not a "
                "torch.nn.Module"
            )
        return module

    def _add_transfer(self, pl_module: pl.LightningModule, output: Any, batch: Any) -> Any:
        distiller = self.distiller
        if distiller is None or output is None:  # None: the user skipped this batch
            return output
        is_dict = isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor)
        if not isinstance(output, Tensor) and not is_dict:
            raise ConfigurationError(
                f"training_step returned a {type(output).__name__}; AttentionTransfer adds the "
                "transfer loss to a returned tensor or to the 'loss' of a returned dict"
            )
        target = self.target(batch) if self.target is not None else None
        transfer = self.weight * distiller.loss(target)
        for name, value in distiller.terms.items():
            pl_module.log(f"athooks/{name}", value, on_step=True, on_epoch=False)
        if is_dict:
            return {**output, "loss": output["loss"] + transfer}
        return output + transfer

    def _attach(self) -> None:
        if self.distiller is not None and not self.distiller.attached:
            self.distiller.attach()

    def _detach(self) -> None:
        if self.distiller is not None:
            self.distiller.detach()

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the Distiller, attach it, and wrap the module's ``training_step``."""
        student = self._student_of(pl_module)
        self.teacher.to(pl_module.device)
        distiller = Distiller(self.teacher, student, **self.distiller_options)
        if any(True for loss in distiller.losses for _ in loss.parameters()):
            raise ConfigurationError(
                "the losses given to AttentionTransfer have learnable parameters, which must be "
                "in the optimizer that configure_optimizers() makes; with learnable mappings or "
                "connectors (e.g. the zoo's fitnet, crd), create the Distiller in the "
                "LightningModule instead and add d.parameters() there"
            )
        if self._pending_state is not None:
            distiller.load_state_dict(self._pending_state, strict=False)
            self._pending_state = None
        self.distiller = distiller
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            batch = args[0] if args else kwargs.get("batch")
            return self._add_transfer(pl_module, original(*args, **kwargs), batch)

        self._patched = training_step
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._attach()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """No teacher forward during validation."""
        self._resume = self.distiller is not None and self.distiller.attached
        self._detach()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Back to training (validation inside a training epoch): attach again."""
        if self._resume:
            self._attach()
        self._resume = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach (again) when training starts, after the sanity-check validation."""
        self._attach()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Detach and give the LightningModule its own ``training_step`` back."""
        self._restore(pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Detach when fitting fails, so the models are left without hooks."""
        self._restore(pl_module)

    def _restore(self, pl_module: pl.LightningModule) -> None:
        self._detach()
        if self._patched is not None and pl_module.__dict__.get("training_step") is self._patched:
            del pl_module.training_step
        self._patched = None

    def state_dict(self) -> dict[str, Any]:
        """The Distiller's state (learnable mappings, tap modes), saved in Lightning checkpoints."""
        return self.distiller.state_dict() if self.distiller is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (now, or when the Distiller is made at the start of fit)."""
        state = {k: torch.as_tensor(v) for k, v in state_dict.items()}
        if self.distiller is not None:
            self.distiller.load_state_dict(state, strict=False)
        else:
            self._pending_state = state
