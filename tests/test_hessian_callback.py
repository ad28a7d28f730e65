"""HessianSpectrum: values against the dense Hessian, no trace left on the training run, checkpoints, bad input."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning import Callback, LightningModule, Trainer, seed_everything
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_act.callbacks.hessian import HessianSpectrum, preserved_training_state
from lit_act.callbacks.hessian_config import HessianConfig
from lit_act.hessian import HessianOperator, lla_criteria, slq
from lit_act.hessian.krylov_trace import lanczos_trace
from lit_act.models import LitActModule, MLPClassifier
from tests.dense import hessian_of, weighted_loss

CONF = Path(__file__).resolve().parents[1] / "conf" / "callbacks" / "hessian.yaml"
SMALL = HessianConfig(top_k=3, trace_budget=30, slq_iter=20, slq_runs=2)


def small(**overrides) -> dict[str, Any]:
    """The callback arguments of the small test settings, with ``overrides`` of their config."""
    return {"config": dataclasses.replace(SMALL, **overrides), "progress": False}


def make_data(n: int = 96, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def make_model(batch_norm: bool = True, dropout: float = 0.2) -> MLPClassifier:
    return MLPClassifier(in_features=8, num_classes=3, hidden=(6, 5), activation="tanh", batch_norm=batch_norm,
                         dropout=dropout, lr=0.05)


def make_trainer(tmp_path, callbacks, max_epochs: int = 1, **kw) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                   callbacks=callbacks, **kw)


def dense_hessian(model: nn.Module, batches) -> torch.Tensor:
    """Exact float64 Hessian of the batch-size-weighted mean loss ``model.loss``, model in eval mode."""
    return hessian_of(copy.deepcopy(model).double().eval(),
                      weighted_loss(lambda m, b: m.loss(m(b[0].double()), b[1]), batches))


class Snapshot(Callback):
    """Records everything a Hessian evaluation could disturb, at on_train_batch_end."""

    def __init__(self):
        self.records = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        self.records.append({
            "step": trainer.global_step,
            "params": [p.detach().clone() for p in pl_module.parameters()],
            "grads": [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()],
            "grad_ids": [id(p.grad) for p in pl_module.parameters()],
            "buffers": [b.clone() for b in pl_module.buffers()],
            "flags": [m.training for m in pl_module.modules()],
            "rng": torch.get_rng_state(),
            "optimizer": copy.deepcopy(optimizer.state_dict()),
        })


def assert_same_record(a, b):
    assert a["step"] == b["step"]
    for key in ("params", "buffers"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
    assert [g is None for g in a["grads"]] == [g is None for g in b["grads"]]
    assert all(x is None or torch.equal(x, y) for x, y in zip(a["grads"], b["grads"]))
    assert a["grad_ids"] == b["grad_ids"]
    assert a["flags"] == b["flags"]
    assert torch.equal(a["rng"], b["rng"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name, value in sa[k].items():
            assert torch.equal(value, sb[k][name]) if torch.is_tensor(value) else value == sb[k][name]


@pytest.mark.parametrize("eval_mode", [True, False], ids=["eval", "train-mode-bn-dropout"])
def test_callback_leaves_no_trace_and_does_not_change_training(tmp_path, eval_mode):
    """With ``eval_mode=False`` the products run through train-mode BatchNorm (updating running statistics) and
    dropout (consuming the global RNG): everything must still be restored bit for bit."""
    seed_everything(0)
    model = make_model()
    before, after = Snapshot(), Snapshot()
    hessian = HessianSpectrum(every_n_steps=4, every_n_epochs=None, num_batches=2,
                              **small(eval_mode=eval_mode, backend="reverse"))
    loader = DataLoader(make_data(), batch_size=16, shuffle=True)
    make_trainer(tmp_path, [before, hessian, after], max_epochs=2).fit(model, loader)
    assert hessian.evaluations == 3  # steps 4, 8, 12
    assert len(before.records) == len(after.records) == 12
    for a, b in zip(before.records, after.records):
        assert_same_record(a, b)
    # the whole trajectory (dropout masks, shuffling, BN statistics) equals a run without the callback
    seed_everything(0)
    reference = make_model()
    loader = DataLoader(make_data(), batch_size=16, shuffle=True)
    make_trainer(tmp_path, [], max_epochs=2).fit(reference, loader)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    for b, c in zip(model.buffers(), reference.buffers()):
        assert torch.equal(b, c)


@pytest.mark.parametrize("backend", ["cached", "forward"])
def test_logged_values_match_dense_hessian(tmp_path, backend):
    seed_everything(0)
    model = make_model()
    hessian = HessianSpectrum(every_n_epochs=1, num_batches=2, config=HessianConfig(top_k=3, trace_budget=30,
                              slq_iter=24, slq_runs=2, backend=backend), progress=True)
    trainer = make_trainer(tmp_path, [hessian])
    trainer.fit(model, DataLoader(make_data(), batch_size=16))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/hessian/")}
    assert set(logged) == set(hessian.metric_names())
    assert len(hessian.cached_batches) == 2
    dense = dense_hessian(model, hessian.cached_batches)
    exact = torch.linalg.eigvalsh(dense)
    for i in range(3):
        assert math.isclose(logged[f"train/hessian/eig_{i + 1}"], float(exact[-1 - i]), rel_tol=1e-4)
    assert abs(logged["train/hessian/lambda_min"] - float(exact[0])) <= 1e-4 * float(exact.abs().max())
    assert abs(logged["train/hessian/trace"] - float(dense.trace())) <= 4 * logged["train/hessian/trace_se"]
    assert logged["train/hessian/converged"] == 1.0
    # the density: the Lanczos pass (from the seed's Rademacher vector, >= 24 steps) and one more SLQ run
    op = HessianOperator(copy.deepcopy(model).eval(), None, hessian.cached_batches)
    first = lanczos_trace(op, 3, 1e-4, 60, probes=0, smallest=True, seed=hessian.config.seed, min_steps=24)
    second = slq(op, 24, 1, seed=hessian.config.seed + 3)
    m = max(first.nodes.numel(), 24)
    pad = m - first.nodes.numel()
    nodes = torch.stack([torch.cat([first.nodes, first.nodes[:1].repeat(pad)]),
                         torch.cat([second.nodes[0], second.nodes[0, :1].repeat(m - 24)])])
    weights = torch.stack([torch.cat([first.weights, torch.zeros(pad, dtype=torch.float64)]),
                           torch.cat([second.weights[0], torch.zeros(m - 24, dtype=torch.float64)])])
    crit = lla_criteria(nodes, weights, 0.5)
    assert math.isclose(logged["train/hessian/re"], crit.re, rel_tol=1e-4)
    assert math.isclose(logged["train/hessian/kh"], crit.kh, rel_tol=1e-4)
    assert logged["train/hessian/trace_se"] > 0  # BatchNorm is outside the exact rules: the rest is estimated
    trace_products = 30  # the interleaved estimator's group products (trace_budget)
    assert logged["train/hessian/matvecs"] == first.top.iterations + trace_products + 24
    assert hessian.last_metrics["train/hessian/eig_1"] == pytest.approx(logged["train/hessian/eig_1"])
    assert list((tmp_path / "figures").glob("hessian_density_step*.png"))


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "empirical_fisher"])
def test_curvatures_and_exact_trace_match_dense(tmp_path, curvature):
    """No BatchNorm: the lit-act MLP is a covered chain, so the default trace is exact (zero standard error)."""
    from tests.test_hessian_curvature import dense_empirical_fisher, dense_ggn

    seed_everything(0)
    model = make_model(batch_norm=False, dropout=0.0)
    hessian = HessianSpectrum(every_n_epochs=1, num_batches=2, **small(curvature=curvature))
    trainer = make_trainer(tmp_path, [hessian])
    trainer.fit(model, DataLoader(make_data(), batch_size=16))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/hessian/")}
    batches = [(x.double(), y) for x, y in hessian.cached_batches]
    reference = copy.deepcopy(model).double().eval()
    dense = {"hessian": lambda: dense_hessian(model, hessian.cached_batches),
             "ggn": lambda: dense_ggn(reference, batches, "cross_entropy"),
             "empirical_fisher": lambda: dense_empirical_fisher(reference, batches, "cross_entropy")}[curvature]()
    exact = torch.linalg.eigvalsh(dense)
    for i in range(3):
        assert math.isclose(logged[f"train/hessian/eig_{i + 1}"], float(exact[-1 - i]), rel_tol=1e-4)
    if curvature == "empirical_fisher":  # no exact rule: the Lanczos pass's Krylov trace (+ float32 rounding)
        assert abs(logged["train/hessian/trace"] - float(dense.trace())) <= (
            4 * logged["train/hessian/trace_se"] + 1e-6 * float(dense.trace()))
    else:
        assert math.isclose(logged["train/hessian/trace"], float(dense.trace()), rel_tol=1e-5)
        assert logged["train/hessian/trace_se"] == 0.0


def test_preserved_training_state_restores_on_exception():
    model = make_model()
    model.train()
    model.hidden[0].linear.weight.grad = torch.ones_like(model.hidden[0].linear.weight)
    grad_obj = model.hidden[0].linear.weight.grad
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"), preserved_training_state(model):
        assert not model.training and not model.hidden[0].act[0].training
        model.train()
        model(torch.randn(16, 8))  # updates BN statistics, consumes RNG (dropout)
        model.loss(model(torch.randn(4, 8)), torch.zeros(4, dtype=torch.long)).backward()
        raise RuntimeError("boom")
    assert all(m.training for m in model.modules())
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))
    assert model.hidden[0].linear.weight.grad is grad_obj and torch.equal(grad_obj, torch.ones_like(grad_obj))
    assert model.head.weight.grad is None
    assert torch.equal(torch.get_rng_state(), rng)


def test_state_dict_roundtrip_and_warm_start():
    batches = [(torch.randn(16, 8), torch.randint(0, 3, (16,)))]
    model = make_model()
    # a warm start applies without the density; it shortens the pass when only the top eigenvalue is asked for
    cb = HessianSpectrum(checkpoint_vector=True, **small(warm_start=True, lambda_min=False, top_k=1, slq_iter=0))
    cold, _ = cb.compute(model, batches)
    warm, _ = cb.compute(model, batches)
    assert warm["train/hessian/eig_1"] == pytest.approx(cold["train/hessian/eig_1"], rel=1e-4)
    assert warm["train/hessian/matvecs"] < cold["train/hessian/matvecs"]
    cb.last_metrics, cb.evaluations = warm, 2
    state = cb.state_dict()
    restored = HessianSpectrum(checkpoint_vector=True, **small())
    restored.load_state_dict(state)
    assert restored.last_metrics == warm and restored.evaluations == 2
    assert torch.equal(restored._warm_vector, cb._warm_vector)
    assert "warm_vector" not in HessianSpectrum(**small()).state_dict()
    assert cb.state_key != HessianSpectrum(every_n_steps=5, **small()).state_key


class DictBatchModule(LightningModule):
    """A LightningModule outside lit-act's conventions: dict batches, no ``loss`` method."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dict_loader():
    data = make_data(32)
    return DataLoader([{"x": x, "y": y} for x, y in data], batch_size=16)


