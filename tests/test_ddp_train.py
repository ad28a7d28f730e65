"""DDP end to end: `train.py trainer=ddp_cpu` (ddp_spawn, 2 CPU processes, gloo) as a subprocess."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_act.analysis.teacher_student import classify_students
from lit_act.data import TeacherStudentDataModule

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["trainer=ddp_cpu", "trainer.max_epochs=2", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2",
         "+trainer.limit_test_batches=2", "extras.print_config=false"]


def _train(args: list[str], run_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALL, *args, f"hydra.run.dir={run_dir}"],
                          cwd=run_dir.parent, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((run_dir / "job_status.json").read_text())
    assert status["status"] == "completed", status.get("error")
    return status["metrics"]


@pytest.mark.slow
def test_ddp_spawn_digits_mlp_fit_and_test(tmp_path):
    """The test stage runs in a new spawn and appends its keys to the fit's metrics.csv (lit_act.loggers.CSVLogger)."""
    metrics = _train(["logger=csv"], tmp_path / "run")
    assert all(math.isfinite(metrics[k]) for k in ("val/acc", "val/loss", "test/acc", "test/loss"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/acc", "test/acc"} <= set(header)


@pytest.mark.slow
def test_ddp_spawn_teacher_student_callback(tmp_path):
    """The callback's logged numbers under DDP equal the classification of the final (synchronised) weights."""
    run = tmp_path / "run"
    metrics = _train(["experiment=teacher_student", "logger=[]"], run)
    weights = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    teacher = TeacherStudentDataModule(input_dim=20, teacher_neurons=4, orthonormal=True).teacher.w
    expected = classify_students(weights["hidden.weight"], teacher, sign_symmetric=True)
    assert metrics["teacher_student/max_cos/mean"] == pytest.approx(
        sum(n.max_cosine for n in expected.neurons) / len(expected.neurons), abs=1e-5)
    for kind in ("copy", "average", "other"):
        assert metrics[f"teacher_student/{kind}_fraction"] == expected.fraction(kind)
    assert (run / "figures" / "teacher_student_cosine.png").exists()
