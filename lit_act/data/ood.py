"""Out-of-distribution sets built from bundled data (no download), for NAC-UE and the MSP / energy baselines.

:func:`digits_ood_sets` builds, next to a :class:`~lit_act.data.DigitsDataModule`, OOD sets of the same size and
layout as its test split, transformed in raw pixel space ([0, 1]) and then normalised exactly as the datamodule
normalises its data (its training split's mean and std):

* ``uniform``: i.i.d. uniform pixels on [0, 1];
* ``gaussian``: i.i.d. Gaussian pixels with the training split's mean and std, clipped to [0, 1];
* ``inverted``: test digits with ``1 - x`` (white background);
* ``flipped``: test digits flipped upside down (vertical flip);
* ``rotated``: test digits rotated by 90 degrees;
* ``letters``: capital letters A-Z drawn the way UCI drew the digits (:func:`letters_like_digits`): a binarised
  32 x 32 bitmap of the size-normalised glyph, counted in non-overlapping 4 x 4 blocks (8 x 8 values in 0..16), then
  scaled by 1/16 as :func:`~lit_act.data.digits.load_digits_tensors` scales the digits;
* ``heldout``: test digits of the classes the datamodule left out (``DigitsDataModule(classes=...)``; only when it
  holds some out).

``uniform``, ``gaussian``, ``inverted``, ``flipped`` and ``rotated`` are *far* OOD (:data:`FAR_OOD_SETS`): noise or
digits in a pose never seen. ``letters`` and ``heldout`` are *near* OOD (:data:`NEAR_OOD_SETS`): upright handwriting-
like glyphs in the digits' own drawing process, of classes the model never saw.

:func:`shuffled_proxy` is the synthetic OOD proxy used by the NAC parameter search when the user gives none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lit_act.data.digits import DigitsDataModule

DIGITS_OOD_SETS = ("uniform", "gaussian", "inverted", "flipped", "rotated", "letters", "heldout")
FAR_OOD_SETS = ("uniform", "gaussian", "inverted", "flipped", "rotated")
NEAR_OOD_SETS = ("letters", "heldout")
LETTER_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
                "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif-Italic.ttf")
"""Fonts shipped with matplotlib (``mpl-data/fonts/ttf``) that :func:`letters_like_digits` draws with."""


def _font_path(name: str) -> str:
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name)


def letters_like_digits(num: int, seed: int = 0, fonts: Sequence[str] = LETTER_FONTS) -> tuple[Tensor, Tensor]:
    """``num`` capital letters drawn like the UCI optdigits / sklearn digits: images ``(num, 1, 8, 8)`` in [0, 1]
    (block counts / 16) and labels ``(num,)`` (0 = A ... 25 = Z).

    UCI (Alpaydin & Kaynak, 1998) size-normalised each handwritten character into a 32 x 32 binary bitmap and counted
    the on pixels of non-overlapping 4 x 4 blocks. Each sample here: a random letter in a random matplotlib font
    (:data:`LETTER_FONTS`) with a random stroke width (0-3 px at 48 pt: pen thickness), a small random rotation (+-12 degrees), the
    glyph's bounding box scaled so its longer side is 26-32 px (aspect ratio kept) at a random offset inside the 32 x 32
    box, binarised at half intensity, then block-counted. Deterministic given ``seed``.

    Example:
        >>> x, y = letters_like_digits(4, seed=0)
        >>> x.shape, bool(((x * 16) == (x * 16).round()).all())
        (torch.Size([4, 1, 8, 8]), True)
    """
    from PIL import Image, ImageDraw, ImageFont

    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    rng = np.random.default_rng(seed)
    loaded: dict[str, ImageFont.FreeTypeFont] = {}
    images = np.zeros((num, 8, 8), dtype=np.float32)
    labels = rng.integers(0, 26, num)
    for i, label in enumerate(labels):
        name = fonts[rng.integers(len(fonts))]
        if name not in loaded:
            loaded[name] = ImageFont.truetype(_font_path(name), 48)
        canvas = Image.new("L", (96, 96), 0)
        ImageDraw.Draw(canvas).text((20, 10), chr(ord("A") + int(label)), fill=255, font=loaded[name],
                                    stroke_width=int(rng.integers(0, 4)), stroke_fill=255)
        canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
        glyph = canvas.crop(canvas.getbbox())
        scale = float(rng.uniform(26, 32)) / max(glyph.size)
        w, h = (max(1, min(32, round(d * scale))) for d in glyph.size)
        glyph = np.asarray(glyph.resize((w, h), Image.BILINEAR)) >= 128
        bitmap = np.zeros((32, 32), dtype=np.float32)
        top, left = int(rng.integers(0, 33 - h)), int(rng.integers(0, 33 - w))
        bitmap[top:top + h, left:left + w] = glyph
        images[i] = bitmap.reshape(8, 4, 8, 4).sum((1, 3))
    return torch.from_numpy(images).unsqueeze(1) / 16.0, torch.from_numpy(labels).long()


def _raw_module(datamodule: DigitsDataModule, classes: list[int]) -> DigitsDataModule:
    hp = datamodule.hparams
    raw = DigitsDataModule(batch_size=hp.batch_size, val_fraction=hp.val_fraction, test_fraction=hp.test_fraction,
                           split_seed=hp.split_seed, classes=classes, normalize=False)
    raw.setup()
    return raw


def digits_ood_sets(datamodule: DigitsDataModule, names: Sequence[str] | None = None,
                    seed: int = 0) -> dict[str, TensorDataset]:
    """``{name: TensorDataset(images (n, 1, 8, 8), labels)}`` for each requested OOD set (default: every available
    one; ``heldout`` only when ``datamodule.classes`` leaves classes out). Labels are ``-1`` for synthetic sets and letters and the
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
        elif name == "letters":
            x, y = letters_like_digits(len(test_x), seed)[0], synthetic_y
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


def mixture_proxy(inputs: Tensor, labels: Tensor, seed: int = 0, low: float = 0.3, high: float = 0.7) -> Tensor:
    """Near-OOD proxy from labelled in-distribution inputs: ``lam * x_i + (1 - lam) * x_j`` with ``x_j`` a random
    sample of a *different* class and ``lam ~ U[low, high]`` per sample -- an image of no training class built from
    training-class strokes, like held-out classes or letters. Deterministic given ``seed``.

    Example:
        >>> x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
        >>> mixture_proxy(x, y).shape
        torch.Size([6, 1, 8, 8])
    """
    if labels.shape[0] != inputs.shape[0] or labels.unique().numel() < 2:
        raise ValueError("mixture_proxy needs one label per input and at least two classes")
    if not 0 <= low <= high <= 1:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    n = labels.shape[0]
    partner = torch.randint(0, n, (n,), generator=gen)
    same = labels[partner] == labels
    while same.any():
        partner[same] = torch.randint(0, n, (int(same.sum()),), generator=gen)
        same = labels[partner] == labels
    lam = (low + (high - low) * torch.rand(n, generator=gen)).to(inputs.device)
    lam = lam.view(-1, *[1] * (inputs.dim() - 1))
    return lam * inputs + (1 - lam) * inputs[partner.to(inputs.device)]