def test_loss_fn_override_and_clear_error_without_it(tmp_path):
    module = DictBatchModule()
    with pytest.raises(TypeError, match="dry run on the first training batch failed.*Fix: pass loss_fn="):
        make_trainer(tmp_path, [HessianSpectrum(**small())]).fit(module, dict_loader())
    assert module.global_step == 0  # raised before training
    cb = HessianSpectrum(loss_fn=lambda m, b: F.cross_entropy(m.net(b["x"]), b["y"]), **small())
    trainer = make_trainer(tmp_path, [cb])
    trainer.fit(DictBatchModule(), dict_loader())
    assert math.isfinite(float(trainer.callback_metrics["train/hessian/eig_1"]))


def test_nan_in_matvec_is_reported_not_raised(tmp_path):
    cb = HessianSpectrum(loss_fn=lambda m, b: m.loss(m(b[0]), b[1]) * float("nan"), **small())
    trainer = make_trainer(tmp_path, [cb])
    with pytest.warns(UserWarning, match="NaN/Inf in (a block )?Hessian-vector product"):
        trainer.fit(make_model(), DataLoader(make_data(32), batch_size=16))
    assert cb.nan_events == 1
    assert math.isnan(float(trainer.callback_metrics["train/hessian/eig_1"]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps or every_n_epochs"):
        HessianSpectrum(every_n_steps=None, every_n_epochs=None)
    with pytest.raises(ValueError, match="every_n_steps"):
        HessianSpectrum(every_n_steps=0)
    with pytest.raises(ValueError, match="num_batches"):
        HessianSpectrum(num_batches=0)
    with pytest.raises(ValueError, match="trace_method='magic': expected one of the valid choices; valid: \\['auto', 'exact'"):
        HessianSpectrum(config=HessianConfig(trace_method="magic"))
    with pytest.raises(ValueError, match="curvature='kfac': .*valid: \\['hessian', 'ggn'"):
        HessianSpectrum(config=HessianConfig(curvature="kfac"))
    with pytest.raises(ValueError, match="loss='nll': .*valid: \\['cross_entropy', 'mse'\\]"):
        HessianSpectrum(config=HessianConfig(curvature="ggn", loss="nll"))
    with pytest.raises(ValueError, match="on_uncovered='skip': .*valid: \\['error', 'control_variate'\\]"):
        HessianSpectrum(config=HessianConfig(on_uncovered="skip"))
    with pytest.raises(ValueError, match="backend='jax': .*valid: \\['forward', 'reverse', 'cached'\\]"):
        HessianSpectrum(config=HessianConfig(backend="jax"))
    with pytest.raises(ValueError, match="trace_budget >= 4"):
        HessianSpectrum(config=HessianConfig(trace_budget=2))
    with pytest.raises(ValueError, match="empty batch list"):
        HessianSpectrum(**small()).compute(make_model(), [])
    with pytest.raises(ValueError, match="k must be between 1 and"):
        HessianSpectrum(config=HessianConfig(top_k=500, max_iter=500), progress=False).compute(
            make_model(), [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))])


