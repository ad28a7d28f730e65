"""The callback core on models nobody here wrote: Hugging Face BERT / GPT-2 built from small configs (random weights,
offline) with padded dict batches, Lightning's ``demos.Transformer`` and ``BoringModel``. Numbers are checked against
direct hook computations written out in the tests."""

import csv
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos import Transformer
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lit_act.batch import (
    BatchAdapter,
    default_forward,
    default_mask,
    default_targets,
    output_logits,
    output_loss,
)
from lit_act.callbacks import (
    ActivationHistograms,
    ActivationSparsity,
    DeadNeurons,
    HessianConfig,
    HessianSpectrum,
    MassiveActivations,
    NeuronActivationCoverage,
)
from lit_act.callbacks.core import probe_batches
from lit_act.models.base import LitActModule
from lit_act.stats.tap import paused, tap

transformers = pytest.importorskip("transformers")

T, VOCAB = 12, 50


class PaddedText(Dataset):
    """Token sequences with ~30% right padding, a class label each."""

    def __init__(self, n=24, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, T), generator=g)
        self.lengths = torch.randint(4, T + 1, (n,), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        mask = (torch.arange(T) < self.lengths[i]).long()
        return {"input_ids": self.ids[i] * mask, "attention_mask": mask, "labels": self.labels[i]}


class HFModule(LightningModule):
    """The thin LightningModule a researcher writes around a Hugging Face model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=T, num_labels=3,
                                     attn_implementation="eager")
    return HFModule(transformers.BertForSequenceClassification(config))


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=32, n_layer=2, n_head=2,
                                     attn_implementation="eager")
    return HFModule(transformers.GPT2LMHeadModel(config))


def _loader(n=24, batch_size=8, seed=0):
    return DataLoader(PaddedText(n, seed), batch_size=batch_size)


def _trainer(tmp_path, callbacks, **kw):
    kw = {"max_steps": 3, "limit_val_batches": 2, "num_sanity_val_steps": 0, "enable_progress_bar": False,
          "enable_model_summary": False, "enable_checkpointing": False, "accelerator": "cpu", "devices": 1,
          "logger": False} | kw
    return Trainer(default_root_dir=tmp_path, callbacks=callbacks, **kw)


GELU = "model.bert.encoder.layer.*.intermediate.intermediate_act_fn"


def _outputs(model, names, loader, port="output"):
    """Direct computation: eval-mode outputs (or, ``port="input"``, first inputs) of ``names`` and the attention
    masks, batch by batch."""
    modules = dict(model.named_modules())
    seen = {n: [] for n in names}
    if port == "input":
        handles = [modules[n].register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0].detach()))
                   for n in names]
    else:
        handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: seen[n].append(out.detach()))
                   for n in names]
    masks = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            masks.append(batch["attention_mask"].bool())
            model(**batch)
    for h in handles:
        h.remove()
    return seen, masks


# ---------------------------------------------------------------------------------------------------- adapters
def test_batch_adapter_reads_every_batch_kind():
    from collections import UserDict
    from dataclasses import dataclass

    @dataclass
    class Batch:
        input_ids: torch.Tensor
        attention_mask: torch.Tensor
        labels: torch.Tensor

    class Encoding(UserDict):  # transformers.BatchEncoding is a UserDict
        pass

    ids, mask, labels = torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([0, 1])
    module = lambda **kw: sorted(kw)  # noqa: E731
    for batch in ({"input_ids": ids, "attention_mask": mask, "labels": labels},
                  Encoding(input_ids=ids, attention_mask=mask, labels=labels), Batch(ids, mask, labels)):
        assert default_forward(module, batch) == ["attention_mask", "input_ids", "labels"]
        assert torch.equal(default_mask(batch), mask.bool())
        assert torch.equal(default_targets(batch), labels)
    x = torch.randn(2, 4)
    assert default_forward(lambda v: v * 2, (x, labels)).equal(x * 2)
    assert default_forward(lambda v: v + 1, x).equal(x + 1)
    assert default_targets((x, labels)) is labels and default_targets(x) is None and default_mask((x,)) is None
    out = transformers.modeling_outputs.SequenceClassifierOutput(loss=torch.tensor(1.5), logits=x)
    assert output_logits(out) is x and float(output_loss(out)) == 1.5
    assert output_logits((x, 1)) is x and output_loss(x) is None
    with pytest.raises(TypeError, match="forward_fn"):
        BatchAdapter(forward_fn=3)


def test_paused_silences_owned_taps_only():
    lin = nn.Linear(2, 2)
    owner, other, seen = object(), object(), []
    with tap({"a": lin}, lambda n, m, x: seen.append("owned"), owner=owner), \
            tap({"a": lin}, lambda n, m, x: seen.append("other"), owner=other), \
            tap({"a": lin}, lambda n, m, x: seen.append("anonymous")):
        lin(torch.zeros(1, 2))
        assert seen == ["owned", "other", "anonymous"]
        seen.clear()
        with paused():
            lin(torch.zeros(1, 2))
        assert seen == ["anonymous"]
        seen.clear()
        with paused(allow=owner):
            lin(torch.zeros(1, 2))
        assert seen == ["owned", "anonymous"]


def test_input_port_site_observes_the_module_input():
    class Net(LitActModule):
        def __init__(self):
            super().__init__(lr=0.05)
            self.fc_in, self.act, self.fc_out = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc_out(self.act(self.fc_in(x)))

    model = Net()
    site = SimpleNamespace(name="fc_out:in", module=model.fc_out, port="input")
    by_site = ActivationSparsity(modules={"down_in": site}, every_n_steps=None, cett_target=None)
    by_module = ActivationSparsity(modules="act", every_n_steps=None, cett_target=None)
    data = DataLoader(TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,))), batch_size=8)
    _trainer(None, [by_site, by_module]).validate(model, data)
    assert by_site.last_logged["val/sparsity/down_in"] == by_module.last_logged["val/sparsity/act"] > 0


class PaddedLM(PaddedText):
    """Padded causal-LM batches: labels are the input ids, -100 on padding."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return item | {"labels": torch.where(item["attention_mask"].bool(), item["input_ids"], -100)}


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T,
                                      attn_implementation="eager")
    return HFModule(transformers.LlamaForCausalLM(config))


