"""Logger factories used by ``conf/logger/``."""

from __future__ import annotations

import csv
import netrc
import os

import lightning.pytorch.loggers as pl_loggers
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


def wandb_configured() -> bool:
    """True when the user has set W&B up: ``WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(save_dir: str, project: str = "lit-act", **kwargs) -> WandbLogger:
    """A ``WandbLogger`` that runs offline unless W&B is set up on this machine.

    ``WANDB_MODE`` (``online``/``offline``/``disabled``) always wins; otherwise the run is online only when
    :func:`wandb_configured`. Offline runs stay in ``<save_dir>/wandb/offline-run-*`` for ``wandb sync``.
    """
    mode = os.environ.get("WANDB_MODE")
    offline = mode == "offline" if mode else not wandb_configured()
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(save_dir=save_dir, project=project, offline=offline, **kwargs)


class _HeaderAwareWriter(ExperimentWriter):
    """Lightning's CSV writer that also knows the columns already in ``metrics.csv``.

    Lightning's writer only knows the keys logged by its own process, so a second process appending to the same file
    (the test stage of a ``ddp_spawn`` run, a resumed run) fails with "dict contains fields not in fieldnames"
    (Lightning-AI/pytorch-lightning#19432).
    """

    def _record_new_keys(self) -> set[str]:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))
        return super()._record_new_keys()


class CSVLogger(pl_loggers.CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` that appends safely to an existing ``metrics.csv`` (see
    :class:`_HeaderAwareWriter`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HeaderAwareWriter(log_dir=self.log_dir)
        return self._experiment
