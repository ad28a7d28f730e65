"""NeuronActivationCoverage callback: numbers equal a direct computation, resume, DDP, evaluation, bad input."""

from __future__ import annotations

import csv
import functools
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_act.callbacks.nac import NeuronActivationCoverage
from lit_act.data import DigitsDataModule
from lit_act.data.ood import digits_ood_sets
from lit_act.models import MLPClassifier
from lit_act.models.base import LitActModule
from lit_act.stats.nac import NAC_UE_PARAMS, NACModel
from lit_act.stats.ood import auroc, energy_scores, msp_scores
from lit_act.stats.tap import select_modules
from tests.helpers import compose_train

CONF = Path(__file__).resolve().parents[1] / "conf"


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows = defaultdict(dict)

    name = "memory"
    version = 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows[step].update(metrics)


class TinyNet(LitActModule):
    """6 -> 16 -> ReLU -> 3."""

    def __init__(self, lr=0.05):
        super().__init__(lr=lr)
        self.fc_in, self.act, self.fc_out = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


def _data(n=64, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _nac_me_by_formula(model: TinyNet, x, y, counts):
    """Paper formula written out: z = relu(W1 x + b1), g = W2^T (softmax - u), s = sigmoid(0.1 z g); count correct
    samples per linear bin [k/50, (k+1)/50) (last closed)."""
    with torch.no_grad():
        z = torch.relu(x @ model.fc_in.weight.T + model.fc_in.bias)
        logits = z @ model.fc_out.weight.T + model.fc_out.bias
        g = (torch.softmax(logits, -1) - 1 / 3) @ model.fc_out.weight
        s = torch.sigmoid(0.1 * z * g)[logits.argmax(-1) == y]
    for k in range(50):
        lo, hi = k / 50, (k + 1) / 50
        counts[k] += ((s >= lo) & ((s < hi) | (k == 49))).sum(0)


def _coverage(counts):
    return (counts / 500).clamp(max=1).sum(0).div(50).mean().item()


class FormulaRecorder(Callback):
    def __init__(self):
        self.counts = torch.zeros(50, 16, dtype=torch.float64)
        self.per_epoch = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _nac_me_by_formula(pl_module, *batch, self.counts)

    def on_train_epoch_end(self, trainer, pl_module):
        self.per_epoch.append(_coverage(self.counts))
        self.counts.zero_()


def _fit(tmp_path, callbacks, model=None, data=None, **kw):
    model = model or TinyNet()
    kw.setdefault("max_epochs", 2)
    trainer = Trainer(default_root_dir=tmp_path, callbacks=callbacks, logger=MemoryLogger(),
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=0, **kw)
    trainer.fit(model, data or _data())
    return trainer, model


def test_nac_me_equals_the_formula_on_the_same_batches(tmp_path):
    torch.manual_seed(0)
    recorder = FormulaRecorder()
    cb = NeuronActivationCoverage(every_n_steps=1, evaluate_on=None)  # running mode
    trainer, model = _fit(tmp_path, [recorder, cb])
    rows = trainer.logger.rows
    logged = [rows[s]["train/nac_me/act"] for s in sorted(rows) if "train/nac_me/act" in rows[s]]
    assert logged == pytest.approx(recorder.per_epoch, rel=1e-6)
    assert len(logged) == 2 and 0 < logged[-1] < 1
    assert rows[8]["train/nac_me/mean"] == rows[8]["train/nac_me/act"]
    assert rows[8]["train/nac_me/act/nonfinite"] == 0
    assert not model.act._forward_hooks and not model.fc_in._forward_hooks


def test_nac_me_probe_pass_equals_the_formula_on_the_fixed_probe_set(tmp_path):
    torch.manual_seed(0)
    cb = NeuronActivationCoverage(evaluate_on=None, probe_samples=40)  # default: a probe pass at each epoch end
    trainer, model = _fit(tmp_path, [cb], max_epochs=2, data=DataLoader(_data().dataset, batch_size=8,
                                                                        shuffle=True))
    rows = trainer.logger.rows
    assert sorted(s for s in rows if "probe/nac_me/act" in rows[s]) == [8, 16]
    assert not any("train/nac_me/act" in row for row in rows.values())
    # the probe rule written out (lit_act.stats.nac.nac_me_params for 40 samples): alpha = 1 / the 0.9-quantile of
    # |z g| over all probe samples and neurons, 100 linear bins, saturation O = max(1, 2 * 40 / 100) = 1
    x, y = _data().dataset.tensors
    x, y = x[:40], y[:40]  # the first 40 training samples in dataset order, final weights
    with torch.no_grad():
        z = torch.relu(x @ model.fc_in.weight.T + model.fc_in.bias)
        logits = z @ model.fc_out.weight.T + model.fc_out.bias
        g = (torch.softmax(logits, -1) - 1 / 3) @ model.fc_out.weight
        products = (z * g).double()
        alpha = 1.0 / torch.quantile(products.abs().flatten(), 0.9).item()
        s = torch.sigmoid(alpha * products)[logits.argmax(-1) == y]
    counts = torch.stack([((s >= k / 100) & ((s < (k + 1) / 100) | (k == 99))).sum(0) for k in range(100)])
    expected = counts.double().clamp(max=1.0).sum(0).div(100).mean().item()
    assert rows[16]["probe/nac_me/act"] == pytest.approx(expected, rel=1e-5)
    assert 0 < expected < 1
    assert model.training  # flags restored


def test_every_n_steps_and_fast_dev_run(tmp_path, monkeypatch):
    seen = []
    update = NACModel.update

    def spy(self, model, inputs, targets=None):
        seen.append(len(inputs[0]))  # the callback passes whole (inputs, targets) batches
        return update(self, model, inputs, targets)

    monkeypatch.setattr(NACModel, "update", spy)
    cb = NeuronActivationCoverage(every_n_steps=3, evaluate_on=None)
    _fit(tmp_path, [cb], max_epochs=1)
    assert seen == [8, 8, 8]  # steps 0, 3, 6 of 8
    assert cb.me.coverage["act"]._update_count == 0  # reset after logging at epoch end
    seen.clear()
    _fit(tmp_path, [NeuronActivationCoverage(evaluate_on=None)], fast_dev_run=True)
    assert seen == []


def _run_batches(cb, trainer, model, batches):
    for i, batch in enumerate(batches):
        cb.on_train_batch_start(trainer, model, batch, i)
        cb.on_train_batch_end(trainer, model, None, batch, i)


def test_resume_from_state_dict_continues_the_histograms(tmp_path):
    torch.manual_seed(1)
    model = TinyNet()
    batches = list(_data(n=48, batch_size=8))
    trainer = Trainer(default_root_dir=tmp_path, logger=MemoryLogger(), enable_progress_bar=False)
    full = NeuronActivationCoverage(every_n_steps=1, evaluate_on=None)
    full.setup(trainer, model, "fit")
    _run_batches(full, trainer, model, batches)
    first = NeuronActivationCoverage(every_n_steps=1, evaluate_on=None)
    first.setup(trainer, model, "fit")
    _run_batches(first, trainer, model, batches[:3])
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = NeuronActivationCoverage(every_n_steps=1, evaluate_on=None)
    resumed.setup(trainer, model, "fit")
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    _run_batches(resumed, trainer, model, batches[3:])
    torch.testing.assert_close(resumed.me.coverage["act"].counts, full.me.coverage["act"].counts)
    assert resumed.state_key == full.state_key
    resumed.on_train_epoch_end(trainer, model)
    full.on_train_epoch_end(trainer, model)
    assert resumed.last_me == full.last_me


def _ddp_fit(tmp_path, devices):
    torch.manual_seed(0)
    model = TinyNet(lr=1e-9)  # same weights in both runs
    data = _data(n=64, batch_size=4 if devices == 2 else 8)
    logger = CSVLogger(tmp_path, name=f"dev{devices}", version=0)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices == 2 else "auto",
                      callbacks=[NeuronActivationCoverage(every_n_steps=1, evaluate_on=None)], logger=logger,
                      max_epochs=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, use_distributed_sampler=True, limit_val_batches=0)
    trainer.fit(model, data)
    rows = list(csv.DictReader(open(tmp_path / f"dev{devices}" / "version_0" / "metrics.csv")))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and k.startswith("train/nac")}


