"""Out-of-distribution sets built from bundled data (no download), for NAC-UE and the MSP / energy baselines.

:func:`digits_ood_sets` builds, next to a :class:`~lit_act.data.DigitsDataModule`, OOD sets of the same size and
layout as its test split, transformed in raw pixel space ([0, 1]) and then normalised exactly as the datamodule
normalises its data (its training split's mean and std):

* ``uniform``: i.i.d. uniform pixels on [0, 1];
* ``gaussian``: i.i.d. Gaussian pixels with the training split's mean and std, clipped to [0, 1];
* ``inverted``: test digits with ``1 - x`` (white background);
* ``flipped``: test digits flipped upside down (vertical flip);
* ``rotated``: test digits rotated by 90 degrees;
* ``heldout``: test digits of the classes the datamodule left out (``DigitsDataModule(classes=...)``; only when it
  holds some out).

:func:`shuffled_proxy` is the synthetic OOD proxy used by the NAC parameter search when the user gives none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lit_act.data.digits import DigitsDataModule

DIGITS_OOD_SETS = ("uniform", "gaussian", "inverted", "flipped", "rotated", "heldout")


def _raw_module(datamodule: DigitsDataModule, classes: list[int]) -> DigitsDataModule:
    hp = datamodule.hparams
    raw = DigitsDataModule(batch_size=hp.batch_size, val_fraction=hp.val_fraction, test_fraction=hp.test_fraction,
                           split_seed=hp.split_seed, classes=classes, normalize=False)
    raw.setup()
    return raw


def digits_ood_sets(datamodule: DigitsDataModule, names: Sequence[str] | None = None,
                    seed: int = 0) -> dict[str, TensorDataset]:
    """``{name: TensorDataset(images (n, 1, 8, 8), labels)}`` for each requested OOD set (default: every available
    one; ``heldout`` only when ``datamodule.classes`` leaves classes out). Labels are ``-1`` for synthetic sets and the
    true digit for transformed / held-out ones. Deterministic given ``seed``."""
    if not isinstance(datamodule, DigitsDataModule):
        raise TypeError(f"digits_ood_sets needs a DigitsDataModule, got {type(datamodule).__name__}")
    held = [c for c in range(10) if c not in datamodule.classes]
    if names is None:
        names = [n for n in DIGITS_OOD_SETS if n != "heldout" or held]
    unknown = [n for n in names if n not in DIGITS_OOD_SETS]
    if unknown:
        raise ValueError(f"unknown OOD set(s) {unknown}; valid: {', '.join(DIGITS_OOD_SETS)}")
    if "heldout" in names and not held:
        raise ValueError("'heldout' needs a DigitsDataModule that holds classes out, e.g. classes=[0, 1, 2, 3, 4]")
    raw = _raw_module(datamodule, datamodule.classes)
    train_x = raw.train_set.tensors[0]
    test_x, test_y = raw.test_set.tensors
    mean, std = train_x.mean(), train_x.std()
    normalize = (lambda x: (x - mean) / std) if datamodule.hparams.normalize else (lambda x: x)
    gen = torch.Generator().manual_seed(seed)
    synthetic_y = torch.full((len(test_x),), -1, dtype=torch.long)
    out: dict[str, TensorDataset] = {}
    for name in names:
        if name == "uniform":
            x, y = torch.rand(test_x.shape, generator=gen), synthetic_y
        elif name == "gaussian":
            x, y = (mean + std * torch.randn(test_x.shape, generator=gen)).clamp(0, 1), synthetic_y
        elif name == "inverted":
            x, y = 1.0 - test_x, test_y
        elif name == "flipped":
            x, y = test_x.flip(-2), test_y
        elif name == "rotated":
            x, y = test_x.rot90(1, dims=(-2, -1)), test_y
        else:
            x, y = _raw_module(datamodule, held).test_set.tensors
        out[name] = TensorDataset(normalize(x).contiguous(), y)
    return out


def shuffled_proxy(inputs: Tensor, seed: int = 0) -> Tensor:
    """Synthetic OOD proxy from in-distribution inputs: every sample's entries (pixels, features or tokens) are
    randomly permuted within the sample, which keeps each sample's value histogram and destroys its structure.
    Deterministic given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    flat = inputs.reshape(inputs.shape[0], -1)
    order = torch.argsort(torch.rand(flat.shape, generator=gen), dim=1).to(inputs.device)
    return flat.gather(1, order).reshape(inputs.shape)
