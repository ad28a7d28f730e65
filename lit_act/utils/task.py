"""Task wrapper for Hydra jobs: always closes W&B, records each job's outcome, keeps multiruns going."""

from __future__ import annotations

import functools
import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _finish_wandb(exit_code: int) -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def task_wrapper(task: Callable[[DictConfig], tuple[dict, dict]]):
    """Run ``task(cfg)``; write ``<output_dir>/job_status.json`` (``completed`` or ``failed`` with the error) and
    always call ``wandb.finish()``.

    A failing job in a multirun is recorded and returns ``({}, {})`` so the sweep goes on (its optimised metric is
    NaN); in a single run the exception propagates.
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> tuple[dict, dict]:
        status_path = Path(cfg.paths.output_dir) / STATUS_FILE
        status_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            metrics, objects = task(cfg)
        except BaseException as err:
            status_path.write_text(json.dumps({"status": "failed", "error": f"{type(err).__name__}: {err}",
                                               "traceback": traceback.format_exc()}, indent=2))
            _finish_wandb(exit_code=1)
            if _in_multirun() and isinstance(err, Exception):
                log.error("job failed, the sweep goes on: %s: %s (details in %s)", type(err).__name__, err,
                          status_path)
                return {}, {}
            raise
        status_path.write_text(json.dumps({"status": "completed", "metrics": {k: float(v) for k, v in metrics.items()}},
                                          indent=2))
        _finish_wandb(exit_code=0)
        return metrics, objects

    return wrapped
