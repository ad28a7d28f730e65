"""Emergence curve of massive activations over training ("Hidden Dynamics of Massive Activations in Transformer
Training", Pythia study, Sec. 4): the per-layer ratio ``r(t) = max|h| / median|h|`` against training step ``t`` is fit
with

    f(t) = A * exp(-lambda * x) * log(x) + K,    x = gamma * t + t0

by bounded non-linear least squares (``scipy.optimize.curve_fit``, trust-region reflective) from the paper's
initialisation ``A = max r - min r``, ``K = min r + A / 2``, ``lambda = 1 / std(r)``, ``gamma = 1 / (t_max - t_min)``,
``t0 = 1``, with ``A, lambda, gamma >= 0`` and ``t0 > 0`` (so ``x > 0``). Goodness of fit ``R^2 = 1 - SS_res / SS_tot``.
The curve peaks where ``d/dx [exp(-lambda x) log x] = 0``, i.e. ``lambda x log x = 1``, ``x* = exp(W(1 / lambda))``
(Lambert W), so ``t_peak = (x* - t0) / gamma``.

The series ``r(t)`` is the per-layer statistic of Sun et al.'s procedure that the paper's code (a fork of
locuslab/massive-activations) records at each checkpoint: the mean over sequences of the per-sequence top-1 ``|h|``
divided by the mean over sequences of the per-sequence median ``|h|`` -- ``ratio`` of
:class:`lit_act.stats.massive.MassiveActivationMetric` (``massive_ratio``), which does not depend on how many sequences
were observed, so points taken on a batch and on an epoch estimate the same curve. The running maximum over all
sequences (``massive_max1``) grows with the number of sequences and is not this statistic.

Deviation from the paper: the paper fits checkpoints of one training run evaluated on a fixed text sample; fitting
the ratios observed on different training batches at different steps adds batch-to-batch noise to ``r(t)``.

Example:
    >>> steps = np.linspace(0, 2000, 40)
    >>> fit = fit_emergence(steps, emergence_curve(steps, 40.0, 1.2, 0.003, 0.6, 3.0))
    >>> round(fit.r2, 4)
    1.0
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

_MIN_POINTS = 5  # five parameters


def emergence_curve(t, A: float, lam: float, gamma: float, t0: float, K: float):  # noqa: N803 (paper's symbols)
    """``f(t) = A exp(-lambda x) log(x) + K`` with ``x = gamma t + t0`` (numpy arrays or floats)."""
    x = gamma * np.asarray(t, dtype=float) + t0
    return A * np.exp(-lam * x) * np.log(x) + K


@dataclass(frozen=True)
class EmergenceFit:
    """Fitted parameters, ``r2`` and ``peak_step`` (``nan`` when ``lambda = 0``: the curve never peaks)."""

    A: float  # noqa: N815
    lam: float
    gamma: float
    t0: float
    K: float  # noqa: N815
    r2: float
    peak_step: float

    def as_dict(self) -> dict[str, float]:
        """Keys ``A, lambda, gamma, t0, K, r2, peak_step``."""
        d = asdict(self)
        d["lambda"] = d.pop("lam")
        return {k: d[k] for k in ("A", "lambda", "gamma", "t0", "K", "r2", "peak_step")}

    def __call__(self, t):
        return emergence_curve(t, self.A, self.lam, self.gamma, self.t0, self.K)


def initial_parameters(steps: np.ndarray, ratios: np.ndarray) -> list[float]:
    """The paper's initialisation ``[A, lambda, gamma, t0, K]`` (guarded against a constant series / one step)."""
    amplitude = float(ratios.max() - ratios.min())
    spread = float(ratios.std())
    span = float(steps.max() - steps.min())
    return [amplitude, 1.0 / spread if spread > 0 else 1.0, 1.0 / span if span > 0 else 1.0, 1.0,
            float(ratios.min()) + amplitude / 2]


def peak_step(lam: float, gamma: float, t0: float) -> float:
    """``(exp(W(1/lambda)) - t0) / gamma``; ``nan`` for ``lambda <= 0`` or ``gamma <= 0``."""
    if lam <= 0 or gamma <= 0:
        return math.nan
    from scipy.special import lambertw

    return (math.exp(float(lambertw(1.0 / lam).real)) - t0) / gamma


def fit_emergence(steps, ratios, max_evals: int = 20_000) -> EmergenceFit:
    """Fit :func:`emergence_curve` to ``ratios`` observed at ``steps`` (at least 5 finite points).

    Raises:
        ValueError: fewer than 5 finite points, or mismatched lengths.
        RuntimeError: ``curve_fit`` did not converge (scipy's message included).
    """
    from scipy.optimize import curve_fit

    steps, ratios = np.asarray(steps, dtype=float), np.asarray(ratios, dtype=float)
    if steps.shape != ratios.shape:
        raise ValueError(f"steps and ratios differ in shape: {steps.shape} vs {ratios.shape}")
    keep = np.isfinite(steps) & np.isfinite(ratios)
    steps, ratios = steps[keep], ratios[keep]
    if len(steps) < _MIN_POINTS:
        raise ValueError(f"the emergence fit needs at least {_MIN_POINTS} finite points, got {len(steps)}")
    lower = [0.0, 0.0, 0.0, 1e-9, -np.inf]
    upper = [np.inf] * 5
    p0 = np.clip(initial_parameters(steps, ratios), lower, upper)
    params, _ = curve_fit(emergence_curve, steps, ratios, p0=p0, bounds=(lower, upper), method="trf",
                          max_nfev=max_evals)
    residual = ratios - emergence_curve(steps, *params)
    total = float(((ratios - ratios.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else math.nan
    A, lam, gamma, t0, K = (float(v) for v in params)  # noqa: N806
    return EmergenceFit(A=A, lam=lam, gamma=gamma, t0=t0, K=K, r2=r2, peak_step=peak_step(lam, gamma, t0))
