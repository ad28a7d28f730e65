"""NAC math (lit_act.stats.nac) against the paper's formulas written out plainly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_act.stats.nac import (
    LOGITS,
    NAC_ME_PARAMS,
    NAC_ME_PROBE_PARAMS,
    LayerParams,
    NACCoverage,
    NACModel,
    as_logits,
    bin_edges,
    logit_products,
    nac_me,
    nac_me_params,
    neuron_products,
    neuron_states,
    resolve_alpha,
)
from lit_act.stats.tap import select_modules


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 4)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).flatten(1))


def kl_u_softmax(logits: torch.Tensor) -> torch.Tensor:
    """KL(u || softmax(logits)) = sum_c u_c (log u_c - log p_c), written out."""
    c = logits.shape[-1]
    p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    return (1.0 / c * (math.log(1.0 / c) - torch.log(p))).sum(-1)


def test_mlp_states_equal_explicit_gradient() -> None:
    torch.manual_seed(0)
    model = TinyMLP().double()
    x = torch.randn(6, 5, dtype=torch.float64)
    out = neuron_products(model, x, {"act": model.act})
    # explicit: z = tanh(W1 x + b1), dKL/dlogits = softmax - u, dKL/dz = W2^T (softmax - u)
    z = torch.tanh(x @ model.fc1.weight.T + model.fc1.bias)
    logits = z @ model.fc2.weight.T + model.fc2.bias
    g = (torch.softmax(logits, -1) - 1.0 / 3) @ model.fc2.weight
    torch.testing.assert_close(out.products["act"], (z * g).float(), rtol=1e-5, atol=1e-7)
    alpha = 7.0
    expected = 1.0 / (1.0 + torch.exp(-alpha * z * g))
    torch.testing.assert_close(neuron_states(out.products["act"], alpha), expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, logits.float())


def test_conv_states_pool_z_and_gradient_separately_by_spatial_sum() -> None:
    torch.manual_seed(1)
    model = TinyCNN().double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    out = neuron_products(model, x, {"act": model.act})
    a = torch.relu(model.conv(x)).detach()
    for b in range(3):
        # per-sample gradient of the paper's KL with torch.autograd.functional on the head alone
        grad = torch.autograd.functional.jacobian(
            lambda h, b=b: kl_u_softmax(model.head(h.flatten().unsqueeze(0)))[0], a[b])
        expected = a[b].sum((1, 2)) * grad.sum((1, 2))  # sum-pool z and g over H x W, then multiply
        torch.testing.assert_close(out.products["act"][b], expected.float(), rtol=1e-5, atol=1e-7)


def test_no_grad_flag_or_running_stat_is_touched() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    model.train()
    model[3].weight.grad = torch.ones_like(model[3].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    neuron_products(model, torch.randn(8, 5), select_modules(model))
    assert model.training and all(m.training for m in model.modules())
    assert model[0].weight.grad is None and model[1].weight.grad is None
    torch.testing.assert_close(model[3].weight.grad, torch.ones_like(model[3].weight))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_works_under_inference_mode_and_with_frozen_parameters() -> None:
    torch.manual_seed(3)
    model = TinyMLP()
    x = torch.randn(4, 5)
    expected = neuron_products(model, x, {"act": model.act}).products["act"]
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        x_inf = x.clone()
        got = neuron_products(model, x_inf, {"act": model.act}).products["act"]
    torch.testing.assert_close(got, expected)


def test_bf16_autocast_gives_fp32_products_close_to_fp32() -> None:
    torch.manual_seed(7)
    model = TinyMLP()
    x = torch.randn(16, 5)
    expected = neuron_products(model, x, {"act": model.act}).products["act"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = neuron_products(model, x, {"act": model.act}).products["act"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.1, atol=0.02)


def _bin_of(s: float, edges: list[float]) -> int:
    for k in range(len(edges) - 1):
        if edges[k] <= s < edges[k + 1] or (k == len(edges) - 2 and s == edges[-1]):
            return k
    raise AssertionError(s)


def test_coverage_and_nac_ue_equal_plain_formula() -> None:
    torch.manual_seed(4)
    states = torch.rand(200, 3)
    states[0] = torch.tensor([0.0, 1.0, 0.5])  # both ends reachable
    edges = bin_edges(6, "symlog")
    cov = NACCoverage(3, saturation=7, edges=edges)
    cov.update(states[:120])
    cov.update(states[120:])
    e = edges.tolist()
    counts = [[0] * 3 for _ in range(6)]
    for row in states.tolist():
        for n, s in enumerate(row):
            counts[_bin_of(s, e)][n] += 1
    t = [[min(c / 7, 1.0) for c in row] for row in counts]
    neuron_cov = [sum(t[k][n] for k in range(6)) / 6 for n in range(3)]
    assert cov.counts.sum() == 600
    assert float(cov.compute()) == pytest.approx(sum(neuron_cov) / 3, rel=1e-6)
    torch.testing.assert_close(cov.neuron_coverage().float(), torch.tensor(neuron_cov))
    probe = torch.rand(5, 3)
    expected = [sum(t[_bin_of(s, e)][n] for n, s in enumerate(row)) / 3 for row in probe.tolist()]
    torch.testing.assert_close(cov.score(probe), torch.tensor(expected))


def test_nonfinite_states_are_counted_and_excluded() -> None:
    cov = NACCoverage(2, saturation=1, edges=bin_edges(4, "linear"))
    cov.update(torch.tensor([[0.1, float("nan")], [0.9, 0.3]]))
    assert cov.nonfinite.item() == 1 and cov.counts.sum().item() == 3
    assert cov.score(torch.tensor([[float("nan"), 0.3]])).item() == pytest.approx(0.5)


def test_bin_edges() -> None:
    lin = bin_edges(5, "linear")
    torch.testing.assert_close(lin, torch.linspace(0, 1, 6, dtype=torch.float64))
    sym = bin_edges(50)
    assert sym.numel() == 51 and sym[0] == 0 and sym[-1] == 1 and (sym.diff() > 0).all()
    torch.testing.assert_close(sym, 1 - sym.flip(0))  # mirrored around 0.5
    widths = sym.diff()
    assert widths[24] < widths[0] / 10  # dense around 0.5, like the reference's logspace(1e3, M)
    # the reference's left half: log_1000(linspace(1, sqrt(1000), M/2)) -- ours re-indexed to M/2 + 1 points
    torch.testing.assert_close(sym[:26], torch.log(torch.linspace(1, math.sqrt(1e3), 26, dtype=torch.float64))
                               / math.log(1e3))


def test_auto_alpha_is_gain_over_quantile() -> None:
    products = torch.tensor([[0.0, -1.0, 2.0, 4.0]])
    params = LayerParams(auto_gain=8.0, auto_quantile=0.5)
    assert resolve_alpha(params, products) == pytest.approx(8.0 / 1.5)
    assert resolve_alpha(LayerParams(alpha=3.0), products) == 3.0


def test_nac_me_counts_only_correct_samples() -> None:
    torch.manual_seed(5)
    model = TinyMLP()
    x = torch.randn(40, 5)
    logits = model(x)
    y = logits.argmax(-1).clone()
    y[:15] = (y[:15] + 1) % 3  # 15 wrong
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    products = neuron_products(model, x, {"act": model.act}).products["act"]
    # the paper's setting: sigmoid(0.1 * p) of the 25 correct samples, O = 500, M = 50 linear bins
    got = nac_me(model, batches, {"act": model.act}, params=NAC_ME_PARAMS)
    ref = NACCoverage(4, 500, bin_edges(50, "linear"))
    ref.update(torch.sigmoid(0.1 * products[15:]))
    assert got["act"] == pytest.approx(float(ref.compute()))
    assert ref.counts.sum() == 25 * 4
    assert got["mean"] == got["act"]
    # the default rule, written out: alpha = 1 / q_0.9(|p| over all 40 probe samples), M = 100 linear bins,
    # O = max(1, 2 * 40 / 100) = 1 -> coverage = mean over neurons of (#bins hit by a correct sample) / 100
    alpha = 1.0 / torch.quantile(products.abs().double().flatten(), 0.9).item()
    states = torch.sigmoid(alpha * products[15:]).tolist()
    edges = torch.linspace(0, 1, 101, dtype=torch.float64).tolist()
    hit = [{_bin_of(row[n], edges) for row in states} for n in range(4)]
    default = nac_me(model, batches, {"act": model.act})
    assert default["act"] == pytest.approx(sum(len(h) / 100 for h in hit) / 4, rel=1e-6)
    assert nac_me_params(40).saturation == 1.0 and NAC_ME_PROBE_PARAMS == nac_me_params(1000)
    assert NAC_ME_PROBE_PARAMS.saturation == 20.0 and NAC_ME_PROBE_PARAMS.bins == 100
    assert NAC_ME_PROBE_PARAMS.alpha == "auto" and NAC_ME_PROBE_PARAMS.auto_gain == 1.0
    with pytest.raises(ValueError, match="probe_samples"):
        nac_me_params(0)


def test_logits_layer_equals_hooking_the_head() -> None:
    torch.manual_seed(9)
    model = TinyMLP()
    x = torch.randn(8, 5)
    hooked = neuron_products(model, x, {"act": model.act, "fc2": model.fc2})
    nac = NACModel({"act": model.act}, logits_layer=True)
    out = nac.products(model, x)
    assert nac.layers == ["act", LOGITS]
    torch.testing.assert_close(out.products[LOGITS], hooked.products["fc2"])
    torch.testing.assert_close(logit_products(out.logits), hooked.products["fc2"])
    # logits only: no hooks needed
    only = NACModel({}, LayerParams(alpha=1.0, saturation=2, bins=10), logits_layer=True).fit(model, [(x, None)])
    expected = NACCoverage(3, 2, bin_edges(10))
    expected.update(torch.sigmoid(hooked.products["fc2"]))
    assert only.layer_coverage()[LOGITS] == pytest.approx(float(expected.compute()))
    with pytest.raises(ValueError, match="logits layer"):
        NACModel({LOGITS: model.act}, logits_layer=True)


def test_nac_model_score_is_mean_over_layers() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    mods = select_modules(model)
    nac = NACModel(mods, LayerParams(alpha=2.0, saturation=3, bins=10)).fit(model, [(torch.randn(50, 5), None)])
    x = torch.randn(7, 5)
    prods = neuron_products(model, x, mods).products
    per_layer = [nac.coverage[n].score(torch.sigmoid(2.0 * prods[n])) for n in mods]
    torch.testing.assert_close(nac.score(model, x), (per_layer[0] + per_layer[1]) / 2)


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyMLP()

    def forward(self, x):
        return {"logits": self.inner(x)}


def test_missing_logits_raise_with_a_fix_and_logits_fn_works() -> None:
    model = DictModel()
    x = torch.randn(3, 5)
    with pytest.raises(TypeError, match="logits_fn"):
        neuron_products(model, x, {"act": model.inner.act})
    out = neuron_products(model, x, {"act": model.inner.act}, logits_fn=lambda o: o["logits"])
    assert out.products["act"].shape == (3, 4)
    with pytest.raises(TypeError, match="floating-point"):
        as_logits(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        as_logits(torch.ones(3))


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": -1.0}, "alpha"), ({"alpha": "big"}, "alpha"), ({"saturation": 0}, "saturation"),
    ({"bins": 1}, "bins"), ({"spacing": "log"}, "symlog, linear"), ({"auto_quantile": 0.0}, "auto_quantile"),
])
def test_bad_parameters_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LayerParams(**kwargs)


def test_bad_model_setups_raise() -> None:
    model = TinyMLP()
    with pytest.raises(ValueError, match="exactly the modules"):
        NACModel({"act": model.act}, {"fc1": LayerParams()})
    unused = nn.ReLU()
    with pytest.raises(RuntimeError, match="did not run"):
        neuron_products(model, torch.randn(2, 5), {"act": model.act, "unused": unused})
    with pytest.raises(RuntimeError, match="not fitted"):
        NACModel({"act": model.act}).score(model, torch.randn(2, 5))
    with pytest.raises(ValueError, match="edges"):
        NACCoverage(3, 1, torch.tensor([0.0, 0.7, 0.5, 1.0]))


def test_transformer_needs_a_position_and_pools_over_tokens() -> None:
    from lit_act.models import TransformerLM

    torch.manual_seed(8)
    model = TransformerLM(vocab_size=128, block_size=8, d_model=16, n_layer=1, n_head=2)
    x = torch.randint(0, 128, (3, 8))
    act = model.blocks[0].mlp.act
    with pytest.raises(ValueError, match="pick one position"):
        neuron_products(model, x, {"act": act})
    got = neuron_products(model, x, {"act": act}, logits_fn=lambda out: out[:, -1]).products["act"]
    kept = []
    handle = act.register_forward_hook(lambda m, a, out: kept.append(out))
    model.eval()
    logits = model(x)[:, -1]
    handle.remove()
    (grad,) = torch.autograd.grad(kl_u_softmax(logits.double()).sum(), kept[0])
    torch.testing.assert_close(got, kept[0].detach().sum(1) * grad.sum(1), rtol=1e-4, atol=1e-6)
