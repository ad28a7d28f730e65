"""Every experiment config runs in smoke mode (`debug=smoke`: real steps, every callback of its set live, schedules
shortened); KAN layers swap in through `mlp=`."""

import json
from pathlib import Path

import pytest

from lit_act.training import train
from tests.helpers import compose_train

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml"))


def test_experiment_list_is_complete():
    assert {"activation_sweep", "activation_sweep_lm", "hessian_landscape", "lazy_neuron", "massive_emergence",
            "nac_ood", "teacher_student"} <= set(EXPERIMENTS)


def _smoke(tmp_path, overrides):
    cfg = compose_train(tmp_path, [*overrides, "debug=smoke"])
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.state.finished and trainer.global_step > 0
    assert json.loads((tmp_path / "job_status.json").read_text())["status"] == "completed"
    return cfg, metrics, trainer


# the statistic each lit-act callback logs once it has collected (prefix match on the logged keys)
EVIDENCE = {
    "ActivationSparsity": "train/sparsity/",
    "DeadNeurons": "train/dead_fraction/",
    "MassiveActivations": "train/massive_ratio/",
    "HessianSpectrum": "train/hessian/eig_1",
    "NeuronActivationCoverage": "train/nac_me/",
    "ActivationHistograms": "train/hist_outside/",
    "TeacherStudentMatch": "teacher_student/",
}


def assert_every_callback_collected(trainer, metrics, csv: Path) -> None:
    logged = set(metrics) | set(csv.read_text().splitlines()[0].split(","))
    for callback in trainer.callbacks:
        prefix = EVIDENCE.get(type(callback).__name__)
        if prefix is not None:
            assert any(key.startswith(prefix) for key in logged), (type(callback).__name__, sorted(logged))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_in_smoke_mode(tmp_path, experiment):
    cfg, metrics, trainer = _smoke(tmp_path, [f"experiment={experiment}"])
    assert "test/loss" in metrics
    assert cfg.optimized_metric in metrics
    assert_every_callback_collected(trainer, metrics, tmp_path / "csv" / "metrics.csv")


@pytest.mark.parametrize("mlp", ["standard", "kan", "fourier_kan", "skan", "grkan"])
def test_mlp_group_swaps_blocks(tmp_path, mlp):
    cfg = compose_train(tmp_path, ["data=pysource", "model=transformer", "model.d_model=32", "data.max_chars=50000",
                                   f"mlp={mlp}", "callbacks=none", "debug=fdr"])
    metrics, objects = train(cfg)
    kan_layers = [type(m).__name__ for m in objects["model"].blocks[0].mlp.modules() if "KAN" in type(m).__name__]
    assert bool(kan_layers) == (mlp != "standard"), kan_layers
    assert "test/loss" in metrics
