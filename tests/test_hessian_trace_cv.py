"""Per-example exact diagonals, the exact GGN diagonal and the control-variate trace estimators against dense
autograd matrices (``torch.autograd.functional.hessian`` / ``jacobian``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_act.hessian import GGNOperator, HessianOperator, trace
from lit_act.hessian.example_diagonal import example_diagonal
from lit_act.hessian.ggn_diagonal import ggn_control_variate, ggn_diagonal
from lit_act.hessian.trace import interleaved
from tests.dense import dense_ggn, dense_hessian, lm_batches, loss_fn_of, make_batches
from tests.test_hessian_curvature import EncoderClassifier, tiny_lm


class ResidualLN(nn.Module):
    """Two residual blocks ``h + tanh(W LN(h))``, a final LayerNorm and a head: no sequential chain reaches past the
    head, every parameter is a Linear or LayerNorm one."""

    def __init__(self, outputs=3):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 6)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6), nn.Tanh()) for _ in range(2))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, outputs)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def residual_model():
    model = ResidualLN().double().eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
    return model


def flat(values, model):
    return torch.cat([values[n].reshape(-1) for n, _ in model.named_parameters()])


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_example_diagonal_matches_dense_hessian_and_ggn_on_residual_layernorm_mlp(loss):
    model, batches = residual_model(), make_batches(loss, (7, 5), seed=3, shape=(5,))
    dense = {"hessian": dense_hessian(model, batches, loss), "ggn": dense_ggn(model, batches, loss)}
    for curvature, matrix in dense.items():
        res = example_diagonal(model, batches, loss, curvature=curvature, chunk=4)  # chunked directions
        assert res.reason is None and len(res.modules) == 7 and res.directions == 2 * (6 * 6 + 3)
        torch.testing.assert_close(flat(res.values, model), matrix.diagonal(), rtol=1e-9, atol=1e-12)
    # the whole trace is exact: chain rule for the head, per-example rule for the rest
    op = HessianOperator(model, loss_fn_of(loss), batches)
    res = trace(op, 10, method="exact", loss=loss)
    assert res.method == "exact" and res.matvecs == 0 and res.std_error == 0
    assert math.isclose(res.estimate, float(dense["hessian"].trace()), rel_tol=1e-9)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    start = sum(sizes[n] for n in list(sizes)[:list(sizes).index("norm.weight")])
    assert math.isclose(res.blocks["norm"], float(dense["hessian"].diagonal()[start:start + 12].sum()), rel_tol=1e-9)
    ggn = GGNOperator(model, loss_fn_of(loss), batches, loss=loss)
    assert math.isclose(trace(ggn, 10, method="exact").estimate, float(dense["ggn"].trace()), rel_tol=1e-9)


@pytest.mark.parametrize("case", ["residual_mse", "encoder", "lm"])
def test_ggn_diagonal_matches_dense_ggn(case):
    if case == "residual_mse":
        model, batches, loss = residual_model(), make_batches("mse", (7, 5), seed=3, shape=(5,)), "mse"
    elif case == "encoder":  # nn.TransformerEncoderLayer: attention, LayerNorm, residuals
        model, loss = EncoderClassifier().double().eval(), "cross_entropy"
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randn(4, 3, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))]
    else:  # several output rows per example (every position of a sequence)
        model, batches, loss = tiny_lm(), lm_batches(), "cross_entropy"
    expected = dense_ggn(model, batches, loss).diagonal()
    torch.testing.assert_close(ggn_diagonal(model, batches, loss), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ggn_diagonal(model, batches, loss, max_elements=1), expected, rtol=1e-9, atol=1e-12)
    # chunks of 7 columns' gradients: the LM's rows x K columns split unevenly, the others 2 examples per chunk
    dim = sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(ggn_diagonal(model, batches, loss, max_elements=7 * dim), expected, rtol=1e-9,
                               atol=1e-12)


def test_ggn_diagonal_reduces_over_processes():
    """Two simulated DDP ranks with batches of 7 and 5 examples: rank B's reduced tensors are recorded, rank A's
    ``all_reduce`` adds them; A must return the dense GGN diagonal over both ranks' examples."""
    model = residual_model()
    batch_a, batch_b = make_batches("mse", (7, 5), seed=3, shape=(5,))
    sent = []
    ggn_diagonal(model, [batch_b], "mse", all_reduce=lambda t: sent.append(t.clone()) or t)
    reduced = ggn_diagonal(model, [batch_a], "mse", all_reduce=lambda t: t + sent.pop(0))
    assert not sent  # the same reductions, in the same order, on both ranks
    expected = dense_ggn(model, [batch_a, batch_b], "mse").diagonal()
    torch.testing.assert_close(reduced, expected, rtol=1e-9, atol=1e-12)


