"""athooks.lightning.AttentionTransfer with Lightning's CPU trainer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import TinyCNN

from athooks import Distiller
from athooks.errors import ConfigurationError

pl = pytest.importorskip("lightning.pytorch")
from athooks.lightning import AttentionTransfer  # noqa: E402

STEPS = 4
LR = 0.05
X = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.arange(16) % 5


class Classifier(pl.LightningModule):
    def __init__(self, returns: str = "tensor"):
        super().__init__()
        torch.manual_seed(1)
        self.net = TinyCNN(8)
        self.returns = returns
        self.validated = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return {"loss": loss} if self.returns == "dict" else loss

    def validation_step(self, batch, batch_idx):
        self.validated += 1
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def teacher_model() -> TinyCNN:
    torch.manual_seed(2)
    return TinyCNN(16)


def loader():
    data = torch.utils.data.TensorDataset(X, Y)
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)


def fit(module, callbacks, **kwargs):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(
        module,
        loader(),
        **({"val_dataloaders": loader()} if "val_check_interval" in kwargs else {}),
    )
    return trainer


def by_hand(weight: float) -> dict[str, torch.Tensor]:
    """The same steps in a plain loop with the Distiller: what the callback must reproduce."""
    module = Classifier()
    teacher = teacher_model()
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    batches = iter(loader())
    with Distiller(teacher, module.net, layers="relu?") as d:
        for _ in range(STEPS):
            x, y = next(batches)
            loss = F.cross_entropy(module.net(x), y) + weight * d.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("returns", ["tensor", "dict"])
def test_the_callback_trains_with_the_transfer_loss_added(returns):
    module = Classifier(returns)
    teacher = teacher_model()
    callback = AttentionTransfer(teacher, student="net", weight=0.5, layers="relu?")
    trainer = fit(module, [callback])
    got = module.net.state_dict()
    with_at = by_hand(0.5)
    without = by_hand(0.0)
    for name, value in with_at.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name], value, msg=lambda m, n=name: f"{n}: {m}")
    # and the term mattered: training without it ends elsewhere
    assert not torch.allclose(got["conv1.weight"], without["conv1.weight"])
    assert "athooks/at" in trainer.callback_metrics
    # after fit: no hooks left, the teacher restored, training_step is the class's again
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    assert hooks == 0
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert "training_step" not in module.__dict__


@pytest.mark.slow
def test_no_teacher_forward_during_validation():
    module = Classifier()
    teacher = teacher_model()
    calls = []
    teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    fit(
        module,
        [AttentionTransfer(teacher, student="net", layers="relu?")],
        val_check_interval=2,
        limit_val_batches=2,
    )
    assert module.validated == 4  # validation ran twice, two batches each
    assert len(calls) == STEPS  # the teacher ran for the training steps only


def test_bad_student_names_the_children():
    callback = AttentionTransfer(teacher_model(), student="backbone", layers="relu?")
    with pytest.raises(ConfigurationError, match="has no submodule 'backbone'.*one of: net"):
        fit(Classifier(), [callback])


def test_lightning_is_imported_only_by_the_integration():
    code = "import sys, athooks, athooks.distiller; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
