"""The main training job behind ``train.py``: data, model, activation, callbacks, loggers and trainer from config."""

from __future__ import annotations

import copy
import inspect
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from lit_act.utils.instantiate import instantiate, instantiate_collection, instantiate_model
from lit_act.utils.schema import check_config
from lit_act.utils.task import add_note, task_wrapper

log = logging.getLogger(__name__)


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor)) and torch.numel(
        torch.as_tensor(v)) == 1}


def _report_outputs(cfg: DictConfig, trainer: L.Trainer) -> None:
    """Print where this run's logs, checkpoints and figures are."""
    out = Path(cfg.paths.output_dir)
    lines = [f"Run directory: {out}"]
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
        lines.append(f"Checkpoints:   {trainer.checkpoint_callback.dirpath}")
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            lines.append(f"CSV metrics:   {Path(logger.log_dir) / 'metrics.csv'}")
        elif isinstance(logger, WandbLogger):
            lines.append(f"W&B run:       {out / 'wandb'} (offline runs: `wandb sync {out}/wandb/offline-run-*`)")
    if (out / "figures").is_dir():
        lines.append(f"Figures:       {out / 'figures'}")
    print("\n".join(lines), flush=True)


def _smoke_value(current: Any, smoke: Any) -> Any:
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (current, smoke))
    return min(current, smoke) if numbers else smoke


def _merge_smoke(target: Any, values: Any) -> None:
    """Merge ``values`` into ``target`` key by key where the key exists, recursing into nested object nodes (with a
    ``_target_``, e.g. a callback's ``config``); other values, plain mappings included (``search_kwargs``), replace,
    so a callback ``config`` written as a plain mapping would be replaced whole: keep its ``_target_``."""
    for key, value in values.items():
        if key not in target:
            continue
        if isinstance(target[key], DictConfig) and "_target_" in target[key] and isinstance(value, DictConfig):
            _merge_smoke(target[key], value)
        else:
            target[key] = _smoke_value(target[key], value)


def apply_smoke(cfg: DictConfig) -> None:
    """``debug=smoke``: merge ``cfg.smoke.callbacks.<name>`` into each callback of the run's set and
    ``cfg.smoke.data`` / ``cfg.smoke.model`` into the data / model config, key by key (nested object nodes too),
    only where the key already exists (so one smoke config shortens every callback set's schedules without adding
    callbacks or unknown arguments). Numbers are caps (the smaller of the run's and the smoke value is kept); other
    values replace."""
    smoke = cfg.get("smoke")
    if not smoke:
        return
    callbacks = cfg.get("callbacks") or {}
    pairs = [(callbacks.get(name), values) for name, values in (smoke.get("callbacks") or {}).items()]
    pairs += [(cfg.get(group), smoke.get(group) or {}) for group in ("data", "model")]
    with open_dict(cfg):
        for target, values in pairs:
            if target is not None:
                _merge_smoke(target, values)


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit (and test) the configured model; returns ``(metrics, objects)``.

    The config is checked first (:func:`lit_act.utils.schema.check_config`): a bad value raises
    :class:`~lit_act.utils.validate.ConfigError` before any data is read."""
    check_config(cfg)
    apply_smoke(cfg)
    if cfg.get("extras", {}).get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=False), flush=True)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    model_cfg, mlp = cfg.model, cfg.get("mlp")  # mlp=kan etc. rewrites the model's MLP blocks (lit_act.kan.kanify)
    if mlp and "mlp" in inspect.signature(hydra.utils.get_object(cfg.model._target_)).parameters:
        # lit-act models kanify themselves and record it in their hparams, so their checkpoints reload alone
        model_cfg, mlp = copy.deepcopy(cfg.model), None
        with open_dict(model_cfg):
            model_cfg.mlp = cfg.mlp
    model = instantiate_model(model_cfg, getattr(datamodule, "shape_hints", {}))
    if mlp:  # any other model is rewritten after construction
        instantiate(mlp)(model)
    callbacks = instantiate_collection(cfg.get("callbacks"))
    loggers = instantiate_collection(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if cfg.get("train"):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = _scalar_metrics(trainer.callback_metrics)

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None, weights_only=False)
        metrics.update(_scalar_metrics(trainer.callback_metrics))

    if trainer.is_global_zero:
        _report_outputs(cfg, trainer)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


def optimized_metric(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a sweeper optimises: ``metrics[cfg.optimized_metric]``; ``None`` when the job failed, the value is
    not finite (Optuna records ``None`` as a failed trial and goes on; it refuses NaN), or the metric was never
    logged (e.g. a job stopped by ``trainer.max_steps`` before its first validation): then a warning is logged and
    the job, still ``completed``, gets a note in its ``job_status.json``."""
    name = cfg.get("optimized_metric")
    if not name or not metrics:
        return None
    if name not in metrics:
        note = f"optimized_metric {name!r} was not logged (the sweeper gets None); logged metrics: {sorted(metrics)}"
        log.warning(note)
        add_note(cfg, note)
        return None
    value = metrics[name]
    return value if math.isfinite(value) else None
