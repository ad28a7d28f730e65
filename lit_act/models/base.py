"""Shared LightningModule for lit-act's reference models.

Conventions every lit-act callback relies on (documented here once):

* a batch is ``(inputs, targets)``;
* ``module(inputs)`` returns **logits** of shape ``(..., num_classes)`` (``(B, C)`` for classifiers, ``(B, T, V)`` for
  the language model); ``module.loss(logits, targets)`` is the training loss (mean cross-entropy over all positions);
* ``module.activation_factory()`` builds one activation module, so ``activation=<name>`` swaps every non-linearity.

Logged keys: ``train/loss``, ``val/loss``, ``test/loss``, and for classifiers ``{stage}/acc``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn

from lit_act.activations import build
from lit_act.utils import validate as v

ActivationSpec = str | type[nn.Module] | Callable[[], nn.Module]


def activation_factory(spec: ActivationSpec) -> Callable[[], nn.Module]:
    """Turn a name, an ``nn.Module`` class or a factory (e.g. a Hydra ``_partial_``) into a zero-argument factory."""
    if isinstance(spec, str):
        build(spec)  # fail fast on unknown names, listing the valid ones
        return functools.partial(build, spec)  # a partial, not a lambda: ddp_spawn pickles the module
    if callable(spec):
        return functools.partial(build, spec)
    raise TypeError(f"activation must be a name, an nn.Module class or a factory, got {spec!r}")


class LitActModule(LightningModule):
    """Base of the reference models: cross-entropy on logits, AdamW with optional cosine decay.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        cosine_schedule: decay the learning rate with a cosine over ``trainer.estimated_stepping_batches``.
    """

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, cosine_schedule: bool = False) -> None:
        super().__init__()
        lr, weight_decay = v.positive_float("lr", lr), v.finite_float("weight_decay", weight_decay, low=0.0)
        cosine_schedule = v.boolean("cosine_schedule", cosine_schedule)
        self.lr = lr
        self.weight_decay = weight_decay
        self.cosine_schedule = cosine_schedule

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over every position: logits ``(..., C)``, integer targets ``(...)``."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = self.loss(logits, targets)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", on_step=stage == "train", on_epoch=True,
                 batch_size=targets.shape[0], sync_dist=stage != "train")
        if self.log_accuracy:
            acc = (logits.argmax(-1) == targets).float().mean()
            self.log(f"{stage}/acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=targets.shape[0],
                     sync_dist=stage != "train")
        return loss

    log_accuracy: bool = True

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if not self.cosine_schedule:
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
