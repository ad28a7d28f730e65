"""The fast paths of issue 13 give the plain computation's numbers: histogram binning and the shared x[mask] copy."""

import math

import torch

from lit_act.stats.histogram import ActivationHistogramMetric
from lit_act.stats.tap import clear_token_cache, valid_tokens


def test_histogram_counts_match_a_plain_loop_with_edges_nonfinite_and_low_precision():
    bins, low, high = 8, -2.0, 2.0
    values = [-2.0, -1.5, -0.5, 0.0, -0.0, 0.49999, 0.5, 1.999, 2.0, -2.0001, 7.0, math.nan, math.inf, -math.inf]
    x = torch.tensor(values + torch.randn(500, generator=torch.Generator().manual_seed(0)).mul(2).tolist())
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        xs = x.to(dtype)
        metric = ActivationHistogramMetric(bins=bins, low=low, high=high)
        metric.update(xs.reshape(2, -1))
        counts, below, above, nonfinite = [0] * bins, 0, 0, 0
        width = (high - low) / bins
        for v in xs.float().tolist():  # bins [low + i*w, low + (i+1)*w), computed as the fp32 position floor
            if not math.isfinite(v):
                nonfinite += 1
            elif v < low:
                below += 1
            elif v >= high:
                above += 1
            else:
                counts[int(math.floor(torch.tensor((v - low) / width, dtype=torch.float32).item()))] += 1
        assert metric.counts.tolist() == counts
        assert (metric.below.item(), metric.above.item(), metric.nonfinite.item()) == (below, above, nonfinite)


def test_valid_tokens_shares_one_copy_and_recomputes_when_anything_changes():
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    first = valid_tokens("m", x, mask)
    assert valid_tokens("m", x, mask.clone()) is first  # equal mask, same output: shared
    other = mask.clone()
    other[0, 2] = True
    assert torch.equal(valid_tokens("m", x, other), x[other])  # different mask
    x.add_(1.0)
    assert torch.equal(valid_tokens("m", x, other), x[other])  # output modified in place
    other[0, 2] = False
    assert torch.equal(valid_tokens("m", x, other), x[other])  # cached mask modified in place
    assert torch.equal(valid_tokens("m", x.clone(), other), x[other])  # another tensor
    clear_token_cache()
    assert valid_tokens("m", x, other) is not valid_tokens("m", x, None)
