"""Every `train.py` command in README.md and docs/*.md runs, in smoke mode (`debug=smoke`: a few real steps with
every callback of the task's set live).

Single runs are composed in-process (tests.helpers.compose_train + lit_act.training.train); multiruns (`-m`, Optuna)
run as subprocesses into a temporary sweep dir and are marked slow. Commands that need hardware this machine lacks
(SLURM, GPUs) are listed in NEEDS_HARDWARE; a placeholder such as `experiment=<name>` is covered by
tests/test_experiments.py. A new command in the docs fails test_every_command_is_classified until it is handled.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lit_act.training import train
from lit_act.utils.validate import ConfigError
from tests.helpers import compose_train

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:\.venv/bin/)?python train\.py((?:[^`\n#\\]|\\\n)*)")
NEEDS_HARDWARE = {"hydra/launcher=slurm": "needs a SLURM cluster", "trainer=gpu": "needs a GPU"}
# the README's examples of refused input: the one-line error each must give
EXPECTED_ERRORS = {
    "trainer.max_epochs=abc": "trainer.max_epochs='abc': expected a non-negative integer (or -1 for no limit)",
    "model=transformer data=digits": "model=transformer does not fit data=digits (task classification: model=mlp|cnn); "
                                     "valid pairs: ",
}


def commands() -> list[str]:
    """The argument strings of every `python train.py ...` in the docs, in order, without duplicates."""
    found: list[str] = []
    for doc in DOCS:
        for match in COMMAND.finditer(doc.read_text()):
            args = " ".join(match.group(1).replace("\\\n", " ").split())
            if args not in found:
                found.append(args)
    return found


def _kind(args: str) -> str:
    tokens = shlex.split(args)
    if any("<" in t for t in tokens):
        return "placeholder"
    if args in EXPECTED_ERRORS:
        return "error"
    if any(t.startswith(key) for t in tokens for key in NEEDS_HARDWARE):
        return "hardware"
    if "-m" in tokens or any(t.startswith("hparams_search=") for t in tokens):
        return "multirun"
    return "single"


ALL = commands()
SINGLE = [c for c in ALL if _kind(c) == "single"]
MULTI = [c for c in ALL if _kind(c) == "multirun"]


def test_every_command_is_classified():
    assert SINGLE and MULTI
    assert {"", "model=cnn activation=gelu", "data=pysource model=transformer", "debug=fdr"} <= set(SINGLE)
    for args in ALL:
        assert _kind(args) in ("single", "multirun", "hardware", "placeholder", "error"), args
    assert set(EXPECTED_ERRORS) <= set(ALL)


@pytest.mark.parametrize("args", sorted(EXPECTED_ERRORS))
def test_documented_error_example(tmp_path, args):
    cfg = compose_train(tmp_path, shlex.split(args))
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert str(info.value).startswith(EXPECTED_ERRORS[args]) and "\n" not in str(info.value)


@pytest.mark.parametrize("args", SINGLE, ids=[a or "<defaults>" for a in SINGLE])
def test_single_run_command_in_smoke_mode(tmp_path, args):
    tokens = shlex.split(args)
    # a command with its own debug mode (debug=fdr, debug=smoke) runs as written
    extra = [] if any(t.startswith("debug=") for t in tokens) else ["debug=smoke"]
    cfg = compose_train(tmp_path, [*tokens, *extra])
    metrics, objects = train(cfg)
    assert objects["trainer"].state.finished and objects["trainer"].global_step > 0
    assert "test/loss" in metrics and cfg.optimized_metric in metrics


@pytest.mark.slow
@pytest.mark.parametrize("args", MULTI)
def test_multirun_command_in_smoke_mode(tmp_path, args):
    tokens = shlex.split(args)
    if any(t.startswith("hparams_search=") for t in tokens):
        tokens.append("hydra.sweeper.n_trials=2")  # 20 trials in the docs; two show the loop works
    # the default sweep dir under the launch directory (no LIT_ACT_ROOT, no hydra.sweep.dir), as a user runs it
    env = {k: v for k, v in os.environ.items() if k != "LIT_ACT_ROOT"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *tokens, "debug=smoke", "logger=csv"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**env, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "logs").glob("*/multiruns/*"))
    assert len(sweeps) == 1, sweeps
    statuses = [json.loads(p.read_text())["status"] for p in sweeps[0].glob("*/job_status.json")]
    assert statuses and set(statuses) == {"completed"}
