"""Teacher-student regression: Gaussian inputs labelled by a random one-hidden-layer teacher.

Teacher (soft committee machine, Saad & Solla 1995; the setting of "Should Under-parameterized Student Networks Copy
or Average Teacher Weights?", Simsek, Bendjeddou, Gerstner & Brea, NeurIPS 2023, arXiv:2311.01644):

    y(x) = sum_{j=1..k} v_j g(w_j . x / sqrt(d)) + sigma * eps,    x ~ N(0, I_d),

with g = erf or ReLU, w_j ~ N(0, I_d) (or orthonormal rows scaled by sqrt(d) when ``orthonormal``), and second-layer
weights v_j = 1 (committee) unless ``random_head``.
"""

from __future__ import annotations

import math

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from lit_act.data.resumable import ResumableDataLoader

_TEACHER_ACTIVATIONS = {"erf": torch.erf, "relu": torch.relu}


class Teacher:
    """The labelling network; ``w`` is ``(k, d)``, ``v`` is ``(k,)``."""

    def __init__(self, input_dim: int, neurons: int, activation: str = "erf", orthonormal: bool = False,
                 random_head: bool = False, seed: int = 0) -> None:
        if activation not in _TEACHER_ACTIVATIONS:
            raise ValueError(f"unknown teacher activation {activation!r}; valid: {sorted(_TEACHER_ACTIVATIONS)}")
        if orthonormal and neurons > input_dim:
            raise ValueError(f"orthonormal teacher needs neurons <= input_dim, got {neurons} > {input_dim}")
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(neurons, input_dim, generator=g)
        if orthonormal:
            q, _ = torch.linalg.qr(w.T)
            w = q.T * math.sqrt(input_dim)
        self.w = w
        self.v = torch.randn(neurons, generator=g) if random_head else torch.ones(neurons)
        self.g = _TEACHER_ACTIVATIONS[activation]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(x @ self.w.T / math.sqrt(self.w.shape[1])) @ self.v


class TeacherStudentDataModule(LightningDataModule):
    """Batches ``(x (B, d), y (B,))``; ``self.teacher`` holds the teacher weights for analysis.

    Args:
        input_dim: d.
        teacher_neurons: k.
        teacher_activation: ``"erf"`` or ``"relu"``.
        orthonormal: orthonormal teacher incoming vectors.
        n_train, n_val, n_test: sample counts (inputs drawn once from the seed).
        noise: label noise standard deviation.
    """

    def __init__(self, input_dim: int = 20, teacher_neurons: int = 4, teacher_activation: str = "erf",
                 orthonormal: bool = False, random_head: bool = False, n_train: int = 4096, n_val: int = 1024,
                 n_test: int = 1024, noise: float = 0.0, batch_size: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.teacher = Teacher(input_dim, teacher_neurons, teacher_activation, orthonormal, random_head, seed)
        self.datasets: dict[str, TensorDataset] = {}

    @property
    def shape_hints(self) -> dict[str, int]:
        return {"in_features": self.hparams.input_dim}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        g = torch.Generator().manual_seed(self.hparams.seed + 1)
        for split in ("train", "val", "test"):
            x = torch.randn(self.hparams[f"n_{split}"], self.hparams.input_dim, generator=g)
            y = self.teacher(x) + self.hparams.noise * torch.randn(len(x), generator=g)
            self.datasets[split] = TensorDataset(x, y)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.hparams.batch_size)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled in an order fixed by ``(seed, epoch)``; resumes mid-epoch (:mod:`lit_act.data.resumable`)."""
        return ResumableDataLoader(self.datasets["train"], batch_size=self.hparams.batch_size, shuffle=True,
                                   seed=self.hparams.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
