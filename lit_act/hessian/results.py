"""Result records of the Hessian routines: values together with how much work produced them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class EigenResult:
    """Eigenvalues from :func:`lit_act.hessian.lanczos.lanczos`.

    Attributes:
        eigenvalues: ``(k,)`` Ritz values, ordered as requested (largest first for ``"largest"`` and
            ``"magnitude"``, smallest first for ``"smallest"``).
        eigenvectors: ``(dim, k)`` unit Ritz vectors (columns), or ``None`` when not requested.
        residuals: ``(k,)`` residual norms ``||H x_i - theta_i x_i||`` (= ``beta_m |s_{m,i}|``).
        converged: ``(k,)`` bool, ``min(r_i, r_i^2 / gap_i) <= tol * |theta_i|`` (see ``lanczos``).
        iterations: Lanczos steps taken (= matvecs).
        matvecs: Hessian-vector products used.
        seconds: wall time.
        which: ``"largest"``, ``"smallest"`` or ``"magnitude"``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    converged: Tensor
    iterations: int
    matvecs: int
    seconds: float
    which: str


@dataclass(frozen=True)
class TraceResult:
    """Stochastic trace estimate: ``estimate +- std_error`` from ``matvecs`` Hessian-vector products."""

    estimate: float
    std_error: float
    matvecs: int
    seconds: float
    method: str


@dataclass(frozen=True)
class SpectralDensityResult:
    """Stochastic Lanczos quadrature: per run ``r``, nodes ``theta_{r,i}`` (Ritz values) and weights ``w_{r,i}``
    (squared first components of the Ritz vectors, summing to 1) such that ``(1/dim) sum_j f(lambda_j) ~=
    mean_r sum_i w_{r,i} f(theta_{r,i})``.

    Attributes:
        nodes: ``(runs, m)`` Ritz values, ascending in each run.
        weights: ``(runs, m)`` quadrature weights.
        matvecs: Hessian-vector products used.
        seconds: wall time.
    """

    nodes: Tensor
    weights: Tensor
    matvecs: int
    seconds: float


@dataclass(frozen=True)
class LLACriteria:
    """Loss-landscape criteria of Gabdullin (LLA): ``re = |lambda_min / lambda_max|`` and ``kh`` (= ``Kh_n``)."""

    re: float
    kh: float
    n: float
