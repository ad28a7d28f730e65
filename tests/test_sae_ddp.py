"""DDP: two gloo ranks, each training on its half of every batch, end with the SAE one process trains on the whole
batches (same seed, same total data)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
