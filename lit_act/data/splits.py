"""Deterministic index splits shared by the datamodules."""

from __future__ import annotations

import torch


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Seeded permutation of ``range(n)`` cut into (train, val, test) index tensors, each sorted."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and val+test < 1, got {val_fraction}, {test_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    val, test, train = perm[:n_val], perm[n_val:n_val + n_test], perm[n_val + n_test:]
    return train.sort().values, val.sort().values, test.sort().values