@pytest.mark.slow
def test_ddp_spawn_two_processes_equal_single_process(tmp_path):
    single = _ddp_fit(tmp_path, 1)
    double = _ddp_fit(tmp_path, 2)
    assert set(single) == {"train/nac_me/act", "train/nac_me/act/nonfinite", "train/nac_me/mean"}
    for key, value in single.items():
        assert double[key] == pytest.approx(value, rel=1e-6), key


def test_end_of_test_evaluation_equals_direct_computation(tmp_path):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64)
    model = MLPClassifier(64, 10)
    ood = functools.partial(digits_ood_sets, names=["uniform", "rotated"], seed=0)
    cb = NeuronActivationCoverage(every_n_steps=None, evaluate_on="test", ood_sets=ood, fit_samples=500)
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[cb], logger=MemoryLogger(), max_epochs=2,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, dm)
    trainer.test(model, dm)
    results = cb.results
    # direct computation on the same model and data: NAC-UE defaults on every activation module plus the logits
    modules = select_modules(model)
    nac = NACModel(modules, NAC_UE_PARAMS, logits_layer=True).fit(model, dm.train_dataloader(), max_samples=500)
    x_in = dm.test_set.tensors[0]
    sets = digits_ood_sets(dm, ["uniform", "rotated"], seed=0)
    model.eval()
    with torch.no_grad():
        l_in = model(x_in)
    for name, data in sets.items():
        x_out = data.tensors[0]
        with torch.no_grad():
            l_out = model(x_out)
        assert results[f"test/nac/auroc/{name}"] == pytest.approx(auroc(nac.score(model, x_in), nac.score(model, x_out)))
        assert results[f"test/msp/auroc/{name}"] == pytest.approx(auroc(msp_scores(l_in), msp_scores(l_out)))
        assert results[f"test/energy/auroc/{name}"] == pytest.approx(auroc(energy_scores(l_in), energy_scores(l_out)))
    assert results["test/nac/auroc/mean"] == pytest.approx(
        (results["test/nac/auroc/uniform"] + results["test/nac/auroc/rotated"]) / 2)
    assert results["test/nac/coverage/hidden.0.act"] == pytest.approx(nac.layer_coverage()["hidden.0.act"])
    assert results["test/nac/coverage/logits"] == pytest.approx(nac.layer_coverage()["logits"])
    assert trainer.logger.rows[trainer.global_step]["test/nac/auroc/uniform"] == results["test/nac/auroc/uniform"]
    assert (tmp_path / "figures" / "nac_ood_auroc.png").exists()
    assert not any(m._forward_hooks for m in model.modules())


