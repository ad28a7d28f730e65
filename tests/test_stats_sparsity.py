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
