"""The one instantiate helper: every object of a run is built from config here."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf


def instantiate_collection(cfg: DictConfig | None) -> list[Any]:
    """Build every ``_target_`` entry of a keyed collection (``callbacks``, ``logger``); ``None`` entries are skipped."""
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"expected a mapping of named configs, got {type(cfg).__name__}")
    objects = []
    for name, entry in cfg.items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"config entry {name!r} has no _target_: {OmegaConf.to_yaml(entry)}")
        objects.append(hydra.utils.instantiate(entry, _convert_="partial"))
    return objects


def instantiate_model(cfg: DictConfig, shape_hints: dict[str, int]) -> Any:
    """Build the model, filling every ``null`` argument that the datamodule's ``shape_hints`` knows
    (input size, classes, vocabulary, context length)."""
    filled = {key: shape_hints[key] for key, value in cfg.items() if value is None and key in shape_hints}
    return hydra.utils.instantiate(cfg, **filled, _convert_="partial")


def instantiate(cfg: DictConfig, **kwargs) -> Any:
    """``hydra.utils.instantiate`` with lists/dicts converted to Python containers."""
    return hydra.utils.instantiate(cfg, **kwargs, _convert_="partial")
