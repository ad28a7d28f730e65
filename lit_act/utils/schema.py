"""The main job's config schema: checked at the start of ``train()``, before any data is read or model built.

Each rule names a dotted key and a validator from :mod:`lit_act.utils.validate`; a key absent from the config is
skipped (a user's own data module or model may not have it). A failure raises :class:`ConfigError` with one line,
``trainer.max_epochs='abc': expected a positive integer``, which ``train.py`` prints without a traceback.
The model/data pairing is checked from the task the data config names (``conf/task/*.yaml``: ``task.models``).

Example::

    >>> from omegaconf import OmegaConf
    >>> check_config(OmegaConf.create({"data": {"batch_size": -1}}))
    Traceback (most recent call last):
    ...
    lit_act.utils.validate.ConfigError: data.batch_size=-1: expected a positive integer
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lit_act.utils import validate as v
from lit_act.utils.validate import ConfigError

Rule = Callable[[str, Any], Any]


def _int_or_minus_one(name: str, value: Any) -> int:
    if value == -1 and not isinstance(value, bool):
        return -1
    try:
        return v.non_negative_int(name, value)
    except ConfigError:
        raise ConfigError(f"{name}={value!r}: expected a non-negative integer (or -1 for no limit)") from None


def _int_or_fraction(name: str, value: Any) -> int | float:
    """Lightning's ``limit_*_batches`` / ``val_check_interval``: a count (int >= 0) or a fraction in [0, 1]."""
    if isinstance(value, float) or isinstance(value, str) and "." in value:
        return v.finite_float(name, value, low=0.0, high=1.0)
    try:
        return v.non_negative_int(name, value)
    except ConfigError:
        raise ConfigError(f"{name}={value!r}: expected a batch count (integer >= 0) or a fraction in [0, 1]") from None


def _fast_dev_run(name: str, value: Any) -> bool | int:
    if isinstance(value, bool):
        return value
    try:
        return v.non_negative_int(name, value)
    except ConfigError:
        raise ConfigError(f"{name}={value!r}: expected true, false or a number of batches") from None


def _any_int(name: str, value: Any) -> int:
    try:
        return v._to_int(name, value, "an integer")
    except ConfigError:
        raise ConfigError(f"{name}={value!r}: expected an integer") from None


def _fraction(name: str, value: Any) -> float:
    return v.finite_float(name, value, low=0.0, high=1.0, high_open=True)


def _non_negative(name: str, value: Any) -> float:
    return v.finite_float(name, value, low=0.0)


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}={value!r}: expected a metric name such as 'val/acc'")
    return value


def _devices(name: str, value: Any) -> Any:
    if value == "auto" or isinstance(value, list) or (isinstance(value, int) and value == -1 and
                                                      not isinstance(value, bool)):
        return value
    return v.positive_int(name, value)


RULES: dict[str, Rule] = {
    "seed": _any_int,
    "optimized_metric": _string,
    "optimized_mode": lambda n, x: v.choice(n, x, ("min", "max")),
    "train": v.boolean,
    "test": v.boolean,
    "allow_failed_jobs": v.boolean,
    # trainer
    "trainer.max_epochs": _int_or_minus_one,
    "trainer.min_epochs": v.non_negative_int,
    "trainer.max_steps": _int_or_minus_one,
    "trainer.min_steps": v.non_negative_int,
    "trainer.limit_train_batches": _int_or_fraction,
    "trainer.limit_val_batches": _int_or_fraction,
    "trainer.limit_test_batches": _int_or_fraction,
    "trainer.val_check_interval": _int_or_fraction,
    "trainer.check_val_every_n_epoch": v.positive_int,
    "trainer.log_every_n_steps": v.positive_int,
    "trainer.accumulate_grad_batches": v.positive_int,
    "trainer.num_sanity_val_steps": _int_or_minus_one,
    "trainer.fast_dev_run": _fast_dev_run,
    "trainer.devices": _devices,
    "trainer.num_nodes": v.positive_int,
    "trainer.gradient_clip_val": _non_negative,
    # data
    "data.batch_size": v.positive_int,
    "data.num_workers": v.non_negative_int,
    "data.val_fraction": _fraction,
    "data.test_fraction": _fraction,
    "data.val_size": v.positive_int,
    "data.block_size": v.positive_int,
    "data.max_chars": v.positive_int,
    "data.input_dim": v.positive_int,
    "data.teacher_neurons": v.positive_int,
    "data.n_train": v.positive_int,
    "data.n_val": v.positive_int,
    "data.n_test": v.positive_int,
    "data.noise": _non_negative,
    "data.split_seed": _any_int,
    # model
    "model.lr": v.positive_float,
    "model.weight_decay": _non_negative,
    "model.dropout": _fraction,
    "model.hidden": v.positive_int_sequence,
    "model.channels": v.positive_int_sequence,
    "model.hidden_neurons": v.positive_int,
    "model.d_model": v.positive_int,
    "model.n_layer": v.positive_int,
    "model.n_head": v.positive_int,
    "model.d_ff": v.positive_int,
    "model.in_features": v.positive_int,
    "model.num_classes": v.positive_int,
    "model.vocab_size": v.positive_int,
}


def _lookup(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
_TASK_OVERRIDE = re.compile(r"override /task(?:@_global_\.task)?: *(\w+)")


@functools.lru_cache(maxsize=1)
def task_table() -> tuple[dict[str, list[str]], dict[str, str]]:
    """``({task: models that fit}, {data: task})`` read from ``conf/task/*.yaml`` and the data configs' defaults."""
    models = {p.stem: list((yaml.safe_load(p.read_text()) or {}).get("task", {}).get("models", []))
              for p in sorted((CONF_DIR / "task").glob("*.yaml"))}
    data = {}
    for path in sorted((CONF_DIR / "data").glob("*.yaml")):
        match = _TASK_OVERRIDE.search(path.read_text())
        if match:
            data[path.stem] = match.group(1)
    return models, data


def valid_pairs() -> str:
    """``"data=digits with model=mlp|cnn; ..."``: every data config with the models of its task."""
    models, data = task_table()
    return "; ".join(f"data={d} with model={'|'.join(models.get(t, []))}" for d, t in data.items())


def check_pairing(cfg: DictConfig) -> None:
    """Refuse a lit-act model that does not fit the data's task (``task.models`` of ``conf/task/<task>.yaml``) with
    the valid pairs listed; models from outside lit-act's own configs are not checked."""
    task, fits = OmegaConf.select(cfg, "task.name"), OmegaConf.select(cfg, "task.models")
    choices = OmegaConf.select(cfg, "hydra.runtime.choices")
    if choices is None and HydraConfig.initialized():  # under @hydra.main the job's cfg has no `hydra` node
        choices = HydraConfig.get().runtime.choices
    if not task or fits is None or choices is None:
        return
    model, data = choices.get("model"), choices.get("data")
    known = {m for ms in task_table()[0].values() for m in ms}
    if model is None or model in fits or model not in known:
        return
    raise ConfigError(f"model={model} does not fit data={data} (task {task}: model={'|'.join(fits)}); "
                      f"valid pairs: {valid_pairs()}")


def check_config(cfg: DictConfig) -> None:
    """Validate every key of :data:`RULES` present in ``cfg`` and the model/data pairing; raise
    :class:`ConfigError` (one line) on the first bad value."""
    for key, rule in RULES.items():
        present, value = _lookup(cfg, key)
        if present and value is not None:
            rule(key, value)
    check_pairing(cfg)
