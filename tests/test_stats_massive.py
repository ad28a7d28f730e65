"""MassiveActivationMetric against Sun et al.'s procedure (locuslab/massive-activations, main_llm.py exp2) written
plainly: per sequence, the top-k of |h| over (token, dim) and torch.median(|h|); figures are means over sequences."""

import math
from collections import Counter

import pytest
import torch

from lit_act.stats.massive import MassiveActivationMetric, massive_activations


def _reference(sequences, k=3, magnitude=100.0, ratio=1000.0):
    """The reference loop: one sequence (T, D) at a time."""
    tops, medians, positions, count = [], [], [Counter() for _ in range(k)], 0
    for seq in sequences:
        feat = seq.abs()
        values, index = torch.sort(feat.flatten(), descending=True)
        tops.append(values[:k])
        median = torch.median(feat)
        medians.append(median)
        for i in range(k):
            positions[i][(int(index[i]) // seq.shape[1], int(index[i]) % seq.shape[1])] += 1
        count += int(((feat > magnitude) & (feat >= ratio * median)).sum())
    top = torch.stack(tops).mean(dim=0)
    median = torch.stack(medians).mean()
    modes = [c.most_common(1)[0] for c in positions]
    return top, median, [(pos, n / len(sequences)) for pos, n in modes], count


def _planted_six():
    """The issue's case: a massive value at token 0 / dim 7 in six sequences (800, 700, ..., 300), noise elsewhere."""
    torch.manual_seed(0)
    h = torch.randn(6, 16, 32) * 10
    h[:, 0, 7] = torch.tensor([800.0, 700.0, 600.0, 500.0, 400.0, 300.0])
    return h


def test_planted_six_sequences_match_reference_not_running_max():
    h = _planted_six()
    metric = MassiveActivationMetric()
    metric.update(h[:4])
    metric.update(h[4:])
    out = metric.compute()
    top, median, modes, count = _reference(list(h))
    assert out["top1"].item() == pytest.approx(550.0)
    for i in range(3):
        assert out[f"top{i + 1}"].item() == pytest.approx(top[i].item(), rel=1e-6)
    assert out["top2"].item() < 60  # per-sequence second largest: noise, not the 700 of another sequence
    assert (out["top1_token"].item(), out["top1_dim"].item(), out["top1_freq"].item()) == (0, 7, 1.0)
    assert out["median"].item() == pytest.approx(median.item(), rel=1e-6)
    assert out["ratio"].item() == pytest.approx(550.0 / median.item(), rel=1e-6)
    assert out["count"].item() == count
    # the running maximum keeps its own keys: the three largest entries overall, all at (0, 7)
    assert [out[f"max{i}"].item() for i in (1, 2, 3)] == [800.0, 700.0, 600.0]
    assert all((out[f"max{i}_token"].item(), out[f"max{i}_dim"].item()) == (0, 7) for i in (1, 2, 3))
    # a batch and the epoch estimate the same statistic: one sequence per batch gives the same means
    single = MassiveActivationMetric()
    for seq in h:
        single.update(seq[None])
    assert single.compute()["top1"].item() == pytest.approx(550.0)


def test_different_massive_dims_in_different_sequences():
    torch.manual_seed(3)
    h = torch.randn(5, 9, 12)
    planted = [(0, 7, 800.0), (3, 2, -700.0), (0, 7, 600.0), (5, 11, 650.0), (0, 7, 900.0)]
    for b, (t, d, v) in enumerate(planted):
        h[b, t, d] = v
    h[1, 4, 4] = 300.0  # a second large entry in sequence 1
    metric = MassiveActivationMetric(k=2)
    metric.update(h[:2])
    metric.update(h[2:])
    out = metric.compute()
    top, median, modes, count = _reference(list(h), k=2)
    assert out["top1"].item() == pytest.approx((800 + 700 + 600 + 650 + 900) / 5)
    assert out["top2"].item() == pytest.approx(top[1].item(), rel=1e-6)
    (pos, freq), _ = modes
    assert pos == (0, 7) and freq == pytest.approx(3 / 5)
    assert (out["top1_token"].item(), out["top1_dim"].item()) == pos
    assert out["top1_freq"].item() == pytest.approx(freq)
    assert out["median"].item() == pytest.approx(median.item(), rel=1e-6)
    assert out["count"].item() == count == 4  # 600 < 1000 x its sequence median: not massive
    assert (out["max1"].item(), out["max1_token"].item(), out["max1_dim"].item()) == (900.0, 0, 7)
    assert (out["max2"].item(), out["max2_token"].item(), out["max2_dim"].item()) == (800.0, 0, 7)


def test_mask_excludes_padding():
    torch.manual_seed(2)
    h = torch.randn(3, 6, 4)
    lengths = [6, 4, 2]
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    h[1, 5, 0] = 5000.0  # padding: ignored
    h[2, 1, 3] = 400.0
    out = MassiveActivationMetric(k=2).to(h.device)
    out.update(h, mask)
    out = out.compute()
    top, median, modes, count = _reference([h[b, :n] for b, n in enumerate(lengths)], k=2)
    assert out["top1"].item() == pytest.approx(top[0].item(), rel=1e-6)
    assert out["top2"].item() == pytest.approx(top[1].item(), rel=1e-6)
    assert out["median"].item() == pytest.approx(median.item(), rel=1e-6)
    assert out["max1"].item() == 400.0
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 6\)"):
        MassiveActivationMetric().update(h, mask[:, :5])


def test_nonfinite_layer_logs_nan_everywhere_and_partial_nonfinite_excluded():
    out = massive_activations(torch.full((2, 3, 4), float("nan")))
    assert out["nonfinite"].item() == 24
    assert all(math.isnan(v.item()) for key, v in out.items() if key != "nonfinite")
    h = torch.ones(1, 3, 4)
    h[0, 1, 1] = float("inf")
    h[0, 2, 3] = float("nan")
    h[0, 0, 0] = 5.0
    out = massive_activations(h, k=2)
    assert out["nonfinite"].item() == 2
    assert out["top1"].item() == 5.0 and out["top2"].item() == 1.0 and out["median"].item() == 1.0


def test_fewer_entries_than_k_and_two_d_states():
    h = torch.tensor([[1.0, 1.0, 1.0, 30.0], [2.0, 2.0, 2.0, 2.0]])  # (B, D): one token per sequence
    out = massive_activations(h, k=1, magnitude=10.0, median_ratio=20.0)
    assert out["count"].item() == 1
    assert out["top1"].item() == pytest.approx(16.0)  # (30 + 2) / 2
    assert out["median"].item() == pytest.approx(1.5)
    out = massive_activations(torch.tensor([[[3.0]], [[4.0]]]), k=2)  # one entry per sequence
    assert out["top1"].item() == 3.5 and math.isnan(out["top2"].item()) and out["max2"].item() == 3.0


def test_position_summary_exact_within_capacity_and_bounded_beyond():
    torch.manual_seed(5)
    n, capacity = 40, 3
    h = torch.rand(n, 8, 8)
    hot = [(b, (1, 2)) for b in range(0, n, 2)]  # rank-1 position (1, 2) in half the sequences
    for b in range(n):
        t, d = (1, 2) if b % 2 == 0 else (b % 8, (b * 3) % 8)  # the other half spread over many positions
        h[b, t, d] = 100.0
    metric = MassiveActivationMetric(k=1, capacity=capacity)
    for chunk in h.split(7):
        metric.update(chunk)
    out = metric.compute()
    assert (out["top1_token"].item(), out["top1_dim"].item()) == (1, 2)
    true = len(hot) / n
    assert true - 1 / (capacity + 1) <= out["top1_freq"].item() <= true  # Misra-Gries bound
    exact = MassiveActivationMetric(k=1, capacity=64)
    exact.update(h)
    assert exact.compute()["top1_freq"].item() == pytest.approx(true)


def test_merged_states_equal_one_pass():
    torch.manual_seed(4)
    a, b = torch.randn(3, 5, 6), torch.randn(4, 5, 6)
    a[0, 2, 1], b[1, 2, 1], b[3, 0, 0] = 300.0, 250.0, -900.0
    left, right, whole = MassiveActivationMetric(), MassiveActivationMetric(), MassiveActivationMetric()
    left.update(a)
    right.update(b)
    whole.update(torch.cat([a, b]))
    left.merge_state(right)  # the DDP reduction (sum / cat) of the two ranks' states
    merged, expected = left.compute(), whole.compute()
    for key, value in expected.items():
        assert merged[key].item() == pytest.approx(value.item(), rel=1e-6, nan_ok=True), key


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        MassiveActivationMetric(k=0)
    with pytest.raises(ValueError, match="positive"):
        MassiveActivationMetric(magnitude=-1)
    with pytest.raises(ValueError, match="capacity"):
        MassiveActivationMetric(capacity=0)
    with pytest.raises(ValueError, match="batch, ..., hidden"):
        MassiveActivationMetric().update(torch.ones(3))


def _ddp_worker(rank, world, port, shards, result):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metric = MassiveActivationMetric(k=2, capacity=4)
        metric.update(shards[rank])
        out = metric.compute()  # syncs: sums, cat-then-merge of the position tables and running maxima
        if rank == 0:
            result.update({k: v.item() for k, v in out.items()})
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_one_pass():
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(6)
    h = torch.randn(8, 5, 6)
    for b in range(8):
        h[b, 0 if b % 4 else 1, 3] = 200.0 + b  # (0, 3) in six sequences, (1, 3) in two
    h[5, 4, 4] = -999.0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_ddp_worker, args=(2, port, [h[:3], h[3:]], result), nprocs=2)
        merged = dict(result)
    whole = MassiveActivationMetric(k=2, capacity=4)
    whole.update(h)
    for key, value in whole.compute().items():
        assert merged[key] == pytest.approx(value.item(), rel=1e-6, nan_ok=True), key
