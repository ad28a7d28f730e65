"""When a lit-act callback collects: shared scheduling rules."""

from __future__ import annotations

from lightning import Trainer


def validate_every_n(name: str, value: int | None) -> None:
    """Raise unless ``value`` is ``None`` or a positive integer."""
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def is_real_run(trainer: Trainer) -> bool:
    """False during the sanity check and under ``fast_dev_run`` (statistics from those runs would mislead)."""
    return not trainer.sanity_checking and not trainer.fast_dev_run


def due(step: int, every_n_steps: int | None) -> bool:
    """True when ``every_n_steps`` is set and ``step`` (0-based) is a multiple of it."""
    return every_n_steps is not None and step % every_n_steps == 0
