"""When a lit-act callback collects: shared scheduling rules."""

from __future__ import annotations

from typing import Any

from lightning import Trainer

from lit_act.utils import validate as v


def validate_every_n(name: str, value: Any) -> int | None:
    """``value`` as a positive integer or ``None``; booleans are errors (``every_n_steps=True`` is not 1), digit
    strings are converted (:class:`~lit_act.utils.validate.ConfigError` naming ``name`` otherwise)."""
    return v.optional(v.positive_int, name, value)


def is_real_run(trainer: Trainer) -> bool:
    """False during the sanity check and under ``fast_dev_run`` (statistics from those runs would mislead)."""
    return not trainer.sanity_checking and not trainer.fast_dev_run


def due(step: int, every_n_steps: int | None) -> bool:
    """True when ``every_n_steps`` is set and ``step`` (0-based) is a multiple of it."""
    return every_n_steps is not None and step % every_n_steps == 0


def planned_steps(trainer: Trainer) -> int | None:
    """Optimizer steps the configured fit will run, when known without loading data: ``max_steps``, or
    ``max_epochs x limit_train_batches`` for an integer limit (``None`` otherwise)."""
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        return trainer.max_steps
    limit, epochs = trainer.limit_train_batches, trainer.max_epochs
    if isinstance(limit, int) and epochs is not None and epochs > 0:
        return limit * epochs // max(trainer.accumulate_grad_batches, 1)
    return None


def validation_enabled(trainer: Trainer) -> bool:
    """False when the configured run never validates (``limit_val_batches=0``)."""
    return trainer.limit_val_batches != 0
