"""The Hydra main job: every sensible model/data pair in smoke mode with its task's callbacks, mismatches and bad
values refused up front in one line, multiruns as subprocesses (failed-job summary, exit codes, missing metrics)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from lit_act.callbacks import HessianConfig
from lit_act.training import apply_smoke, optimized_metric, train
from lit_act.utils.validate import ConfigError
from tests.helpers import compose_train
from tests.test_experiments import assert_every_callback_collected

ROOT = Path(__file__).resolve().parents[1]

# every model/data pair that makes sense, the task its data names, and the callbacks that task's set adds
PAIRS = [
    (["data=digits", "model=mlp"], "classification", {"NeuronActivationCoverage", "HessianSpectrum"}),
    (["data=digits", "model=cnn", "activation=gelu"], "classification", {"NeuronActivationCoverage",
                                                                         "HessianSpectrum"}),
    (["data=pysource", "model=transformer", "model.d_model=32"], "lm", {"MassiveActivations", "HessianSpectrum"}),
    (["data=teacher_student", "model=student", "activation=erf"], "regression", {"TeacherStudentMatch",
                                                                                  "HessianSpectrum"}),
]
NEUTRAL = {"ModelCheckpoint", "RichModelSummary", "ActivationSparsity", "DeadNeurons", "ActivationHistograms"}


@pytest.mark.parametrize("overrides, task, added", PAIRS, ids=[" ".join(p[0]) for p in PAIRS])
def test_every_pair_runs_with_its_task_callbacks(tmp_path, overrides, task, added):
    cfg = compose_train(tmp_path, [*overrides, "debug=smoke"])
    assert cfg.task.name == task
    assert cfg.optimized_metric == ("val/acc" if task == "classification" else "val/loss")
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    names = {type(c).__name__ for c in trainer.callbacks}
    assert NEUTRAL | added <= names, names
    if task != "classification":
        assert "NeuronActivationCoverage" not in names
    assert 0 < trainer.global_step <= 6  # debug=smoke: max_steps=6 (teacher_student has 4 batches)
    value = optimized_metric(cfg, metrics)
    assert value is not None and math.isfinite(value)
    assert_every_callback_collected(trainer, metrics, tmp_path / "csv" / "metrics.csv")
    assert json.loads((tmp_path / "job_status.json").read_text())["status"] == "completed"
    HydraConfig.instance().cfg = None


def test_default_callback_set_is_task_neutral(tmp_path):
    cfg = compose_train(tmp_path, ["data=pysource", "model=transformer", "callbacks=default"])
    assert set(cfg.callbacks) == {"model_checkpoint", "model_summary", "activation_sparsity", "dead_neurons",
                                  "activation_histograms"}
    assert cfg.callbacks.model_checkpoint.mode == "min" and cfg.callbacks.model_checkpoint.monitor == "val/loss"


def test_experiment_callbacks_win_over_the_task_set(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=hessian_landscape"])
    assert set(cfg.callbacks) == {"model_checkpoint", "hessian"}


def test_smoke_caps_nested_callback_configs_and_keeps_the_rest(tmp_path):
    """``debug=smoke`` merges into a callback's nested object node (``config``, with a ``_target_``) key by key:
    numbers capped, the experiment's other fields and ``_target_`` kept; the command line reaches it too."""
    cfg = compose_train(tmp_path, ["experiment=hessian_landscape", "debug=smoke",
                                   "callbacks.hessian.config.curvature=ggn"])
    apply_smoke(cfg)
    hessian = cfg.callbacks.hessian
    assert hessian.num_batches == 1  # min(4, 1)
    assert (hessian.config.slq_iter, hessian.config.slq_runs, hessian.config.top_k) == (4, 1, 2)  # min(80, 4), ...
    assert hessian.config.curvature == "ggn" and hessian.config.tol == 1e-4
    callback = instantiate(hessian)
    assert isinstance(callback.config, HessianConfig) and callback.config.slq_iter == 4
    # a plain mapping argument (no _target_) is replaced whole, as before: the NAC search's smoke settings
    cfg = compose_train(tmp_path, ["experiment=nac_ood", "debug=smoke"])
    apply_smoke(cfg)
    assert dict(cfg.callbacks.nac.search_kwargs) == {"strategy": "random", "num_trials": 2, "seed": 0}


def test_fast_dev_run_still_works(tmp_path):
    cfg = compose_train(tmp_path, ["debug=fdr"])
    metrics, _ = train(cfg)
    assert "test/loss" in metrics


def test_model_shapes_filled_from_data(tmp_path):
    cfg = compose_train(tmp_path, ["debug=fdr", "data=pysource", "model=transformer", "data.block_size=16",
                                   "data.max_chars=50000", "model.d_model=16"])
    _, objects = train(cfg)
    model = objects["model"]
    assert model.hparams.vocab_size == 128 and model.hparams.block_size == 16


