"""Every experiment config composes and runs end to end with fast_dev_run; KAN layers swap in through `mlp=`."""

from pathlib import Path

import pytest

from lit_act.training import train
from tests.helpers import compose_train

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml"))


def test_experiment_list_is_complete():
    assert {"activation_sweep", "activation_sweep_lm", "hessian_landscape", "lazy_neuron", "massive_emergence",
            "nac_ood", "teacher_student"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_with_fast_dev_run(tmp_path, experiment):
    cfg = compose_train(tmp_path, [f"experiment={experiment}", "debug=fdr"])
    metrics, objects = train(cfg)
    assert "test/loss" in metrics
    assert objects["trainer"].state.finished


@pytest.mark.parametrize("mlp", ["standard", "kan", "fourier_kan", "skan", "grkan"])
def test_mlp_group_swaps_blocks(tmp_path, mlp):
    cfg = compose_train(tmp_path, ["data=pysource", "model=transformer", "model.d_model=32", "data.max_chars=50000",
                                   f"mlp={mlp}", "callbacks=none", "debug=fdr", "optimized_metric=val/loss"])
    metrics, objects = train(cfg)
    kan_layers = [type(m).__name__ for m in objects["model"].blocks[0].mlp.modules() if "KAN" in type(m).__name__]
    assert bool(kan_layers) == (mlp != "standard"), kan_layers
    assert "test/loss" in metrics
