"""Character-level language modelling on the Python standard library's own ``.py`` sources (real text, no download).

Vocabulary: the 128 ASCII code points (fixed, so identical on every machine); any other character maps to ``?``.
Split: each file goes to train/val/test by a hash of its path relative to the stdlib root (deterministic, no
leakage across splits). Files are read in an order fixed by a second hash of the path (a deterministic shuffle, so a
``max_chars`` prefix samples the whole library); each split takes files until it holds its share of ``max_chars``
characters (or the files run out).
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lit_act.data.resumable import ResumableDataLoader

VOCAB_SIZE = 128
_UNKNOWN = ord("?")


def encode(text: str) -> np.ndarray:
    """ASCII code points as uint8; non-ASCII characters become ``?``."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < VOCAB_SIZE, codes, _UNKNOWN).astype(np.uint8)


def decode(codes) -> str:
    """Inverse of :func:`encode` (for samples)."""
    return "".join(chr(int(c)) for c in codes)


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library (site-packages and test suites excluded)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def _unit_hash(text: str) -> float:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _split_of(relative: str, val_fraction: float, test_fraction: float) -> str:
    u = _unit_hash(relative)
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


class TokenWindows(Dataset):
    """Non-overlapping windows of ``block_size + 1`` tokens -> ``(inputs[:-1], targets[1:])``."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        if len(tokens) < block_size + 1:
            raise ValueError(f"only {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i: int):
        chunk = self.tokens[i * self.block_size: (i + 1) * self.block_size + 1]
        return chunk[:-1], chunk[1:]


class PySourceDataModule(LightningDataModule):
    """Batches ``(idx (B, T), targets (B, T))`` of stdlib source code, next-character targets.

    Args:
        block_size: context length T.
        batch_size: batch size.
        max_chars: stop reading sources once this many characters are collected (all splits together).
        val_fraction, test_fraction: expected share of files in val/test.
        root: directory to read instead of the stdlib (for tests).
    """

    def __init__(self, block_size: int = 64, batch_size: int = 32, max_chars: int = 1_000_000,
                 val_fraction: float = 0.05, test_fraction: float = 0.05, root: str | None = None,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.splits: dict[str, TokenWindows] = {}

    @property
    def shape_hints(self) -> dict[str, int]:
        return {"vocab_size": VOCAB_SIZE, "block_size": self.hparams.block_size}

    def read_splits(self) -> dict[str, np.ndarray]:
        """Token arrays for train/val/test, deterministic for a given Python installation."""
        root = Path(self.hparams.root or sysconfig.get_paths()["stdlib"])
        files = sorted(stdlib_sources(root), key=lambda p: _unit_hash("order:" + p.relative_to(root).as_posix()))
        fractions = {"val": self.hparams.val_fraction, "test": self.hparams.test_fraction}
        fractions["train"] = 1.0 - fractions["val"] - fractions["test"]
        budget = {k: f * self.hparams.max_chars for k, f in fractions.items()}
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
        for path in files:
            if all(budget[k] <= 0 for k in parts):
                break
            split = _split_of(path.relative_to(root).as_posix(), self.hparams.val_fraction, self.hparams.test_fraction)
            if budget[split] <= 0:
                continue
            text = path.read_text(encoding="utf-8", errors="replace") + "\n"
            parts[split].append(encode(text))
            budget[split] -= len(text)
        return {k: np.concatenate(v) if v else np.zeros(0, np.uint8) for k, v in parts.items()}

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = {k: TokenWindows(v, self.hparams.block_size) for k, v in self.read_splits().items()}

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled in an order fixed by ``(seed, epoch)``, last partial batch dropped; resumes mid-epoch
        (:mod:`lit_act.data.resumable`)."""
        return ResumableDataLoader(self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True,
                                   seed=self.hparams.seed, drop_last=True, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
