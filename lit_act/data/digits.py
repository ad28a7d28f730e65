"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes): no download."""

from __future__ import annotations

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from lit_act.data.resumable import ResumableDataLoader
from lit_act.data.splits import split_indices


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as images ``(N, 1, 8, 8)`` scaled to [0, 1] and labels ``(N,)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.long)


class DigitsDataModule(LightningDataModule):
    """Fixed, seeded train/val/test split of the sklearn digits; batches are ``(images (B,1,8,8), labels (B,))``.

    Args:
        batch_size: batch size of every loader.
        val_fraction, test_fraction: split sizes (the split depends only on ``split_seed``).
        split_seed: seed of the split permutation.
        classes: keep only these labels (e.g. ``[0..4]`` to hold out the rest as OOD data); ``None`` keeps all.
        normalize: standardise pixels with the training split's mean and std.
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 split_seed: int = 0, classes: list[int] | None = None, normalize: bool = True,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.classes = sorted(classes) if classes is not None else list(range(10))
        if not self.classes or any(c not in range(10) for c in self.classes):
            raise ValueError(f"classes must be a non-empty subset of 0..9, got {classes}")
        self.train_set = self.val_set = self.test_set = None

    @property
    def shape_hints(self) -> dict[str, int]:
        """Model arguments implied by this data (used by ``train.py`` to fill ``null`` model fields)."""
        return {"in_features": 64, "in_channels": 1, "image_size": 8, "num_classes": 10}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors()
        train, val, test = split_indices(len(labels), self.hparams.val_fraction, self.hparams.test_fraction,
                                         self.hparams.split_seed)
        keep = torch.isin(labels, torch.tensor(self.classes))
        train, val, test = (idx[keep[idx]] for idx in (train, val, test))
        if self.hparams.normalize:
            mean, std = images[train].mean(), images[train].std()
            images = (images - mean) / std
        self.train_set, self.val_set, self.test_set = (TensorDataset(images[i], labels[i]) for i in (train, val, test))

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled in an order fixed by ``(split_seed, epoch)``; resumes mid-epoch (:mod:`lit_act.data.resumable`)."""
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                                   seed=self.hparams.split_seed, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
