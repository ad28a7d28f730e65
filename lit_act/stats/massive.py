"""Massive activations (Sun et al., COLM 2024, "Massive Activations in Large Language Models",
locuslab/massive-activations).

Site: the residual stream, i.e. a decoder block's output ``h`` of shape ``(B, T, D)`` (any ``(B, ..., D)``; the middle
dimensions are flattened into token positions). Per layer, over the sequences seen since the last reset, following the
reference code (``main_llm.py``, experiment 2: per sequence, the top-3 of ``|h|`` over (token, dim) and
``torch.median(|h|)``; the figures are the means over sequences of these per-sequence values):

* ``top{i}`` (i = 1..k, default k = 3): the i-th largest ``|h|`` over the (token, dim) entries *of one sequence*,
  averaged over sequences. A batch and an epoch estimate the same number (it does not grow with the number of
  sequences seen);
* ``top{i}_token``, ``top{i}_dim``, ``top{i}_freq``: the (token, dim) position that is most often the i-th largest entry
  of a sequence, and the fraction of sequences in which it is (see *Positions* below);
* ``median``: the median of ``|h|`` over one sequence, averaged over sequences (``torch.median``: the lower of the two
  middle values for an even count, as the reference);
* ``ratio = top1 / median`` (ratio of the two means): the per-layer ``max|h| / median|h|`` of "Hidden Dynamics of Massive
  Activations in Transformer Training" (Gallego-Feliciano et al. 2025, Sec. 3), whose code (a fork of
  locuslab/massive-activations) forms it from these per-layer means; :mod:`lit_act.stats.emergence` fits it;
* ``count``: entries with ``|h| > magnitude`` (100) and ``|h| >= median_ratio x`` their sequence's median (1000x), the
  paper's criterion (Sec. 2: "larger than 100 and at least or around 1,000 times larger than the median");
* ``max{i}``, ``max{i}_token``, ``max{i}_dim``: the running top-k of ``|h|`` over *every* entry seen (a different
  statistic: it grows with the amount of data), with positions.

Masking: ``update(h, mask)`` takes a bool token mask of shape ``h.shape[:-1]`` (``attention_mask``): padded positions
are left out of the top-k, the median, the count and the positions. NaN/Inf entries are counted (``nonfinite``) and
left out the same way. A sequence with no finite unpadded entry is skipped; a layer with none at all logs NaN for every
statistic, positions included (``nonfinite`` keeps its count).

Positions: the per-sequence position modes are tracked with a Misra-Gries frequent-items summary of fixed capacity
``capacity`` per rank i (batched and merged as the mergeable summaries of Agarwal et al. 2012). While at most
``capacity`` distinct positions have held rank i, the counts are exact; beyond that a count is a lower bound within
``n / (capacity + 1)`` of the true count (``n`` sequences), and any position that is the i-th entry in more than
``n / (capacity + 1)`` sequences is guaranteed to be kept. Memory is ``O(k x capacity)`` whatever the sequence length.

Deviations from the reference, listed:

* ``top{i}_token/_dim/_freq`` have no counterpart in ``main_llm.py`` (which plots the per-sequence top entries); the
  summary is approximate beyond ``capacity`` distinct positions (bound above).
* Sequences are the leading batch dimension; the reference feeds one sequence at a time, so it is the same procedure.
* Padded tokens: the reference has none (one unpadded sequence at a time); here they are removed by ``mask``.

Example:
    >>> h = torch.ones(6, 4, 8)
    >>> h[:, 0, 7] = torch.tensor([800.0, 700.0, 600.0, 500.0, 400.0, 300.0])
    >>> out = massive_activations(h)
    >>> out["top1"].item(), out["top1_token"].item(), out["top1_dim"].item(), out["top1_freq"].item()
    (550.0, 0.0, 7.0, 1.0)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from lit_act.stats.tap import nan_marked

_RADIX = 1 << 32  # position key = token * _RADIX + dim


def _massive_activation_arg_validation(k: int, magnitude: float, median_ratio: float, capacity: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not magnitude > 0 or not median_ratio > 0:
        raise ValueError(f"magnitude and median_ratio must be positive, got {magnitude} and {median_ratio}")
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity (positions tracked per rank) must be a positive integer, got {capacity!r}")


def _magnitudes(h: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(|h| as (B, T*D) fp32 with NaN at NaN/Inf and padded entries, #NaN/Inf among unpadded entries)``."""
    if h.dim() < 2:
        raise ValueError(f"massive activations need (batch, ..., hidden) states, got shape {tuple(h.shape)}")
    marked = nan_marked(h).abs_()
    if mask is None:
        return marked.reshape(h.shape[0], -1), marked.isnan().sum()
    if mask.shape != h.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(h.shape[:-1])} (the hidden states' shape without the hidden "
                         f"dimension), got {tuple(mask.shape)}")
    keep = mask.to(device=h.device, dtype=torch.bool)[..., None]
    nonfinite = (marked.isnan() & keep).sum()
    return marked.masked_fill_(~keep, math.nan).reshape(h.shape[0], -1), nonfinite


