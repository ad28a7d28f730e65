"""Sparsing Law: neuron output norms, CETT, per-layer threshold bisection, PPL-p% sparsity."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_act.models import MLPClassifier, TransformerLM
from lit_act.stats.sparsing_law import (
    CETTSparsityMetric,
    calibrate_thresholds,
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


def _brute_force_threshold(a, w, b, target):
    """Every observed norm (and +inf) as a candidate: the largest eps whose mean CETT is within target."""
    candidates = sorted({float(v) for v in neuron_output_norm(a, w).flatten()}) + [math.inf]
    means = [cett(a, w, b, c).mean().item() for c in candidates]
    best = max(c for c, m in zip(candidates, means, strict=True) if m <= target)
    return best, candidates, means


def _with_outlier_neurons(seed, tokens=24, neurons=20, width=6):
    torch.manual_seed(seed)
    a = torch.relu(torch.randn(tokens, neurons))
    w = torch.rand(width, neurons) * 0.1  # non-negative contributions: mean CETT monotone in eps
    w[:, 3] *= 2000.0  # one neuron's output norm ~2000x the others, as MiniLM layer 0 (195 vs 0.09)
    w[:, 11] *= 50.0
    return a, w


@pytest.mark.parametrize("target", [0.05, 0.2, 0.5])
def test_threshold_is_exact_largest_eps_with_outlier_neurons(target):
    a, w = _with_outlier_neurons(0)
    b = torch.rand(6) * 0.01
    best, candidates, means = _brute_force_threshold(a, w, b, target)
    assert means == sorted(means)  # the fixture is monotone, so the largest eps is well defined
    eps = cett_threshold(a, w, b, target)
    assert eps.item() == pytest.approx(best, rel=1e-6)
    achieved = cett(a, w, b, eps).mean().item()
    assert achieved <= target
    following = candidates[candidates.index(best) + 1]
    assert cett(a, w, b, following).mean().item() > target
    # the former 16 halvings of [0, max n] stop far from it: max n is dominated by the outlier neuron
    norms = neuron_output_norm(a, w)
    lo, hi = 0.0, norms.max().item() * (1 + 1e-6)
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cett(a, w, b, mid).mean().item() <= target else (lo, mid)
    assert lo <= best


def test_threshold_on_signed_random_data_is_a_crossing():
    a, w = torch.randn(40, 16), torch.randn(8, 16)
    eps = cett_threshold(a, w, None, 0.2)
    assert cett(a, w, None, eps).mean() <= 0.2
    norms = neuron_output_norm(a, w).flatten().sort().values
    above = norms[norms > eps][0]
    assert cett(a, w, None, above + 1e-6).mean() > 0.2


def test_calibrate_once_then_apply():
    a, w = _with_outlier_neurons(1, tokens=30)
    down = nn.Linear(20, 6)
    with torch.no_grad():
        down.weight.copy_(w)
    calibration, batches = a[:12], [a[12:20], a[20:]]
    eps = calibrate_thresholds({"act": calibration}, {"act": down}, 0.2)["act"]
    assert eps.item() == pytest.approx(cett_threshold(calibration, w, down.bias.detach(), 0.2).item())
    metric = CETTSparsityMetric(0.2, threshold=eps)
    for x in batches:
        metric.update(x, down.weight, down.bias)
    out = metric.compute()
    rest = torch.cat(batches)
    assert out["cett_threshold"].item() == pytest.approx(eps.item())
    kept = (neuron_output_norm(rest, w) >= eps).float().mean().item()
    assert out["cett_activation_ratio"].item() == pytest.approx(kept, rel=1e-6)
    assert out["cett"].item() == pytest.approx(cett(rest, w, down.bias.detach(), eps).mean().item(), rel=1e-5)
    # passing the down-projection output saves a matmul and gives the same CETT
    with_out = CETTSparsityMetric(0.2, threshold=eps)
    for x in batches:
        with_out.update(x, down.weight, down.bias, ffn_out=down(x).detach())
    assert with_out.compute()["cett"].item() == pytest.approx(out["cett"].item(), rel=1e-5)
    blind = CETTSparsityMetric(0.2, threshold=eps, measure_cett=False)
    blind.update(rest, down.weight, down.bias)
    assert math.isnan(blind.compute()["cett"].item())
    assert blind.compute()["cett_activation_ratio"].item() == pytest.approx(kept, rel=1e-6)
    with pytest.raises(ValueError, match="threshold must be one number"):
        CETTSparsityMetric(0.2, threshold=-1.0)


def test_nonfinite_layer_logs_nan():
    w = torch.randn(3, 4)
    for metric in (CETTSparsityMetric(0.2), CETTSparsityMetric(0.2, threshold=0.5)):
        metric.update(torch.full((5, 4), float("nan")), w, None)
        out = metric.compute()
        assert out["nonfinite"].item() == 20
        assert all(math.isnan(out[k].item()) for k in ("cett_threshold", "cett", "cett_activation_ratio"))


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
    """Independent re-computation: thresholds from the batch's dense activations, applied in the sparse pass."""
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
    assert result.ppl_ratio < 1.01
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


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act1, self.out1 = nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 6)
        self.fc2, self.act2, self.out2 = nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 5)

    def forward(self, x):
        return self.out2(self.act2(self.fc2(x + self.out1(self.act1(self.fc1(x))))))


