"""Overhead of lit-act's activation-statistic callbacks on the reference TransformerLM (conf/model/transformer.yaml:
d_model 128, 2 layers, 4 heads, ReLU MLP; conf/data/pysource.yaml shapes: batch 32 x 64 tokens, vocab 128), CPU fp32.

Printed ratios (goal in brackets), each against the no-callback baseline measured in the same run:

* step time, every statistic collected on every training step (<= 1.15x): ActivationSparsity(every_n_steps=1),
  MassiveActivations(every_n_steps=1), DeadNeurons(every_n_steps=1). NeuronActivationCoverage is not included: it
  needs classification logits ``(B, C)`` with targets ``(B,)`` (NAC-ME keeps correctly classified samples), which a
  language model's per-token batches do not provide;
* step time with every_n_steps=50 (<= 1.02x);
* peak memory (<= 1.05x): each configuration trains in a fresh subprocess; we report the ratio of the process's peak
  resident set size (``ru_maxrss``) and, more sensitive, of the RSS growth during ``fit`` (peak minus RSS before fit);
* informational: one validation epoch with ActivationSparsity's CETT calibration vs without callbacks.

Step time = wall time between consecutive ``on_train_batch_start`` calls (forward, backward, optimizer and every
callback hook). Configurations run interleaved, ``ROUNDS`` short fits each of ``STEPS`` steps after ``WARMUP``, and
the order rotates every round and each fit starts after ``gc.collect()`` with glibc's mmap threshold pinned
(``mallopt``), so neither position in a round nor the allocator history left by an earlier fit favours a
configuration. Each is summarised by medians over all pooled steps (robust to load from other processes): the
median step for ``every_n_steps`` in (None, 1); for ``every_n_steps=n`` the amortised
``median(plain steps) + (median(collecting steps) - median(plain steps)) / n``.
Run: ``.venv/bin/python -m benchmarks.bench_callbacks``.

**GPT-2 case** (issue 13; ``python -m benchmarks.bench_callbacks gpt2`` runs it alone, ``main`` runs it last): a
Hugging Face ``GPT2LMHeadModel`` from a config (4 layers, d_model 256, 4 heads, vocabulary 4096 to keep the LM head
from dominating a CPU step), sequences of 256 tokens, batch 8, right-padded batches (lengths uniform in [128, 256],
about 25% padding) with ``attention_mask``, AdamW, CPU fp32, one thread. Every statistics callback that applies to a
language model with its default selection -- ActivationSparsity (mlp_hidden), MassiveActivations (residual stream),
DeadNeurons (running window), ActivationHistograms -- against the same fits without callbacks, configurations
interleaved with a rotating order, medians over pooled steps:

* every step (goal <= 1.10x);
* every 50 steps (goal <= 1.01x): ``median(plain steps of the every-50 fits) + (median(collecting step) -
  that) / 50``, the collecting step measured by the every-step fits;
* masking cost (goal <= 1.02x): every-step fits with the ``attention_mask`` (default) vs the same callbacks with
  ``BatchAdapter(mask_fn=lambda batch: None)``.

Step times here are the process's CPU time (``time.process_time``, one torch thread) between consecutive
``on_train_batch_start`` calls: on a machine shared with other jobs, wall time measures their load as much as ours
(+-30% between identical steps). CPU time still varies by ~10% between identical steps under contention (shared
caches and memory bandwidth), so the case also prints the callbacks' *own* CPU time per step (their batch hooks and
the bodies of their forward hooks, timed inside the same fits) as ``1 + own / baseline step``: the overhead itself,
not the difference of two noisy totals (it leaves out PyTorch's hook dispatch, which is negligible here).

Measured (2026-12-01, shared 2-core CPU, baseline 1126 ms CPU per step, 3 rounds x 8 steps): every step 1.151x
end to end / 1.123x own time (goal 1.10x missed; without ActivationHistograms 1.042x / 1.067x); every 50 steps
0.980x / 1.0025x; masking 1.015x / 1.001x. cProfile of the every-step fits: ActivationHistograms' update (binning
every entry, ``stats/histogram.py``) ~0.14 s per step, MassiveActivations' per-sequence ``nanmedian``/``topk``
(``stats/massive.py``) ~0.12 s, and ``valid_tokens`` (``x[mask]``, copied once per callback and module) ~0.05 s.
After the fast paths (histogram binning in one in-place fp32 buffer and an int32 ``bincount``; one shared ``x[mask]``
copy per observed output, ``stats/tap.py``), same day, two interleaved before/after pairs, 3 rounds x 8 steps each:
every step 1.108x / 1.101x before -> 1.042x / 1.049x after end to end; callbacks' own time 1.113x / 1.109x before ->
1.081x / 1.082x after (ActivationHistograms' share 0.043 / 0.039 -> 0.017 / 0.018 of a baseline step). Still the
largest cost: MassiveActivations' per-sequence ``nanmedian`` (~7 ms per site and step; ``median``/``kthvalue`` are
no faster on CPU), left as is.
"""

