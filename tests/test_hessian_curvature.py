"""Exact diagonals, GGN/Fisher operators, XTrace, control variates and Transformers against dense autograd matrices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_act.hessian import (
    GGNOperator,
    HessianOperator,
    UncoveredModuleError,
    curvature_operator,
    diagonal,
    empirical_fisher_diagonal,
    exact_diagonal,
    hutchinson,
    hutchpp,
    lanczos,
    trace,
    xtrace,
)
from lit_act.hessian.lanczos import make_generator, probe_block
from lit_act.models import MLPClassifier, TransformerLM
from tests.dense import (
    LOSSES,
    dense_ggn,
    dense_hessian,
    hessian_of,
    lm_batches,
    loss_fn_of,
    make_batches,
    weighted_loss,
)


def make_mlp(activation, seed=0):
    torch.manual_seed(seed)
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    return nn.Sequential(nn.Linear(6, 9), act(), nn.Linear(9, 7), act(), nn.Dropout(0.3), nn.Linear(7, 3)).double().eval()


def dense_empirical_fisher(model, batches, loss):
    params = list(model.parameters())
    total = sum(x.shape[0] for x, _ in batches)
    out = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            g = torch.autograd.grad(LOSSES[loss](model(x[i:i + 1]), y[i:i + 1]), params)
            g = torch.cat([t.reshape(-1) for t in g])
            out = out + torch.outer(g, g)
    return out / total


CASES = [(a, loss) for a in ("relu", "tanh") for loss in ("cross_entropy", "mse")]


@pytest.mark.parametrize(("activation", "loss"), CASES, ids=[f"{a}-{loss}" for a, loss in CASES])
def test_exact_diagonals_match_dense(activation, loss):
    model, batches = make_mlp(activation), make_batches(loss)
    hess, ggn = dense_hessian(model, batches, loss).diagonal(), dense_ggn(model, batches, loss).diagonal()
    for curvature, reference in (("hessian", hess), ("ggn", ggn)):
        res = exact_diagonal(model, batches, loss_fn_of(loss), loss=loss, curvature=curvature)
        assert res.covered == res.names and res.passes == 2 and res.uncovered_reason is None
        assert float((res.diagonal - reference).abs().max()) <= 1e-6 * float(reference.abs().max())
        assert math.isclose(res.trace, float(reference.sum()), rel_tol=1e-6)
        assert math.isclose(res.blocks["0"], float(reference[:6 * 9 + 9].sum()), rel_tol=1e-6, abs_tol=1e-12)
    if activation == "relu":  # piecewise linear in each parameter: the residual term has a zero diagonal
        torch.testing.assert_close(hess, ggn, rtol=1e-9, atol=1e-12)
    else:  # a real difference, so the test above can tell the two apart
        assert float((hess - ggn).abs().max()) > 1e-3 * float(hess.abs().max())


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_exact_diagonal_drains_many_output_columns_in_blocks(monkeypatch, loss):
    """A block budget of 2 output-Hessian factor columns: 12 classes in 6 blocks per batch, the tanh residual terms
    joined once; the diagonals still equal the dense Hessian's and GGN's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 12)).double().eval()
    batches = make_batches(loss, sizes=(10, 10), classes=12, out_shape=(12,))
    monkeypatch.setattr(diagonal, "_BLOCK_ELEMENTS", 10 * 12 * 2)  # a batch's R C entries x 2 columns
    blocks = []
    factor = diagonal.output_hessian_factor
    monkeypatch.setattr(diagonal, "output_hessian_factor", lambda *a: blocks.append(a[2]) or factor(*a))
    for curvature, reference in (("hessian", dense_hessian(model, batches, loss).diagonal()),
                                 ("ggn", dense_ggn(model, batches, loss).diagonal())):
        res = exact_diagonal(model, batches, loss_fn_of(loss), loss=loss, curvature=curvature)
        assert float((res.diagonal - reference).abs().max()) <= 1e-9 * float(reference.abs().max())
    assert len(blocks) == 2 * 2 * 6 and blocks[:6] == [slice(lo, lo + 2) for lo in range(0, 12, 2)]


