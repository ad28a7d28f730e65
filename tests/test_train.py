"""The Hydra main job: in-process composition with fast_dev_run, multiruns as subprocesses, bad config values."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from lit_act.training import optimized_metric, train
from tests.helpers import compose_train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides", [
    [],
    ["model=cnn", "activation=gelu"],
    ["data=pysource", "model=transformer", "data.max_chars=100000", "model.d_model=32", "optimized_metric=val/loss"],
    ["data=teacher_student", "model=student", "activation=erf", "optimized_metric=val/loss"],
])
def test_train_fast_dev_run(tmp_path, overrides):
    cfg = compose_train(tmp_path, ["debug=fdr", *overrides])
    metrics, objects = train(cfg)
    value = optimized_metric(cfg, metrics)
    assert value is not None and math.isfinite(value)
    assert "test/loss" in metrics
    status = json.loads((tmp_path / "job_status.json").read_text())
    assert status["status"] == "completed"
    HydraConfig.instance().cfg = None


def test_model_shapes_filled_from_data(tmp_path):
    cfg = compose_train(tmp_path, ["debug=fdr", "data=pysource", "model=transformer", "data.block_size=16",
                                   "data.max_chars=50000", "model.d_model=16", "optimized_metric=val/loss"])
    _, objects = train(cfg)
    model = objects["model"]
    assert model.hparams.vocab_size == 128 and model.hparams.block_size == 16


def test_csv_metrics_written(tmp_path):
    cfg = compose_train(tmp_path, ["trainer.max_epochs=1", "+trainer.limit_train_batches=3",
                                   "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"])
    metrics, _ = train(cfg)
    csv = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "val/acc" in csv.splitlines()[0] and "test/acc" in csv.splitlines()[0]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def _run(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled", **env})


def test_multirun_over_two_activations(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(["-m", "activation=relu,gelu", "debug=fdr", "logger=csv", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        status = json.loads((sweep / job / "job_status.json").read_text())
        assert status["status"] == "completed" and "test/acc" in status["metrics"]


def test_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(["-m", "model.lr=-1,0.001", "debug=fdr", "logger=csv", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads((sweep / "0" / "job_status.json").read_text())
    assert failed["status"] == "failed" and "lr must be positive" in failed["error"]
    assert json.loads((sweep / "1" / "job_status.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("override, group, valid", [("activation=foo", "activation", "relu"),
                                                   ("data=bar", "data", "digits")])
def test_unknown_choice_lists_valid_options(tmp_path, override, group, valid):
    proc = _run([override], tmp_path)
    assert proc.returncode != 0
    assert f"Available options in '{group}'" in proc.stderr
    assert f"\t{valid}\n" in proc.stderr


def test_wandb_offline_run_is_left_for_sync(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train(tmp_path, ["logger=[wandb,csv]", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                                   "+trainer.limit_val_batches=1", "test=false"])
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert (tmp_path / "csv" / "metrics.csv").exists()
