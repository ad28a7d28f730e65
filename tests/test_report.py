"""`lit-act report` on a real multirun over three activations (subprocesses), plus a failed job in the same sweep."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_act.cli import main
from lit_act.report import canonical_keys, find_jobs, is_per_unit, parse_overrides, summary_keys

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["logger=csv", "trainer.max_epochs=2", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2",
         "+trainer.limit_test_batches=2", "extras.print_config=false", "callbacks=none"]


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Jobs 0-2: one activation each; job `failed`: lr=-1 in the same sweep directory (refused by the config check)."""
    tmp = tmp_path_factory.mktemp("report")
    sweep = tmp / "sweep"
    proc = _train(["-m", "activation=relu,gelu,tanh", "model.lr=0.001", *SMALL, f"hydra.sweep.dir={sweep}"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _train(["-m", "activation=relu", "model.lr=-1", *SMALL, f"hydra.sweep.dir={sweep}",
                   "hydra.sweep.subdir=failed"], tmp)
    assert proc.returncode == 1 and "1 of 4 jobs failed" in proc.stderr, proc.stderr[-3000:]  # the failure table
    return sweep


def _last_logged(metrics_csv: Path, key: str) -> float:
    """Plain reading: the last non-empty entry of column ``key``."""
    with open(metrics_csv, newline="") as handle:
        values = [row[key] for row in csv.DictReader(handle) if row.get(key)]
    return float(values[-1])


def test_report_table_and_figures(sweep, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "lit_act.cli", "report", str(sweep), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(out / "comparison.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["activation"], r["model.lr"], r["status"]) for r in rows] == [
        ("0", "relu", "0.001", "completed"), ("1", "gelu", "0.001", "completed"), ("2", "tanh", "0.001", "completed"),
        ("failed", "relu", "-1", "failed")]
    assert "model.lr=-1: expected a finite number > 0.0" in rows[3]["error"] and rows[3]["val/loss"] == ""
    for row in rows[:3]:
        metrics_csv = sweep / row["job"] / "csv" / "metrics.csv"
        for key in ("val/loss", "val/acc", "test/acc"):
            assert float(row[key]) == pytest.approx(_last_logged(metrics_csv, key), rel=1e-12)
        # train/loss is the epoch mean (train/loss_epoch in the CSV); the per-step copy is dropped
        assert float(row["train/loss"]) == pytest.approx(_last_logged(metrics_csv, "train/loss_epoch"), rel=1e-12)
        assert "train/loss_step" not in row
    markdown = (out / "comparison.md").read_text()
    assert "4 job(s): 3 completed, 1 failed." in markdown
    assert "| job | activation | model.lr | status | val/acc | val/loss | test/acc | test/loss" in markdown
    assert "| failed | relu | -1 | failed |" in markdown and "model.lr=-1: expected a finite number > 0.0" in markdown
    assert f"| 2 | tanh | 0.001 | completed | {float(rows[2]['val/acc']):.4g} |" in markdown
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"final_val_acc.png", "final_val_loss.png", "final_test_acc.png", "curve_val_loss.png"} <= figures
    assert all((out / "figures" / name).stat().st_size > 10_000 for name in figures)
    assert "![curve_val_loss](figures/curve_val_loss.png)" in markdown


def test_report_on_a_single_run_and_metric_patterns(sweep, tmp_path, capsys):
    assert main(["report", str(sweep / "1"), "--out", str(tmp_path), "--metrics", "test/*"]) == 0
    markdown = (tmp_path / "comparison.md").read_text()
    assert "1 job(s): 1 completed." in markdown and "| job | status | test/acc | test/loss |" in markdown
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"final_test_acc.png", "final_test_loss.png",
                                                                  "curve_val_acc.png", "curve_val_loss.png"}


def test_report_without_runs_says_what_it_expects(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "no runs under" in capsys.readouterr().err


def test_find_jobs_orders_numerically(tmp_path):
    for name in ("10", "2", "extra"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "job_status.json").write_text('{"status": "completed"}')
    assert [p.name for p in find_jobs(tmp_path)] == ["2", "10", "extra"]


def test_helpers():
    assert parse_overrides(["activation=gelu", "+trainer.limit_train_batches=3", "~logger.wandb"]) == {
        "activation": "gelu", "trainer.limit_train_batches": "3", "logger.wandb": "<deleted>"}
    assert canonical_keys({"train/loss_step": 1.0, "train/loss_epoch": 2.0, "val/loss": 3.0, "a_step": 4.0}) == {
        "train/loss": 2.0, "val/loss": 3.0, "a_step": 4.0}
    keys = ["val/loss", "train/sparsity/mean", "train/sparsity/hidden.0.act", "ts/max_cos/neuron_0",
            "ts/max_cos/mean", "train/hessian/eig_1"]
    assert [k for k in keys if is_per_unit(k, set(keys))] == ["train/sparsity/hidden.0.act", "ts/max_cos/neuron_0"]
    assert summary_keys(keys) == ["val/loss", "train/hessian/eig_1", "train/sparsity/mean", "ts/max_cos/mean"]