def test_hydra_config_instantiates():
    cfg = OmegaConf.load(CONF)
    assert list(cfg) == ["hessian"]
    cb = instantiate(cfg.hessian)
    assert isinstance(cb, HessianSpectrum) and cb.every_n_epochs == 1
    assert cb.config == HessianConfig()  # the YAML spells out the defaults
    # a typo in the config node (Hydra path) and in a plain mapping name the field and list the valid ones; a node's
    # Hydra keys are not fields; flat fields point to config=
    typo = OmegaConf.merge(cfg, {"hessian": {"config": {"topk": 5}}})
    with pytest.raises(InstantiationException, match=r"unknown HessianConfig field\(s\) \['topk'\]; valid: \['top_k'"):
        instantiate(typo.hessian)
    assert HessianConfig.of(OmegaConf.merge(cfg.hessian.config, {"top_k": 5})) == HessianConfig(top_k=5)
    with pytest.raises(ValueError, match=r"pass HessianSpectrum\(config=HessianConfig\(top_k=5\)\)"):
        HessianSpectrum(top_k=5)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        HessianSpectrum(top_k=5, colour="red")


# ---------------------------------------------------------------------------------------------------- DDP
class TinyClassifier(LitActModule):
    """Picklable for ddp_spawn (MLPClassifier keeps a lambda activation factory)."""

    def __init__(self):
        super().__init__(lr=0.05)
        self.net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)