def _reference_inspect(model, data, c):
    """inspect_sparsity.inspect_model + calc_thresholds_given_cett, written plainly for two layers: per batch a dense
    pass gives each layer's threshold (exact largest eps, every norm a candidate), the sparse pass applies them."""
    ratios, kept = [], {"act1": [0.0, 0], "act2": [0.0, 0]}
    for x, y in data:
        h1 = model.act1(model.fc1(x))
        r = x + model.out1(h1)
        h2 = model.act2(model.fc2(r))
        dense = F.cross_entropy(model.out2(h2), y).item()
        eps1 = _brute_force_threshold(h1, model.out1.weight, model.out1.bias, c)[0]
        eps2 = _brute_force_threshold(h2, model.out2.weight, model.out2.bias, c)[0]
        s1 = model.act1(model.fc1(x))
        m1 = neuron_output_norm(s1, model.out1.weight) >= eps1
        s2 = model.act2(model.fc2(x + model.out1(s1 * m1)))
        m2 = neuron_output_norm(s2, model.out2.weight) >= eps2
        sparse = F.cross_entropy(model.out2(s2 * m2), y).item()
        ratios.append(math.exp(sparse - dense))
        for name, m in (("act1", m1), ("act2", m2)):
            kept[name][0] += m.float().sum().item()
            kept[name][1] += m.numel()
    return sum(ratios) / len(ratios), {k: s / n for k, (s, n) in kept.items()}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ppl_p_sparsity_follows_reference_procedure_on_two_layers():
    torch.manual_seed(1)
    model = _TwoLayer()
    data = [(torch.randn(6, 6), torch.randint(0, 5, (6,))) for _ in range(2)]
    result = ppl_p_sparsity(model, data, p=0.05, modules=["act1", "act2"], steps=6)
    with torch.no_grad():
        ratio, kept = _reference_inspect(model, data, result.cett)
        assert result.ppl_ratio == pytest.approx(ratio, rel=1e-5) and ratio < 1.05
        assert result.activation_ratio == pytest.approx(kept, rel=1e-6)
        # the next CETT of the bisection grid breaks the budget (or c is the grid's last point)
        if result.cett + 2 ** -6 < 1:
            assert _reference_inspect(model, data, result.cett + 2 ** -6)[0] >= 1.05


def test_metric_moves_between_devices_in_both_modes():
    for metric in (CETTSparsityMetric(0.2), CETTSparsityMetric(0.2, threshold=0.3)):
        metric = metric.to("cpu").double().float()  # nn.Module._apply must stay intact
        metric.update(torch.rand(4, 5), torch.rand(3, 5), None)
        assert metric.compute()["cett_activation_ratio"].item() > 0
