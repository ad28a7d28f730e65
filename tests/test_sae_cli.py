"""``lit-act sae``: offline SAEs on a finished run (a hand-made run directory of the digits MLP)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from lit_act.cli import main
from lit_act.data import DigitsDataModule
from lit_act.models import MLPClassifier
from lit_act.sae import TopKSAE
from lit_act.sae.cli import resolve_source


def _run_dir(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    cfg = OmegaConf.create({
        "activation": "relu",
        "data": {"_target_": "lit_act.data.DigitsDataModule", "batch_size": 64},
        "model": {"_target_": "lit_act.models.MLPClassifier", "in_features": None, "num_classes": None,
                  "hidden": [32], "activation": "${activation}"},
    })
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    hints = DigitsDataModule(batch_size=64).shape_hints
    torch.manual_seed(0)
    model = MLPClassifier(hints["in_features"], hints["num_classes"], hidden=[32], activation="relu")
    torch.save({"state_dict": model.state_dict()}, run / "checkpoints" / "last.ckpt")
    return run, model


@pytest.mark.slow  # two Hydra jobs, ~10 s
def test_offline_sweep_writes_metrics_saes_and_figures(tmp_path):
    run, model = _run_dir(tmp_path)
    logs = tmp_path / "logs"
    code = main(["sae", str(run), "--modules", "hidden.0.act", "sae.k=2,4", "sae.d_latent=64", "sae.batch_size=128",
                 "tokens=1024", "buffer_tokens=512", "eval_batches=2", "loss_recovered_batches=1",
                 "log_every_n_batches=4", f"paths.log_dir={logs}", "device=cpu", "-m"])
    assert code == 0
    (sweep,) = (logs / "sae" / "multiruns").iterdir()
    for job, k in (("0", 2), ("1", 4)):
        status = json.loads((sweep / job / "job_status.json").read_text())
        assert status["status"] == "completed", status
        metrics = status["metrics"]
        assert metrics["val/sae/l0/hidden.0.act"] <= k
        assert 0 < metrics["val/sae/fvu/hidden.0.act"] < 1.5
        assert "val/sae/loss_recovered/mean" in metrics and "val/sae/dead_fraction/mean" in metrics
        saved = torch.load(sweep / job / "saes" / "hidden.0.act.pt")
        sae = TopKSAE(saved["d_in"], 64, k=saved["config"]["k"])
        sae.load_state_dict(saved["state_dict"])
        assert saved["config"]["k"] == k and saved["d_in"] == 32
        assert (sweep / job / "figures" / "sae_density_hidden.0.act.png").is_file()
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert f"sae.k={k}" in overrides
    assert (sweep / "figures" / "sae_fvu_vs_l0.png").is_file()


def test_source_without_run_config_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a train.py run directory"):
        resolve_source(tmp_path)


def test_report_draws_fvu_vs_l0_of_an_online_sweep(tmp_path):
    """`lit-act report` on a multirun of online SAE jobs (CSV logs only) draws FVU against L0 per job."""
    from lit_act.report import find_jobs, load_job, write_report
    from lit_act.sae.figures import sweep_points

    finals = {"0": (8, 7.9, 0.31), "1": (16, 15.2, 0.22), "2": (32, 30.5, 0.15)}
    for job, (k, l0, fvu) in finals.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- experiment=sae_lm\n- callbacks.sae.k={k}\n")
        (tmp_path / job / "job_status.json").write_text(json.dumps({"status": "completed", "metrics": {}}))
        (tmp_path / job / "csv").mkdir()
        (tmp_path / job / "csv" / "metrics.csv").write_text(
            "step,val/sae/fvu/mean,val/sae/l0/mean\n"
            f"99,0.9,{k}\n"  # an earlier validation: the figure uses the final values
            f"199,{fvu},{l0}\n")
    report = write_report(tmp_path)
    assert tmp_path / "report" / "figures" / "sae_fvu_vs_l0.png" in report.figures
    jobs = [load_job(p, tmp_path) for p in find_jobs(tmp_path)]
    assert sorted(sweep_points(jobs, ["callbacks.sae.k"])) == [
        (7.9, 0.31, "k=8"), (15.2, 0.22, "k=16"), (30.5, 0.15, "k=32")]