from __future__ import annotations

import ctypes
import gc
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from lightning import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lit_act.batch import BatchAdapter
from lit_act.callbacks.dead import DeadNeurons
from lit_act.callbacks.histograms import ActivationHistograms
from lit_act.callbacks.massive import MassiveActivations
from lit_act.callbacks.sparsity import ActivationSparsity
from lit_act.models import TransformerLM

BATCH, BLOCK, VOCAB = 32, 64, 128
WARMUP, STEPS, ROUNDS = 5, 50, 6


def make_callbacks(every_n_steps: int | None) -> list[Callback]:
    """Every statistic, collected on training batches every ``every_n_steps`` (``None``: no callbacks)."""
    if every_n_steps is None:
        return []
    return [
        ActivationSparsity(every_n_steps=every_n_steps, on_validation=False, figures=False),
        MassiveActivations(every_n_steps=every_n_steps, fit_emergence=False, figures=False),
        DeadNeurons(every_n_steps=every_n_steps, window_steps=max(every_n_steps, 50), figures=False),
    ]


class _StepTimer(Callback):
    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(self.clock())


def _data(n_batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, VOCAB, (n_batches * BATCH, BLOCK + 1), generator=g)
    return DataLoader(TensorDataset(idx[:, :-1], idx[:, 1:]), batch_size=BATCH)


def _model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(vocab_size=VOCAB, block_size=BLOCK, d_model=128, n_layer=2, n_head=4, activation="relu")


def _trainer(callbacks: list[Callback], steps: int, **kw) -> Trainer:
    return Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                   num_sanity_val_steps=0, limit_val_batches=0, default_root_dir="/tmp/lit_act_bench", **kw)


def step_times(every_n_steps: int | None) -> dict[int, float]:
    """``{step: seconds}`` of one fit of ``WARMUP + STEPS`` steps (warm-up steps dropped)."""
    gc.collect()
    timer = _StepTimer()
    steps = WARMUP + STEPS + 1
    _trainer([timer, *make_callbacks(every_n_steps)], steps).fit(_model(), _data(steps))
    return {step: b - a for step, (a, b) in enumerate(zip(timer.starts, timer.starts[1:], strict=False))
            if step >= WARMUP}


def per_step_cost(runs: list[dict[int, float]], every_n_steps: int | None) -> float:
    """Median step time; for ``every_n_steps > 1`` amortised over plain and collecting steps."""
    pooled = [(step, t) for run in runs for step, t in run.items()]
    if every_n_steps in (None, 1):
        return statistics.median(t for _, t in pooled)
    plain = statistics.median(t for step, t in pooled if step % every_n_steps)
    collecting = statistics.median(t for step, t in pooled if not step % every_n_steps)
    return plain + (collecting - plain) / every_n_steps


