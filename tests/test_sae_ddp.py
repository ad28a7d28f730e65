"""DDP: two gloo ranks, each training on its half of every batch, end with the SAE one process trains on the whole
batches (same seed, same total data)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning import Callback

from lit_act.sae import SAEConfig, SAETrainer

STEPS, BATCH, D_IN = 6, 64, 8


def _config(sae: str) -> SAEConfig:
    return SAEConfig(sae=sae, d_latent=128, k=3, lr=1e-2, batch_size=BATCH, dead_tokens=BATCH, seed=3)


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(STEPS * BATCH, D_IN, generator=g).relu() + 0.1


def _rank(rank: int, world: int, init_file: str, sae: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = SAETrainer(D_IN, _config(sae))
        data = _data()
        half = BATCH // world
        for step in range(STEPS):
            batch = data[step * BATCH:(step + 1) * BATCH]
            trainer.step(batch[rank * half:(rank + 1) * half])
        torch.save({"sae": trainer.sae.state_dict(), "since": trainer.tokens_since_fired}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
@pytest.mark.parametrize("sae", ["topk", "relu"])
def test_two_ranks_equal_one_process_on_the_same_data(tmp_path, sae):
    single = SAETrainer(D_IN, _config(sae))
    data = _data()
    for step in range(STEPS):
        single.step(data[step * BATCH:(step + 1) * BATCH])
    assert sae != "topk" or single.dead.any()  # AuxK took part
    out = str(tmp_path / "state")
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), sae, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for name, value in single.sae.state_dict().items():
        torch.testing.assert_close(ranks[0]["sae"][name], ranks[1]["sae"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ranks[0]["sae"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(ranks[0]["since"], single.tokens_since_fired)


class _SaveSAEs(Callback):
    def __init__(self, sae_callback, out: str) -> None:
        self.sae_callback, self.out = sae_callback, out

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({name: sae.state_dict() for name, sae in self.sae_callback.saes.items()},
                   f"{self.out}.{trainer.global_rank}")


@pytest.mark.slow  # Lightning ddp_spawn, two CPU processes
def test_callback_under_ddp_spawn_keeps_one_sae_on_every_rank(tmp_path):
    from lightning import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from tests.test_sae_callback import TinyLM, _callback, _loaders

    sae_callback = _callback(loss_recovered_batches=1)
    out = str(tmp_path / "saes")
    trainer = Trainer(default_root_dir=tmp_path, max_steps=6, limit_val_batches=2, val_check_interval=3,
                      callbacks=[sae_callback, _SaveSAEs(sae_callback, out)], logger=CSVLogger(tmp_path),
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=2, strategy="ddp_spawn", num_sanity_val_steps=0)
    train, val = _loaders()
    trainer.fit(TinyLM(), train, val)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert set(ranks[0]) == {"act"}
    for name, value in ranks[0]["act"].items():
        assert torch.equal(value, ranks[1]["act"][name]), name
    header = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    for key in ("train/sae/fvu/act", "val/sae/fvu/act", "val/sae/loss_recovered/act", "val/sae/dead_fraction/mean"):
        assert key in header, key