def _down_proj_inputs(model, names, loader):
    """Direct computation: eval-mode inputs of the down-projections ``names`` (``act_fn(gate) * up``) on real
    tokens, ``{name: (real tokens, hidden)}``."""
    return _module_inputs(model, names, loader, "input")


def test_llama_defaults_observe_the_gated_down_projection_input(tmp_path):
    """On a gated MLP the default selection ("mlp_hidden") observes ``act_fn(gate_proj(x)) * up_proj(x)``, the input
    of ``down_proj``, not the SiLU output; sparsity and dead neurons equal a direct pre-hook computation."""
    model = _llama()
    val = DataLoader(PaddedLM(16, seed=1), batch_size=8)
    names = [f"model.model.layers.{i}.mlp.down_proj" for i in range(2)]
    direct = _down_proj_inputs(model, names, val)
    tau = direct[names[0]].abs().median().item()  # thresholds that make both statistics non-trivial
    dead_tau = direct[names[0]].max(0).values.median().item()
    sparsity = ActivationSparsity(threshold=tau, every_n_steps=None, cett_target=None, figures=False)
    dead = DeadNeurons(threshold=dead_tau, figures=False)
    _trainer(tmp_path, [sparsity, dead]).validate(model, val)
    for cb in (sparsity, dead):
        assert list(cb.selected) == names and all(site.port == "input" for site in cb.selected.values())
    for name in names:
        a = direct[name]
        expected_sparsity = (a.abs() <= tau).float().mean().item()
        expected_dead = (~(a > dead_tau).any(0)).float().mean().item()
        assert 0.05 < expected_sparsity < 0.95 and 0.05 < expected_dead < 0.95
        assert sparsity.last_logged[f"val/sparsity/{name}"] == pytest.approx(expected_sparsity)
        assert dead.last_logged[f"val/dead_fraction/{name}"] == pytest.approx(expected_dead)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def _module_inputs(model, names, loader, port):
    """Direct computation: eval-mode inputs (``port="input"``) or outputs of ``names`` on real tokens."""
    seen, masks = _outputs(model, names, loader, port)
    mask = torch.cat(masks)
    return {n: torch.cat(v)[mask] for n, v in seen.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cett_thresholds_calibrated_once_and_applied_to_every_batch(tmp_path, family):
    """CETT on a gated MLP (LLaMA: input of down_proj) and on GPT-2 (Conv1D c_proj, weight stored (in, out)): the
    threshold is the exact Sparsing-Law threshold of the first ``cett_max_tokens`` real tokens (brute force over every
    candidate), the activation ratio counts every real token of the epoch."""
    model = _llama() if family == "llama" else _gpt2()
    prefix, down_name = ("model.model.layers", "mlp.down_proj") if family == "llama" else ("model.transformer.h",
                                                                                          "mlp.c_proj")
    site = "mlp.down_proj" if family == "llama" else "mlp.act"
    names = [f"{prefix}.{i}.{site}" for i in range(2)]
    val = DataLoader(PaddedLM(16, seed=2), batch_size=8)
    direct = _module_inputs(model, names, val, "input" if family == "llama" else "output")
    cb = ActivationSparsity(every_n_steps=None, cett_target=0.2, cett_max_tokens=40, cett_measure_tokens=None,
                            figures=False)
    _trainer(tmp_path, [cb]).validate(model, val)
    assert list(cb.selected) == names
    for i, name in enumerate(names):
        down = model.get_submodule(f"{prefix}.{i}.{down_name}")
        w = down.weight.detach() if family == "llama" else down.weight.detach().T  # (out, in)
        b = None if down.bias is None else down.bias.detach()
        a = direct[name]
        norms = a.abs() * w.norm(dim=0)

        def mean_cett(x, eps, x_norms, w=w, b=b):
            full = x @ w.T + (0 if b is None else b)
            return ((x * (x_norms < eps)) @ w.T).norm(dim=1).div(full.norm(dim=1)).mean().item()

        calibration, calibration_norms = a[:40], norms[:40]
        candidates = sorted(set(calibration_norms.flatten().tolist()))
        eps = max(e for e in candidates if mean_cett(calibration, e, calibration_norms) <= 0.2)
        assert cb.last_logged[f"val/cett_threshold/{name}"] == pytest.approx(eps, rel=1e-6)
        assert cb.last_logged[f"val/cett_activation_ratio/{name}"] == pytest.approx(
            (norms >= eps).float().mean().item(), rel=1e-6)
        assert cb.last_logged[f"val/cett/{name}"] == pytest.approx(mean_cett(a, eps, norms), rel=1e-4)
        assert 0.05 < cb.last_logged[f"val/cett_activation_ratio/{name}"] < 0.95
    assert cb.cett_thresholds.keys() == set(names)


# ------------------------------------------------------------------------------------------ padding and probes
def test_bert_padded_statistics_count_real_tokens_only(tmp_path):
    model = _bert()
    val = _loader(16, seed=1)
    sparsity = ActivationSparsity(modules=GELU, threshold=0.05, every_n_steps=None, cett_target=None)
    hist = ActivationHistograms(modules=GELU, every_n_steps=None, on_validation=True, figures=False)
    massive = MassiveActivations(modules=["model.bert.encoder.layer.0", "model.bert.encoder.layer.1"],
                                 figures=False)  # defaults: on_validation=False, yet trainer.validate collects
    dead = DeadNeurons(modules=GELU, threshold=0.5, figures=False)
    _trainer(tmp_path, [sparsity, hist, massive, dead]).validate(model, val)
    names = ["model.bert.encoder.layer.0.intermediate.intermediate_act_fn",
             "model.bert.encoder.layer.1.intermediate.intermediate_act_fn",
             "model.bert.encoder.layer.0", "model.bert.encoder.layer.1"]
    seen, masks = _outputs(model, names, val)
    mask = torch.cat(masks)
    assert 0.2 < 1 - mask.float().mean() < 0.5  # the batches are padded
    for name in names[:2]:
        a = torch.cat(seen[name])[mask]  # (real tokens, neurons)
        assert sparsity.last_logged[f"val/sparsity/{name}"] == pytest.approx((a.abs() <= 0.05).float().mean().item())
        assert hist.last_histograms["val"][name].sum() + (a.abs() >= 5).sum().item() == pytest.approx(a.numel(),
                                                                                                      abs=1)
        assert dead.last_logged[f"val/dead_fraction/{name}"] == pytest.approx(
            (~(a > 0.5).any(0)).float().mean().item())
    for name in names[2:]:
        h = [x[m].abs() for batch, bm in zip(seen[name], masks) for x, m in zip(batch, bm)]  # per sequence
        medians = torch.stack([x.flatten().median() for x in h])
        assert massive.last_logged[f"val/massive_median/{name}"] == pytest.approx(medians.mean().item(), rel=1e-5)
        # Sun et al.: top-1 of each sequence, averaged over sequences; the running maximum is massive_max1
        top1 = torch.stack([x.max() for x in h])
        assert massive.last_logged[f"val/massive_top1/{name}"] == pytest.approx(top1.mean().item(), rel=1e-5)
        assert massive.last_logged[f"val/massive_max1/{name}"] == pytest.approx(top1.max().item())


def test_mask_shape_mismatch_names_module_and_shapes(tmp_path):
    model = _bert()
    name = "model.bert.encoder.layer.0.intermediate.intermediate_act_fn"
    short = BatchAdapter(mask_fn=lambda batch: batch["attention_mask"][:, :-1])  # (8, 11): one token short
    cb = ActivationSparsity(modules=name, every_n_steps=None, cett_target=None, adapter=short)
    with pytest.raises(ValueError, match=rf"\(8, 11\).*'{re.escape(name)}' of shape \(8, 12, 48\)"):
        _trainer(tmp_path, [cb]).validate(model, _loader(8))
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    # a per-sequence (B, N) output (the pooler) has no token axis, so no padding: observed as it is
    pooler = ActivationSparsity(modules="model.bert.pooler.activation", every_n_steps=None, cett_target=None)
    _trainer(tmp_path, [pooler]).validate(model, _loader(8))
    assert "val/sparsity/model.bert.pooler.activation" in pooler.last_logged


def test_dead_neurons_probe_pass_on_fixed_model(tmp_path):
    def fit(callbacks):
        torch.manual_seed(0)
        model = _bert()
        train = DataLoader(PaddedText(32), batch_size=8, shuffle=True)
        _trainer(tmp_path, callbacks, max_steps=-1, max_epochs=2, limit_val_batches=0).fit(model, train)
        return model, train

    dead = DeadNeurons(modules=GELU, threshold=0.3, probe_samples=20, figures=False)
    model, train = fit([dead])
    assert dead.history_steps == [4, 8]  # one probe pass per epoch end
    probe = DataLoader(torch.utils.data.Subset(train.dataset, range(20)), batch_size=8)
    names = list(dead.selected)
    seen, masks = _outputs(model, names, probe)
    for name in names:
        a = torch.cat(seen[name])[torch.cat(masks)]
        assert dead.last_logged[f"probe/dead_fraction/{name}"] == pytest.approx(
            (~(a > 0.3).any(0)).float().mean().item())
    # no side effects: the probe passes change neither the shuffling nor dropout nor the weights' trajectory
    plain, _ = fit([])
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n


def test_probe_batches_keep_order_and_rng():
    data = DataLoader(TensorDataset(torch.arange(10.0)), batch_size=4, shuffle=True)
    trainer = SimpleNamespace(datamodule=None, train_dataloader=data, global_rank=0, world_size=1)
    rng = torch.get_rng_state()
    batches = list(probe_batches(trainer, 6))
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.cat([b[0] for b in batches]).tolist() == [0, 1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------------ the emitter
def test_statistics_reach_callback_metrics_and_checkpoint_monitor(tmp_path):
    model = _bert()
    sparsity = ActivationSparsity(modules=GELU, threshold=0.05, every_n_steps=1, cett_target=None, figures=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/sparsity/mean", mode="max")
    trainer = _trainer(tmp_path, [sparsity, ckpt], enable_checkpointing=True, val_check_interval=3)
    trainer.fit(model, _loader(), _loader(16, seed=1))
    metrics = trainer.callback_metrics
    assert float(metrics["val/sparsity/mean"]) == pytest.approx(sparsity.last_logged["val/sparsity/mean"])
    assert "train/sparsity/mean" in metrics
    assert ckpt.best_model_score is not None
    assert float(ckpt.best_model_score) == pytest.approx(sparsity.last_logged["val/sparsity/mean"])


def test_figures_land_under_the_run_directory_not_the_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    model = _bert()
    cb = ActivationSparsity(modules=GELU, every_n_steps=1, cett_target=None, on_validation=False)
    logger = CSVLogger(tmp_path / "logs", name="run")
    Trainer(max_steps=2, callbacks=[cb], logger=logger, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, limit_val_batches=0).fit(model, _loader())
    assert not (cwd / "figures").exists()
    assert (tmp_path / "logs" / "run" / "version_0" / "figures" / "sparsity_per_layer.png").exists()


# ------------------------------------------------------------------------------------------ isolation of passes
class _Net(LitActModule):
    def __init__(self):
        super().__init__(lr=0.05)
        self.fc_in, self.act, self.fc_out = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


def _classification():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)),
                      batch_size=8)


