"""Lanczos start vector (loss gradient + Rademacher) and semi-orthogonal basis, against dense Hessians from
``torch.autograd.functional.hessian``."""

from __future__ import annotations

from collections import deque

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_act.hessian import GGNOperator, HessianOperator, lanczos
from lit_act.hessian.lanczos import _orthogonalise, lanczos_steps, loss_gradient, make_generator
from tests.dense import dense_hessian


def ce_loss(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def make_mlp(activation: type[nn.Module], dtype=torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), activation(), nn.Linear(9, 7), activation(), nn.Linear(7, 3)).to(dtype)


def make_batch(dtype=torch.float64, n: int = 24, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    return x.to(dtype), torch.randint(0, 3, (n,), generator=gen)


class Quadratic(nn.Module):
    """``L(theta) = theta^T A theta / 2`` with a chosen symmetric ``A`` (its Hessian), ``theta`` set by the test."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())


def quadratic_loss(module, batch):
    (a,) = batch
    return 0.5 * module.theta @ a @ module.theta


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh], ids=["relu", "tanh"])
def test_gradient_start_top_eigenvalues_match_dense(activation):
    model, batch = make_mlp(activation), make_batch()
    exact = torch.linalg.eigvalsh(dense_hessian(model, [batch], "cross_entropy"))
    op = HessianOperator(model, ce_loss, [batch])
    top = lanczos(op, k=3, tol=1e-8)
    assert top.start == "gradient" and bool(top.converged.all())
    torch.testing.assert_close(top.eigenvalues, exact.flip(0)[:3], rtol=1e-7, atol=0)
    low = lanczos(op, k=1, which="smallest", tol=1e-8)  # auto: the gradient only helps at the top
    assert low.start == "random"
    assert abs(float(low.eigenvalues[0]) - float(exact[0])) <= 1e-7 * float(exact.abs().max())
    assert lanczos(op, k=1, v0=top.eigenvectors[:, 0]).start == "v0"


def test_nearly_tied_top_pair_and_gradient_without_top_component():
    """``A`` has ``lambda_1 = 1``, ``lambda_2 = 1 - 1e-4`` and 198 more eigenvalues in ``[-0.5, 0.9]``; ``theta`` has no
    component along the top eigenvector, so neither has the gradient ``A theta`` nor its Krylov space: started from the
    gradient alone, Lanczos converges to ``lambda_2``. The Rademacher half of the default start finds ``lambda_1``."""
    gen = torch.Generator().manual_seed(0)
    dim = 200
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    values = torch.cat([torch.tensor([1.0, 1.0 - 1e-4], dtype=torch.float64),
                        torch.linspace(0.9, -0.5, dim - 2, dtype=torch.float64)])
    a = (q * values) @ q.T
    a = (a + a.T) / 2
    theta = q[:, 1:] @ torch.randn(dim - 1, generator=gen, dtype=torch.float64)
    model = Quadratic(theta)
    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(lambda t: 0.5 * t @ a @ t, theta))
    torch.testing.assert_close(exact.flip(0)[:2], values[:2], rtol=1e-12, atol=1e-12)
    op = HessianOperator(model, quadratic_loss, [(a,)])
    gradient = loss_gradient(op)
    torch.testing.assert_close(gradient, a @ theta, rtol=1e-12, atol=1e-12)
    assert abs(float(gradient @ q[:, 0])) < 1e-10
    only_gradient = lanczos(op, k=1, tol=1e-10, v0=gradient, return_vectors=False)
    assert abs(float(only_gradient.eigenvalues[0]) - float(values[1])) < 1e-8  # lambda_2: the hazard
    for seed in range(3):
        res = lanczos(op, k=2, tol=1e-10, max_iter=120, seed=seed)
        assert res.start == "gradient" and bool(res.converged.all())
        torch.testing.assert_close(res.eigenvalues, exact.flip(0)[:2], rtol=1e-9, atol=0)


def test_zero_gradient_falls_back_to_random_start():
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    a = b + b.T
    op = HessianOperator(Quadratic(torch.zeros(12, dtype=torch.float64)), quadratic_loss, [(a,)])
    res = lanczos(op, k=1, tol=1e-10)
    assert res.start == "random"
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(a)[-1:], rtol=1e-9, atol=0)


@pytest.mark.parametrize("backend", ["cached", "forward", "reverse"])
def test_loss_gradient_matches_autograd_on_every_backend(backend):
    model, batch = make_mlp(nn.Tanh), make_batch()
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ce_loss(model, batch), list(model.parameters()))])
    op = HessianOperator(model, ce_loss, [batch], backend=backend)
    torch.testing.assert_close(loss_gradient(op), expected, rtol=1e-12, atol=1e-14)
    ggn = GGNOperator(model, ce_loss, [batch], loss="cross_entropy")
    torch.testing.assert_close(loss_gradient(ggn), expected, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())


def test_all_reduce_keeps_the_start_direction_and_the_eigenvalue():
    """Two identical ranks simulated by ``all_reduce = 2 x``: the operator is unchanged, the start is the same on
    every rank (the gradient is reduced too)."""
    model, batch = make_mlp(nn.Tanh), make_batch()
    exact = torch.linalg.eigvalsh(dense_hessian(model, [batch], "cross_entropy"))
    op = HessianOperator(model, ce_loss, [batch], all_reduce=lambda t: 2 * t)
    single = HessianOperator(model, ce_loss, [batch])
    torch.testing.assert_close(loss_gradient(op), 2 * 24 * loss_gradient(single), rtol=1e-12, atol=1e-14)
    res = lanczos(op, k=1, tol=1e-8)
    torch.testing.assert_close(res.eigenvalues, exact[-1:], rtol=1e-7, atol=0)


def test_orthogonalise_skips_only_when_already_orthogonal():
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(50, 5, generator=gen, dtype=torch.float64))
    basis = basis.T.contiguous()
    w = torch.randn(50, generator=gen, dtype=torch.float64)
    w = w - basis.T @ (basis @ w)  # orthogonal to 1e-16
    w_close = w + 1e-12 * basis[0]  # within sqrt(eps) of orthogonal: left as is
    assert _orthogonalise(w_close, basis, skip_below=1.5e-8) is w_close
    w_far = w + 1e-3 * basis[0]  # beyond: orthogonalised
    out = _orthogonalise(w_far, basis, skip_below=1.5e-8)
    assert float((basis @ out).abs().max()) < 1e-14 * float(out.norm())
    torch.testing.assert_close(out, w, rtol=0, atol=1e-14)


def test_float32_basis_stays_semi_orthogonal_and_ritz_values_match_dense():
    model, batch = make_mlp(nn.Tanh, dtype=torch.float32), make_batch(dtype=torch.float32)
    exact = torch.linalg.eigvalsh(dense_hessian(make_mlp(nn.Tanh), [make_batch()], "cross_entropy"))
    op = HessianOperator(model, ce_loss, [batch])
    steps = 60
    steps_run = lanczos_steps(op, torch.randn(op.dim, generator=make_generator(0)), steps, make_generator(0))
    basis = deque(steps_run, maxlen=1)[0][2]  # the (steps, dim) basis after the last step
    gram = basis.double() @ basis.double().T
    semi = torch.finfo(torch.float32).eps ** 0.5
    assert float((gram - torch.eye(steps, dtype=torch.float64)).abs().max()) <= 4 * semi
    top = lanczos(op, k=3, tol=1e-5)
    torch.testing.assert_close(top.eigenvalues.double(), exact.flip(0)[:3], rtol=2e-5, atol=0)


def test_relu_hessian_is_not_its_ggn_so_the_default_backend_stays_the_double_backward():
    """For a piecewise-linear network each layer's own block of the Hessian equals the GGN's (the output is linear in
    one layer's weights), but the blocks coupling two layers do not: ``f = W3 relu(W2 relu(W1 x))`` has non-zero
    ``d2 f / dW1 dW2``. A GGN product is therefore not an exact Hessian product, and the default backend stays the
    cached double backward."""
    model, batch = make_mlp(nn.ReLU), make_batch()
    dense = dense_hessian(model, [batch], "cross_entropy")
    ggn = GGNOperator(model, ce_loss, [batch], loss="cross_entropy").matmat(torch.eye(dense.shape[0],
                                                                                      dtype=torch.float64))
    first = 6 * 9 + 9  # parameters of the first Linear layer
    torch.testing.assert_close(ggn[:first, :first], dense[:first, :first], rtol=1e-9, atol=1e-12)
    assert float((ggn[:first, first:] - dense[:first, first:]).abs().max()) > 1e-3 * float(dense.abs().max())
    op = HessianOperator(model, ce_loss, [batch])
    assert op.backend == "cached"
    torch.testing.assert_close(lanczos(op, k=1, tol=1e-8).eigenvalues, torch.linalg.eigvalsh(dense)[-1:],
                               rtol=1e-7, atol=0)