def validation_time(with_cett: bool) -> float:
    model, data = _model(), _data(20)
    callbacks = [ActivationSparsity(every_n_steps=None, cett_target=0.2, figures=False)] if with_cett else []
    trainer = Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1, default_root_dir="/tmp/lit_act_bench")
    trainer.validate(model, data, verbose=False)  # warm-up
    start = time.perf_counter()
    trainer.validate(model, data, verbose=False)
    return time.perf_counter() - start


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def memory_child(every_n_steps: int | None) -> dict[str, int]:
    """Runs in a fresh process: RSS before fit and peak RSS (KiB) for 60 steps."""
    torch.set_num_threads(1)
    _pin_mmap_threshold()
    model, data, callbacks = _model(), _data(60), make_callbacks(every_n_steps)
    before = _rss_kib()
    _trainer(callbacks, 60).fit(model, data)
    return {"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _memory(every_n_steps: int | None) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_callbacks", "--memory-child", str(every_n_steps)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _pin_mmap_threshold(nbytes: int = 256 * 1024 * 1024) -> None:
    """Fix glibc's mmap threshold (M_MMAP_THRESHOLD = -3), which otherwise grows with the allocation history."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)
    except OSError:  # not glibc
        pass


def main() -> None:
    torch.set_num_threads(1)
    print("statistics: ActivationSparsity, MassiveActivations, DeadNeurons (NAC needs classification batches: "
          "not included)")
    _pin_mmap_threshold()
    runs: dict[int | None, list[dict[int, float]]] = {None: [], 1: [], 50: []}
    order = list(runs)
    step_times(None)  # warm-up (imports, allocator)
    for round_ in range(ROUNDS):
        for every in order[round_ % 3:] + order[:round_ % 3]:
            runs[every].append(step_times(every))
    base = per_step_cost(runs[None], None)
    print(f"baseline step time (no callbacks): {base * 1e3:.1f} ms (median over {ROUNDS} x {STEPS} steps)")
    for every, goal in ((1, 1.15), (50, 1.02)):
        ratio = per_step_cost(runs[every], every) / base
        print(f"step time, all statistics every_n_steps={every}: {ratio:.3f}x (goal <= {goal}x)")
    memory = {every: _memory(every) for every in (None, 1)}
    peak = memory[1]["peak"] / memory[None]["peak"]
    growth = (memory[1]["peak"] - memory[1]["before"]) / max(1, memory[None]["peak"] - memory[None]["before"])
    print(f"peak RSS, all statistics every step: {peak:.3f}x (goal <= 1.05x; "
          f"{memory[None]['peak'] / 1024:.0f} -> {memory[1]['peak'] / 1024:.0f} MiB); "
          f"RSS growth during fit: {growth:.3f}x")
    val = statistics.median(validation_time(True) / validation_time(False) for _ in range(3))
    print(f"validation epoch with CETT calibration (ActivationSparsity at validation): {val:.2f}x (informational)")
    main_gpt2()


# ------------------------------------------------------------------------------------------------- GPT-2 case
GPT2_LAYERS, GPT2_D, GPT2_HEADS, GPT2_T, GPT2_B, GPT2_VOCAB = 4, 256, 4, 256, 8, 4096
GPT2_WARMUP, GPT2_STEPS, GPT2_ROUNDS = 2, 8, 3


class _GPT2(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel  # benchmark-only dependency (dev extra)

        torch.manual_seed(0)
        config = GPT2Config(n_layer=GPT2_LAYERS, n_embd=GPT2_D, n_head=GPT2_HEADS, n_positions=GPT2_T,
                            vocab_size=GPT2_VOCAB, bos_token_id=0, eos_token_id=0)
        self.model = GPT2LMHeadModel(config)

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class _PaddedTokens(Dataset):
    """Right-padded samples: ``input_ids``, ``attention_mask`` (lengths uniform in [T/2, T]), ``labels``."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, GPT2_VOCAB, (n, GPT2_T), generator=g)
        self.mask = (torch.arange(GPT2_T) < torch.randint(GPT2_T // 2, GPT2_T + 1, (n, 1), generator=g)).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i] * self.mask[i]
        return {"input_ids": ids, "attention_mask": self.mask[i], "labels": ids.masked_fill(self.mask[i] == 0, -100)}


def gpt2_callbacks(every_n_steps: int | None, masked: bool = True, histograms: bool = True) -> list[Callback]:
    """Every statistics callback that applies to a causal LM (default selections), every ``every_n_steps``."""
    if every_n_steps is None:
        return []
    adapter = None if masked else BatchAdapter(mask_fn=lambda batch: None)
    callbacks = [
        ActivationSparsity(every_n_steps=every_n_steps, on_validation=False, figures=False, adapter=adapter),
        MassiveActivations(every_n_steps=every_n_steps, fit_emergence=False, figures=False, adapter=adapter),
        DeadNeurons(every_n_steps=every_n_steps, window_steps=max(every_n_steps, 50), figures=False,
                    adapter=adapter),
    ]
    if histograms:
        callbacks.append(ActivationHistograms(every_n_steps=every_n_steps, figures=False, adapter=adapter))
    return callbacks


class _CallbackClock:
    """CPU time spent inside the statistics callbacks (their batch hooks and their tap hooks' ``_observe``), read by
    :class:`_StepTimer`-aligned snapshots: the callbacks' own cost per step, without the noise of the whole step."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.total = 0.0
        self.snapshots: list[float] = []
        for callback in callbacks:
            for name in ("on_train_batch_start", "on_train_batch_end", "_observe"):
                setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.process_time() - start

        return timed


class _SnapshotTimer(_StepTimer):
    def __init__(self, clock: _CallbackClock) -> None:
        super().__init__(time.process_time)
        self.callback_clock = clock

    def on_train_batch_start(self, *args) -> None:
        super().on_train_batch_start(*args)
        self.callback_clock.snapshots.append(self.callback_clock.total)


def gpt2_step_times(config: str) -> tuple[list[float], list[float]]:
    """CPU times of the steps (warm-up dropped) of one short fit; ``config`` in ``none``, ``every1``, ``every1_unmasked``,
    ``every50``."""
    every, masked, histograms = {"none": (None, True, True), "every1": (1, True, True),
                                 "every1_unmasked": (1, False, True), "every50": (50, True, True),
                                 "every1_no_histograms": (1, True, False)}[config]
    gc.collect()
    callbacks = gpt2_callbacks(every, masked, histograms)
    clock = _CallbackClock(callbacks)
    timer = _SnapshotTimer(clock)
    steps = GPT2_WARMUP + GPT2_STEPS + 1
    data = DataLoader(_PaddedTokens(steps * GPT2_B), batch_size=GPT2_B)
    _trainer([timer, *callbacks], steps).fit(_GPT2(), data)
    times = [b - a for a, b in zip(timer.starts, timer.starts[1:], strict=False)]
    inside = [b - a for a, b in zip(clock.snapshots, clock.snapshots[1:], strict=False)]
    return times[GPT2_WARMUP:], inside[GPT2_WARMUP:]  # every-50 fits collect at step 0 only: the rest are plain


def main_gpt2() -> dict[str, float]:
    torch.set_num_threads(1)
    _pin_mmap_threshold()
    configs = ["none", "every1", "every1_unmasked", "every50", "every1_no_histograms"]
    runs: dict[str, list[float]] = {c: [] for c in configs}
    inside: dict[str, list[float]] = {c: [] for c in configs}
    gpt2_step_times("none")  # warm-up
    for round_ in range(GPT2_ROUNDS):
        for config in configs[round_ % len(configs):] + configs[:round_ % len(configs)]:
            times, callback_times = gpt2_step_times(config)
            runs[config].extend(times)
            inside[config].extend(callback_times)
    med = {c: statistics.median(v) for c, v in runs.items()}
    own = {c: statistics.median(v) / med["none"] for c, v in inside.items() if c != "none"}
    every50 = med["every50"] + (med["every1"] - med["every50"]) / 50
    ratios = {"every_step": med["every1"] / med["none"], "every_50_steps": every50 / med["none"],
              "masking": med["every1"] / med["every1_unmasked"],
              "every_step_no_histograms": med["every1_no_histograms"] / med["none"]}
    print(f"GPT-2 config ({GPT2_LAYERS} layers, d={GPT2_D}, T={GPT2_T}, batch {GPT2_B}, padded): baseline step "
          f"{med['none'] * 1e3:.0f} ms CPU (median of {len(runs['none'])} steps); statistics: ActivationSparsity, "
          "MassiveActivations, DeadNeurons, ActivationHistograms")
    print(f"  every step: {ratios['every_step']:.3f}x (goal <= 1.10x)")
    print(f"  every 50 steps: {ratios['every_50_steps']:.4f}x (goal <= 1.01x)")
    print(f"  masking (with attention_mask vs mask_fn=None, every step): {ratios['masking']:.3f}x (goal <= 1.02x)")
    print(f"  every step without ActivationHistograms: {ratios['every_step_no_histograms']:.3f}x (informational)")
    print("  the callbacks' own CPU time per step (their hooks, timed inside the fits), as 1 + it / baseline step: "
          f"every step {1 + own['every1']:.3f}x, unmasked {1 + own['every1_unmasked']:.3f}x (masking "
          f"{(1 + own['every1']) / (1 + own['every1_unmasked']):.3f}x), without histograms "
          f"{1 + own['every1_no_histograms']:.3f}x, every 50 steps {1 + own['every50'] + own['every1'] / 50:.4f}x")
    ratios |= {f"own_{c}": 1 + v for c, v in own.items()}
    return ratios


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "gpt2":
        main_gpt2()
    elif len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        arg = sys.argv[2]
        print(json.dumps(memory_child(None if arg == "None" else int(arg))))
    else:
        main()