def test_interleaved_estimator_reproduces_the_dense_block_quadratic_forms():
    """Module i (parameter order) joins group i mod 3; each round's sample is sum_g z_g^T H_gg z_g, here from the dense
    Hessian's blocks with the probes drawn in the estimator's order (one Rademacher vector per group, in order)."""
    model, batches = tiny_lm(), lm_batches()
    dense = dense_hessian(model, batches, "cross_entropy")
    op = HessianOperator(model, loss_fn_of("cross_entropy"), batches)
    res = interleaved(op, 13, seed=5, groups=3)  # 4 rounds of 3 group products
    assert res.matvecs == 12 and res.method == "interleaved"
    index, offset = {}, 0
    for name, p in model.named_parameters():
        index.setdefault(name.rpartition(".")[0], []).extend(range(offset, offset + p.numel()))
        offset += p.numel()
    modules = list(index)
    groups = [[i for m in modules[g::3] for i in index[m]] for g in range(3)]
    gen = torch.Generator().manual_seed(5)
    samples = []
    for _ in range(4):
        total = 0.0
        for idx in groups:
            z = torch.randint(0, 2, (len(idx),), generator=gen, dtype=torch.float32).mul_(2).sub_(1).double()
            total += float(z @ dense[idx][:, idx] @ z)
        samples.append(total)
    samples = torch.tensor(samples, dtype=torch.float64)
    assert math.isclose(res.estimate, float(samples.mean()), rel_tol=1e-9)
    assert math.isclose(res.std_error, float(samples.std() / 2), rel_tol=1e-9)
    assert math.isclose(sum(res.blocks.values()), res.estimate, rel_tol=1e-9) and list(res.blocks) == modules
    assert interleaved(op, 5, groups=3).matvecs == 4  # too few for 2 rounds of 3 groups: 2 rounds of 2
    with pytest.raises(ValueError, match="at least 2 group products"):
        interleaved(op, 1)
    with pytest.raises(ValueError, match="Hessian block products"):
        interleaved(GGNOperator(model, None, batches, curvature="ggn"), 12)


def test_interleaved_control_variate_on_a_transformer_lm_is_unbiased():
    """trace(method="auto") on a tiny TransformerLM: the LM head exact, the interleaved estimator on the rest; the
    mean over seeds within 4 reported standard errors of the dense trace."""
    model, batches = tiny_lm(), lm_batches()
    exact = float(dense_hessian(model, batches, "cross_entropy").trace())
    op = HessianOperator(model, loss_fn_of("cross_entropy"), batches)
    results = [trace(op, 8, method="auto", seed=s, loss="cross_entropy") for s in range(10)]
    assert {r.method for r in results} == {"control_variate+interleaved"}
    mean = sum(r.estimate for r in results) / len(results)
    se = math.sqrt(sum(r.std_error ** 2 for r in results)) / len(results)
    assert se > 0 and abs(mean - exact) <= 4 * se