def test_callbacks_do_not_observe_each_others_passes(tmp_path):
    counts = []
    for others in ([], [NeuronActivationCoverage(every_n_steps=1, evaluate_on=None, figures=False),
                        HessianSpectrum(every_n_steps=1, every_n_epochs=None, config=HessianConfig(top_k=1,
                                        max_iter=4, trace_budget=0, slq_iter=0, lambda_min=False),
                                        progress=False)]):
        torch.manual_seed(0)
        hist = ActivationHistograms(every_n_steps=1, figures=False)
        _trainer(tmp_path, [*others, hist], max_steps=2, limit_val_batches=0).fit(_Net(), _classification())
        counts.append(hist.last_histograms["train"]["act"])
    assert counts[0].sum() == 8 * 16 and (counts[0] == counts[1]).all()


# ------------------------------------------------------------------------------------- NAC and Hessian anywhere
def test_nac_on_padded_bert_and_hessian_on_gpt2(tmp_path):
    nac = NeuronActivationCoverage(modules=GELU, evaluate_on=None, probe_samples=16, figures=False)
    _trainer(tmp_path, [nac], max_steps=-1, max_epochs=1, limit_val_batches=0).fit(_bert(), _loader(16))
    assert set(nac.last_me) >= {"probe/nac_me/mean", f"probe/nac_me/{GELU.replace('*', '0')}"}
    assert 0 <= nac.last_me["probe/nac_me/mean"] <= 1

    def lm_batches(n=8):
        data = PaddedText(n)
        return DataLoader([{"input_ids": d["input_ids"], "attention_mask": d["attention_mask"],
                            "labels": d["input_ids"]} for d in data], batch_size=4)

    logger = CSVLogger(tmp_path, name="hess")
    hess = HessianSpectrum(every_n_steps=1, every_n_epochs=None, config=HessianConfig(top_k=1, max_iter=5,
                           trace_budget=0, slq_iter=0, lambda_min=False), progress=False)
    _trainer(tmp_path, [hess], max_steps=3, limit_val_batches=0, logger=logger).fit(_gpt2(), lm_batches())
    assert hess.evaluations == 3
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/hessian/eig_1")]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # every evaluation has its row


