"""Lanczos with a semi-orthogonal basis for extreme Hessian eigenvalues.

Lanczos (Golub & Van Loan, *Matrix Computations*, 4th ed., Alg. 10.1.1) builds an orthonormal Krylov basis
``Q_m = [q_1..q_m]`` of ``span{q_1, H q_1, ..., H^{m-1} q_1}`` with ``H Q_m = Q_m T_m + beta_m q_{m+1} e_m^T`` and
``T_m`` tridiagonal (``alpha`` on the diagonal, ``beta`` off it). After the three-term recurrence each new vector's
inner products with the whole basis are computed, and it is orthogonalised against the basis (a second pass when the
first loses more than ``1/sqrt(2)`` of the norm, "twice is enough") unless they are all below ``sqrt(eps)`` of its norm
(``eps`` of the operator's dtype). Keeping the basis semi-orthogonal this way is enough for the Ritz values to be those
of a fully reorthogonalised run up to ``O(eps ||H||)`` (Simon 1984, "The Lanczos algorithm with partial
reorthogonalization", Math. Comp. 42; Parlett, *The Symmetric Eigenvalue Problem*, Sec. 13.8), so no ghost eigenvalues
appear; unlike Simon's recurrence the inner products are measured, not estimated. The skipped subtraction is one of the
two sweeps over the ``(j, dim)`` basis each step: on the 784-256-256-10 MLP in float32 it was never needed within the
22-38 steps of a top-1 run at ``tol=1e-4`` (8 times in 60 steps at ``tol=1e-9`` on the tanh MLP, 3 in 33 on the ReLU
one), and full reorthogonalisation had cost 30% of a 52-step tanh run.
If the Krylov space becomes invariant
(``beta ~ 0``), the iteration continues from a fresh random vector orthogonal to the basis (``beta = 0`` in ``T``), so
with ``m = dim`` steps the spectrum is exact.

The Ritz pairs ``(theta_i, Q_m s_i)`` of ``T_m`` have residual ``||H x_i - theta_i x_i|| = beta_m |s_{m,i}|``.
A Ritz value is flagged converged when ``min(r_i, r_i^2 / gap_i) <= tol * |theta_i|``: some eigenvalue lies within
``r_i`` of ``theta_i`` (Bauer-Fike/Weyl), and within ``r_i^2 / gap_i`` when the other Ritz values estimate the gap
(Kato-Temple, the ARPACK-style estimate). Like every Krylov method, Lanczos cannot flag an eigenvalue it has not
found yet: with near-ties (e.g. ``lambda_2 ~ -lambda_1`` for ``"magnitude"``) raise ``max_iter`` or lower ``tol``.
Measured against the actual error on the 784-256-256-10 MLP (float32, gradient start, ``tol=1e-4``): ReLU reaches
1e-4 at step 18 and the test stops at 22 (error 2.5e-6, bound 4e-5: the residual is dominated by eigenvalues far from
``theta``, so ``r^2 / gap`` is ~15x pessimistic); tanh (``lambda_1 - lambda_2`` = 0.7%) reaches 1e-4 at step 22-23
and stops at 27-28 (error 3.3-3.9e-5, the second Ritz value still 2% below ``lambda_2``, so the gap is over-estimated)
or at 38 once the second Ritz value has converged (error 3e-6). The tridiagonal ``eigh`` of every step costs ~0.3 ms,
under 3% of a product.

For ``which="largest"`` the default start vector mixes the loss gradient into the random one
(:func:`gradient_start`): the gradient lies mostly in the top eigenspace.

PyHessian instead runs power iteration and stops when two consecutive Rayleigh quotients differ by less than
``1e-3`` relative, which on small spectral gaps stops ~1% low.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator

import torch
from torch import Tensor

from lit_act.hessian.operator import HessianOperator, math_attention
from lit_act.hessian.results import EigenResult

WHICH = ("largest", "smallest", "magnitude")
STARTS = ("auto", "gradient", "random")


def make_generator(seed: int) -> torch.Generator:
    """Private CPU generator (never touches the global RNG); vectors are drawn on CPU then moved."""
    return torch.Generator().manual_seed(int(seed))


def rademacher(shape: tuple[int, ...], generator: torch.Generator, op: HessianOperator) -> Tensor:
    """+-1 entries with equal probability, drawn from ``generator`` on CPU directly in float32 (an int64 draw of a
    ``(dim, 100)`` probe block took 0.47 s, 13x longer), cast to the operator's dtype/device."""
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.float32).mul_(2).sub_(1)
    return signs.to(dtype=op.dtype, device=op.device)


