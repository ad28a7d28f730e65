"""Result records of the Hessian routines: values together with how much work produced them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


def block_of(name: str) -> str:
    """The block of parameter ``name``: the module owning it (``"<root>"`` for the model's own parameters), the key
    of every per-block result (``TraceResult.blocks``, ``DiagonalResult.blocks``, ``HessianOperator.blocks``)."""
    return name.rpartition(".")[0] or "<root>"


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
        start: the start vector: ``"gradient"``, ``"random"`` or ``"v0"`` (given).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    converged: Tensor
    iterations: int
    matvecs: int
    seconds: float
    which: str
    start: str = "random"


@dataclass(frozen=True)
class TraceResult:
    """Trace estimate ``estimate +- std_error`` from ``matvecs`` curvature-vector products.

    Attributes:
        estimate: the trace.
        std_error: its standard error (0 when exact).
        matvecs: curvature-vector products used.
        seconds: wall time.
        method: ``"hutchinson"``, ``"hutchpp"``, ``"xtrace"``, ``"exact"`` or ``"control_variate+<estimator>"``.
        blocks: per-block (per-module) traces from the same products (estimates, exact for exact blocks).
        exact_part: the part of ``estimate`` computed exactly (exact diagonal blocks); the rest is estimated.
    """

    estimate: float
    std_error: float
    matvecs: int
    seconds: float
    method: str
    blocks: dict[str, float] = field(default_factory=dict)
    exact_part: float = 0.0


@dataclass(frozen=True)
class DiagonalResult:
    """Exact curvature diagonal from :func:`lit_act.hessian.diagonal.exact_diagonal`.

    Attributes:
        diagonal: ``(dim,)`` in the order of ``names`` (flattened); NaN for uncovered parameters.
        names: chosen parameter names.
        covered: the names whose diagonal is exact (all of ``names`` unless ``on_uncovered="partial"``).
        trace: sum of the covered diagonal.
        blocks: per owning module, the trace of its covered parameters.
        curvature: ``"hessian"`` or ``"ggn"``.
        passes: extended backward passes (one per batch).
        seconds: wall time.
        uncovered_reason: why the walk stopped (``None`` when everything is covered).
    """

    diagonal: Tensor
    names: list[str]
    covered: list[str]
    trace: float
    blocks: dict[str, float]
    curvature: str
    passes: int
    seconds: float
    uncovered_reason: str | None = None


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
