"""experiment=sae_lm on real steps: the SAE metrics reach the `lit-act report` table."""

import pytest

from lit_act.report import write_report
from lit_act.training import train
from tests.helpers import compose_train


@pytest.mark.slow  # a real (tiny) LM fit with online SAEs, ~30 s
def test_sae_lm_reports_fvu_l0_dead_and_loss_recovered(tmp_path):
    cfg = compose_train(tmp_path, [
        "experiment=sae_lm", "data.max_chars=50000", "model.d_model=32", "trainer.max_steps=8",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
        "callbacks.sae.start_step=2", "callbacks.sae.every_n_steps=1", "callbacks.sae.d_latent=64",
        "callbacks.sae.k=8", "callbacks.sae.batch_size=256", "callbacks.sae.buffer_tokens=2048",
        "callbacks.sae.loss_recovered_batches=1", "callbacks.sae.log_every_n_steps=2"])
    metrics, _ = train(cfg)
    for stat in ("fvu", "l0", "dead_fraction", "loss_recovered"):
        for module in ("blocks.0.mlp.act", "blocks.1.mlp.act", "mean"):
            assert f"val/sae/{stat}/{module}" in metrics, (stat, module)
    assert metrics["val/sae/l0/mean"] <= 8
    table = write_report(tmp_path).markdown.read_text()
    for stat in ("fvu", "l0", "dead_fraction", "loss_recovered"):
        assert f"val/sae/{stat}/mean" in table
