"""CIFAR-10 and MNIST through torchvision (optional ``vision`` extra; downloads on first use)."""

from __future__ import annotations

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, random_split

from lit_act.data.resumable import ResumableDataLoader


def _torchvision():
    try:
        import torchvision
    except Exception as err:  # ImportError, or a torchvision built for another torch
        raise ImportError(
            "this datamodule needs torchvision: install the extra with `pip install -e '.[vision]'` "
            "(with a torchvision build that matches your torch)"
        ) from err
    return torchvision


class TorchvisionDataModule(LightningDataModule):
    """A torchvision classification dataset with a seeded train/val split of its training set.

    Args:
        dataset: ``"cifar10"`` or ``"mnist"``.
        data_dir: where to download/read the files.
        val_size: images held out of the training set for validation.
    """

    _STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), "mnist": ((0.1307,), (0.3081,))}
    _SHAPES = {"cifar10": (3, 32, 10), "mnist": (1, 28, 10)}

    def __init__(self, dataset: str = "cifar10", data_dir: str = "data/", batch_size: int = 128, val_size: int = 5000,
                 num_workers: int = 2, seed: int = 0) -> None:
        super().__init__()
        if dataset not in self._STATS:
            raise ValueError(f"unknown dataset {dataset!r}; valid: {sorted(self._STATS)}")
        self.save_hyperparameters()
        self.sets = {}

    @property
    def shape_hints(self) -> dict[str, int]:
        c, s, k = self._SHAPES[self.hparams.dataset]
        return {"in_features": c * s * s, "in_channels": c, "image_size": s, "num_classes": k}

    def _cls(self):
        tv = _torchvision()
        return {"cifar10": tv.datasets.CIFAR10, "mnist": tv.datasets.MNIST}[self.hparams.dataset], tv.transforms

    def prepare_data(self) -> None:
        cls, _ = self._cls()
        cls(self.hparams.data_dir, train=True, download=True)
        cls(self.hparams.data_dir, train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        cls, t = self._cls()
        mean, std = self._STATS[self.hparams.dataset]
        transform = t.Compose([t.ToTensor(), t.Normalize(mean, std)])
        full = cls(self.hparams.data_dir, train=True, transform=transform)
        g = torch.Generator().manual_seed(self.hparams.seed)
        train, val = random_split(full, [len(full) - self.hparams.val_size, self.hparams.val_size], generator=g)
        self.sets = {"train": train, "val": val, "test": cls(self.hparams.data_dir, train=False, transform=transform)}

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.sets[split], batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled in an order fixed by ``(seed, epoch)``; resumes mid-epoch (:mod:`lit_act.data.resumable`)."""
        return ResumableDataLoader(self.sets["train"], batch_size=self.hparams.batch_size, shuffle=True,
                                   seed=self.hparams.seed, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
