"""Task wrapper for Hydra jobs: always closes W&B, records each job's outcome, keeps multiruns going; the
multirun-end summary of failed jobs (:class:`FailedJobsSummary`)."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lit_act.utils.validate import ConfigError

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"


def set_default_root() -> None:
    """``LIT_ACT_ROOT`` (``paths.root_dir``) defaults to the launch directory, as an absolute path. Set before
    ``@hydra.main`` runs: a multirun resolves ``hydra.sweep.dir`` before Hydra's runtime information (and so
    ``${hydra:runtime.cwd}``) exists, and launcher workers inherit the variable."""
    os.environ.setdefault("LIT_ACT_ROOT", os.getcwd())


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _finish_wandb(exit_code: int) -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def config_error(err: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` behind ``err`` (itself, or a cause such as Hydra's ``InstantiationException``)."""
    while err is not None:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__
    return None


def error_line(err: BaseException) -> str:
    """One line for a job's error: a config error's own message, else ``Type: message`` (its first line)."""
    found = config_error(err)
    if found is not None:
        return f"ConfigError: {found}"
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


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
            status_path.write_text(json.dumps({"status": "failed", "error": error_line(err),
                                               "traceback": traceback.format_exc()}, indent=2))
            _finish_wandb(exit_code=1)
            if _in_multirun() and isinstance(err, Exception):
                log.error("job failed, the sweep goes on: %s (details in %s)", error_line(err), status_path)
                return {}, {}
            raise
        status_path.write_text(json.dumps({"status": "completed", "metrics": {k: float(v) for k, v in metrics.items()}},
                                          indent=2))
        _finish_wandb(exit_code=0)
        return metrics, objects

    return wrapped


def add_note(cfg: DictConfig, note: str) -> None:
    """Append ``note`` to the ``notes`` of this job's ``job_status.json`` (written by :func:`task_wrapper`)."""
    path = Path(cfg.paths.output_dir) / STATUS_FILE
    status = json.loads(path.read_text()) if path.exists() else {}
    status.setdefault("notes", []).append(note)
    path.write_text(json.dumps(status, indent=2))


def failed_jobs(sweep_dir: str | Path) -> list[tuple[str, str, str]]:
    """``(job number, overrides, error)`` of every job under ``sweep_dir`` whose ``job_status.json`` says failed."""
    rows = []
    for status_path in sorted(Path(sweep_dir).glob(f"*/{STATUS_FILE}"), key=lambda p: _job_key(p.parent.name)):
        status = json.loads(status_path.read_text())
        if status.get("status") != "failed":
            continue
        overrides_path = status_path.parent / ".hydra" / "overrides.yaml"
        overrides = ""
        if overrides_path.exists():
            overrides = " ".join(yaml.safe_load(overrides_path.read_text()) or [])
        rows.append((status_path.parent.name, overrides, (status.get("error") or "?").splitlines()[0][:200]))
    return rows


def _job_key(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 30, name)


def failure_table(rows: list[tuple[str, str, str]]) -> str:
    """A plain-text table of failed jobs: job number, overrides, error."""
    header = ("job", "overrides", "error")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(2)]
    lines = [f"{header[0]:<{widths[0]}}  {header[1]:<{widths[1]}}  {header[2]}"]
    lines += [f"{job:<{widths[0]}}  {ovr:<{widths[1]}}  {err}" for job, ovr, err in rows]
    return "\n".join(lines)


def allow_failed_jobs(config: DictConfig) -> bool:
    """``allow_failed_jobs=true`` in the config or ``LIT_ACT_ALLOW_FAILED_JOBS=1`` in the environment."""
    env = os.environ.get("LIT_ACT_ALLOW_FAILED_JOBS", "").strip().lower()
    return env in ("1", "true", "yes") or bool(config.get("allow_failed_jobs"))


class FailedJobsSummary(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): at the end of a multirun, print a table of the failed jobs and
    exit 1, unless ``allow_failed_jobs=true`` (or ``LIT_ACT_ALLOW_FAILED_JOBS=1``), which keeps exit 0."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        rows = failed_jobs(config.hydra.sweep.dir)
        if not rows:
            return
        total = len(list(Path(config.hydra.sweep.dir).glob(f"*/{STATUS_FILE}")))
        print(f"\n{len(rows)} of {total} jobs failed (details in <job dir>/{STATUS_FILE}):\n{failure_table(rows)}",
              file=sys.stderr, flush=True)
        if not allow_failed_jobs(config):
            print("exit 1 (pass allow_failed_jobs=true or set LIT_ACT_ALLOW_FAILED_JOBS=1 to exit 0)", file=sys.stderr,
                  flush=True)
            sys.exit(1)
