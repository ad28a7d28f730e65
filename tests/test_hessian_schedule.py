"""HessianSpectrum with ``num_batches`` larger than ``every_n_steps``: step evaluations run on the batches cached so far
(issue 11: ``HessianSpectrum(num_batches=100)`` with ``every_n_steps`` used to never evaluate)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning import seed_everything
from torch.utils.data import DataLoader

from lit_act.callbacks.hessian import HessianSpectrum
from lit_act.callbacks.hessian_config import HessianConfig
from tests.test_hessian_callback import dense_hessian, make_data, make_model, make_trainer


def test_step_evaluations_use_the_batches_cached_so_far(tmp_path):
    seed_everything(0)
    model = make_model(batch_norm=False, dropout=0.0)
    hessian = HessianSpectrum(every_n_steps=2, every_n_epochs=None, num_batches=100,
                              config=HessianConfig(top_k=2, trace_budget=0, slq_iter=0, lambda_min=False),
                              progress=False, save_density_figure=False)
    with pytest.warns(UserWarning, match="every_n_steps=2 < num_batches=100.*cached so far"):
        make_trainer(tmp_path, [hessian]).fit(model, DataLoader(make_data(64), batch_size=16))  # 4 steps
    assert hessian.evaluations == 2  # steps 2 and 4, not never
    assert len(hessian.cached_batches) == 4
    # the step-4 evaluation is the spectrum of the 4 batches cached by then, at the final parameters
    exact = torch.linalg.eigvalsh(dense_hessian(model, hessian.cached_batches))
    for i in range(2):
        assert math.isclose(hessian.last_metrics[f"train/hessian/eig_{i + 1}"], float(exact[-1 - i]), rel_tol=1e-4)