def test_evaluation_with_search_logs_the_chosen_parameters(tmp_path):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64)
    model = MLPClassifier(64, 10)
    cb = NeuronActivationCoverage(every_n_steps=None, evaluate_on="fit", figures=False, search=True,
                                  ood_sets=functools.partial(digits_ood_sets, names=["uniform"]),
                                  search_kwargs={"alphas": ["auto", 1.0], "saturations": [20], "bins": [50],
                                                 "seed": 0})
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[cb], logger=MemoryLogger(), max_epochs=2,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, dm)
    assert cb.search_result is not None and cb.results["search/nac/val_auroc"] == cb.search_result.val_auroc
    for name, params in cb.search_result.params.items():
        assert cb.results[f"search/nac/saturation/{name}"] == 20
        assert cb.results[f"search/nac/alpha/{name}"] == (-1.0 if params.alpha == "auto" else params.alpha)
    assert {f"test/{m}/auroc/uniform" for m in ("nac", "msp", "energy")} <= set(cb.results)


class TupleNet(TinyNet):
    def forward(self, x):
        return {"scores": super().forward(x)}

    def training_step(self, batch, batch_idx):
        return self.loss(self(batch[0])["scores"], batch[1])


def test_bad_input_raises_with_a_fix(tmp_path):
    with pytest.raises(ValueError, match="ood_sets"):
        NeuronActivationCoverage(evaluate_on="test")
    with pytest.raises(ValueError, match="evaluate_on"):
        NeuronActivationCoverage(evaluate_on="val", ood_sets={})
    with pytest.raises(ValueError, match="every_n_steps"):
        NeuronActivationCoverage(every_n_steps=0, evaluate_on=None)
    with pytest.raises(ValueError, match="do nothing"):
        NeuronActivationCoverage(every_n_steps=None, probe=None, evaluate_on=None)
    with pytest.raises(ValueError, match="unknown search_kwargs.*strategy"):
        NeuronActivationCoverage(evaluate_on=None, search_kwargs={"trials": 3})
    with pytest.raises(ValueError, match="saturation"):
        NeuronActivationCoverage(evaluate_on=None, saturation=0)
    with pytest.raises(ValueError, match="not selected"):
        _fit(tmp_path, [NeuronActivationCoverage(evaluate_on=None, layer_params={"fc_in": {"bins": 10}})])
    with pytest.raises(ValueError, match="match no module"):
        _fit(tmp_path, [NeuronActivationCoverage(modules="blocks.*", evaluate_on=None)])
    with pytest.raises(TypeError, match="logits_fn"):
        _fit(tmp_path, [NeuronActivationCoverage(evaluate_on=None)], model=TupleNet())
    cb = NeuronActivationCoverage(evaluate_on=None, logits_fn=lambda out: out["scores"])
    _fit(tmp_path, [cb], model=TupleNet(), max_epochs=1)
    assert 0 < cb.last_me["probe/nac_me/act"] < 1


