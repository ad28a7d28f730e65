"""Shared test helpers: compose the train config in-process."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_train(tmp_path: Path, overrides: list[str] | None = None) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, CSV logging only, outputs under ``tmp_path``, no config print."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True,
                      overrides=["logger=csv", "extras.print_config=false", *(overrides or [])])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path)
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg
