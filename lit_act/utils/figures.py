"""Where callbacks put figures: a PNG in the run directory, and a W&B image when a ``WandbLogger`` is attached."""

from __future__ import annotations

import os
from pathlib import Path

from lightning import Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


def figure_dir(trainer: Trainer) -> Path:
    """``<trainer.default_root_dir>/figures`` (the Hydra run directory under ``train.py``), created if missing."""
    path = Path(trainer.default_root_dir) / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


@rank_zero_only
def save_figure(trainer: Trainer, fig, name: str, step: int | None = None) -> Path:
    """Save ``fig`` (a matplotlib Figure) as ``figures/<name>[_step<step>].png``, log it to every attached W&B logger
    under the key ``figures/<name>``, and close it. Returns the PNG path."""
    import matplotlib.pyplot as plt

    stem = name.replace("/", "_") + (f"_step{step:07d}" if step is not None else "")
    path = figure_dir(trainer) / f"{stem}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and os.environ.get("WANDB_MODE") != "disabled":
            logger.log_image(key=f"figures/{name}", images=[str(path)], step=trainer.global_step)
    return path
