"""OOD scores, AUROC and the bundled OOD sets (lit_act.stats.ood, lit_act.data.ood)."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from lit_act.data import DigitsDataModule
from lit_act.data.digits import load_digits_tensors
from lit_act.data.ood import (
    FAR_OOD_SETS,
    NEAR_OOD_SETS,
    digits_ood_sets,
    letters_like_digits,
    mixture_proxy,
    shuffled_proxy,
)
from lit_act.data.splits import split_indices
from lit_act.stats.ood import auroc, energy_scores, logits_scorer, msp_scores, ood_auroc


def test_auroc_matches_sklearn_with_ties() -> None:
    torch.manual_seed(0)
    s_in = torch.randint(0, 5, (40,)).float()
    s_out = torch.randint(0, 4, (30,)).float()
    expected = roc_auc_score([1] * 40 + [0] * 30, torch.cat([s_in, s_out]).numpy())
    assert auroc(s_in, s_out) == pytest.approx(expected, abs=1e-6)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([float("nan")]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="at least one"):
        auroc(torch.tensor([]), torch.tensor([1.0]))


def test_baseline_formulas() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    e = torch.exp(logits)
    torch.testing.assert_close(msp_scores(logits), (e / e.sum(1, keepdim=True)).max(1).values)
    torch.testing.assert_close(energy_scores(logits), torch.log(e.sum(1)))
    torch.testing.assert_close(energy_scores(logits, 2.0), 2.0 * torch.log(torch.exp(logits / 2).sum(1)))
    with pytest.raises(ValueError, match="temperature"):
        energy_scores(logits, 0.0)


def test_ood_auroc_on_loaders_and_scorer_restores_flags() -> None:
    model = torch.nn.Linear(3, 2)
    model.train()
    scorer = logits_scorer(model, "energy")
    x_in, x_out = torch.randn(10, 3), torch.randn(12, 3)
    value = ood_auroc(scorer, [(x_in[:5], None), (x_in[5:], None)], [(x_out, None)])
    with torch.no_grad():
        assert value == pytest.approx(auroc(energy_scores(model(x_in)), energy_scores(model(x_out))))
    assert model.training
    with pytest.raises(ValueError, match="msp, energy"):
        logits_scorer(model, "odin")


def test_digits_ood_sets_are_transformed_test_digits_normalised_like_the_datamodule() -> None:
    dm = DigitsDataModule(classes=[0, 1, 2, 3, 4])
    dm.setup()
    sets = digits_ood_sets(dm, seed=1)
    assert list(sets) == ["uniform", "gaussian", "inverted", "flipped", "rotated", "letters", "heldout"]
    test_x, test_y = dm.test_set.tensors
    images, labels = load_digits_tensors()
    raw_train = DigitsDataModule(classes=[0, 1, 2, 3, 4], normalize=False)
    raw_train.setup()
    mean, std = raw_train.train_set.tensors[0].mean(), raw_train.train_set.tensors[0].std()
    torch.testing.assert_close(sets["flipped"].tensors[0], test_x.flip(-2))
    torch.testing.assert_close(sets["rotated"].tensors[0], test_x.rot90(1, dims=(-2, -1)))
    raw_test = test_x * std + mean
    torch.testing.assert_close(sets["inverted"].tensors[0], (1 - raw_test - mean) / std, rtol=1e-5, atol=1e-5)
    raw_uniform = sets["uniform"].tensors[0] * std + mean
    assert raw_uniform.min() >= -1e-5 and raw_uniform.max() <= 1 + 1e-5 and raw_uniform.shape == test_x.shape
    held_x, held_y = sets["heldout"].tensors
    assert set(held_y.tolist()) == {5, 6, 7, 8, 9} and set(test_y.tolist()) <= {0, 1, 2, 3, 4}
    _, _, test_idx = split_indices(len(labels), 0.15, 0.15, 0)
    held_idx = test_idx[labels[test_idx] >= 5]
    torch.testing.assert_close(held_x, (images[held_idx] - mean) / std)
    torch.testing.assert_close(sets["uniform"].tensors[0], digits_ood_sets(dm, ["uniform"], seed=1)["uniform"]
                               .tensors[0])


def test_digits_ood_sets_bad_names() -> None:
    dm = DigitsDataModule()
    dm.setup()
    assert "heldout" not in digits_ood_sets(dm, seed=0)
    with pytest.raises(ValueError, match="holds classes out"):
        digits_ood_sets(dm, ["heldout"])
    with pytest.raises(ValueError, match="uniform, gaussian"):
        digits_ood_sets(dm, ["svhn"])


def test_shuffled_proxy_keeps_each_sample_histogram_and_is_seeded() -> None:
    x = torch.randn(6, 1, 8, 8)
    p = shuffled_proxy(x, seed=3)
    torch.testing.assert_close(p.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    assert not torch.equal(p, x)
    torch.testing.assert_close(p, shuffled_proxy(x, seed=3))


def test_letters_are_block_counts_of_a_binary_32x32_bitmap_normalised_like_the_digits() -> None:
    x, y = letters_like_digits(200, seed=4)
    counts = x * 16
    assert x.shape == (200, 1, 8, 8) and y.min() >= 0 and y.max() <= 25 and len(y.unique()) > 20
    torch.testing.assert_close(counts, counts.round())  # integer on-pixel counts of 4 x 4 blocks
    assert counts.min() == 0 and counts.max() == 16
    # the glyph is size-normalised: its bounding box spans at least 26 of the 32 pixels, i.e. >= 7 blocks one way
    for img in counts[:, 0]:
        rows, cols = img.sum(1).nonzero(), img.sum(0).nonzero()
        assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 >= 7
    torch.testing.assert_close(x, letters_like_digits(200, seed=4)[0])
    assert not torch.equal(x, letters_like_digits(200, seed=5)[0])
    # roughly as much ink as the digits (mean block count within 30%)
    digits, _ = load_digits_tensors()
    assert abs(x.mean().item() / digits.mean().item() - 1) < 0.3
    dm = DigitsDataModule()
    dm.setup()
    letters = digits_ood_sets(dm, ["letters"], seed=4)["letters"]
    raw_train = DigitsDataModule(normalize=False)
    raw_train.setup()
    mean, std = raw_train.train_set.tensors[0].mean(), raw_train.train_set.tensors[0].std()
    n = len(dm.test_set)
    torch.testing.assert_close(letters.tensors[0], (letters_like_digits(n, seed=4)[0] - mean) / std)
    assert (letters.tensors[1] == -1).all()
    assert set(FAR_OOD_SETS) | set(NEAR_OOD_SETS) == set(digits_ood_sets(DigitsDataModule(classes=[0, 1]), seed=0))


def test_mixture_proxy_mixes_two_different_classes() -> None:
    torch.manual_seed(0)
    x = torch.stack([torch.full((1, 2, 2), float(i)) for i in range(8)])  # sample i is constant i
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    p = mixture_proxy(x, y, seed=2, low=0.3, high=0.7)
    for i in range(8):
        value = p[i].flatten()[0].item()
        assert (p[i] == value).all()
        # value = lam * i + (1 - lam) * j with j of another class and lam in [0.3, 0.7]
        ok = [j for j in range(8) if y[j] != y[i] and 0.3 - 1e-6 <= ((value - j) / (i - j) if i != j else -1) <= 0.7 + 1e-6]
        assert ok, (i, value)
    torch.testing.assert_close(p, mixture_proxy(x, y, seed=2, low=0.3, high=0.7))
    with pytest.raises(ValueError, match="two classes"):
        mixture_proxy(x, torch.zeros(8, dtype=torch.long))