def probe_block(op: HessianOperator, count: int, generator: torch.Generator) -> Tensor:
    """``(dim, count)`` Rademacher probes stored row-major as ``(count, dim)`` (a transposed view), so
    :meth:`HessianOperator.matmat` reads contiguous rows."""
    return rademacher((count, op.dim), generator, op).T


def loss_gradient(op: HessianOperator) -> Tensor:
    """Flat gradient of the first batch's mean loss w.r.t. the operator's parameters, weighted by its size and summed
    over processes under DDP (so every rank gets the same vector). Read from the cached first-order graph when the
    operator keeps one (``backend="cached"``), computed by one backward pass otherwise."""
    with math_attention():
        graph = op.first_order(0)
    flat = op.flatten([None if g is None else g.detach() for g in graph])
    if op.all_reduce is not None:
        flat = op.all_reduce(flat * op._weights[0])
    return flat


def gradient_start(op: HessianOperator, generator: torch.Generator) -> Tensor | None:
    """``g / ||g|| + r / ||r||``: the loss gradient ``g`` (:func:`loss_gradient`) plus a Rademacher vector ``r``.

    The gradient lies mostly in the span of the top Hessian eigenvectors (Gur-Ari, Roberts & Dyer 2018, "Gradient
    descent happens in a tiny subspace"), so Lanczos started from it needs fewer steps for the largest eigenvalues;
    the random half gives every eigendirection a non-zero component (almost surely), so no eigenvalue is missed.
    Measured on the 784-256-256-10 MLP (batch 256, cross-entropy, 4 seeds), steps until the top Ritz value is within
    1e-4 of lambda_max: ReLU 21-22 from a Rademacher vector, 18 from this one; tanh (gap lambda_1 - lambda_2 of 0.7%)
    30-56 against 22. ``None`` when the gradient is zero or not finite (then start from a random vector)."""
    g = loss_gradient(op)
    norm = float(g.norm())
    if not math.isfinite(norm) or norm == 0.0:
        return None
    r = rademacher((op.dim,), generator, op)
    return g.div_(norm).add_(r, alpha=1 / float(r.norm()))


def _orthogonalise(w: Tensor, basis: Tensor, skip_below: float = 0.0) -> Tensor:
    """Classical Gram-Schmidt of ``w`` against the rows of ``basis``, repeated once when the norm drops below
    ``1/sqrt(2)`` of its value (Daniel-Gragg-Kaufman-Stewart criterion; "twice is enough").

    A pass is skipped when every coefficient is at most ``skip_below * ||w||``: ``w`` is then already orthogonal to
    the basis to that level, and the subtraction (the second of the pass's two sweeps over the ``(j, dim)`` basis) would
    not change it beyond that."""
    before = float(w.norm())
    for _ in range(2):
        coefficients = basis @ w
        if float(coefficients.abs().max()) <= skip_below * before:
            return w
        w = torch.addmv(w, basis.T, coefficients, alpha=-1)
        after = float(w.norm())
        if after >= 0.7071 * before:
            return w
        before = after
    return w