def test_exact_diagonal_of_a_lone_head_needs_only_the_output_hessian_diagonal(monkeypatch):
    """A TransformerLM's chain is its head alone (the final LayerNorm and the MLP branch before it have the
    closed-form tail rule instead): the head's exact diagonal is ``sum_r (p_r - p_r^2) a_r^2 / R``, from no
    ``(R, C, C)`` factor (vocab 300: 300x the memory)."""
    monkeypatch.setattr(diagonal, "output_hessian_factor", lambda *a: pytest.fail("factor built for a lone head"))
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=300, block_size=8, d_model=8, n_layer=1, n_head=2).double().eval()
    batches = lm_batches(300, t=8, sizes=(3, 2))
    res = exact_diagonal(model, batches, on_uncovered="partial")
    assert res.covered == [f"blocks.0.mlp.{m}.{p}" for m in ("fc_in", "fc_out") for p in ("weight", "bias")] + [
        "ln_f.weight", "ln_f.bias", "lm_head.weight"]
    head = dict(zip(res.names, res.diagonal.split([p.numel() for p in model.parameters()])))["lm_head.weight"]
    reference = hessian_of(model, weighted_loss(lambda m, b: m.loss(m(b[0]), b[1]), batches),
                           ["lm_head.weight"]).diagonal()
    # 1e-6 as the other exact-vs-dense checks: the reference's math attention kernel and the default one differ at ~1e-8
    assert float((head - reference).abs().max()) <= 1e-6 * float(reference.abs().max())


