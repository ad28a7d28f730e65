"""One Lanczos pass for the top eigenvalues, the smallest one, the trace and an SLQ run together.

Lanczos with reorthogonalisation (:func:`lit_act.hessian.lanczos.lanczos_steps`: a full sweep whenever the basis
would lose semi-orthogonality, Simon 1984) builds a basis ``Q`` (``m`` columns), orthonormal to ``O(sqrt(eps))``, with
``Q^T H Q = T`` tridiagonal to the same order. With ``P = I - Q Q^T``,

    tr(H) = tr(Q^T H Q) + tr(P H P) = sum_i alpha_i + tr(P H P),

an identity for any orthonormal ``Q``, and the first term is free: the Krylov basis that found the top eigenvalues
holds the outlying part of the spectrum, so only the deflated remainder is estimated, by Hutchinson with ``probes``
fresh Rademacher vectors projected by ``P`` (``z^T P H P z``, one product each; unbiased given ``Q``, the probes being
independent of it). The standard error is that of the residual Hutchinson mean (``std / sqrt(probes)``). This is the
Hutch++ decomposition (Meyer, Musco, Musco & Woodruff, SOSA 2021) with the Krylov basis in place of the one-step
sketch ``orth(H S)``, the simplest member of Krylov-aware trace estimation (Chen & Hallman, "Krylov-aware stochastic
trace estimation", SIMAX 2023, which also reuses Krylov products of the probes; not done here). When the basis spans
the whole space the trace is exact (``std_error = 0``).

From the same ``T``: the top-``k`` Ritz values (``EigenResult`` with Lanczos's convergence test: ``min(r, r^2 / gap)
<= tol |theta|``), optionally the smallest Ritz value with the same test (the pass runs until both converge or
``max_iter``), and, when the start vector is Rademacher (no warm start), one stochastic Lanczos quadrature run
(Ubaru, Chen & Saad 2017): nodes = Ritz values, weights = squared first components of the Ritz vectors.

Example::

    res = lanczos_trace(HessianOperator(model, None, [(x, y)]), k=3, tol=1e-4, probes=10)
    res.top.eigenvalues, res.trace.estimate, res.trace.std_error
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_act.hessian.lanczos import (
    check_lanczos_args,
    check_v0,
    lanczos_steps,
    make_generator,
    probe_block,
    rademacher,
    ritz_test,
    select_ritz,
    tridiagonal_eigh,
)
from lit_act.hessian.operator import HessianOperator
from lit_act.hessian.results import EigenResult, TraceResult
from lit_act.hessian.trace import _Blocks, _mean_and_se


@dataclass(frozen=True)
class KrylovSpectrumResult:
    """Results of :func:`lanczos_trace`.

    Attributes:
        top: the top-``k`` eigenpairs (as :func:`lit_act.hessian.lanczos.lanczos` with ``which="largest"``).
        smallest: the smallest eigenvalue from the same pass (``None`` unless asked for).
        trace: ``tr(T) + `` the deflated Hutchinson remainder; ``matvecs`` counts the residual probes only (the
            Lanczos products are in ``top``).
        nodes: ``(m,)`` Ritz values (ascending); ``weights``: ``(m,)`` squared first components: one SLQ run when
            ``random_start`` (see :class:`lit_act.hessian.results.SpectralDensityResult`).
        random_start: whether the pass started from a Rademacher vector (so ``nodes``/``weights`` are an unbiased
            SLQ sample); ``False`` with a warm start.
        matvecs: all products of the pass (Lanczos + probes); ``seconds``: its wall time.
    """

    top: EigenResult
    smallest: EigenResult | None
    trace: TraceResult
    nodes: Tensor
    weights: Tensor
    random_start: bool
    matvecs: int
    seconds: float


def lanczos_trace(op: HessianOperator, k: int = 3, tol: float = 1e-4, max_iter: int | None = None,
                  probes: int = 10, smallest: bool = False, v0: Tensor | None = None, seed: int = 0,
                  return_vectors: bool = True, min_steps: int = 0) -> KrylovSpectrumResult:
    """Top-``k`` eigenvalues, optionally the smallest, the trace (``probes`` residual products) and an SLQ run from
    one Lanczos pass (module docstring).

    Args:
        op: the curvature operator.
        k: number of top eigenvalues.
        tol: relative tolerance of the Lanczos convergence test (top-``k``, and the smallest when asked).
        max_iter: Lanczos steps at most; default ``min(dim, max(2k + 20, 60))``.
        probes: Rademacher probes of the deflated remainder (``>= 2`` for a standard error; ``0``: ``tr(T)`` only,
            a lower bound for a positive semi-definite operator, reported with a NaN standard error).
        smallest: also converge the smallest Ritz value in the same pass.
        v0: warm start (e.g. the previous top eigenvectors summed); a Rademacher vector from ``seed`` otherwise.
        seed: seed of the private generator (start vector, restarts, probes).
        return_vectors: also return the ``(dim, k)`` top Ritz vectors.
        min_steps: Lanczos steps at least (e.g. the SLQ nodes wanted from the pass), capped by ``max_iter``.
    """
    max_iter = check_lanczos_args(op, k, max_iter, tol)
    if not isinstance(probes, int) or probes < 0:
        raise ValueError(f"probes must be an integer >= 0, got {probes!r}")
    start, matvecs0 = time.perf_counter(), op.matvecs
    generator = make_generator(seed)
    random_start = v0 is None
    if v0 is None:
        v0 = rademacher((op.dim,), generator, op)
    else:
        check_v0(op, v0)
    for step in lanczos_steps(op, v0, max_iter, generator):
        alpha, beta, basis, beta_next = step  # the basis after the loop is the final one
        j = alpha.numel()
        if j < k:
            continue
        theta, s = tridiagonal_eigh(alpha, beta)
        top, low = select_ritz(theta, k, "largest"), select_ritz(theta, 1, "smallest")
        top_res, top_ok = ritz_test(theta, s, beta_next, top, tol)
        low_res, low_ok = ritz_test(theta, s, beta_next, low, tol)
        if j == op.dim:
            top_ok, low_ok = torch.ones_like(top_ok), torch.ones_like(low_ok)
        if j >= min_steps and bool(top_ok.all()) and (not smallest or bool(low_ok.all())):
            break
    lanczos_matvecs, lanczos_seconds = op.matvecs - matvecs0, time.perf_counter() - start
    vectors = (basis.T @ s[:, top].to(basis.dtype)).contiguous() if return_vectors else None
    top_result = EigenResult(theta[top].clone(), vectors, top_res, top_ok, j, lanczos_matvecs, lanczos_seconds,
                             "largest")
    low_result = None
    if smallest:
        low_result = EigenResult(theta[low].clone(), None, low_res, low_ok, j, lanczos_matvecs, lanczos_seconds,
                                 "smallest")
    trace = _deflated_trace(op, alpha, beta, basis, probes, generator)
    return KrylovSpectrumResult(top_result, low_result, trace, theta.clone(), s[0].square(), random_start,
                                op.matvecs - matvecs0, time.perf_counter() - start)


def _deflated_trace(op: HessianOperator, alpha: Tensor, beta: Tensor, basis: Tensor, probes: int,
                    generator: torch.Generator) -> TraceResult:
    """``tr(T) + (1/p) sum_i z_i^T P H P z_i`` with ``P = I - Q^T Q`` for the ``(m, dim)`` basis rows ``Q``."""
    start, matvecs0 = time.perf_counter(), op.matvecs
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    # per-block split of tr(Q^T H Q) = tr(T): diag(Q^T T Q) summed over each block
    krylov_diag = ((t.to(basis.dtype) @ basis) * basis).sum(0)
    blocks = _Blocks(op)
    krylov_blocks = blocks.sums(krylov_diag[:, None])
    krylov_part = float(alpha.sum())
    m = basis.shape[0]
    if m >= op.dim or probes == 0:
        se = 0.0 if m >= op.dim else math.nan
        return TraceResult(krylov_part, se, 0, time.perf_counter() - start, "lanczos+hutchinson",
                           blocks.as_dict(krylov_blocks[:, 0]))
    z = probe_block(op, probes, generator)  # (dim, p) view of a row-major block
    for _ in range(2):  # project out the basis twice (Gram-Schmidt "twice is enough")
        z = z - basis.T @ (basis @ z)
    z = z.T.contiguous().T
    forms = z * op.matmat(z)
    residual_blocks = blocks.sums(forms)
    mean, se = _mean_and_se(residual_blocks.sum(0))
    return TraceResult(krylov_part + mean, se, op.matvecs - matvecs0, time.perf_counter() - start,
                       "lanczos+hutchinson", blocks.as_dict(krylov_blocks[:, 0] + residual_blocks.mean(1)))
