"""Cost of Sparsing-Law CETT in ActivationSparsity: one validation epoch with ``cett_target=0.2`` (thresholds
calibrated once per epoch on ``cett_max_tokens`` calibration tokens per layer, then applied to every batch) against the
same epoch with ``cett_target=None`` and with no callback, measured in the same process (CPU fp32, one thread).

Goal (issue 15, item 5): a validation epoch with CETT on costs at most 1.5x one without it.

Models: the reference TransformerLM of :mod:`benchmarks.bench_callbacks` (d_model 128, 2 layers, ReLU MLP, batch 32 x 64
tokens, 20 batches) and, when ``transformers`` is installed, a GPT-2 config (4 layers, d=256, sequence 256, batch 8,
10 padded batches; ``Conv1D`` down-projections). Each configuration's epoch time is the median over ``ROUNDS``
interleaved repetitions (after a warm-up epoch).

Run: ``.venv/bin/python -m benchmarks bench_cett``.
"""

from __future__ import annotations

import statistics
import time

import torch
from lightning import LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset

from benchmarks.bench_callbacks import _data, _model
from lit_act.callbacks.sparsity import ActivationSparsity

ROUNDS = 5
GPT2_BATCHES, GPT2_BATCH, GPT2_T, GPT2_VOCAB = 10, 8, 256, 512


class _PaddedTokens(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, GPT2_VOCAB, (n, GPT2_T), generator=g)
        self.lengths = torch.randint(GPT2_T // 2, GPT2_T + 1, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = (torch.arange(GPT2_T) < self.lengths[i]).long()
        return {"input_ids": self.ids[i] * mask, "attention_mask": mask}


class _HF(LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**batch)

    def validation_step(self, batch, batch_idx):
        return self.model(**batch).logits.float().mean()


def _gpt2() -> tuple[LightningModule, DataLoader] | None:
    try:
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=GPT2_VOCAB, n_positions=GPT2_T, n_embd=256, n_layer=4, n_head=4,
                                     attn_implementation="eager")
    data = DataLoader(_PaddedTokens(GPT2_BATCHES * GPT2_BATCH), batch_size=GPT2_BATCH)
    return _HF(transformers.GPT2LMHeadModel(config)), data


def _epoch(model: LightningModule, data: DataLoader, cett: bool | None) -> float:
    """Seconds of one validation epoch: ``cett=None`` no callback, else ActivationSparsity with / without CETT."""
    callbacks = [] if cett is None else [ActivationSparsity(every_n_steps=None, cett_target=0.2 if cett else None,
                                                            figures=False)]
    trainer = Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1, default_root_dir="/tmp/lit_act_bench")
    start = time.perf_counter()
    trainer.validate(model, data, verbose=False)
    return time.perf_counter() - start


def measure(name: str, model: LightningModule, data: DataLoader) -> float:
    configs = (None, False, True)
    for cett in configs:
        _epoch(model, data, cett)  # warm-up
    times: dict[bool | None, list[float]] = {c: [] for c in configs}
    for round_ in range(ROUNDS):
        for cett in configs[round_ % 3:] + configs[:round_ % 3]:
            times[cett].append(_epoch(model, data, cett))
    plain, sparsity, cett = (statistics.median(times[c]) for c in configs)
    ratio = cett / sparsity
    print(f"{name}: validation epoch {plain * 1e3:.0f} ms without callbacks; ActivationSparsity without CETT "
          f"{sparsity / plain:.2f}x; with CETT {cett / plain:.2f}x; CETT on vs off: {ratio:.2f}x (goal <= 1.5x)")
    return ratio


def main() -> None:
    torch.set_num_threads(1)
    measure("TransformerLM (d 128, 2 layers, 32 x 64 tokens)", _model(), _data(20))
    gpt2 = _gpt2()
    if gpt2 is not None:
        measure("GPT-2 config (d 256, 4 layers, 8 x 256 padded tokens)", *gpt2)


if __name__ == "__main__":
    main()
