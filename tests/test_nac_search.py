"""NAC-UE defaults and parameter search on a digits classifier trained in the test (a few seconds)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lit_act.data import DigitsDataModule
from lit_act.data.ood import digits_ood_sets, mixture_proxy, shuffled_proxy
from lit_act.models import CNNClassifier, MLPClassifier
from lit_act.stats.nac import LOGITS, LayerParams, NACModel
from lit_act.stats.nac_search import search_parameters
from lit_act.stats.ood import auroc, ood_auroc
from lit_act.stats.tap import select_modules


def _train(model, dm: DigitsDataModule, epochs: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=model.lr)
    for _ in range(epochs):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            model.loss(model(x), y).backward()
            opt.step()
    model.eval()


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def mlp(digits: DigitsDataModule) -> MLPClassifier:
    torch.manual_seed(0)
    model = MLPClassifier(64, 10)
    _train(model, digits, epochs=3)
    return model


def _uniform_loader(dm: DigitsDataModule) -> DataLoader:
    return DataLoader(digits_ood_sets(dm, ["uniform"], seed=0)["uniform"], batch_size=256)


def test_default_nac_ue_scores_in_distribution_above_uniform_noise(mlp, digits) -> None:
    nac = NACModel(select_modules(mlp)).fit(mlp, digits.train_dataloader(), max_samples=1000)
    x_in = digits.test_set.tensors[0]
    x_out = digits_ood_sets(digits, ["uniform"], seed=0)["uniform"].tensors[0]
    s_in, s_out = nac.score(mlp, x_in), nac.score(mlp, x_out)
    assert s_in.mean() > s_out.mean()
    value = ood_auroc(lambda x: nac.score(mlp, x), digits.test_dataloader(), _uniform_loader(digits))
    assert value == pytest.approx(auroc(s_in, s_out))
    assert value > 0.9


def test_default_nac_ue_beats_chance_on_a_trained_cnn(digits) -> None:
    torch.manual_seed(0)
    model = CNNClassifier(1, 10)
    _train(model, digits, epochs=12)
    nac = NACModel(select_modules(model)).fit(model, digits.train_dataloader(), max_samples=1000)
    value = ood_auroc(lambda x: nac.score(model, x), digits.test_dataloader(), _uniform_loader(digits))
    assert value > 0.7


def _proxy_auroc(model, dm, modules, params) -> float:
    """Validation AUROC of ``params`` against the search's synthetic proxy, computed without the search code."""
    nac = NACModel(modules, params).fit(model, dm.train_dataloader(), max_samples=1000)
    x_val = dm.val_set.tensors[0]
    return auroc(nac.score(model, x_val), nac.score(model, shuffled_proxy(x_val, seed=0)))


def test_search_improves_over_a_bad_setting_and_reports_consistently(mlp, digits) -> None:
    modules = select_modules(mlp)
    bad = LayerParams(alpha=1.0, saturation=50, bins=50)
    bad_auroc = _proxy_auroc(mlp, digits, modules, bad)
    result = search_parameters(mlp, digits.train_dataloader(), digits.val_dataloader(), modules,
                               alphas=("auto", 1.0, 100.0), saturations=(5, 50), bins=(20, 50), seed=0,
                               proxy="shuffled")
    assert bad_auroc < 0.5  # the failure mode of issue 8: worse than chance
    assert result.val_auroc > 0.95 > bad_auroc
    chosen = {n: modules[n] for n in result.params}
    assert result.val_auroc == pytest.approx(_proxy_auroc(mlp, digits, chosen, result.params))
    assert len(result.trials) == 2 * 3 * 2 * 2 and len(result.subsets) == 3
    flat = result.flat()
    assert flat["search/nac/val_auroc"] == result.val_auroc
    assert {f"search/nac/bins/{n}" for n in result.params} <= set(flat)
    # it generalises to a real OOD set on the test split
    nac = NACModel(chosen, result.params).fit(mlp, digits.train_dataloader(), max_samples=1000)
    assert ood_auroc(lambda x: nac.score(mlp, x), digits.test_dataloader(), _uniform_loader(digits)) > 0.95


def test_search_is_deterministic_given_the_seed(mlp, digits) -> None:
    modules = select_modules(mlp)
    kwargs = dict(strategy="random", num_trials=6, seed=3, fit_samples=400, val_samples=200)
    a = search_parameters(mlp, digits.train_dataloader(), digits.val_dataloader(), modules, **kwargs)
    b = search_parameters(mlp, digits.train_dataloader(), digits.val_dataloader(), modules, **kwargs)
    assert a.params == b.params and a.val_auroc == b.val_auroc
    assert [t[1] for t in a.trials] == [t[1] for t in b.trials] and len(a.trials) == 2 * 6


def test_search_with_a_user_proxy_and_bad_arguments(mlp, digits) -> None:
    modules = select_modules(mlp, "hidden.1.act")
    proxy = DataLoader(digits_ood_sets(digits, ["gaussian"], seed=5)["gaussian"], batch_size=128)
    result = search_parameters(mlp, digits.train_dataloader(), digits.val_dataloader(), modules, proxy,
                               alphas=(10.0,), saturations=(20,), bins=(50,), search_layers=False)
    assert list(result.params) == ["hidden.1.act"] and result.params["hidden.1.act"].alpha == 10.0
    with pytest.raises(ValueError, match="shuffled, mixture, both"):
        search_parameters(mlp, [], [], modules, proxy="noise")
    with pytest.raises(ValueError, match="labels"):
        search_parameters(mlp, [(x,) for x, _ in digits.train_dataloader()], [(x,) for x, _ in digits.val_dataloader()],
                          modules, proxy="mixture", alphas=(10.0,), saturations=(20,), bins=(50,))
    with pytest.raises(ValueError, match="strategy"):
        search_parameters(mlp, [], [], modules, strategy="bayes")
    with pytest.raises(ValueError, match="num_trials"):
        search_parameters(mlp, [], [], modules, strategy="random")
    with pytest.raises(ValueError, match="at least one candidate"):
        search_parameters(mlp, [], [], modules, bins=())


def test_default_proxy_adds_class_mixtures_and_the_logits_layer_can_be_chosen(mlp, digits) -> None:
    modules = select_modules(mlp)
    kwargs = dict(alphas=("auto",), saturations=(20,), bins=(100,), search_layers=False, logits_layer=True)
    result = search_parameters(mlp, digits.train_dataloader(), digits.val_dataloader(), modules, **kwargs)
    assert list(result.params) == [*modules, LOGITS]
    # the union proxy's AUROC is the mean of the shuffled and the mixture AUROCs, computed here without the search
    nac = NACModel(modules, result.params[LOGITS], logits_layer=True).fit(mlp, digits.train_dataloader(), 1000)
    x_val, y_val = digits.val_set.tensors
    s_val = nac.score(mlp, x_val)
    shuffled = auroc(s_val, nac.score(mlp, shuffled_proxy(x_val, seed=0)))
    mixed = auroc(s_val, nac.score(mlp, mixture_proxy(x_val, y_val, seed=0)))
    assert result.val_auroc == pytest.approx((shuffled + mixed) / 2, abs=1e-4)