def test_csv_metrics_written(tmp_path):
    cfg = compose_train(tmp_path, ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "callbacks=default",
                                   "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"])
    metrics, _ = train(cfg)
    csv = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "val/acc" in csv.splitlines()[0] and "test/acc" in csv.splitlines()[0]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("overrides, message", [
    (["model=transformer", "data=digits"], "model=transformer does not fit data=digits"),
    (["model=cnn", "data=pysource"], "model=cnn does not fit data=pysource"),
    (["model=student", "data=digits"], "model=student does not fit data=digits"),
    (["model=mlp", "data=teacher_student"], "model=mlp does not fit data=teacher_student"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs='abc': expected"),
    (["trainer.max_epochs=abc", "debug=fdr"], "trainer.max_epochs='abc': expected"),
    (["seed=abc"], "seed='abc': expected an integer"),
    (["model.lr=abc"], "model.lr='abc': expected a finite number > 0.0"),
    (["data.batch_size=-1"], "data.batch_size=-1: expected a positive integer"),
    (["model.hidden=[0]"], "model.hidden=[0]: expected a list of positive integers"),
    (["model.hidden=0"], "model.hidden=0: expected a list of positive integers"),
])
def test_bad_config_refused_before_any_work(tmp_path, overrides, message):
    cfg = compose_train(tmp_path, overrides)
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert str(info.value).startswith(message), str(info.value)
    if "does not fit" in message:
        assert "valid pairs: data=cifar10 with model=mlp|cnn" in str(info.value)
        assert "data=pysource with model=transformer" in str(info.value)
    assert not (tmp_path / "csv").exists()  # nothing was built or logged


def _run(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled",
                                                       "LIT_ACT_ROOT": str(tmp_path), **env})


def test_bad_value_is_one_line_on_stderr(tmp_path):
    proc = _run(["model=transformer", "data=digits"], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: model=transformer does not fit data=digits")
    proc = _run(["trainer.max_epochs=abc", "debug=fdr"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: trainer.max_epochs='abc': expected a non-negative integer "
                                   "(or -1 for no limit)")


def test_full_error_shows_the_traceback(tmp_path):
    proc = _run(["seed=abc"], tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError: seed='abc'" in proc.stderr


def test_multirun_over_two_activations(tmp_path):
    # as a user launches it: the default sweep dir under the launch directory, LIT_ACT_ROOT unset (a multirun resolves
    # its sweep dir before Hydra's runtime info exists, so paths.root_dir must not need it)
    env = {k: v for k, v in os.environ.items() if k != "LIT_ACT_ROOT"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "activation=relu,gelu", "debug=fdr",
                           "logger=csv"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**env, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "logs").glob("*/multiruns/*")
    for job in ("0", "1"):
        status = json.loads((sweep / job / "job_status.json").read_text())
        assert status["status"] == "completed" and "test/acc" in status["metrics"]


def test_failed_jobs_are_summarised_and_exit_nonzero(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "model.lr=-1,0.001", "debug=fdr", "logger=csv", f"hydra.sweep.dir={sweep}"]
    proc = _run(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = json.loads((sweep / "0" / "job_status.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("ConfigError: model.lr=-1: expected")
    assert json.loads((sweep / "1" / "job_status.json").read_text())["status"] == "completed"
    table = proc.stderr[proc.stderr.index("1 of 2 jobs failed"):]
    lines = table.splitlines()
    assert lines[1].split() == ["job", "overrides", "error"]
    assert lines[2].split()[:2] == ["0", "model.lr=-1"] and "ConfigError: model.lr=-1" in lines[2]
    # the flag keeps exit 0 (the table is still printed)
    proc = _run([*args, "allow_failed_jobs=true", f"hydra.sweep.dir={tmp_path / 'sweep2'}"], tmp_path)
    assert proc.returncode == 0 and "1 of 2 jobs failed" in proc.stderr


@pytest.mark.slow
def test_every_job_failed_exits_nonzero(tmp_path):
    proc = _run(["-m", "model.lr=-1,-2", "debug=fdr", "logger=csv", f"hydra.sweep.dir={tmp_path / 's'}"], tmp_path)
    assert proc.returncode == 1 and "2 of 2 jobs failed" in proc.stderr
    proc = _run(["-m", "model.lr=-1,-2", "debug=fdr", "logger=csv", f"hydra.sweep.dir={tmp_path / 't'}"], tmp_path,
                LIT_ACT_ALLOW_FAILED_JOBS="1")
    assert proc.returncode == 0


def test_missing_optimized_metric_is_a_note_not_a_failure(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(["-m", "activation=relu,gelu", "++trainer.max_steps=4", "callbacks=none", "logger=csv",
                 "+trainer.limit_test_batches=2", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        status = json.loads((sweep / job / "job_status.json").read_text())
        assert status["status"] == "completed"
        assert "optimized_metric 'val/acc' was not logged" in status["notes"][0]


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
                                   "+trainer.limit_val_batches=1", "test=false", "callbacks=default"])
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert (tmp_path / "csv" / "metrics.csv").exists()
