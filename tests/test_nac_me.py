"""NAC-ME of fixed models tracks their generalisation (Liu et al., ICLR 2024, Sec. 5; issue 15, item 3).

Digits MLPs of different quality (width, epochs, label noise) are trained here; NAC-ME is computed on each fixed model
over the correctly classified samples among the first 1,000 training samples (clean labels) with the default rule
(:func:`lit_act.stats.nac.nac_me_params`), and must rank-correlate with test accuracy (Spearman >= 0.8).
"""

from __future__ import annotations

import torch
from scipy.stats import spearmanr

from lit_act.data import DigitsDataModule
from lit_act.models import MLPClassifier
from lit_act.stats.nac import NAC_ME_PARAMS, nac_me
from lit_act.stats.tap import select_modules

# (hidden widths, epochs, label-noise fraction)
MODELS = [((128, 128), 1, 0.0), ((128, 128), 3, 0.0), ((128, 128), 30, 0.0), ((16, 16), 3, 0.0),
          ((16, 16), 30, 0.0), ((128, 128), 30, 0.5), ((128, 128), 30, 0.8), ((32, 32), 10, 0.0),
          ((64, 64), 2, 0.0), ((128, 128), 10, 0.3)]


def train_digits_mlp(dm: DigitsDataModule, hidden, epochs: int, noise: float, seed: int = 0) -> MLPClassifier:
    """An MLP trained on the training split with a fraction ``noise`` of labels replaced by random ones."""
    torch.manual_seed(seed)
    model = MLPClassifier(64, 10, hidden=hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=model.lr)
    x, y = dm.train_set.tensors
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=gen) < noise
    noisy = torch.where(flip, torch.randint(0, 10, (len(y),), generator=gen), y)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            model.loss(model(x[idx]), noisy[idx]).backward()
            opt.step()
    return model.eval()


def me_table(models=MODELS) -> list[tuple[tuple, float, float, float]]:
    """``[(config, test accuracy, NAC-ME (default rule), NAC-ME (paper setting))]``."""
    dm = DigitsDataModule()
    dm.setup()
    x_test, y_test = dm.test_set.tensors
    probe = [dm.train_set.tensors[0][:1000], dm.train_set.tensors[1][:1000]]
    rows = []
    for config in models:
        model = train_digits_mlp(dm, *config)
        with torch.no_grad():
            acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
        modules = select_modules(model)
        rows.append((config, acc, nac_me(model, [probe], modules)["mean"],
                     nac_me(model, [probe], modules, params=NAC_ME_PARAMS)["mean"]))
    return rows


def test_nac_me_rank_correlates_with_test_accuracy() -> None:
    rows = me_table()
    acc = [r[1] for r in rows]
    me = [r[2] for r in rows]
    assert max(acc) - min(acc) > 0.4  # models of clearly different quality
    assert spearmanr(acc, me).statistic >= 0.8, rows
    assert max(me) - min(me) > 0.1  # and NAC-ME spreads (the paper setting spans ~0.03 on these models)
