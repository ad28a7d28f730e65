"""Mid-epoch resume: lit-act's datamodules continue on the batches an uninterrupted run would have seen.

Each test trains N steps in one go, recording a hash of every training batch, then trains again from a checkpoint
taken mid-epoch by ``ModelCheckpoint(every_n_train_steps=k)`` with a fresh model and ``Trainer.fit(ckpt_path=...)``:
the batch sequence after step k and the final parameters must be identical.
"""

from __future__ import annotations

import hashlib

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, TensorDataset

from lit_act.data import (
    DigitsDataModule,
    PySourceDataModule,
    ResumableDataLoader,
    ResumableSampler,
    TeacherStudentDataModule,
)
from lit_act.models import MLPClassifier, StudentNetwork, TransformerLM


class BatchRecorder(Callback):
    """Hashes of the inputs of every training batch, in order."""

    def __init__(self) -> None:
        self.hashes: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.hashes.append(hashlib.sha1(batch[0].numpy().tobytes()).hexdigest())


def _trainer(max_steps: int, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks, **kwargs)


def _setup(name: str):
    if name == "digits":  # 1258 training images, batch 64: 20 batches per epoch
        return (lambda: MLPClassifier(64, 10, hidden=(16,))), (lambda: DigitsDataModule(batch_size=64))
    if name == "pysource":  # cosine schedule: configure_optimizers reads trainer.estimated_stepping_batches
        return ((lambda: TransformerLM(128, 8, d_model=16, n_layer=1, n_head=2, cosine_schedule=True)),
                (lambda: PySourceDataModule(block_size=8, batch_size=64, max_chars=4000)))
    return ((lambda: StudentNetwork(8, hidden_neurons=2)),
            (lambda: TeacherStudentDataModule(input_dim=8, n_train=200, n_val=16, n_test=16, batch_size=32)))


def _run_and_resume(tmp_path, name: str, total: int, at: int):
    make_model, make_data = _setup(name)
    torch.manual_seed(0)
    straight, straight_model = BatchRecorder(), make_model()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=at, save_top_k=-1)
    _trainer(total, [straight, ckpt]).fit(straight_model, datamodule=make_data())

    torch.manual_seed(1)  # another initialisation: everything must come from the checkpoint
    resumed, resumed_model = BatchRecorder(), make_model()
    trainer = _trainer(total, [resumed])
    trainer.fit(resumed_model, datamodule=make_data(), ckpt_path=tmp_path / f"step={at}.ckpt")
    return straight, straight_model, resumed, resumed_model, trainer


@pytest.mark.parametrize("name,total,at", [("digits", 30, 7), ("digits", 30, 25), ("pysource", 20, 5),
                                           ("teacher_student", 12, 9)])
def test_resume_mid_epoch_sees_the_same_batches(tmp_path, name, total, at):
    straight, straight_model, resumed, resumed_model, trainer = _run_and_resume(tmp_path, name, total, at)
    batches_per_epoch = trainer.num_training_batches
    assert at % batches_per_epoch != 0, "the checkpoint must be taken mid-epoch"
    assert total > batches_per_epoch, "the run must cross an epoch boundary"
    assert len(straight.hashes) == total and resumed.hashes == straight.hashes[at:]
    assert trainer.global_step == total
    for (key, p), q in zip(straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(p, q), key


def test_epochs_reshuffle_and_depend_only_on_seed_and_epoch():
    data = TensorDataset(torch.arange(20.0))

    def epoch_order(seed: int, epoch: int) -> list[float]:
        loader = ResumableDataLoader(data, batch_size=5, seed=seed)
        loader.sampler.set_epoch(epoch)
        return torch.cat([b[0] for b in loader]).tolist()

    assert epoch_order(0, 1) == epoch_order(0, 1)
    assert sorted(epoch_order(0, 1)) == list(range(20))
    assert epoch_order(0, 0) != epoch_order(0, 1) and epoch_order(0, 1) != epoch_order(3, 1)
    sequential = ResumableDataLoader(data, batch_size=5, shuffle=False)
    assert torch.cat([b[0] for b in sequential]).tolist() == list(range(20))
    # epoch 0 is what lit-act's datamodules yielded before they resumed: a plain DataLoader with a seeded generator
    plain = DataLoader(data, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(4))
    assert epoch_order(4, 0) == torch.cat([b[0] for b in plain]).tolist()


@pytest.mark.parametrize("shuffle,drop_last", [(True, False), (False, False), (True, True)])
def test_sampler_shards_like_distributed_sampler(shuffle, drop_last):
    data = TensorDataset(torch.arange(23))
    shards = [list(ResumableSampler(data, shuffle, seed=1, drop_last=drop_last, num_replicas=3, rank=r))
              for r in range(3)]
    reference = [list(DistributedSampler(data, 3, r, shuffle=False, drop_last=drop_last)) for r in range(3)]
    assert [len(s) for s in shards] == [len(s) for s in reference]
    if not shuffle:
        assert shards == reference
    covered = [i for s in shards for i in s]
    if drop_last:  # 21 distinct indices, the last two of the order dropped
        assert len(covered) == len(set(covered)) == 21
    else:  # every index, the first of the order repeated to fill 24 = 3 x 8
        assert len(covered) == 24 and set(covered) == set(range(23))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_state_continues_the_epoch(num_workers):
    data = TensorDataset(torch.arange(40.0))
    kwargs = {"batch_size": 4, "seed": 5, "num_workers": num_workers}
    loader = ResumableDataLoader(data, **kwargs)
    loader.sampler.set_epoch(2)
    it = iter(loader)
    seen = [next(it)[0] for _ in range(3)]  # workers prefetch further; the state counts what was yielded
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 3}
    rest = [b[0] for b in it]

    fresh = ResumableDataLoader(data, **kwargs)
    fresh.load_state_dict(state)
    continued = [b[0] for b in fresh]
    assert len(seen) + len(continued) == len(loader)
    assert all(torch.equal(a, b) for a, b in zip(continued, rest, strict=True))
    assert fresh.state_dict() == {"epoch": 2, "batches": 10}

    done = ResumableDataLoader(data, **kwargs)
    done.load_state_dict({"epoch": 2, "batches": 10})  # a complete epoch: the next pass is epoch 3
    assert done.sampler.epoch == 3 and len(list(done)) == 10


