"""Sparsing Law: neuron output norms, CETT, per-layer threshold bisection, PPL-p% sparsity."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_act.models import MLPClassifier, TransformerLM
from lit_act.stats.sparsing_law import (
    CETTSparsityMetric,
    cett,
    cett_threshold,
    down_projections_for,
    find_down_projection,
    neuron_output_norm,
    ppl_p_sparsity,
)


def _plain_cett(a, w, b, eps):
    """Eq. 2 written token by token."""
    values = []
    for token in a:
        full = w @ token + (b if b is not None else 0)
        tail = sum((token[i] * w[:, i] for i in range(len(token)) if abs(token[i]) * w[:, i].norm() < eps),
                   torch.zeros(w.shape[0]))
        values.append(tail.norm() / full.norm())
    return torch.stack(values)


def test_neuron_output_norm_and_cett_match_plain_formula():
    a, w, b = torch.randn(6, 5), torch.randn(3, 5), torch.randn(3)
    norms = neuron_output_norm(a, w)
    assert torch.allclose(norms[2, 4], a[2, 4].abs() * w[:, 4].norm())
    for eps in (0.0, 0.5, 1.5, 100.0):
        assert torch.allclose(cett(a, w, b, eps), _plain_cett(a, w, b, eps), atol=1e-6)


def test_threshold_is_largest_eps_meeting_target():
    a, w = torch.randn(40, 16), torch.randn(8, 16)
    eps = cett_threshold(a, w, None, 0.2)
    assert cett(a, w, None, eps).mean() <= 0.2
    # next candidate neuron norm above eps pushes the mean CETT above the target
    norms = neuron_output_norm(a, w).flatten().sort().values
    above = norms[norms > eps][0]
    assert cett(a, w, None, above + 1e-6).mean() > 0.2


def test_metric_averages_batches():
    w, b = torch.randn(4, 10), torch.randn(4)
    batches = [torch.randn(12, 10), torch.randn(9, 10)]
    metric = CETTSparsityMetric(0.3)
    for a in batches:
        metric.update(a, w, b)
    eps = [cett_threshold(a, w, b, 0.3) for a in batches]
    ratio = [(neuron_output_norm(a, w) >= e).float().mean() for a, e in zip(batches, eps, strict=True)]
    out = metric.compute()
    assert out["cett_threshold"].item() == pytest.approx(float(sum(eps) / 2), rel=1e-5)
    assert out["cett_activation_ratio"].item() == pytest.approx(float(sum(ratio) / 2), rel=1e-5)
    assert out["cett"].item() <= 0.3


def test_metric_token_cap_uses_strided_subsample():
    w, a = torch.randn(4, 10), torch.randn(50, 10)
    metric = CETTSparsityMetric(0.3, max_tokens=16)
    metric.update(a, w, None)
    sub = a[::4]  # ceil(50 / 16) = 4 -> 13 tokens
    assert metric.compute()["cett_threshold"].item() == pytest.approx(cett_threshold(sub, w, None, 0.3).item(),
                                                                      rel=1e-5)
    with pytest.raises(ValueError, match="max_tokens"):
        CETTSparsityMetric(0.3, max_tokens=0)


def test_metric_excludes_nonfinite_tokens():
    w = torch.randn(4, 6)
    a = torch.randn(5, 6)
    bad = a.clone()
    bad[1, 2] = float("nan")
    metric = CETTSparsityMetric(0.2)
    metric.update(bad, w, None)
    expected = cett_threshold(a[[0, 2, 3, 4]], w, None, 0.2)
    out = metric.compute()
    assert out["nonfinite"].item() == 1
    assert out["cett_threshold"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_down_projection_found_or_explicit_or_error():
    lm = TransformerLM(128, 16, d_model=32, n_layer=2, n_head=2)
    assert find_down_projection(lm, "blocks.1.mlp.act") is lm.blocks[1].mlp.fc_out
    mlp = MLPClassifier(in_features=4, num_classes=3, hidden=(8,))
    act = next(n for n, _ in mlp.named_modules() if n.endswith(".act"))
    with pytest.raises(ValueError, match="down_projections="):
        find_down_projection(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), "1")  # nothing after the activation
    assert down_projections_for(mlp, [act], {act: "head"})[act] is mlp.head
    with pytest.raises(ValueError, match="not an nn.Linear"):
        down_projections_for(mlp, [act], {act: act})
    with pytest.raises(ValueError, match=r"CETT target must lie in \(0, 1\)"):
        CETTSparsityMetric(1.5)


class _FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(6, 24)
        self.act = nn.ReLU()
        self.fc_out = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


def _sparse_loss(model, data, c):
    """Independent re-computation: mask each batch's activations at its CETT-c threshold."""
    total, count = 0.0, 0
    for x, y in data:
        a = model.act(model.fc_in(x))
        w, b = model.fc_out.weight, model.fc_out.bias
        keep = neuron_output_norm(a, w) >= cett_threshold(a, w, b, c)
        total += F.cross_entropy(model.fc_out(a * keep), y).item() * y.numel()
        count += y.numel()
    return total / count


def test_ppl_p_sparsity_meets_budget_and_matches_recomputation():
    torch.manual_seed(0)
    model = _FFN()
    data = [(torch.randn(32, 6), torch.randint(0, 5, (32,))) for _ in range(3)]
    model.train()
    result = ppl_p_sparsity(model, data, p=0.01)
    assert model.training  # flag restored
    dense = sum(F.cross_entropy(model(x), y).item() * 32 for x, y in data) / 96
    assert result.ppl_dense == pytest.approx(math.exp(dense), rel=1e-5)
    assert result.ppl_sparse <= result.ppl_dense * 1.01 + 1e-9
    assert 0 < result.cett < 1
    with torch.no_grad():
        assert result.ppl_sparse == pytest.approx(math.exp(_sparse_loss(model, data, result.cett)), rel=1e-5)
        a = torch.cat([model.act(model.fc_in(x)) for x, _ in data])
    # a looser budget can only allow more sparsity
    assert ppl_p_sparsity(model, data, p=0.5).sparsity >= result.sparsity
    assert 0 < result.activation_ratio["act"] <= (a > 0).float().mean().item() + 1e-6
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    with pytest.raises(ValueError, match="p must be"):
        ppl_p_sparsity(model, data, p=0)


def test_down_projection_found_across_parents_of_reference_mlp():
    """MLPClassifier splits Linear -> act -> Linear over hidden.N and hidden.N+1 / head; conv activations have none."""
    from lit_act.models import CNNClassifier, MLPClassifier

    mlp = MLPClassifier(64, 10, hidden=(32, 16))
    assert find_down_projection(mlp, "hidden.0.act") is mlp.hidden[1].linear
    assert find_down_projection(mlp, "hidden.1.act") is mlp.head
    with pytest.raises(ValueError, match="down_projections="):
        find_down_projection(CNNClassifier(1, 10), "features.1.act")