def test_exact_diagonal_of_deeper_chain_with_other_activations():
    """Five Linear layers (residual factors expanded after two layers), GELU and SiLU through double backward (SiLU
    has no forward-mode derivative of its backward), sigmoid, MSE."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 7), nn.GELU(), nn.Linear(7, 6), nn.Sigmoid(), nn.Linear(6, 5), nn.Tanh(),
                          nn.Flatten(), nn.Linear(5, 4), nn.SiLU(), nn.Linear(4, 3)).double()
    batches = make_batches("mse")
    reference = dense_hessian(model, batches, "mse").diagonal()
    res = exact_diagonal(model, batches, loss="mse")
    assert float((res.diagonal - reference).abs().max()) <= 1e-6 * float(reference.abs().max())


def test_exact_diagonal_detects_lit_act_mlp_and_names_uncovered_module():
    torch.manual_seed(0)
    model = MLPClassifier(in_features=6, num_classes=3, hidden=(5, 4), activation="tanh").double().eval()
    batches = make_batches("cross_entropy")
    res = exact_diagonal(model, batches)  # loss detected from LitActModule.loss
    reference = dense_hessian(model, batches, "cross_entropy").diagonal()
    assert float((res.diagonal - reference).abs().max()) <= 1e-6 * float(reference.abs().max())
    assert trace(HessianOperator(model, None, batches), 10, method="exact").method == "exact"
    with_bn = MLPClassifier(in_features=6, num_classes=3, hidden=(5, 4), activation="tanh",
                            batch_norm=True).double().eval()
    with pytest.raises(UncoveredModuleError, match=r"'hidden\.1\.act\.0' \(BatchNorm1d\) is not covered"):
        exact_diagonal(with_bn, batches)
    partial = exact_diagonal(with_bn, batches, on_uncovered="partial")
    assert partial.covered == ["head.weight", "head.bias"]
    full = dense_hessian(with_bn, batches, "cross_entropy").diagonal()
    head = full[-(4 * 3 + 3):]
    torch.testing.assert_close(partial.diagonal[-15:], head, rtol=1e-9, atol=1e-12)
    assert torch.isnan(partial.diagonal[:-15]).all()


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh())
        self.norm = nn.LayerNorm(8)
        self.head = nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        h = self.inp(x)
        h = h + self.block(h)
        return self.head(self.norm(h))


def test_exact_trace_errors_or_falls_back_to_control_variate():
    model, batches = ResidualMLP().double(), make_batches("cross_entropy")
    op = HessianOperator(model, loss_fn_of("cross_entropy"), batches)
    with pytest.raises(UncoveredModuleError, match=r"module 'norm' \(LayerNorm\) is not covered"):
        trace(op, 30, method="exact", loss="cross_entropy", per_example=False)
    dense = dense_hessian(model, batches, "cross_entropy")
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    covered = sum(sizes[names.index("head.0.weight"):])
    exact_head = float(dense.diagonal()[-covered:].sum())
    with pytest.warns(UserWarning, match="control variate"):
        res = trace(op, 30, method="exact", on_uncovered="control_variate", loss="cross_entropy", seed=3,
                    per_example=False, estimator="hutchinson")
    assert res.method == "control_variate+hutchinson" and res.matvecs == 30
    assert math.isclose(res.exact_part, exact_head, rel_tol=1e-9)
    assert abs(res.estimate - float(dense.trace())) <= 4 * res.std_error
    assert math.isclose(res.blocks["head.2"], float(dense.diagonal()[-18:].sum()), rel_tol=1e-9)
    # the stochastic part runs on the uncovered block only: with a full budget it is exact
    full = trace(op, 2 * op.dim, method="auto", estimator="hutchpp", loss="cross_entropy", per_example=False)
    assert math.isclose(full.estimate, float(dense.trace()), rel_tol=1e-9)
    # Hutchinson restricted to the uncovered block: plain formula with the same probes
    mask = torch.isnan(exact_diagonal(model, batches, op.loss_fn, loss="cross_entropy",
                                      on_uncovered="partial").diagonal)
    z = probe_block(op, 7, make_generator(5)) * mask[:, None]
    samples = (z * (dense @ z)).sum(0)
    assert math.isclose(hutchinson(op, 7, seed=5, mask=mask).estimate, float(samples.mean()), rel_tol=1e-9)


def test_per_block_traces_from_one_pass():
    model, batches = make_mlp("tanh"), make_batches("cross_entropy")
    dense = dense_hessian(model, batches, "cross_entropy")
    op = HessianOperator(model, loss_fn_of("cross_entropy"), batches)
    res = hutchpp(op, 2 * op.dim)
    bounds = {"0": (0, 63), "2": (63, 133), "5": (133, 157)}
    for name, (lo, hi) in bounds.items():
        assert math.isclose(res.blocks[name], float(dense.diagonal()[lo:hi].sum()), rel_tol=1e-7)
    approx = hutchinson(op, 40, seed=1)
    assert math.isclose(sum(approx.blocks.values()), approx.estimate, rel_tol=1e-9)


def test_xtrace_matches_leave_one_out_definition_and_is_exact_on_full_space():
    model, batches = make_mlp("tanh"), make_batches("cross_entropy")
    dense = dense_hessian(model, batches, "cross_entropy")
    op = HessianOperator(model, loss_fn_of("cross_entropy"), batches)
    res = xtrace(op, 12, seed=4)
    assert res.matvecs == 12 and res.std_error > 0
    omega = probe_block(op, 6, make_generator(4))
    estimates = []
    for i in range(6):  # Epperly, Tropp & Webber, Alg. 1.2, written out: basis from the other five probes
        others = torch.cat([omega[:, :i], omega[:, i + 1:]], dim=1)
        q, _ = torch.linalg.qr(dense @ others)
        w = omega[:, i] - q @ (q.T @ omega[:, i])
        estimates.append(float(torch.trace(q.T @ dense @ q) + w @ dense @ w))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    assert math.isclose(res.estimate, float(estimates.mean()), rel_tol=1e-8)
    assert math.isclose(res.std_error, float(estimates.std() / math.sqrt(6)), rel_tol=1e-6)
    assert math.isclose(xtrace(op, 2 * op.dim).estimate, float(dense.trace()), rel_tol=1e-6)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_fisher_and_empirical_fisher_operators_match_dense(loss):
    model, batches = make_mlp("tanh"), make_batches(loss)
    ggn, emp = dense_ggn(model, batches, loss), dense_empirical_fisher(model, batches, loss)
    eye = torch.eye(ggn.shape[0], dtype=torch.float64)
    for curvature, reference in (("ggn", ggn), ("fisher", ggn), ("empirical_fisher", emp)):
        op = curvature_operator(model, loss_fn_of(loss), batches, curvature=curvature, loss=loss)
        assert isinstance(op, GGNOperator)
        torch.testing.assert_close(op.matmat(eye), reference, rtol=1e-9, atol=1e-12)
        top = lanczos(op, k=2)
        torch.testing.assert_close(top.eigenvalues, torch.linalg.eigvalsh(reference).flip(0)[:2], rtol=1e-4, atol=0)
    torch.testing.assert_close(empirical_fisher_diagonal(model, batches, loss=loss), emp.diagonal(), rtol=1e-9,
                               atol=1e-12)
    op = GGNOperator(model, loss_fn_of(loss), batches, curvature="ggn", loss=loss)
    assert trace(op, 10, method="exact").estimate == pytest.approx(float(ggn.trace()), rel=1e-9)


def test_unknown_loss_and_mismatched_loss_fn_raise():
    model, batches = make_mlp("relu"), make_batches("cross_entropy")
    with pytest.raises(ValueError, match=r"supported losses \['cross_entropy', 'mse'\]"):
        GGNOperator(model, loss_fn_of("cross_entropy"), batches, curvature="ggn")
    with pytest.raises(ValueError, match=r"unknown output loss 'hinge'; supported losses"):
        curvature_operator(model, loss_fn_of("cross_entropy"), batches, curvature="ggn", loss="hinge")
    with pytest.raises(ValueError, match=r"unknown curvature 'kfac'; valid: \['hessian', 'ggn', 'fisher'"):
        curvature_operator(model, None, batches, curvature="kfac")
    doubled = lambda m, b: 2 * F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    with pytest.raises(ValueError, match="differs from cross_entropy"):
        exact_diagonal(model, batches, doubled, loss="cross_entropy")
    with pytest.raises(ValueError, match="unknown on_uncovered"):
        exact_diagonal(model, batches, loss="cross_entropy", on_uncovered="ignore")


def tiny_lm():
    torch.manual_seed(0)
    return TransformerLM(vocab_size=5, block_size=4, d_model=4, n_layer=1, n_head=2, d_ff=6).double().eval()


@pytest.mark.parametrize("backend", ["cached", "forward", "reverse"])
def test_transformer_sdpa_hessian_matches_dense(backend):
    """SDPA attention: the fused CPU kernel has no double backward; the operator switches to the math kernel."""
    model, batches = tiny_lm(), lm_batches()
    dense = dense_hessian(model, batches, "cross_entropy")
    op = HessianOperator(model, loss_fn_of("cross_entropy"), batches, backend=backend)  # module.loss casts to fp32
    v = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matmat(v), dense @ v, rtol=1e-8, atol=1e-10)
    assert op.backend == backend  # no fallback was needed


def test_transformer_ggn_and_control_variate_trace():
    model, batches = tiny_lm(), lm_batches()
    ggn = dense_ggn(model, batches, "cross_entropy")
    op = GGNOperator(model, None, batches, curvature="ggn")  # loss detected from LitActModule.loss
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.matvec(v), ggn @ v, rtol=1e-8, atol=1e-10)
    dense = dense_hessian(model, batches, "cross_entropy")
    hessian = HessianOperator(model, loss_fn_of("cross_entropy"), batches)
    res = trace(hessian, 2 * op.dim, method="auto", estimator="hutchpp", loss="cross_entropy")  # the tail exact
    assert res.method == "control_variate+hutchpp"
    tail = ("blocks.0.mlp.", "ln_f.", "lm_head.")
    covered = torch.cat([torch.full((p.numel(),), n.startswith(tail)) for n, p in model.named_parameters()])
    assert math.isclose(res.exact_part, float(dense.diagonal()[covered].sum()), rel_tol=1e-8)
    assert math.isclose(res.estimate, float(dense.trace()), rel_tol=1e-8)


class EncoderClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(dim=1))


def test_transformer_encoder_layer_hessian_and_ggn_match_dense():
    model = EncoderClassifier().double().eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen))]
    dense, ggn = dense_hessian(model, batches, "cross_entropy"), dense_ggn(model, batches, "cross_entropy")
    v = torch.randn(dense.shape[0], 2, dtype=torch.float64, generator=gen)
    for backend in ("cached", "forward"):
        op = HessianOperator(model, loss_fn_of("cross_entropy"), batches, backend=backend)
        torch.testing.assert_close(op.matmat(v), dense @ v, rtol=1e-8, atol=1e-10)
    op = GGNOperator(model, loss_fn_of("cross_entropy"), batches, loss="cross_entropy")
    torch.testing.assert_close(op.matmat(v), ggn @ v, rtol=1e-8, atol=1e-10)
