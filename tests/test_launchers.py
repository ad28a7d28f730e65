"""Launcher presets (conf/hydra/launcher) and the Optuna search (conf/hparams_search) compose, resolve and run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from tests.helpers import compose_train

ROOT = Path(__file__).resolve().parents[1]


def _launcher(tmp_path, overrides):
    cfg = compose_train(tmp_path, overrides)
    return cfg, OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_local_parallel_preset(tmp_path):
    _, launcher = _launcher(tmp_path, ["hydra/launcher=local_parallel"])
    assert launcher["_target_"] == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher["n_jobs"] == 2 and launcher["backend"] == "loky" and launcher["prefer"] == "processes"


def test_slurm_preset_follows_the_ddp_trainer(tmp_path):
    cfg, launcher = _launcher(tmp_path, ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8",
                                         "trainer.num_nodes=2", "hydra.launcher.partition=gpu"])
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == cfg.trainer.devices == 8
    assert launcher["nodes"] == cfg.trainer.num_nodes == 2
    assert launcher["partition"] == "gpu" and launcher["timeout_min"] == 240
    assert launcher["submitit_folder"].startswith(cfg.hydra.sweep.dir)
    # the default trainer has no num_nodes: one node, one task
    _, single = _launcher(tmp_path, ["hydra/launcher=slurm"])
    assert single["nodes"] == 1 and single["tasks_per_node"] == 1


def test_slurm_local_preset(tmp_path):
    _, launcher = _launcher(tmp_path, ["hydra/launcher=slurm_local"])
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert launcher["tasks_per_node"] == 1 and launcher["gpus_per_node"] == 0


@pytest.mark.parametrize("preset", ["local_parallel", "slurm", "slurm_local"])
def test_launcher_objects_accept_the_presets(tmp_path, preset):
    cfg = compose_train(tmp_path, [f"hydra/launcher={preset}"])
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == cfg.hydra.launcher._target_.rsplit(".", 1)[1]


def test_optuna_search_composes(tmp_path):
    cfg = compose_train(tmp_path, ["hparams_search=digits_optuna"])
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    assert sweeper["_target_"] == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler"
    assert cfg.optimized_metric == "val/acc" and sweeper["direction"] == "maximize"
    assert set(sweeper["params"]) == {"activation", "model.lr", "data.batch_size"}
    assert cfg.hydra.mode.name == "MULTIRUN"


def _train(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})


def _statuses(sweep: Path) -> list[str]:
    return [json.loads((job / "job_status.json").read_text())["status"] for job in sorted(sweep.glob("[0-9]*"))]


@pytest.mark.slow
def test_local_parallel_runs_two_jobs(tmp_path):
    proc = _train(["-m", "hydra/launcher=local_parallel", "activation=relu,gelu", "debug=fdr", "logger=csv",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2,backend=loky" in proc.stdout + proc.stderr
    assert _statuses(tmp_path / "sweep") == ["completed", "completed"]


@pytest.mark.slow
def test_slurm_local_runs_two_jobs(tmp_path):
    proc = _train(["-m", "hydra/launcher=slurm_local", "activation=relu,gelu", "debug=fdr", "logger=csv",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _statuses(tmp_path / "sweep") == ["completed", "completed"]
    assert (tmp_path / "sweep" / ".submitit").is_dir()


@pytest.mark.slow
def test_optuna_search_runs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _train(["hparams_search=digits_optuna", "hydra.sweeper.n_trials=2", "debug=fdr", "logger=csv",
                   f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.name == "optuna" and set(results.best_params) == {"activation", "model.lr", "data.batch_size"}
    assert _statuses(sweep) == ["completed", "completed"]
