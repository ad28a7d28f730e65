"""Spectral density by stochastic Lanczos quadrature (SLQ) and the LLA loss-landscape criteria.

SLQ (Ghorbani, Krishnan & Xiao, ICML 2019, Sec. 3; Lin, Saad & Yang, SIAM Rev. 2016): for a unit Rademacher start
vector ``v``, ``m`` Lanczos steps give ``T_m = S diag(theta) S^T`` and ``v^T f(H) v ~= sum_i w_i f(theta_i)`` with
``w_i = S_{1,i}^2``; averaging over runs estimates ``(1/dim) tr f(H)``. The smoothed density is

    phi_sigma(t) = mean_runs sum_i w_i N(t; theta_i, sigma^2),

which integrates to 1 (weights sum to 1 per run). PyHessian's ``density_generate`` passes ``sigma_squared * range`` as
a *variance* to its Gaussian and renormalises by a Riemann sum; here ``sigma`` is a standard deviation (default 1% of
the node range) and nothing is renormalised. PyHessian's ``hessian.density`` itself crashes on torch >= 2 (``torch.eig``
was removed).

LLA criteria (Gabdullin et al., "Investigating generalization capabilities of neural networks by means of loss
landscapes and Hessian analysis"; GabdullinN/loss-landscape-analysis ``hessian_criteria``), per SLQ run then averaged
over runs as the reference code does:

    re   = |theta_min / theta_max|,
    Kh_n = sum_{theta_i < 0} |theta_i w_i|^n / sum_{theta_i > 0} (theta_i w_i)^n      (n = 0.5 by default).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from lit_act.hessian.lanczos import lanczos_tridiagonal, make_generator, rademacher, tridiagonal_eigh
from lit_act.hessian.operator import HessianOperator
from lit_act.hessian.results import LLACriteria, SpectralDensityResult


def slq(op: HessianOperator, num_iter: int = 64, runs: int = 1, seed: int = 0) -> SpectralDensityResult:
    """``runs`` independent SLQ runs of ``num_iter`` Lanczos steps (capped at ``dim``) from Rademacher vectors."""
    if num_iter < 1 or runs < 1:
        raise ValueError(f"num_iter and runs must be >= 1, got num_iter={num_iter}, runs={runs}")
    start, matvecs0 = time.perf_counter(), op.matvecs
    generator = make_generator(seed)
    nodes, weights = [], []
    for _ in range(runs):
        v0 = rademacher((op.dim,), generator, op)
        theta, s = tridiagonal_eigh(*lanczos_tridiagonal(op, v0, num_iter, generator))
        nodes.append(theta)
        weights.append(s[0].square())
    return SpectralDensityResult(torch.stack(nodes), torch.stack(weights), op.matvecs - matvecs0,
                                 time.perf_counter() - start)


def gaussian_density(nodes: Tensor, weights: Tensor, grid: Tensor | None = None, num_points: int = 1000,
                     sigma: float | None = None) -> tuple[Tensor, Tensor]:
    """``(grid, phi_sigma(grid))`` for ``(runs, m)`` nodes/weights (module docstring).

    Args:
        grid: evaluation points; default ``num_points`` points over ``[min - 5 sigma, max + 5 sigma]``.
        sigma: Gaussian standard deviation; default 1% of the node range (``1e-3`` if the range is 0).
    """
    nodes, weights = nodes.double().reshape(-1, nodes.shape[-1]), weights.double().reshape(-1, weights.shape[-1])
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 1e-3
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
    grid = grid.double()
    kernel = torch.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (kernel * weights[None]).sum(dim=-1).mean(dim=-1)
    return grid, density


def lla_criteria(nodes: Tensor, weights: Tensor, n: float = 0.5) -> LLACriteria:
    """``re`` and ``Kh_n`` of the LLA paper from ``(runs, m)`` SLQ nodes/weights (or exact eigenvalues with weights),
    computed per run and averaged over runs. ``Kh_n`` is ``inf`` when a run has no positive node."""
    if n <= 0:
        raise ValueError(f"the Kh power n must be positive, got {n}")
    nodes, weights = nodes.double().reshape(-1, nodes.shape[-1]), weights.double().reshape(-1, weights.shape[-1])
    re_runs, kh_runs = [], []
    for theta, w in zip(nodes, weights):
        top = float(theta.max())
        re_runs.append(abs(float(theta.min()) / top) if top != 0 else math.inf)
        product = theta * w
        positive = float(product[theta > 0].pow(n).sum())
        negative = float(product[theta < 0].abs().pow(n).sum())
        kh_runs.append(negative / positive if positive > 0 else math.inf)
    return LLACriteria(re=sum(re_runs) / len(re_runs), kh=sum(kh_runs) / len(kh_runs), n=n)