class PlainDigits(DigitsDataModule):
    """The same data through a plain shuffling ``DataLoader``: not resumable."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))


def test_plain_dataloader_restarts_the_epoch(tmp_path):
    """The behaviour documented in docs/resume.md, and proof that the resume test can fail."""
    straight = BatchRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=7, save_top_k=-1)
    _trainer(12, [straight, ckpt]).fit(MLPClassifier(64, 10, hidden=(16,)), datamodule=PlainDigits(batch_size=64))
    resumed = BatchRecorder()
    with pytest.warns(UserWarning, match="not resumable"):
        _trainer(12, [resumed]).fit(MLPClassifier(64, 10, hidden=(16,)), datamodule=PlainDigits(batch_size=64),
                                    ckpt_path=tmp_path / "step=7.ckpt")
    assert resumed.hashes == straight.hashes[:5]  # batch 0 of the epoch again, not batch 7


@pytest.mark.slow
def test_resume_mid_epoch_under_ddp(tmp_path):
    """ddp_spawn on 2 CPU processes: each rank resumes its shard (10 batches per rank and epoch) at step 4."""

    def fit(callbacks=(), ckpt_path=None) -> MLPClassifier:
        torch.manual_seed(0 if ckpt_path is None else 1)
        model = MLPClassifier(64, 10, hidden=(16,))
        trainer = _trainer(14, list(callbacks), strategy="ddp_spawn", accelerator="cpu", devices=2)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
        return model

    straight = fit([ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)])
    resumed = fit(ckpt_path=tmp_path / "step=4.ckpt")
    for (key, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), key


def test_main_job_resumes_mid_epoch(tmp_path):
    """``python train.py ckpt_path=...`` from a mid-epoch checkpoint ends on the uninterrupted run's parameters."""
    from hydra.core.hydra_config import HydraConfig

    from lit_act.training import train
    from tests.helpers import compose_train

    def run(out, *extra):
        cfg = compose_train(out, ["callbacks=model_checkpoint", "++callbacks.model_checkpoint.every_n_train_steps=7",
                                  "++callbacks.model_checkpoint.save_top_k=-1", "++callbacks.model_checkpoint.monitor=null",
                                  "++callbacks.model_checkpoint.save_last=false", "++callbacks.model_checkpoint.filename='{step}'",
                                  "model.hidden=[16]", "test=false", "optimized_metric=train/loss",
                                  "++trainer.max_steps=25", "++trainer.limit_val_batches=0",
                                  "++trainer.enable_progress_bar=false", *extra])
        try:
            return train(cfg)[1]["model"]
        finally:
            HydraConfig.instance().cfg = None

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / '7.ckpt'}", "seed=1")
    for (key, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), key


def test_a_replaced_sampler_gives_a_plain_loader():
    """Lightning re-creates the loader with its own sampler for ``overfit_batches``: that loader does not resume."""
    data = TensorDataset(torch.arange(10.0))
    loader = ResumableDataLoader(data, batch_size=4, sampler=SequentialSampler(data))
    assert torch.cat([b[0] for b in loader]).tolist() == list(range(10)) and loader.state_dict() == {}
    loader.load_state_dict({"epoch": 1, "batches": 2})
    assert len(list(loader)) == 3
    trainer = L.Trainer(overfit_batches=2, max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(MLPClassifier(64, 10, hidden=(8,)), datamodule=DigitsDataModule())
    assert trainer.global_step == 4
