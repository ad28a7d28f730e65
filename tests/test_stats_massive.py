"""MassiveActivationMetric against the reference recipe written plainly (per-sequence median, top-k, criterion)."""

import pytest
import torch

from lit_act.stats.massive import MassiveActivationMetric


def _plain(batches, k=3, magnitude=100.0, ratio=1000.0):
    medians, count, entries = [], 0, []
    for h in batches:
        for b in range(h.shape[0]):
            seq = h[b].abs()
            med = seq.flatten().median()
            medians.append(med)
            count += int(((seq > magnitude) & (seq >= ratio * med)).sum())
            for t in range(seq.shape[0]):
                for d in range(seq.shape[1]):
                    entries.append((float(seq[t, d]), t, d))
    entries.sort(reverse=True)
    return entries[:k], float(torch.stack(medians).mean()), count


def test_matches_plain_recipe_with_planted_massive_activations():
    torch.manual_seed(1)
    batches = [torch.randn(2, 7, 6), torch.randn(3, 7, 6)]
    batches[0][1, 4, 2] = -2500.0
    batches[1][0, 0, 5] = 900.0
    batches[1][2, 6, 1] = 150.0  # > 100 but < 1000 x median: not massive
    metric = MassiveActivationMetric()
    for h in batches:
        metric.update(h)
    out = metric.compute()
    top, median, count = _plain(batches)
    for i, (value, token, dim) in enumerate(top, start=1):
        assert out[f"top{i}"].item() == pytest.approx(value)
        assert (out[f"top{i}_token"].item(), out[f"top{i}_dim"].item()) == (token, dim)
    assert out["median"].item() == pytest.approx(median, rel=1e-6)
    assert out["ratio"].item() == pytest.approx(2500.0 / median, rel=1e-6)
    assert out["count"].item() == count == 2


def test_thresholds_configurable_and_two_d_states():
    h = torch.tensor([[1.0, 1.0, 1.0, 30.0], [2.0, 2.0, 2.0, 2.0]])
    metric = MassiveActivationMetric(k=1, magnitude=10.0, median_ratio=20.0)
    metric.update(h)
    out = metric.compute()
    assert out["count"].item() == 1
    assert out["top1"].item() == 30.0 and out["top1_token"].item() == 0 and out["top1_dim"].item() == 3
    assert out["median"].item() == pytest.approx(1.5)


def test_nonfinite_excluded():
    h = torch.ones(1, 3, 4)
    h[0, 1, 1] = float("inf")
    h[0, 2, 3] = float("nan")
    h[0, 0, 0] = 5.0
    metric = MassiveActivationMetric(k=2)
    metric.update(h)
    out = metric.compute()
    assert out["nonfinite"].item() == 2
    assert out["top1"].item() == 5.0 and out["top2"].item() == 1.0
    assert out["median"].item() == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        MassiveActivationMetric(k=0)
    with pytest.raises(ValueError, match="positive"):
        MassiveActivationMetric(magnitude=-1)
    with pytest.raises(ValueError, match="batch, ..., hidden"):
        MassiveActivationMetric().update(torch.ones(3))