def _massive_activation_update(h: Tensor, mask: Tensor | None, k: int, magnitude: float,
                               median_ratio: float) -> dict[str, Tensor]:
    """Per-sequence statistics of one batch: ``top_values (B, k)`` (``-inf`` where a sequence has fewer than i
    entries), ``top_keys (B, k)`` (position keys, -1 there), ``median (B,)`` (NaN for a sequence with no entry),
    ``count`` and ``nonfinite`` (scalars), ``max_values (k',)`` and ``max_positions (k', 2)`` (the batch's top-k)."""
    per_sample, nonfinite = _magnitudes(h, mask)
    median = per_sample.nanmedian(dim=1).values
    # |h| > magnitude and |h| >= ratio * median  <=>  |h| > limit, with limit the stricter of the two per sample
    # (x >= t is x > nextafter(t, -inf) in fp32); a NaN limit (no finite entry) matches nothing
    relative = median_ratio * median
    limit = torch.where(relative > magnitude, torch.nextafter(relative, relative.new_tensor(-math.inf)),
                        relative.new_tensor(magnitude))
    count = (per_sample > limit[:, None]).sum()
    per_sample.nan_to_num_(nan=-math.inf)
    top_values, top_index = per_sample.topk(min(k, per_sample.shape[1]), dim=1)
    if top_values.shape[1] < k:  # fewer entries per sequence than k
        pad = k - top_values.shape[1]
        top_values = torch.cat([top_values, top_values.new_full((h.shape[0], pad), -math.inf)], dim=1)
        top_index = torch.cat([top_index, top_index.new_zeros((h.shape[0], pad))], dim=1)
    dim = h.shape[-1]
    top_keys = torch.where(top_values > -math.inf, (top_index // dim) * _RADIX + top_index % dim, -1)
    max_values, best = top_values.flatten().topk(min(k, top_values.numel()))
    within = top_index.flatten()[best]
    max_positions = torch.stack([within // dim, within % dim], dim=1)
    return {"top_values": top_values, "top_keys": top_keys, "median": median, "count": count,
            "nonfinite": nonfinite, "max_values": max_values, "max_positions": max_positions}


def _frequent_merge(keys: Tensor, counts: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Merge Misra-Gries summaries row by row: ``keys``/``counts`` ``(k, M)`` (key -1 = empty) -> ``(k, capacity)``.

    Equal keys are summed; when more than ``capacity`` keys remain, the ``(capacity + 1)``-th largest count is
    subtracted from all and the non-positive ones dropped (Agarwal et al. 2012, "Mergeable summaries", Sec. 3). Fixed
    shapes only: no host sync.
    """
    sorted_keys, order = keys.sort(dim=1)
    sorted_counts = counts.gather(1, order)
    start = torch.ones_like(sorted_keys, dtype=torch.bool)
    start[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    run = start.long().cumsum(1) - 1
    totals = torch.zeros_like(sorted_counts).scatter_add_(1, run, sorted_counts)
    run_keys = torch.full_like(sorted_keys, -1).scatter_(1, run, sorted_keys)
    totals = torch.where(run_keys >= 0, totals, 0)
    width = keys.shape[1]
    if width < capacity:
        totals = torch.cat([totals, totals.new_zeros((keys.shape[0], capacity - width))], dim=1)
        run_keys = torch.cat([run_keys, run_keys.new_full((keys.shape[0], capacity - width), -1)], dim=1)
    top, index = totals.topk(min(capacity + 1, totals.shape[1]), dim=1)
    if top.shape[1] > capacity:
        top, index = top[:, :capacity] - top[:, capacity:], index[:, :capacity]
    kept = top > 0
    return torch.where(kept, run_keys.gather(1, index), -1), torch.where(kept, top, 0)


class MassiveActivationMetric(Metric):
    """Fixed-shape accumulator of one layer's massive-activation statistics (module docstring).

    States (DDP reduction): ``top_sum (k,)`` and ``top_samples (k,)`` (sum), ``median_sum``, ``samples``,
    ``massive_count``, ``nonfinite`` (sum), ``mode_keys (k, capacity)`` / ``mode_counts (k, capacity)`` (concatenated,
    then merged in :meth:`compute`), ``max_values (k,)`` / ``max_positions (k, 2)`` (concatenated, then top-k again).

    Args:
        k: number of largest magnitudes per sequence (>= 1).
        magnitude: absolute criterion threshold (> 0).
        median_ratio: relative criterion, multiple of the sequence median (> 0).
        capacity: positions tracked per rank i by the frequent-items summary (>= 1).

    Example:
        >>> metric = MassiveActivationMetric(k=1)
        >>> h = torch.ones(2, 3, 4)
        >>> h[0, 0, 1], h[1, 2, 3] = 500.0, 300.0
        >>> metric.update(h)
        >>> out = metric.compute()
        >>> out["top1"].item(), out["max1"].item(), out["top1_freq"].item()
        (400.0, 500.0, 0.5)
    """

    full_state_update = False

    def __init__(self, k: int = 3, magnitude: float = 100.0, median_ratio: float = 1000.0, capacity: int = 64,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        _massive_activation_arg_validation(k, magnitude, median_ratio, capacity)
        self.k, self.magnitude, self.median_ratio, self.capacity = k, float(magnitude), float(median_ratio), capacity
        self.add_state("top_sum", torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("top_samples", torch.zeros(k, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("median_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("samples", "massive_count", "nonfinite"):
            self.add_state(name, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("mode_keys", torch.full((k, capacity), -1, dtype=torch.int64), dist_reduce_fx="cat")
        self.add_state("mode_counts", torch.zeros((k, capacity), dtype=torch.int64), dist_reduce_fx="cat")
        self.add_state("max_values", torch.full((k,), -math.inf), dist_reduce_fx="cat")
        self.add_state("max_positions", torch.full((k, 2), -1, dtype=torch.int64), dist_reduce_fx="cat")

    def update(self, h: Tensor, mask: Tensor | None = None) -> None:
        """``h``: ``(B, T, D)`` hidden states (``(B, D)`` is one token per sample); ``mask``: optional bool tensor of
        shape ``h.shape[:-1]``, False at padded positions."""
        batch = _massive_activation_update(h, mask, self.k, self.magnitude, self.median_ratio)
        seen = ~batch["median"].isnan()
        present = batch["top_values"] > -math.inf
        self.top_sum += torch.where(present, batch["top_values"], 0.0).sum(dim=0, dtype=torch.float64)
        self.top_samples += present.sum(dim=0)
        self.median_sum += torch.where(seen, batch["median"], 0.0).sum(dtype=torch.float64)
        self.samples += seen.sum()
        self.massive_count += batch["count"]
        self.nonfinite += batch["nonfinite"]
        keys = torch.cat([self.mode_keys.reshape(-1, self.k, self.capacity).transpose(0, 1).reshape(self.k, -1),
                          batch["top_keys"].T], dim=1)
        counts = torch.cat([self.mode_counts.reshape(-1, self.k, self.capacity).transpose(0, 1).reshape(self.k, -1),
                            present.T.long()], dim=1)
        self.mode_keys, self.mode_counts = _frequent_merge(keys, counts, self.capacity)
        self.max_values, self.max_positions = _top_merge(
            torch.cat([self.max_values.reshape(-1), batch["max_values"]]),
            torch.cat([self.max_positions.reshape(-1, 2), batch["max_positions"]]), self.k)

    def compute(self) -> dict[str, Tensor]:
        """``top{i}``, ``top{i}_token``, ``top{i}_dim``, ``top{i}_freq``, ``max{i}``, ``max{i}_token``, ``max{i}_dim``
        (i = 1..k), ``median``, ``ratio``, ``count`` and ``nonfinite`` (everything but ``nonfinite`` NaN when no
        finite entry was seen)."""
        # after a DDP sync (or a restored DDP checkpoint) the cat states hold every rank's tables, stacked
        keys = self.mode_keys.reshape(-1, self.k, self.capacity).transpose(0, 1).reshape(self.k, -1)
        counts = self.mode_counts.reshape(-1, self.k, self.capacity).transpose(0, 1).reshape(self.k, -1)
        keys, counts = _frequent_merge(keys, counts, self.capacity)
        max_values, max_positions = _top_merge(self.max_values.reshape(-1), self.max_positions.reshape(-1, 2), self.k)
        return _massive_activation_compute(self.top_sum, self.top_samples, self.median_sum, self.samples,
                                           self.massive_count, self.nonfinite, keys[:, 0], counts[:, 0], max_values,
                                           max_positions)


def _top_merge(values: Tensor, positions: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if values.numel() < k:
        values = torch.cat([values, values.new_full((k - values.numel(),), -math.inf)])
        positions = torch.cat([positions, positions.new_full((k - positions.shape[0], 2), -1)])
    best = values.topk(k).indices
    return values[best], positions[best]


def _massive_activation_compute(top_sum: Tensor, top_samples: Tensor, median_sum: Tensor, samples: Tensor,
                                massive_count: Tensor, nonfinite: Tensor, mode_key: Tensor, mode_count: Tensor,
                                max_values: Tensor, max_positions: Tensor) -> dict[str, Tensor]:
    nan = torch.tensor(math.nan, device=top_sum.device)
    seen = samples > 0
    top = torch.where(top_samples > 0, top_sum / top_samples.clamp(min=1), nan).float()
    median = torch.where(seen, median_sum / samples.clamp(min=1), nan).float()
    found = mode_key >= 0
    out = {}
    for i in range(top.shape[0]):
        out[f"top{i + 1}"] = top[i]
        out[f"top{i + 1}_token"] = torch.where(found[i], (mode_key[i] // _RADIX).float(), nan)
        out[f"top{i + 1}_dim"] = torch.where(found[i], (mode_key[i] % _RADIX).float(), nan)
        out[f"top{i + 1}_freq"] = torch.where(found[i], mode_count[i] / top_samples[i].clamp(min=1), nan).float()
    for i in range(max_values.shape[0]):
        valid = max_values[i] > -math.inf
        out[f"max{i + 1}"] = torch.where(valid, max_values[i], nan)
        out[f"max{i + 1}_token"] = torch.where(valid, max_positions[i, 0].float(), nan)
        out[f"max{i + 1}_dim"] = torch.where(valid, max_positions[i, 1].float(), nan)
    return out | {"median": median, "ratio": top[0] / median,
                  "count": torch.where(seen, massive_count.float(), nan), "nonfinite": nonfinite.float()}


def massive_activations(h: Tensor, mask: Tensor | None = None, k: int = 3, magnitude: float = 100.0,
                        median_ratio: float = 1000.0, capacity: int = 64) -> dict[str, Tensor]:
    """The statistics of :class:`MassiveActivationMetric` on one batch ``h`` (``mask`` as in ``update``)."""
    metric = MassiveActivationMetric(k, magnitude, median_ratio, capacity).to(h.device)
    metric.update(h, mask)
    return metric.compute()


__all__ = ["MassiveActivationMetric", "massive_activations"]
