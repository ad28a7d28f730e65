"""A bounded, shuffled activation buffer for SAE training.

A ring of fixed capacity ``buffer_tokens`` rows (allocated once, on the activations' device): new rows overwrite the
oldest; SAE batches are drawn uniformly at random (without replacement within a batch) from the filled rows with a
private ``torch.Generator``, which decorrelates the consecutive tokens of a sequence (the purpose of SAELens's
mixing buffer). Rows with a NaN/Inf entry are dropped and counted (:attr:`ActivationBuffer.nonfinite_rows`), never
stored. Memory: ``buffer_tokens * d_in`` floats, whatever the run length.

Example::

    buf = ActivationBuffer(d_in=64, buffer_tokens=8192, batch_size=1024, seed=0)
    buf.add(acts)                 # (N, 64)
    if buf.ready: x = buf.sample()
"""

from __future__ import annotations

import torch
from torch import Tensor


class ActivationBuffer:
    """Ring buffer of activation rows with random batch sampling.

    Args:
        d_in: row width.
        buffer_tokens: capacity in rows (tokens); must be >= ``batch_size``.
        batch_size: rows per :meth:`sample`.
        seed: seed of the private sampling generator (the global RNG is never used).

    Raises:
        ValueError: ``buffer_tokens < batch_size`` (naming both), or non-positive sizes.
    """

    def __init__(self, d_in: int, buffer_tokens: int, batch_size: int, seed: int = 0) -> None:
        for name, value in (("d_in", d_in), ("buffer_tokens", buffer_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if buffer_tokens < batch_size:
            raise ValueError(f"buffer_tokens ({buffer_tokens}) must be >= batch_size ({batch_size}): the buffer has "
                             "to hold at least one SAE batch")
        self.d_in = d_in
        self.capacity = buffer_tokens
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.data: Tensor | None = None
        self.size = 0  # filled rows
        self.cursor = 0  # next row to write
        self.nonfinite_rows = 0
        self.tokens_seen = 0  # finite rows ever added

    @property
    def ready(self) -> bool:
        """At least one batch is stored."""
        return self.size >= self.batch_size

    def add(self, x: Tensor) -> int:
        """Store the finite rows of ``x`` ``(N, d_in)`` (detached, fp32); returns how many were stored. When ``N``
        exceeds the capacity, a random subset of ``buffer_tokens`` rows is kept."""
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected activations of shape (N, {self.d_in}), got {tuple(x.shape)}")
        x = x.detach().float()
        finite = torch.isfinite(x).all(dim=1)
        n_finite = int(finite.sum())
        self.nonfinite_rows += x.shape[0] - n_finite
        if n_finite < x.shape[0]:
            x = x[finite]
        if x.shape[0] > self.capacity:
            keep = torch.randperm(x.shape[0], generator=self.generator)[:self.capacity].to(x.device)
            x = x[keep]
        if self.data is None:
            self.data = torch.empty(self.capacity, self.d_in, device=x.device)
        n = x.shape[0]
        first = min(n, self.capacity - self.cursor)
        self.data[self.cursor:self.cursor + first] = x[:first]
        if n > first:
            self.data[:n - first] = x[first:]
        self.cursor = (self.cursor + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        self.tokens_seen += n
        return n

    def sample(self) -> Tensor:
        """``batch_size`` distinct random rows of the stored ones (a new tensor)."""
        if not self.ready:
            raise RuntimeError(f"the buffer holds {self.size} rows, fewer than batch_size={self.batch_size}")
        index = torch.randperm(self.size, generator=self.generator)[:self.batch_size].to(self.data.device)
        return self.data[index]

    def state_dict(self) -> dict:
        """Counters and the sampling generator state; the stored rows are *not* saved (a resumed run refills the
        buffer from its next batches), which keeps checkpoints small."""
        return {"nonfinite_rows": self.nonfinite_rows, "tokens_seen": self.tokens_seen,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_rows = int(state["nonfinite_rows"])
        self.tokens_seen = int(state["tokens_seen"])
        self.generator.set_state(state["generator"])