class _Record(Callback):
    def __init__(self, path):
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        hessian = next(c for c in trainer.callbacks if isinstance(c, HessianSpectrum))
        torch.save(hessian.last_metrics, Path(self.path) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("memory_budget", [None, 2.0])  # 2.0: every rank plans its own kept / recomputed chunks
def test_ddp_matches_single_process(tmp_path, memory_budget):
    data = make_data(64)
    seed_everything(0)
    model = TinyClassifier()
    cb = HessianSpectrum(every_n_epochs=1, num_batches=2, config=HessianConfig(top_k=3, trace_budget=30,
                         slq_iter=20, memory_budget=memory_budget), progress=False)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, callbacks=[cb, _Record(tmp_path)])
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=False))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    names = [k for k in rank0 if k != "train/hessian/seconds"]
    assert all(rank0[k] == rank1[k] for k in names)  # identical on every rank
    # single process, same weights, same data (DistributedSampler without shuffle: rank r gets samples r::2)
    x, y = data.tensors
    batches = [(x[r::2][i * 16:(i + 1) * 16], y[r::2][i * 16:(i + 1) * 16]) for r in (0, 1) for i in range(2)]
    single, _ = HessianSpectrum(num_batches=4, config=HessianConfig(top_k=3, trace_budget=30, slq_iter=20),
                                progress=False).compute(
        model, batches)
    for i in range(3):
        key = f"train/hessian/eig_{i + 1}"
        assert math.isclose(rank0[key], single[key], rel_tol=1e-4)
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches))
    assert math.isclose(rank0["train/hessian/eig_1"], float(exact[-1]), rel_tol=1e-4)
    # the trace's exact head block (all-reduced diagonal) and its Hutch++ remainder match the single process
    assert math.isclose(rank0["train/hessian/trace"], single["train/hessian/trace"], rel_tol=1e-4)
