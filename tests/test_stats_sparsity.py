"""ActivationSparsityMetric against a plain count."""

import pytest
import torch

from lit_act.stats.sparsity import ActivationSparsityMetric


def test_exact_zero_sparsity_and_token_ratios_on_known_tensor():
    a = torch.tensor([[0.0, 1.0, 0.0, -2.0],
                      [0.0, 0.0, 0.0, 3.0],
                      [5.0, 1.0, 2.0, 1.0]])
    metric = ActivationSparsityMetric()
    metric.update(a[:2])
    metric.update(a[2:])
    out = metric.compute()
    assert out["sparsity"].item() == pytest.approx(5 / 12)
    ratios = [2 / 4, 1 / 4, 4 / 4]
    assert out["token_activation_ratio"].item() == pytest.approx(sum(ratios) / 3)
    assert out["token_activation_ratio_min"].item() == pytest.approx(0.25)
    assert out["token_activation_ratio_max"].item() == pytest.approx(1.0)
    assert out["nonfinite"].item() == 0


def test_threshold_matches_direct_computation_random():
    a = torch.randn(50, 17)
    metric = ActivationSparsityMetric(threshold=0.3)
    for chunk in a.split(7):
        metric.update(chunk)
    expected = (a.abs() <= 0.3).float().mean().item()
    per_token = (a.abs() > 0.3).float().mean(dim=1)
    out = metric.compute()
    assert out["sparsity"].item() == pytest.approx(expected)
    assert out["token_activation_ratio"].item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    assert out["token_activation_ratio_min"].item() == pytest.approx(per_token.min().item())


def test_nonfinite_counted_and_excluded_and_bf16_accumulates_in_fp32():
    a = torch.tensor([[0.0, float("nan"), 2.0], [float("inf"), 0.0, 0.0]])
    metric = ActivationSparsityMetric()
    metric.update(a.to(torch.bfloat16))
    out = metric.compute()
    assert out["nonfinite"].item() == 2
    assert out["sparsity"].item() == pytest.approx(3 / 4)  # finite entries: 0, 2, 0, 0
    assert out["token_activation_ratio"].item() == pytest.approx((1 / 2 + 0 / 2) / 2)


def test_bad_threshold_raises():
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        ActivationSparsityMetric(threshold=-1)


def test_signed_mode_counts_negative_lobe_as_inactive():
    torch.manual_seed(0)
    a = torch.nn.functional.gelu(torch.randn(64, 10))
    for tau in (0.0, 0.05, -0.1):
        metric = ActivationSparsityMetric(threshold=tau, mode="signed")
        metric.update(a)
        out = metric.compute()
        assert out["sparsity"].item() == pytest.approx((a <= tau).float().mean().item())
        assert out["token_activation_ratio"].item() == pytest.approx((a > tau).float().mean(dim=1).mean().item(),
                                                                    rel=1e-6)
    exact_zeros = ActivationSparsityMetric()  # abs, tau = 0: GELU has (almost) no exact zeros
    exact_zeros.update(a)
    assert exact_zeros.compute()["sparsity"].item() == pytest.approx((a == 0).float().mean().item())


def test_relu_modes_agree_and_nonfinite_layer_is_nan():
    a = torch.relu(torch.randn(30, 7))
    outs = []
    for mode in ("abs", "signed"):
        metric = ActivationSparsityMetric(mode=mode)
        metric.update(a)
        outs.append(metric.compute()["sparsity"].item())
    assert outs[0] == outs[1] == pytest.approx((a == 0).float().mean().item())
    metric = ActivationSparsityMetric()
    metric.update(torch.full((3, 4), float("inf")))
    out = metric.compute()
    assert out["nonfinite"].item() == 12
    assert all(torch.isnan(v) for k, v in out.items() if k != "nonfinite")


def test_bad_mode_lists_valid_values():
    with pytest.raises(ValueError, match=r"mode must be one of \['abs', 'signed'\]"):
        ActivationSparsityMetric(mode="relu")
    ActivationSparsityMetric(threshold=-0.5, mode="signed")  # a negative threshold is valid in signed mode
