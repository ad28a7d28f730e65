"""lit_act.hessian against the exact dense Hessian of small MLPs (torch.autograd.functional.hessian)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_act.hessian import (
    HessianOperator,
    gaussian_density,
    hutchinson,
    hutchpp,
    lanczos,
    lla_criteria,
    slq,
    trace,
)
from tests.dense import dense_hessian


def ce_loss(module, batch):
    inputs, targets = batch
    return F.cross_entropy(module(inputs), targets)


def make_mlp(activation: str, batch_norm: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    layers = [nn.Linear(6, 9)] + ([nn.BatchNorm1d(9)] if batch_norm else []) + [act(), nn.Linear(9, 7), act(),
                                                                              nn.Linear(7, 3)]
    model = nn.Sequential(*layers).double()
    if batch_norm:  # non-trivial running statistics, then eval mode
        with torch.no_grad():
            model(torch.randn(64, 6, dtype=torch.float64) * 2 + 1)
        model.eval()
    return model


def make_batches(sizes=(20, 12), seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for n in sizes]


CASES = [("relu", False), ("tanh", False), ("relu", True), ("tanh", True)]


@pytest.fixture(params=CASES, ids=[f"{a}{'-bn' if bn else ''}" for a, bn in CASES])
def problem(request):
    activation, batch_norm = request.param
    model, batches = make_mlp(activation, batch_norm), make_batches()
    dense = dense_hessian(model, batches, "cross_entropy")
    return model, batches, dense, torch.linalg.eigvalsh(dense)


@pytest.mark.parametrize("backend", ["forward", "reverse", "cached"])
def test_matvec_and_matmat_match_dense(problem, backend):
    model, batches, dense, _ = problem
    op = HessianOperator(model, ce_loss, batches, backend=backend, vmap_size=3)
    vs = torch.randn(op.dim, 5, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(vs[:, 0]), dense @ vs[:, 0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(op.matmat(vs), dense @ vs, rtol=1e-9, atol=1e-11)
    assert op.matvecs == 6
    assert op.backend == backend


def test_top3_and_extremes_match_dense(problem):
    model, batches, _, exact = problem
    op = HessianOperator(model, ce_loss, batches)
    top = lanczos(op, k=3)
    assert bool(top.converged.all())
    torch.testing.assert_close(top.eigenvalues, exact.flip(0)[:3], rtol=1e-4, atol=0)
    assert top.matvecs == top.iterations < op.dim
    low = lanczos(op, k=1, which="smallest")
    assert bool(low.converged.all())
    assert abs(float(low.eigenvalues[0]) - float(exact[0])) <= 1e-4 * float(exact.abs().max())
    mag = lanczos(op, k=1, which="magnitude")
    by_magnitude = exact[exact.abs().argsort(descending=True)][:1]
    torch.testing.assert_close(mag.eigenvalues, by_magnitude, rtol=1e-4, atol=0)
    # Ritz vectors are eigenvectors: ||H x - theta x|| equals the reported residual bound
    dense = problem[2]
    x = top.eigenvectors
    residual = (dense @ x - x * top.eigenvalues).norm(dim=0)
    torch.testing.assert_close(residual, top.residuals, rtol=1e-3, atol=1e-8)


def test_full_krylov_space_is_exact():
    model, batches = make_mlp("tanh"), make_batches()
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches, "cross_entropy"))
    op = HessianOperator(model, ce_loss, batches)
    res = lanczos(op, k=op.dim, max_iter=op.dim, tol=1e-12)
    torch.testing.assert_close(res.eigenvalues.flip(0), exact, rtol=1e-7, atol=1e-9)


def test_warm_start_converges_faster_and_unconverged_flag():
    model, batches = make_mlp("tanh"), make_batches()
    op = HessianOperator(model, ce_loss, batches)
    cold = lanczos(op, k=1, tol=1e-8)
    warm = lanczos(op, k=1, tol=1e-8, v0=cold.eigenvectors[:, 0])
    assert warm.iterations < cold.iterations
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-7, atol=0)
    short = lanczos(op, k=3, max_iter=3, tol=1e-10)
    assert not bool(short.converged.all()) and short.iterations == 3


def test_subset_and_per_layer_blocks_match_dense_blocks():
    model, batches = make_mlp("relu"), make_batches()
    dense = dense_hessian(model, batches, "cross_entropy")
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    blocks = HessianOperator.blocks(model, ce_loss, batches)
    assert list(blocks) == ["0", "2", "4"]
    for block_index, (module_name, op) in enumerate(blocks.items()):
        lo, hi = offsets[2 * block_index], offsets[2 * block_index + 2]
        assert op.names == [f"{module_name}.weight", f"{module_name}.bias"]
        v = torch.randn(op.dim, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(v), dense[lo:hi, lo:hi] @ v, rtol=1e-9, atol=1e-11)
    head = HessianOperator(model, ce_loss, batches, params=["4.*"])
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches, "cross_entropy", names=set(names[4:])))
    torch.testing.assert_close(lanczos(head, k=2).eigenvalues, exact.flip(0)[:2], rtol=1e-4, atol=0)


def test_trace_estimators_within_standard_errors(problem):
    model, batches, dense, _ = problem
    exact = float(dense.trace())
    op = HessianOperator(model, ce_loss, batches, backend="cached")
    for method in ("hutchinson", "hutchpp"):
        for seed in range(3):
            res = trace(op, budget=30, method=method, seed=seed)
            assert res.matvecs == 30 and res.method == method
            assert res.std_error > 0
            assert abs(res.estimate - exact) <= 4 * res.std_error, (method, seed, res, exact)
    full = hutchpp(op, budget=2 * op.dim)
    assert full.std_error == 0.0
    assert math.isclose(full.estimate, exact, rel_tol=1e-9, abs_tol=1e-10)


def test_hutchinson_plain_formula_and_private_generator():
    model, batches = make_mlp("tanh"), make_batches()
    dense = dense_hessian(model, batches, "cross_entropy")
    op = HessianOperator(model, ce_loss, batches)
    state = torch.get_rng_state()
    res = hutchinson(op, budget=7, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    gen = torch.Generator().manual_seed(11)
    z = (torch.randint(0, 2, (7, op.dim), generator=gen, dtype=torch.float32) * 2 - 1).double().T
    samples = ((dense @ z) * z).sum(0)
    assert math.isclose(res.estimate, float(samples.mean()), rel_tol=1e-9)
    assert math.isclose(res.std_error, float(samples.std() / math.sqrt(7)), rel_tol=1e-9)
    assert hutchinson(op, budget=7, seed=11).estimate == res.estimate


def test_slq_extremes_weights_and_density(problem):
    model, batches, _, exact = problem
    op = HessianOperator(model, ce_loss, batches)
    res = slq(op, num_iter=40, runs=3, seed=0)
    assert res.nodes.shape == res.weights.shape == (3, 40) and res.matvecs == 120
    torch.testing.assert_close(res.weights.sum(dim=1), torch.ones(3, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    spread = float(exact[-1] - exact[0])
    assert (res.nodes.max(dim=1).values - exact[-1]).abs().max() <= 1e-4 * spread
    assert (res.nodes.min(dim=1).values - exact[0]).abs().max() <= 1e-4 * spread
    grid, density = gaussian_density(res.nodes, res.weights, num_points=4000)
    assert (density >= 0).all()
    assert math.isclose(float(torch.trapezoid(density, grid)), 1.0, abs_tol=1e-4)


def test_slq_quadrature_is_exact_for_full_krylov_space():
    """With m = dim steps, sum_i w_i theta_i^p = v^T H^p v / v^T v for the Rademacher start vector."""
    model, batches = make_mlp("tanh"), make_batches()
    dense = dense_hessian(model, batches, "cross_entropy")
    op = HessianOperator(model, ce_loss, batches)
    res = slq(op, num_iter=op.dim, runs=1, seed=5)
    v = (torch.randint(0, 2, (op.dim,), generator=torch.Generator().manual_seed(5), dtype=torch.float32) * 2
         - 1).double()
    v = v / v.norm()
    for power in (1, 2, 3):
        quad = float((res.weights[0] * res.nodes[0] ** power).sum())
        assert math.isclose(quad, float(v @ torch.linalg.matrix_power(dense, power) @ v), rel_tol=1e-6,
                            abs_tol=1e-10)


def test_lla_criteria_from_exact_eigenpairs_match_plain_formula():
    model, batches = make_mlp("tanh"), make_batches()
    eigenvalues, eigenvectors = torch.linalg.eigh(dense_hessian(model, batches, "cross_entropy"))
    assert (eigenvalues < 0).any() and (eigenvalues > 0).any()
    v = torch.randn(eigenvalues.numel(), dtype=torch.float64)
    weights = (eigenvectors.T @ (v / v.norm())) ** 2
    n = 0.5
    re_plain = abs(eigenvalues.min().item() / eigenvalues.max().item())
    neg = sum(abs(lam * w) ** n for lam, w in zip(eigenvalues.tolist(), weights.tolist()) if lam < 0)
    pos = sum((lam * w) ** n for lam, w in zip(eigenvalues.tolist(), weights.tolist()) if lam > 0)
    crit = lla_criteria(eigenvalues[None], weights[None], n=n)
    assert math.isclose(crit.re, re_plain, rel_tol=1e-12)
    assert math.isclose(crit.kh, neg / pos, rel_tol=1e-12)
    # several runs are averaged run by run (as the reference implementation does)
    two = lla_criteria(torch.stack([eigenvalues, eigenvalues * 2]), torch.stack([weights, weights]), n=1.0)
    kh1 = sum(abs(lam * w) for lam, w in zip(eigenvalues.tolist(), weights.tolist()) if lam < 0) / sum(
        lam * w for lam, w in zip(eigenvalues.tolist(), weights.tolist()) if lam > 0)
    assert math.isclose(two.kh, kh1, rel_tol=1e-12) and math.isclose(two.re, re_plain, rel_tol=1e-12)


def test_forward_backend_falls_back_to_double_backward():
    class NoForwardAD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.tanh(x)

        @staticmethod
        def backward(ctx, grad_out):
            (x,) = ctx.saved_tensors
            return grad_out * (1 - torch.tanh(x) ** 2)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5).double(), nn.Linear(5, 3).double()

        def forward(self, x):
            return self.b(NoForwardAD.apply(self.a(x)))

    model, batches = Model(), make_batches()
    op = HessianOperator(model, ce_loss, batches, backend="forward")
    with pytest.warns(UserWarning, match="falling back to double backward"):
        op.matvec(torch.randn(op.dim, dtype=torch.float64))
    assert op.backend == "reverse"


def test_bad_inputs_raise_clear_errors():
    model, batches = make_mlp("relu"), make_batches()
    with pytest.raises(ValueError, match="empty batch list"):
        HessianOperator(model, ce_loss, [])
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), batches)
    with pytest.raises(ValueError, match="does not depend"):
        HessianOperator(model, lambda m, b: b[0].sum() * 0 + torch.zeros((), requires_grad=True), batches)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        HessianOperator(model, ce_loss, batches, params=["head.*"])
    with pytest.raises(ValueError, match="unknown backend"):
        HessianOperator(model, ce_loss, batches, backend="magic")
    op = HessianOperator(model, ce_loss, batches)
    with pytest.raises(ValueError, match="k must be between 1 and"):
        lanczos(op, k=op.dim + 1)
    with pytest.raises(ValueError, match="unknown which"):
        lanczos(op, which="biggest")
    with pytest.raises(ValueError, match="at least 3"):
        hutchpp(op, budget=2)
    with pytest.raises(TypeError, match="loss_fn"):
        HessianOperator(model, None, batches)  # nn.Sequential has no .loss
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    op = HessianOperator(model, ce_loss, batches)
    with pytest.raises(FloatingPointError, match="NaN/Inf in Hessian-vector product #1"):
        op.matvec(torch.randn(op.dim, dtype=torch.float64))


def test_unused_parameter_warns_and_gets_zero_rows():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.extra = make_mlp("relu"), nn.Linear(2, 2).double()

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    batches = make_batches()
    with pytest.warns(UserWarning, match="does not depend on"):
        op = HessianOperator(model, ce_loss, batches, backend="reverse")
    hv = op.matvec(torch.ones(op.dim, dtype=torch.float64))
    assert torch.equal(hv[-6:], torch.zeros(6, dtype=torch.float64))
