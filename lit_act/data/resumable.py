"""Training loaders that resume mid-epoch on the same batches (Lightning fault-tolerant data loading).

A plain ``DataLoader`` restarts its epoch at batch 0 when ``Trainer.fit(ckpt_path=...)`` resumes from a mid-epoch
checkpoint, and a shuffling one draws a new order, so the resumed run trains on other batches. Lightning saves the
``state_dict()`` of every training loader that has ``state_dict`` / ``load_state_dict`` (``_Stateful``) in the
checkpoint (``loops.fit_loop.state_dict.combined_loader``) and hands it back through ``load_state_dict`` before the
first batch of the resumed epoch. :class:`ResumableDataLoader` implements that interface:

* the order of epoch ``e`` is a function of ``(seed, e)`` only (:class:`ResumableSampler`; Lightning calls
  ``set_epoch`` every epoch): the order a fresh ``DataLoader(shuffle=True,
  generator=torch.Generator().manual_seed(seed + e))`` yields, so epoch 0 is what lit-act's datamodules yielded
  before they resumed; the workers' base seed is drawn from the same generator, so it too depends on ``(seed, e)``;
* its state is ``{"epoch": e, "batches": k}``, the batches it has yielded in epoch ``e``; loading it makes the next
  pass of epoch ``e`` skip those ``k`` batches in the sampler, without loading their samples.

Under DDP the sampler shards the order over ranks itself (``DistributedSampler``, so Lightning does not wrap it);
the state counts batches per rank, the same on every rank, so the checkpoint written by rank 0 serves them all.
Example::

    loader = ResumableDataLoader(dataset, batch_size=32, shuffle=True, seed=0)
    state = loader.state_dict()            # {"epoch": 0, "batches": 7} after 7 batches of epoch 0
    fresh = ResumableDataLoader(dataset, batch_size=32, shuffle=True, seed=0)
    fresh.load_state_dict(state)           # next(iter(fresh)) is the 8th batch of epoch 0
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ["ResumableDataLoader", "ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """Indices of epoch ``epoch`` in an order fixed by ``(seed, epoch)`` (shuffled or sequential), sharded over
    the DDP ranks as ``DistributedSampler`` shards (``num_replicas`` / ``rank`` default to the initialised process
    group, else one replica), and able to start ``skip`` indices into the epoch.

    ``set_epoch`` to another epoch cancels a pending skip. The skip is consumed by the next ``iter()``.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)

    def generator(self) -> torch.Generator:
        """A generator seeded with ``seed + epoch``."""
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        if self.shuffle:
            g = self.generator()
            torch.empty((), dtype=torch.int64).random_(generator=g)  # a DataLoader's first draw: its workers' seed
            indices = torch.randperm(len(self.dataset), generator=g).tolist()
        else:
            indices = list(range(len(self.dataset)))
        if self.drop_last:  # shard over the ranks as DistributedSampler does
            indices = indices[:self.total_size]
        else:
            indices += (indices * math.ceil(self.total_size / len(indices)))[:self.total_size - len(indices)]
        return iter(indices[self.rank:self.total_size:self.num_replicas][skip:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` with Lightning's ``state_dict`` / ``load_state_dict``.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per batch.
        shuffle: shuffle each epoch (order fixed by ``(seed, epoch)``); ``False`` keeps the dataset order.
        seed: seed of the shuffle.
        drop_last: drop the last incomplete batch.
        sampler: leave ``None``; another sampler (Lightning passes one for ``overfit_batches``) makes the loader
            a plain, non-resuming ``DataLoader`` (its ``state_dict`` is empty).
        **kwargs: other ``DataLoader`` arguments (``num_workers``, ``pin_memory``, ...).
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, sampler: Sampler | None = None, **kwargs: Any) -> None:
        if kwargs.get("batch_sampler") is not None:
            raise ValueError("ResumableDataLoader batches its own sampler; batch_sampler= is not accepted")
        if sampler is None:
            sampler, kwargs["generator"] = ResumableSampler(dataset, shuffle, seed), torch.Generator()
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
        self.batches = 0  # batches yielded in the current epoch (including the skipped ones after a resume)

    @property
    def resumable(self) -> bool:
        return isinstance(self.sampler, ResumableSampler)

    def __iter__(self) -> Iterator[Any]:
        # a generator: the body runs at the first next(), after Lightning's set_epoch for the epoch
        self.batches = 0
        if self.resumable:
            self.generator.set_state(self.sampler.generator().get_state())  # workers' base seed: from (seed, epoch)
            self.batches = self.sampler.skip // self.batch_size
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "batches": k}``: ``k`` batches of epoch ``e`` were yielded (``{}`` if not resumable)."""
        return {"epoch": self.sampler.epoch, "batches": self.batches} if self.resumable else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next pass continue epoch ``state_dict["epoch"]`` after its first ``batches`` batches (or start
        the next epoch when that one was complete)."""
        if not state_dict or not self.resumable:
            return
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batches * self.batch_size
        self.batches = batches
