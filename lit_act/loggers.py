"""Logger factories used by ``conf/logger/``."""

from __future__ import annotations

import netrc
import os

from lightning.pytorch.loggers import WandbLogger


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
