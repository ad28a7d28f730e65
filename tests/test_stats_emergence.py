"""Emergence-curve fit: formula, initialisation, R^2, peak step."""

import math

import numpy as np
import pytest

from lit_act.stats.emergence import emergence_curve, fit_emergence, initial_parameters, peak_step


def test_curve_formula():
    t = np.array([0.0, 10.0])
    x = 0.1 * t + 2.0
    assert np.allclose(emergence_curve(t, 3.0, 0.5, 0.1, 2.0, 1.0), 3.0 * np.exp(-0.5 * x) * np.log(x) + 1.0)


def test_initialisation_follows_paper():
    steps, ratios = np.array([0.0, 50.0, 100.0]), np.array([2.0, 10.0, 6.0])
    assert initial_parameters(steps, ratios) == pytest.approx([8.0, 1 / ratios.std(), 1 / 100.0, 1.0, 6.0])


def test_fit_recovers_synthetic_curve_r2_and_peak():
    steps = np.linspace(0, 2000, 60)
    truth = emergence_curve(steps, 40.0, 1.2, 0.003, 0.6, 3.0)
    ratios = truth + np.random.default_rng(0).normal(0, 0.05, steps.shape)
    fit = fit_emergence(steps, ratios)
    residual = ratios - fit(steps)
    assert fit.r2 == pytest.approx(1 - (residual ** 2).sum() / ((ratios - ratios.mean()) ** 2).sum())
    truth_r2 = 1 - ((ratios - truth) ** 2).sum() / ((ratios - ratios.mean()) ** 2).sum()
    assert fit.r2 >= truth_r2 - 1e-6 and fit.r2 > 0.99  # least squares does at least as well as the truth
    assert np.abs(fit(steps) - truth).max() < 0.1
    grid = np.linspace(0, 2000, 200_001)
    assert fit.peak_step == pytest.approx(grid[np.argmax(fit(grid))], abs=0.05)
    assert set(fit.as_dict()) == {"A", "lambda", "gamma", "t0", "K", "r2", "peak_step"}


def test_peak_step_closed_form_and_errors():
    lam, gamma, t0 = 0.7, 0.01, 0.5
    x = np.linspace(0.51, 50, 2_000_000)
    assert peak_step(lam, gamma, t0) == pytest.approx((x[np.argmax(np.exp(-lam * x) * np.log(x))] - t0) / gamma,
                                                      abs=0.01)
    assert math.isnan(peak_step(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="at least 5"):
        fit_emergence([0, 1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="differ in shape"):
        fit_emergence([0, 1, 2, 3, 4, 5], [1, 2, 3])
