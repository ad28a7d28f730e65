"""ActivationSparsity, MassiveActivations and DeadNeurons inside real Trainer runs, checked against the statistics
recomputed plainly from activations recorded by an independent forward hook on the same batches."""

import csv
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_act.callbacks.dead import DeadNeurons
from lit_act.callbacks.massive import MassiveActivations
from lit_act.callbacks.sparsity import ActivationSparsity
from lit_act.data import PySourceDataModule
from lit_act.models import TransformerLM
from lit_act.models.base import LitActModule

CONF = Path(__file__).resolve().parents[1] / "conf" / "callbacks"


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call: ``rows[step] = {key: value}``."""

    def __init__(self):
        super().__init__()
        self.rows = defaultdict(dict)

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows[step].update(metrics)


class TinyNet(LitActModule):
    """BoringModel-style classifier: 6 -> 16 -> ReLU -> 3."""

    def __init__(self, lr=0.05, fail_at_step=None):
        super().__init__(lr=lr)
        self.fc_in, self.act, self.fc_out = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)
        self.fail_at_step = fail_at_step

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == self.fail_at_step:
            raise RuntimeError("failure inside a collected step")
        return loss


def _classification(n=64, batch_size=8):
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _tokens(n=32, t=16, batch_size=8):
    idx = torch.randint(0, 128, (n, t + 1))
    return DataLoader(TensorDataset(idx[:, :-1], idx[:, 1:]), batch_size=batch_size)


def _lm(**kw):
    return TransformerLM(vocab_size=128, block_size=16, d_model=32, n_layer=2, n_head=2, **kw)


def _trainer(tmp_path, callbacks, logger=None, **kw):
    kw = {"max_steps": 4, "limit_val_batches": 2, "num_sanity_val_steps": 0, "enable_progress_bar": False,
          "enable_model_summary": False, "enable_checkpointing": False, "accelerator": "cpu", "devices": 1} | kw
    return Trainer(default_root_dir=tmp_path, callbacks=callbacks, logger=logger or MemoryLogger(), **kw)


def _record(model, names):
    """Independent recorder: ``records[(stage, global_step)][name] -> list of outputs``."""
    records = defaultdict(lambda: defaultdict(list))
    modules = dict(model.named_modules())

    def make(name):
        def hook(module, args, output):
            stage = "train" if model.training else "val"
            records[(stage, model.trainer.global_step)][name].append(output.detach().clone())
        return hook

    handles = [modules[n].register_forward_hook(make(n)) for n in names]
    return records, handles


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_sparsity_on_tiny_model_matches_direct_counts(tmp_path):
    model = TinyNet()
    records, handles = _record(model, ["act"])
    logger = MemoryLogger()
    cb = ActivationSparsity(every_n_steps=2, threshold=0.1, cett_target=0.25)
    _trainer(tmp_path, [cb], logger, max_steps=5, val_check_interval=5).fit(model, _classification(),
                                                                            _classification(16))
    for h in handles:
        h.remove()
    assert cb.history_steps == [0, 2, 4]
    for step in (0, 2, 4):
        a = records[("train", step)]["act"][0]
        row = logger.rows[step]
        assert row["train/sparsity/act"] == pytest.approx((a.abs() <= 0.1).float().mean().item())
        assert row["train/sparsity/mean"] == row["train/sparsity/act"]
        per_token = (a.abs() > 0.1).float().mean(dim=1)
        assert row["train/token_activation_ratio_max/act"] == pytest.approx(per_token.max().item())
        assert row["train/sparsity/act/nonfinite"] == 0
        assert "train/cett/act" not in row  # CETT runs at validation only
    assert 1 not in logger.rows and 3 not in logger.rows
    val = logger.rows[5]
    calibration, batches = records[("val", 5)]["act"][:2], records[("val", 5)]["act"][2:]
    for c, x in zip(calibration, batches, strict=True):  # the calibration pass: the val set from sample 0, eval mode
        assert torch.equal(c, x)
    a = torch.cat(batches)
    assert val["val/sparsity/act"] == pytest.approx((a.abs() <= 0.1).float().mean().item())
    # Sparsing Law, written out: the largest eps whose token-mean CETT(eps) <= 0.25 on the calibration tokens (every
    # candidate eps is an observed norm |a_i| ||W_out[:, i]||), applied to every validation token
    w, b = model.fc_out.weight.detach(), model.fc_out.bias.detach()
    norms = a.abs() * w.norm(dim=0)

    def mean_cett(eps):
        tail = (a * (norms < eps)) @ w.T
        return (tail.norm(dim=1) / (a @ w.T + b).norm(dim=1)).mean().item()

    eps = max(e for e in norms.flatten().tolist() if mean_cett(e) <= 0.25)
    assert val["val/cett_threshold/act"] == pytest.approx(eps, rel=1e-6)
    assert val["val/cett_activation_ratio/act"] == pytest.approx((norms >= eps).float().mean().item(), rel=1e-6)
    assert val["val/cett/act"] == pytest.approx(mean_cett(eps), rel=1e-5)
    assert _hook_count(model) == 0
    assert (tmp_path / "figures" / "sparsity_per_layer.png").exists()


def test_transformer_all_callbacks_match_direct_computation(tmp_path):
    model = _lm(activation="relu")
    names = ["blocks.0.mlp.act", "blocks.1.mlp.act", "blocks.0", "blocks.1"]
    records, handles = _record(model, names)
    logger = MemoryLogger()
    sparsity = ActivationSparsity(every_n_steps=1, on_validation=False)
    massive = MassiveActivations(every_n_steps=1, k=2, magnitude=1.0, median_ratio=2.0)
    dead = DeadNeurons(window_steps=3)
    _trainer(tmp_path, [sparsity, massive, dead], logger, max_steps=6).fit(model, _tokens(n=48))
    for h in handles:
        h.remove()
    assert massive.history_steps == list(range(6)) and dead.history_steps == [0, 3]
    for step in range(6):
        row = logger.rows[step]
        for act in ("blocks.0.mlp.act", "blocks.1.mlp.act"):
            a = records[("train", step)][act][0]
            assert row[f"train/sparsity/{act}"] == pytest.approx((a == 0).float().mean().item())
        for block in ("blocks.0", "blocks.1"):
            h = records[("train", step)][block][0].abs()  # (B, T, D) = (8, 16, 32)
            # Sun et al.'s statistic, written out: per sequence the top-2 of |h| over (token, dim), then the mean
            # over sequences; positions: the (token, dim) most often the per-sequence top-1
            per_sequence = [x.flatten().topk(2) for x in h]
            for i in range(2):
                expected = sum(t.values[i].item() for t in per_sequence) / len(per_sequence)
                assert row[f"train/massive_top{i + 1}/{block}"] == pytest.approx(expected, rel=1e-6)
            top1_positions = [(t.indices[0].item() // 32, t.indices[0].item() % 32) for t in per_sequence]
            counts = {p: top1_positions.count(p) for p in top1_positions}
            logged = (row[f"train/massive_top1_token/{block}"], row[f"train/massive_top1_dim/{block}"])
            assert counts.get(logged) == max(counts.values())  # a most frequent position (ties: any of them)
            assert row[f"train/massive_top1_freq/{block}"] == pytest.approx(max(counts.values()) / len(h))
            # the running maximum over every entry of the batch, under its own keys
            flat = h.flatten()
            top = flat.topk(2)
            assert row[f"train/massive_max1/{block}"] == pytest.approx(top.values[0].item())
            assert row[f"train/massive_max2/{block}"] == pytest.approx(top.values[1].item())
            position = top.indices[0].item()
            assert row[f"train/massive_max1_token/{block}"] == (position // 32) % 16
            assert row[f"train/massive_max1_dim/{block}"] == position % 32
            medians = h.flatten(1).median(dim=1).values
            assert row[f"train/massive_median/{block}"] == pytest.approx(medians.mean().item(), rel=1e-6)
            assert row[f"train/massive_ratio/{block}"] == pytest.approx(
                row[f"train/massive_top1/{block}"] / row[f"train/massive_median/{block}"], rel=1e-6)
            count = ((h > 1.0) & (h >= 2.0 * medians[:, None, None])).sum().item()
            assert row[f"train/massive_count/{block}"] == count
        for key in ("top1_token", "top1_freq", "max1_token", "max1_dim"):
            assert f"train/massive_{key}/mean" not in row
        assert row["train/massive_max1/mean"] == pytest.approx(
            (row["train/massive_max1/blocks.0"] + row["train/massive_max1/blocks.1"]) / 2)
    for start in (0, 3):
        for act in ("blocks.0.mlp.act", "blocks.1.mlp.act"):
            a = torch.cat([records[("train", s)][act][0].reshape(-1, 128) for s in range(start, start + 3)])
            fired = (a > 0).sum(dim=0)
            assert logger.rows[start][f"train/dead_fraction/{act}"] == pytest.approx(
                (fired == 0).float().mean().item())
            living = fired > 0
            assert logger.rows[start][f"train/living_activation_frequency/{act}"] == pytest.approx(
                (fired[living] / a.shape[0]).float().mean().item(), rel=1e-6)
    final = logger.rows[6]
    assert {"train/emergence_r2/blocks.0", "train/emergence_lambda/blocks.1"} <= set(final)
    assert (tmp_path / "figures" / "massive_emergence.png").exists()
    assert _hook_count(model) == 0


def test_non_finite_layer_logs_nan_everywhere_and_stays_out_of_module_means(tmp_path):
    model = _lm()
    broken = model.blocks[1].register_forward_hook(lambda m, args, out: torch.full_like(out, math.nan))
    records, handles = _record(model, ["blocks.0"])
    massive = MassiveActivations(k=2, figures=False)
    with pytest.warns(UserWarning, match="NaN/Inf"):
        _trainer(tmp_path, [massive], max_steps=1).validate(model, _tokens(n=16))
    for h in [broken, *handles]:
        h.remove()
    logged = massive.last_logged
    stats = ["top1", "top2", "top1_token", "top1_dim", "top1_freq", "top2_token", "max1", "max1_token", "max1_dim",
             "median", "ratio", "count"]
    for stat in stats:
        assert math.isnan(logged[f"val/massive_{stat}/blocks.1"]), stat
        assert not math.isnan(logged[f"val/massive_{stat}/blocks.0"]), stat
    assert logged["val/massive/blocks.1/nonfinite"] == 16 * 16 * 32
    for stat in ("top1", "max1", "median", "ratio"):  # the mean over modules leaves the NaN layer out
        assert logged[f"val/massive_{stat}/mean"] == logged[f"val/massive_{stat}/blocks.0"]
    h = torch.cat(records[("val", 0)]["blocks.0"]).abs()
    assert logged["val/massive_top1/blocks.0"] == pytest.approx(h.flatten(1).max(1).values.mean().item(), rel=1e-6)


def test_pysource_datamodule_validation_epoch(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(20):
        (root / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {j} + {i}\n" for j in range(40)))
    dm = PySourceDataModule(root=root, block_size=16, batch_size=4, val_fraction=0.3, test_fraction=0.2)
    model = _lm()
    records, handles = _record(model, ["blocks.0.mlp.act", "blocks.1.mlp.act"])
    logger = MemoryLogger()
    cb = ActivationSparsity(every_n_steps=None, threshold=0.05, cett_target=None)
    _trainer(tmp_path, [cb], logger, max_steps=2, limit_val_batches=3, val_check_interval=2).fit(model, dm)
    for h in handles:
        h.remove()
    row = logger.rows[2]
    for act in ("blocks.0.mlp.act", "blocks.1.mlp.act"):
        a = torch.cat([x.reshape(-1, 128) for x in records[("val", 2)][act]])
        assert row[f"val/sparsity/{act}"] == pytest.approx((a.abs() <= 0.05).float().mean().item())
    assert row["val/sparsity/mean"] == pytest.approx(
        (row["val/sparsity/blocks.0.mlp.act"] + row["val/sparsity/blocks.1.mlp.act"]) / 2)


def _resume_run(tmp_path, ckpt_dir, max_epochs, ckpt_path=None):
    torch.manual_seed(0)
    model = TinyNet()
    data = _classification(n=32)
    callbacks = [DeadNeurons(window_steps=8), ActivationSparsity(every_n_steps=1, on_validation=False),
                 ModelCheckpoint(dirpath=ckpt_dir, save_last=True)]
    trainer = _trainer(tmp_path, callbacks, max_steps=-1, max_epochs=max_epochs, limit_val_batches=0,
                       enable_checkpointing=True)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return callbacks


def test_resume_continues_accumulators(tmp_path):
    full_dead, full_sparsity, _ = _resume_run(tmp_path / "a", tmp_path / "ckpt_a", max_epochs=2)
    _resume_run(tmp_path / "b", tmp_path / "ckpt_b", max_epochs=1)  # 4 steps, window half full
    dead, sparsity, _ = _resume_run(tmp_path / "b", tmp_path / "ckpt_b2", max_epochs=2,
                                    ckpt_path=tmp_path / "ckpt_b" / "last.ckpt")
    assert dead.history_steps == full_dead.history_steps == [0]
    assert dead.history == full_dead.history
    assert dead.last_logged == pytest.approx(full_dead.last_logged)
    assert sparsity.history_steps == full_sparsity.history_steps == list(range(8))
    assert sparsity.history["act"] == pytest.approx(full_sparsity.history["act"])
    # mid-window state: the counts saved at step 4 hold the first 4 steps
    state = torch.load(tmp_path / "ckpt_b" / "last.ckpt", weights_only=False)["callbacks"]
    dead_state = next(v for k, v in state.items() if k.startswith("DeadNeurons"))
    assert dead_state["window_start"] == 0
    assert dead_state["metric_states"]["train"]["act"]["dead"]["seen"].tolist() == [32] * 16


def test_hooks_removed_after_exception_and_many_cycles(tmp_path):
    model = TinyNet(fail_at_step=1)
    cb = ActivationSparsity(every_n_steps=1)
    with pytest.raises(RuntimeError, match="failure inside a collected step"):
        _trainer(tmp_path, [cb], logger=False).fit(model, _classification())
    assert _hook_count(model) == 0
    model = TinyNet()
    callbacks = [ActivationSparsity(every_n_steps=1, figures=False), DeadNeurons(window_steps=1, figures=False)]
    data = _classification(n=8)
    for _ in range(100):
        trainer = _trainer(tmp_path, callbacks, logger=False, max_steps=1, limit_val_batches=0)
        trainer.fit(model, data)
        assert _hook_count(model) == 0
    assert len(callbacks[1].history_steps) == 100


def test_skips_sanity_check_and_fast_dev_run(tmp_path):
    model = TinyNet()
    cb = ActivationSparsity(every_n_steps=1)
    _trainer(tmp_path, [cb], fast_dev_run=2).fit(model, _classification(), _classification())
    assert cb.last_logged == {} and cb.history_steps == []
    logger = MemoryLogger()
    cb = ActivationSparsity(every_n_steps=None, on_validation=True)
    _trainer(tmp_path, [cb], logger, max_steps=1, num_sanity_val_steps=2, check_val_every_n_epoch=50).fit(
        model, _classification(), _classification())
    assert not any(k.startswith("val/") for row in logger.rows.values() for k in row)


class _NaNAct(nn.Module):
    def forward(self, x):
        bad = torch.zeros_like(x)
        bad[0, 0], bad[1, 1] = float("nan"), float("inf")
        return torch.relu(x) + bad


def test_nonfinite_counted_warned_and_excluded(tmp_path):
    model = TinyNet()
    model.act = _NaNAct()
    records, handles = _record(model, ["act"])
    logger = MemoryLogger()
    cb = ActivationSparsity(modules="act", every_n_steps=1, on_validation=False)
    with pytest.warns(UserWarning, match="NaN/Inf activations were excluded"):
        _trainer(tmp_path, [cb], logger, max_steps=1).fit(model, _classification())
    for h in handles:
        h.remove()
    row = logger.rows[0]
    assert row["train/sparsity/act/nonfinite"] == 2
    a = records[("train", 0)]["act"][0]
    finite = torch.isfinite(a)
    assert finite.sum() == a.numel() - 2
    assert row["train/sparsity/act"] == pytest.approx((a[finite] == 0).float().mean().item())
    assert math.isfinite(row["train/token_activation_ratio/act"])


def test_bf16_autocast_accumulates_fp32(tmp_path):
    model = TinyNet()
    records, handles = _record(model, ["act"])
    logger = MemoryLogger()
    cb = DeadNeurons(window_steps=2)
    _trainer(tmp_path, [cb], logger, max_steps=2, precision="bf16-mixed").fit(model, _classification())
    for h in handles:
        h.remove()
    a = torch.cat([records[("train", s)]["act"][0] for s in (0, 1)])
    assert a.dtype == torch.bfloat16
    fired = (a.float() > 0).sum(dim=0)
    assert logger.rows[0]["train/dead_fraction/act"] == pytest.approx((fired == 0).float().mean().item())


def test_bad_input_raises_with_fix(tmp_path):
    with pytest.raises(ValueError, match="every_n_steps=0: expected a positive integer"):
        ActivationSparsity(every_n_steps=0)
    with pytest.raises(ValueError, match="would never collect"):
        DeadNeurons(every_n_steps=None, probe=None)
    with pytest.raises(ValueError, match="probe='never': expected None"):
        DeadNeurons(probe="never")
    with pytest.raises(ValueError, match=r"threshold must be >= 0 in mode='abs'.*-0.5"):
        ActivationSparsity(threshold=-0.5)  # mode="signed" accepts it: a > -0.5 is active
    with pytest.raises(ValueError, match="threshold=nan: expected a finite number"):
        ActivationSparsity(threshold=float("nan"), mode="signed")
    with pytest.raises(ValueError, match="k=0: expected a positive integer"):
        MassiveActivations(k=0)
    with pytest.raises(ValueError, match=r"\['blocks\.\*\.nope'\] match no module"):
        _trainer(tmp_path, [ActivationSparsity(modules="blocks.*.nope")]).fit(_lm(), _tokens())
    with pytest.raises(ValueError, match="no repeated-block stack.*pass modules="):
        _trainer(tmp_path, [MassiveActivations()]).fit(TinyNet(), _classification())
    with pytest.raises(ValueError, match="not among the selected modules"):
        _trainer(tmp_path, [ActivationSparsity(down_projections={"fc_out": "fc_out"})]).fit(TinyNet(),
                                                                                           _classification())


def test_compiled_module_is_refused_clearly(tmp_path):
    model = TinyNet()
    with pytest.raises(RuntimeError, match="cannot observe a torch.compile'd module"):
        _trainer(tmp_path, [ActivationSparsity()]).fit(torch.compile(model), _classification())
    assert _hook_count(model) == 0


@pytest.mark.parametrize("name", ["activation_sparsity", "massive_activations", "dead_neurons"])
def test_hydra_configs_instantiate(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert list(cfg) == [name]
    callback = instantiate(cfg[name])
    assert type(callback).__name__ == {"activation_sparsity": "ActivationSparsity",
                                       "massive_activations": "MassiveActivations",
                                       "dead_neurons": "DeadNeurons"}[name]


def _ddp_validate(tmp_path, devices):
    torch.manual_seed(0)
    model = TinyNet()  # same weights and data in both runs
    data = _classification(n=32, batch_size=4 if devices == 2 else 8)
    callbacks = [ActivationSparsity(every_n_steps=None, threshold=0.2, cett_target=None),
                 DeadNeurons(every_n_steps=None, on_validation=True, threshold=0.5),
                 MassiveActivations(modules=["act"], every_n_steps=None, on_validation=True, magnitude=0.5,
                                    median_ratio=1.5)]
    logger = CSVLogger(tmp_path, name=f"dev{devices}", version=0)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices == 2 else "auto",
                      callbacks=callbacks, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, use_distributed_sampler=True)
    trainer.validate(model, data)
    rows = list(csv.DictReader(open(tmp_path / f"dev{devices}" / "version_0" / "metrics.csv")))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and k != "step"}


def test_ddp_spawn_two_processes_equal_single_process(tmp_path):
    single = _ddp_validate(tmp_path, 1)
    double = _ddp_validate(tmp_path, 2)
    keys = [k for k in single if k.startswith("val/") and "/loss" not in k and "/acc" not in k]
    assert len(keys) > 10
    for key in keys:
        assert double[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7, nan_ok=True), key


def test_mode_abs_and_signed_on_sparsity_and_dead_neurons(tmp_path):
    model = _lm(activation="gelu")
    act = "blocks.0.mlp.act"
    records, handles = _record(model, [act])
    callbacks = [ActivationSparsity(modules=act, mode="signed", every_n_steps=None, cett_target=None, figures=False),
                 ActivationSparsity(modules=act, threshold=0.05, every_n_steps=None, cett_target=None, figures=False),
                 DeadNeurons(modules=act, figures=False),
                 DeadNeurons(modules=act, mode="abs", threshold=0.17, figures=False)]
    _trainer(tmp_path, callbacks, max_steps=1).validate(model, _tokens(n=16))
    for h in handles:
        h.remove()
    a = torch.cat(records[("val", 0)][act]).reshape(-1, 128)
    signed, absolute, dead_signed, dead_abs = (cb.last_logged for cb in callbacks)
    assert signed[f"val/sparsity/{act}"] == pytest.approx((a <= 0).float().mean().item())  # GELU: the negative lobe
    assert 0.3 < signed[f"val/sparsity/{act}"] < 0.9
    assert absolute[f"val/sparsity/{act}"] == pytest.approx((a.abs() <= 0.05).float().mean().item())
    assert dead_signed[f"val/dead_fraction/{act}"] == pytest.approx((~(a > 0).any(0)).float().mean().item())
    assert dead_abs[f"val/dead_fraction/{act}"] == pytest.approx((~(a.abs() > 0.17).any(0)).float().mean().item())


@pytest.mark.parametrize("cls", [ActivationSparsity, DeadNeurons])
def test_bad_mode_lists_the_valid_modes(cls):
    with pytest.raises(ValueError, match=r"mode must be one of \['abs', 'signed'\].*'magnitude'"):
        cls(mode="magnitude")
    with pytest.raises(ValueError, match="threshold must be >= 0 in mode='abs'"):
        cls(mode="abs", threshold=-0.1)


def _digits_fit(tmp_path, total, ckpt=None, ckpt_path=None):
    from lit_act.data import DigitsDataModule
    from lit_act.models import MLPClassifier

    torch.manual_seed(0 if ckpt_path is None else 1)  # a resumed run gets everything from the checkpoint
    logger = MemoryLogger()
    callbacks = [ActivationSparsity(every_n_steps=3, threshold=0.1, on_validation=False, figures=False),
                 DeadNeurons(window_steps=8, threshold=0.2, figures=False),  # running window
                 DeadNeurons(threshold=0.2, probe_samples=300, figures=False),  # probe pass at each epoch end
                 *([ckpt] if ckpt else [])]
    trainer = _trainer(tmp_path, callbacks, logger, max_steps=total, limit_val_batches=0,
                       enable_checkpointing=ckpt is not None)
    trainer.fit(MLPClassifier(64, 10, hidden=(16,)), datamodule=DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
    return logger.rows, trainer


def test_statistics_after_a_mid_epoch_resume_equal_an_uninterrupted_run(tmp_path):
    """lit-act's datamodules resume mid-epoch on the same batches (ResumableDataLoader), and the callbacks' states
    (DeadNeurons' half-full window, the history) come back with the checkpoint: every statistic the resumed run logs
    equals the uninterrupted run's, across an epoch boundary (20 batches per epoch) and a window boundary."""
    at, total = 13, 30  # mid-epoch, mid-window (8..16)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=at, save_top_k=-1)
    straight, trainer = _digits_fit(tmp_path / "a", total, ckpt=ckpt)
    assert trainer.num_training_batches == 20 and at % 20
    resumed, _ = _digits_fit(tmp_path / "b", total, ckpt_path=tmp_path / "ckpt" / f"step={at}.ckpt")
    keys = {(step, key) for step, row in resumed.items() for key in row if "hidden.0.act" in key or key.endswith("/mean")}
    assert {key for _, key in keys} >= {"train/sparsity/hidden.0.act", "train/dead_fraction/hidden.0.act",
                                        "probe/dead_fraction/hidden.0.act"}
    assert {s for s, k in keys if k == "train/dead_fraction/hidden.0.act"} == {8, 16}  # windows 8..16, 16..24
    assert {s for s, k in keys if k == "probe/dead_fraction/hidden.0.act"} == {20, 30}  # at each epoch end
    for step, key in sorted(keys):
        assert resumed[step][key] == straight[step][key], (step, key)
    assert 0 < straight[15]["train/sparsity/hidden.0.act"] < 1