def test_nac_and_hessian_fail_at_train_start_with_a_fix(tmp_path):
    class LMData(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            x = torch.randint(0, 20, (6,))
            return x, x.roll(1)

    class DemoLM(LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Transformer(vocab_size=20, ninp=8, nhead=2, nhid=16, nlayers=1)
            self.steps = 0

        def forward(self, inputs, target):
            return self.model(inputs, target)

        def training_step(self, batch, batch_idx):
            self.steps += 1
            inputs, target = batch
            return nn.functional.nll_loss(self(inputs, target), target.view(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = DemoLM()
    with pytest.raises(TypeError, match="dry run.*forward_fn"):
        _trainer(tmp_path, [NeuronActivationCoverage(modules="model.transformer.encoder.layers.0.linear1",
                                                     evaluate_on=None)]).fit(model, DataLoader(LMData(), 4))
    assert model.steps == 0
    with pytest.raises(TypeError, match="dry run.*loss_fn"):
        _trainer(tmp_path, [HessianSpectrum(progress=False)]).fit(model, DataLoader(LMData(), 4))
    assert model.steps == 0
    boring = BoringModel()
    with pytest.raises(ValueError, match="no targets.*targets_fn"):
        _trainer(tmp_path, [NeuronActivationCoverage(modules="layer", evaluate_on=None)]).fit(
            boring, DataLoader(RandomDataset(32, 16), batch_size=4))
    with pytest.raises(TypeError, match="no targets in the batch.*loss_fn"):
        _trainer(tmp_path, [HessianSpectrum(progress=False)]).fit(boring, DataLoader(RandomDataset(32, 16), 4))
    # with an adapter and a loss the demo Transformer runs: Hessian-vector products use the math SDPA kernel (the
    # fused kernels have no double backward), so the plain loss works
    adapter = BatchAdapter(forward_fn=lambda m, b: m(*b), targets_fn=lambda b: b[1].view(-1))
    small = HessianConfig(top_k=1, max_iter=4, trace_budget=0, slq_iter=0, lambda_min=False)
    hess = HessianSpectrum(every_n_steps=1, every_n_epochs=None, config=small, adapter=adapter, loss_fn=_nll,
                           progress=False)
    _trainer(tmp_path, [hess], max_steps=1).fit(model, DataLoader(LMData(), 4))
    assert hess.evaluations == 1 and model.steps == 1


def _nll(module, batch):
    return nn.functional.nll_loss(module(*batch), batch[1].view(-1))


def test_nac_pooling_sums_real_tokens_only():
    class Tok(LightningModule):
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.act, self.out = nn.Embedding(10, 8), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)

        def forward(self, input_ids, attention_mask):
            return self.out(self.act(self.fc(self.emb(input_ids))).mean(1))  # padding reaches the logits

    torch.manual_seed(0)
    model = Tok()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    batch = {"input_ids": torch.randint(0, 10, (4, 5)), "attention_mask": mask}
    cb = NeuronActivationCoverage(modules="act", evaluate_on=None)
    cb.setup(SimpleNamespace(max_steps=-1, max_epochs=None, limit_train_batches=1.0, accumulate_grad_batches=1,
                             fast_dev_run=False),
             model, "fit")
    got = cb.me.products(cb.model, batch).products["act"]
    h = model.act(model.fc(model.emb(batch["input_ids"])))  # direct: z and dKL/dz, each summed over real tokens
    logits = model.out(h.mean(1))
    kl = (-torch.log(torch.tensor(3.0)) - torch.log_softmax(logits, -1).mean(-1)).sum()
    (grad,) = torch.autograd.grad(kl, h)
    keep = mask[..., None].float()
    torch.testing.assert_close(got, (h.detach() * keep).sum(1) * (grad * keep).sum(1))


# -------------------------------------------------------------------------------------------------- never silent
def test_never_silent_warnings_and_validate_yields_every_statistic(tmp_path):
    with pytest.warns(UserWarning, match="every_n_steps=50.*plans 5 steps"):
        _trainer(tmp_path, [ActivationSparsity(every_n_steps=50, on_validation=False, cett_target=None)],
                 max_steps=5, limit_val_batches=0).fit(_Net(), _classification())
    with pytest.warns(UserWarning, match="collects nothing"):
        _trainer(tmp_path, [MassiveActivations(modules=["act"], every_n_steps=None, on_validation=True)],
                 max_steps=2, limit_val_batches=0).fit(_Net(), _classification())
    with pytest.warns(UserWarning, match="no evaluation runs"):
        _trainer(tmp_path, [HessianSpectrum(every_n_steps=10, every_n_epochs=None, progress=False)],
                 max_steps=3, limit_val_batches=0).fit(_Net(), _classification())
    callbacks = [ActivationSparsity(cett_target=None), DeadNeurons(), MassiveActivations(modules=["act"]),
                 ActivationHistograms()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(tmp_path, callbacks)
        trainer.validate(_Net(), _classification())
    for cb in callbacks:
        assert cb.last_logged and all(k.startswith("val/") for k in cb.last_logged), type(cb).__name__
    assert {"val/sparsity/mean", "val/dead_fraction/mean", "val/massive_ratio/mean", "val/hist_outside/mean"} <= set(
        trainer.callback_metrics)
