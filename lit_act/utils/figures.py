"""Where callbacks put figures: a PNG in the run's directory, and a W&B image when a ``WandbLogger`` is attached."""

from __future__ import annotations

import os
from pathlib import Path

from lightning import Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


def run_dir(trainer: Trainer) -> Path:
    """The run's directory: ``trainer.default_root_dir`` when it was set (the Hydra run directory under
    ``train.py``), otherwise ``trainer.log_dir`` (the first logger's directory, e.g.
    ``lightning_logs/version_0``), so figures never land in the bare working directory of a user's script."""
    root = Path(trainer.default_root_dir)
    if root.resolve() != Path.cwd().resolve() or not trainer.loggers or trainer.log_dir is None:
        return root
    return Path(trainer.log_dir)


def figure_dir(trainer: Trainer) -> Path:
    """``<run dir>/figures`` (:func:`run_dir`), created if missing."""
    path = run_dir(trainer) / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


@rank_zero_only
def save_figure(trainer: Trainer, fig, name: str, step: int | None = None) -> Path:
    """Save ``fig`` (a matplotlib Figure) as ``figures/<name>[_step<step>].png`` under :func:`run_dir`, log it to every
    attached W&B logger under the key ``figures/<name>``, and close it. Returns the PNG path."""
    import matplotlib.pyplot as plt

    stem = name.replace("/", "_") + (f"_step{step:07d}" if step is not None else "")
    path = figure_dir(trainer) / f"{stem}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and os.environ.get("WANDB_MODE") != "disabled":
            logger.log_image(key=f"figures/{name}", images=[str(path)], step=trainer.global_step)
    return path