def test_hydra_configs_instantiate(tmp_path):
    cfg = OmegaConf.load(CONF / "callbacks" / "nac.yaml")
    assert list(cfg) == ["nac"]
    cb = instantiate(cfg.nac)
    assert isinstance(cb, NeuronActivationCoverage) and cb.evaluate_on == "test" and not cb.search
    train_cfg = compose_train(tmp_path, ["experiment=nac_ood"])
    assert train_cfg.model._target_.endswith("MLPClassifier") and list(train_cfg.data.classes) == list(range(8))
    cb = instantiate(train_cfg.callbacks.nac)
    assert cb.search and cb.search_kwargs["seed"] == train_cfg.seed
    dm = instantiate(train_cfg.data)
    dm.setup()
    assert "heldout" in cb.ood_sets(dm)


class TwoBranchNet(TinyNet):
    """TinyNet plus a second activation whose output does not reach the logits."""

    def __init__(self):
        super().__init__()
        self.fc_b, self.act_b = nn.Linear(6, 4), nn.ReLU()

    def forward(self, x):
        self.act_b(self.fc_b(x))
        return super().forward(x)


def test_non_finite_layer_logs_nan_and_stays_out_of_the_mean(tmp_path):
    torch.manual_seed(0)
    model = TwoBranchNet()
    model.act_b.register_forward_hook(lambda m, args, out: out * float("nan"))
    cb = NeuronActivationCoverage(evaluate_on=None, probe_samples=40)
    with pytest.warns(UserWarning, match="NaN/Inf neuron states"):
        _fit(tmp_path, [cb], model=model, max_epochs=1, data=_data())
    me = cb.last_me
    x, y = _data().dataset.tensors
    model.eval()
    with torch.no_grad():
        correct = (model(x[:40]).argmax(-1) == y[:40]).sum().item()  # NAC-ME counts the correct probe samples
    assert math.isnan(me["probe/nac_me/act_b"]) and me["probe/nac_me/act_b/nonfinite"] == correct * 4 > 0
    assert 0 < me["probe/nac_me/act"] < 1 and me["probe/nac_me/mean"] == me["probe/nac_me/act"]