class LanczosRecurrence:
    """The Lanczos recurrence advanced one product at a time: compute ``w = H @ rec.q``, then ``rec.advance(w)``
    (three-term recurrence, semi-orthogonality-gated full reorthogonalisation), then, when another step follows,
    ``rec.next_vector()`` (the next basis vector, or a fresh direction orthogonal to the basis when the Krylov space
    became invariant, ``beta = 0``). Shared by :func:`lanczos_steps` (one operator) and
    :func:`lit_act.hessian.blocks.block_eigenvalues` (every block in lockstep).

    Attributes: ``basis`` (``(num_steps, dim)``, rows written in place), ``alpha``/``beta`` (float64), ``j`` (steps
    taken)."""

    def __init__(self, q0: Tensor, num_steps: int, generator: torch.Generator) -> None:
        self.dim, self.num_steps, self.generator = q0.numel(), num_steps, generator
        self.basis = torch.empty(num_steps, self.dim, dtype=q0.dtype, device=q0.device)
        self.alpha = torch.zeros(num_steps, dtype=torch.float64)
        self.beta = torch.zeros(max(num_steps - 1, 0), dtype=torch.float64)
        self.semi = torch.finfo(q0.dtype).eps ** 0.5  # semi-orthogonality level (module docstring)
        torch.div(q0, q0.norm(), out=self.basis[0])
        self.j = 0
        self._w: Tensor | None = None

    @property
    def q(self) -> Tensor:
        """The vector whose product the next :meth:`advance` takes (a view of its basis row)."""
        return self.basis[self.j]

    def advance(self, w: Tensor) -> float:
        """Take the step with ``w = H q`` (updated in place); returns ``beta_j``, the residual scale."""
        j, alpha, beta, basis = self.j, self.alpha, self.beta, self.basis
        q = basis[j]
        alpha[j] = float(torch.dot(w, q))
        w.add_(q, alpha=-float(alpha[j]))  # three-term recurrence, then reorthogonalisation
        if j:
            w.add_(basis[j - 1], alpha=-float(beta[j - 1]))
        self._w = _orthogonalise(w, basis[: j + 1], self.semi)
        self.j = j + 1
        return float(self._w.norm())

    def tridiagonal(self) -> tuple[Tensor, Tensor]:
        """``(alpha, beta)`` of ``T_j`` so far."""
        return self.alpha[: self.j], self.beta[: self.j - 1]

    def next_vector(self) -> None:
        """Write the next basis vector (after :meth:`advance`, when ``j < num_steps``)."""
        j, w = self.j, self._w
        norm = float(w.norm())
        scale = max(float(self.alpha[:j].abs().max()), float(self.beta[: j - 1].abs().max()) if j > 1 else 0.0,
                    1e-30)
        if norm <= 1e-6 * scale:  # invariant subspace: restart with a fresh orthogonal direction
            w = _orthogonalise(torch.randn(self.dim, generator=self.generator).to(w.dtype).to(w.device),
                               self.basis[:j])
            self.beta[j - 1] = 0.0
            torch.div(w, w.norm(), out=self.basis[j])
        else:
            self.beta[j - 1] = norm
            torch.div(w, norm, out=self.basis[j])


def lanczos_steps(op: HessianOperator, q0: Tensor, num_steps: int,
                  generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Tensor, float]]:
    """Run up to ``num_steps`` Lanczos steps from ``q0``; after each step yield ``(alpha, beta, basis, beta_next)``:
    the diagonal and off-diagonal of ``T_j`` (float64), the ``(j, dim)`` basis, and ``beta_j`` (residual scale)."""
    num_steps = min(num_steps, op.dim)
    rec = LanczosRecurrence(q0.to(dtype=op.dtype, device=op.device), num_steps, generator)
    while True:
        norm = rec.advance(op.matvec(rec.q))
        alpha, beta = rec.tridiagonal()
        yield alpha, beta, rec.basis[: rec.j], norm
        if rec.j == num_steps:
            return
        rec.next_vector()