def test_control_variate_estimators_are_unbiased():
    """Mean over fixed seeds within 4 standard errors (from the estimators' own reported errors) of the dense trace."""
    model = EncoderClassifier().double().eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 3, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))]
    dense = dense_hessian(model, batches, "cross_entropy")
    exact = float(dense.trace())
    op = HessianOperator(model, loss_fn_of("cross_entropy"), batches)
    seeds = range(12)
    auto = [trace(op, 8, method="auto", seed=s, loss="cross_entropy") for s in seeds]
    assert {r.method for r in auto} == {"control_variate+interleaved"}
    head = model.head.weight.numel() + model.head.bias.numel()
    assert math.isclose(auto[0].exact_part, float(dense.diagonal()[-head:].sum()), rel_tol=1e-9)
    cv = [ggn_control_variate(op, 8, "cross_entropy", seed=s) for s in seeds]
    ggn = dense_ggn(model, batches, "cross_entropy")
    assert math.isclose(cv[0].exact_part, float(ggn.trace()), rel_tol=1e-9)
    for results in (auto, cv):
        mean = sum(r.estimate for r in results) / len(results)
        se = math.sqrt(sum(r.std_error ** 2 for r in results)) / len(results)
        assert se > 0 and abs(mean - exact) <= 4 * se


def test_per_example_rule_skips_interacting_examples_and_sequences():
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double().train()
    res = example_diagonal(bn, make_batches("cross_entropy", (7, 5), seed=3, shape=(5,)), "cross_entropy")
    assert res.values == {} and "interact" in res.reason
    res = example_diagonal(tiny_lm(), lm_batches(), "cross_entropy")
    assert res.values == {} and "'tok_emb' (Embedding) has no per-example rule" in res.reason
    res = example_diagonal(tiny_lm(), lm_batches(), "cross_entropy", params=["lm_head.weight"])
    assert res.values == {} and "sequence inputs are not covered" in res.reason


def test_bad_input_errors():
    model, batches = residual_model(), make_batches("cross_entropy", (7, 5), seed=3, shape=(5,))
    with pytest.raises(ValueError, match=r"unknown curvature 'fisher'.*\['hessian', 'ggn'\]"):
        example_diagonal(model, batches, "cross_entropy", curvature="fisher")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        example_diagonal(model, batches, "cross_entropy", chunk=0)
    with pytest.raises(ValueError, match="empty batch list"):
        example_diagonal(model, [], "cross_entropy")
    with pytest.raises(ValueError, match=r"unknown output loss 'nll'.*\['cross_entropy', 'mse'\]"):
        ggn_diagonal(model, batches, "nll")
    with pytest.raises(ValueError, match="max_elements must be >= 1"):
        ggn_diagonal(model, batches, "cross_entropy", max_elements=0)
    op = HessianOperator(model, loss_fn_of("cross_entropy"), batches)
    with pytest.raises(ValueError, match="budget must be >= 2"):
        ggn_control_variate(op, 1, "cross_entropy")
    with pytest.raises(ValueError, match="estimates the Hessian's trace"):
        ggn_control_variate(GGNOperator(model, None, batches, loss="cross_entropy"), 4, "cross_entropy")


class _Double(torch.autograd.Function):
    """No forward-mode derivative and no functorch support: the per-example rule cannot run through it."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class _DoubleModule(nn.Module):
    def forward(self, x):
        return _Double.apply(x)


def test_per_example_rule_failure_falls_back_to_the_estimator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), _DoubleModule(), nn.Linear(4, 3)).double().eval()
    batches = make_batches("cross_entropy", (7, 5), seed=3, shape=(5,))
    op = HessianOperator(model, loss_fn_of("cross_entropy"), batches)
    with pytest.warns(UserWarning, match="per-example diagonal rule failed"):
        res = trace(op, 6, method="auto", loss="cross_entropy")
    assert res.method == "control_variate+interleaved" and res.matvecs == 6  # one uncovered module: 6 rounds
    assert math.isclose(res.exact_part, float(dense_hessian(model, batches, "cross_entropy").diagonal()[-15:].sum()),
                        rel_tol=1e-9)