def lanczos_tridiagonal(op: HessianOperator, q0: Tensor, num_steps: int,
                        generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(alpha, beta)`` of ``T_m`` after ``min(num_steps, dim)`` full Lanczos steps from ``q0``."""
    alpha, beta, _, _ = deque(lanczos_steps(op, q0, num_steps, generator), maxlen=1)[0]
    return alpha, beta


def tridiagonal_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix ``T(alpha, beta)`` (float64)."""
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    return torch.linalg.eigh(t)


def default_steps(k: int) -> int:
    """Lanczos steps for ``k`` eigenvalues when not given, before the dimension cap: ``max(2k + 20, 60)``."""
    return max(2 * k + 20, 60)


def default_max_iter(dim: int, k: int) -> int:
    """Lanczos steps at most when not given: ``min(dim, default_steps(k))``."""
    return min(dim, default_steps(k))


def check_lanczos_args(op: HessianOperator, k: int, max_iter: int | None, tol: float) -> int:
    """Validates ``k``, ``max_iter`` and ``tol``; returns ``max_iter`` (default :func:`default_max_iter`)."""
    if not 1 <= k <= op.dim:
        raise ValueError(f"k must be between 1 and the number of parameters ({op.dim}), got {k}")
    if max_iter is None:
        max_iter = default_max_iter(op.dim, k)
    if max_iter < k:
        raise ValueError(f"max_iter ({max_iter}) must be >= k ({k})")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    return max_iter


def check_v0(op: HessianOperator, v0: Tensor) -> None:
    """Raise ``ValueError`` unless the warm start ``v0`` is a finite non-zero vector of shape ``(op.dim,)``."""
    if v0.shape != (op.dim,) or not torch.isfinite(v0).all() or float(v0.norm()) == 0:
        raise ValueError(f"v0 must be a finite non-zero vector of shape ({op.dim},), got {tuple(v0.shape)}")


def ritz_test(theta: Tensor, s: Tensor, beta_next: float, chosen: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Residuals ``r_i = beta_m |s_{m,i}|`` of the chosen Ritz values and their convergence flags
    ``min(r_i, r_i^2 / gap_i) <= tol |theta_i|`` (module docstring; the Kato-Temple estimate needs another Ritz
    value for the gap, so a single step uses ``r_i`` alone)."""
    residuals = beta_next * s[-1, chosen].abs()
    bound = residuals
    if theta.numel() > 1:
        others = theta[None, :] - theta[chosen, None]
        others[torch.arange(chosen.numel()), chosen] = float("inf")
        bound = torch.minimum(residuals, residuals.square() / others.abs().min(dim=1).values)
    return residuals, bound <= tol * theta[chosen].abs().clamp_min(1e-30)


def select_ritz(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the ``k`` Ritz values ``theta`` that ``which`` asks for (``largest``, ``smallest``, ``magnitude``)."""
    if which == "largest":
        return torch.argsort(theta, descending=True)[:k]
    if which == "smallest":
        return torch.argsort(theta)[:k]
    return torch.argsort(theta.abs(), descending=True)[:k]


def lanczos(op: HessianOperator, k: int = 1, which: str = "largest", max_iter: int | None = None,
            tol: float = 1e-4, v0: Tensor | None = None, seed: int = 0,
            return_vectors: bool = True, start: str = "auto") -> EigenResult:
    """Top-``k`` eigenpairs of ``op`` by Lanczos with a semi-orthogonal basis (module docstring).

    Args:
        op: the Hessian operator.
        k: number of eigenpairs (``<= op.dim``).
        which: ``"largest"`` (algebraic, default), ``"smallest"`` (algebraic) or ``"magnitude"``.
        max_iter: Lanczos steps at most (matvec budget); default ``min(dim, max(2k + 20, 60))``.
        tol: relative tolerance of the convergence test (module docstring); stops once all ``k`` pass.
        v0: warm start (e.g. the previous top eigenvector); overrides ``start``.
        seed: seed of the private generator (start vector and restarts).
        return_vectors: also return the ``(dim, k)`` Ritz vectors.
        start: start vector when ``v0`` is not given: ``"gradient"`` (:func:`gradient_start`, the loss gradient plus a
            Rademacher vector), ``"random"`` (a Rademacher vector) or ``"auto"`` (default: ``"gradient"`` for
            ``which="largest"``, where it saves steps, ``"random"`` otherwise). Recorded in ``result.start``.

    Example::

        res = lanczos(HessianOperator(model, loss_fn, [(x, y)]), k=1)
        res.eigenvalues[0], res.matvecs
    """
    if which not in WHICH:
        raise ValueError(f"unknown which={which!r}; valid: {list(WHICH)}")
    max_iter = check_lanczos_args(op, k, max_iter, tol)
    if start not in STARTS:
        raise ValueError(f"unknown start={start!r}; valid: {list(STARTS)}")
    began, matvecs0 = time.perf_counter(), op.matvecs
    generator = make_generator(seed)
    if v0 is None:
        start = ("gradient" if which == "largest" else "random") if start == "auto" else start
        v0 = gradient_start(op, generator) if start == "gradient" else None
        if v0 is None:
            start, v0 = "random", rademacher((op.dim,), generator, op)
    else:
        check_v0(op, v0)
        start = "v0"
    for step in lanczos_steps(op, v0, max_iter, generator):
        alpha, beta, basis, beta_next = step
        j = alpha.numel()
        if j < k:
            continue
        theta, s = tridiagonal_eigh(alpha, beta)
        chosen = select_ritz(theta, k, which)
        residuals, converged = ritz_test(theta, s, beta_next, chosen, tol)
        if bool(converged.all()) or j == op.dim:
            converged = converged | (j == op.dim)
            break
    vectors = None
    if return_vectors:
        vectors = (basis.T @ s[:, chosen].to(basis.dtype)).contiguous()
    return EigenResult(eigenvalues=theta[chosen].clone(), eigenvectors=vectors, residuals=residuals,
                       converged=converged, iterations=j, matvecs=op.matvecs - matvecs0,
                       seconds=time.perf_counter() - began, which=which, start=start)
