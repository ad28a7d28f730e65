"""``lit-act sae``: train SAEs offline on a finished run's model, from activations streamed from its datamodule.

    lit-act sae <run dir or checkpoint> --modules 'blocks.*.mlp.act' [hydra overrides ...] [-m]
    lit-act sae logs/train/runs/<date> --modules 'blocks.*.mlp.act' sae.k=8,16,32 sae.d_latent=512,1024 -m

Config: ``conf/sae/offline.yaml`` (Hydra; every key overridable, ``-m`` sweeps comma lists, e.g. over ``sae.k`` and
``sae.d_latent``). A run directory is one written by ``train.py`` (its ``.hydra/config.yaml`` rebuilds the datamodule
and the model; the weights come from ``checkpoints/last.ckpt``, else the newest ``*.ckpt``); a checkpoint path uses
the run directory two levels up. Overrides are recognised among the ``--modules`` values by their ``=``.

Each job streams ``tokens`` training activations of the selected modules through a bounded buffer into one
:class:`~lit_act.sae.training.SAETrainer` per module, then evaluates on ``eval_batches`` validation batches
(FVU, L0, AFA error, density; ``loss_recovered`` on the first ``loss_recovered_batches``) and writes, in its
Hydra output directory: ``metrics.csv`` (CSVLogger: ``train/sae/{metric}/{module}`` during training,
``val/sae/{metric}/{module}`` and ``.../mean`` at the end; read by ``lit-act report``), ``job_status.json``,
``saes/<module>.pt`` (config + state dict), ``figures/sae_density_<module>.png``. After a multirun,
``<sweep dir>/figures/sae_fvu_vs_l0.png`` plots FVU against L0 for every job.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lit_act.batch import DEFAULT_ADAPTER
from lit_act.sae.buffer import ActivationBuffer
from lit_act.sae.metrics import DENSITY_RANGE, SAEMetrics, decoder_epsilon, loss_recovered
from lit_act.sae.training import SAEConfig, SAETrainer
from lit_act.selection import Site, select_sites
from lit_act.stats.tap import neuron_view, tap, valid_tokens
from lit_act.utils.task import set_default_root, task_wrapper

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the ``sae`` subcommand on ``lit-act``'s subparsers."""
    parser = commands.add_parser(
        "sae", help="train sparse autoencoders on a finished run's activations (Hydra config conf/sae/)",
        description="Stream activations of the selected modules of a trained model from its datamodule and train "
                    "one SAE per module. Extra KEY=VALUE arguments are Hydra overrides of conf/sae/offline.yaml.")
    parser.add_argument("source", type=Path, help="a run directory written by train.py, or a checkpoint in it")
    parser.add_argument("--modules", nargs="+", required=True, metavar="GLOB",
                        help="module globs (e.g. 'blocks.*.mlp.act'); KEY=VALUE items are taken as overrides")
    parser.add_argument("-m", "--multirun", action="store_true", help="Hydra multirun (sweep comma lists)")
    parser.add_argument("overrides", nargs="*", default=[], help="Hydra overrides, e.g. sae.k=8,16,32")


def run(args: argparse.Namespace) -> int:
    """Run the Hydra job(s) for parsed ``lit-act sae`` arguments."""
    globs = [m for m in args.modules if "=" not in m]
    overrides = [m for m in args.modules if "=" in m] + list(args.overrides)
    quoted = ",".join(json.dumps(g) for g in globs)
    argv = [f"source={json.dumps(str(args.source.resolve()))}", f"modules=[{quoted}]", *overrides]
    if args.multirun:
        argv.append("--multirun")
    saved = sys.argv
    sys.argv = ["lit-act-sae", *argv]
    try:
        _hydra_main()
    finally:
        sys.argv = saved
    return 0


def _hydra_main() -> None:
    import hydra

    set_default_root()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sae/offline")
    def main(cfg: DictConfig) -> float | None:
        metrics, _ = train_saes(cfg)
        _sweep_figure_when_last(cfg)
        return metrics.get("val/sae/fvu/mean")

    main()


# --------------------------------------------------------------------------------------------------- the job
def resolve_source(source: Path) -> tuple[Path, Path]:
    """``(run dir, checkpoint)`` for a run directory or a checkpoint file (see the module docstring)."""
    source = Path(source)
    if source.is_file():
        run_dir = next((p for p in source.parents if (p / ".hydra" / "config.yaml").is_file()), None)
        if run_dir is None:
            raise FileNotFoundError(f"no .hydra/config.yaml above checkpoint {source}: pass a run directory of "
                                    "train.py or a checkpoint inside one")
        return run_dir, source
    if not (source / ".hydra" / "config.yaml").is_file():
        raise FileNotFoundError(f"{source} is not a train.py run directory (no .hydra/config.yaml)")
    last = source / "checkpoints" / "last.ckpt"
    ckpts = sorted(source.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not last.is_file() and not ckpts:
        raise FileNotFoundError(f"no checkpoint (*.ckpt) under {source}; train with the model_checkpoint callback")
    return source, last if last.is_file() else ckpts[-1]


def load_trained(source: Path) -> tuple[nn.Module, Any, DictConfig]:
    """``(model with the checkpoint's weights, datamodule, train config)`` of a finished run."""
    from lit_act.utils.instantiate import instantiate, instantiate_model

    run_dir, ckpt = resolve_source(source)
    train_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    datamodule = instantiate(train_cfg.data)
    model = instantiate_model(train_cfg.model, getattr(datamodule, "shape_hints", {}))
    if train_cfg.get("mlp"):
        instantiate(train_cfg.mlp)(model)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    return model, datamodule, train_cfg


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _rows(name: str, module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The real-token rows ``(tokens, d_in)`` of an observed tensor (padding dropped, :func:`valid_tokens`)."""
    if not x.is_floating_point():
        raise TypeError(f"module {name!r} returned a {x.dtype} tensor; SAEs need a floating-point activation")
    return neuron_view(valid_tokens(name, x.detach(), mask), module).float()


@task_wrapper
def train_saes(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """One offline job (see the module docstring); returns ``(final metrics, {"saes": ..., "trainers": ...})``."""
    from lightning.pytorch.loggers import CSVLogger

    out = Path(cfg.paths.output_dir)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    config = SAEConfig(**OmegaConf.to_container(cfg.sae, resolve=True))
    model, datamodule, _ = load_trained(Path(cfg.source))
    model.to(device).eval()
    selected = select_sites(model, list(cfg.modules))
    datamodule.setup("fit")
    logger = CSVLogger(save_dir=str(out), name="", version="")
    trainers: dict[str, SAETrainer] = {}
    buffers: dict[str, ActivationBuffer] = {}
    pending: dict[str, int] = {}
    train_metrics: dict[str, SAEMetrics] = {}
    mask: list[torch.Tensor | None] = [None]

    def collect(name: str, module: nn.Module, x: torch.Tensor) -> None:
        rows = _rows(name, module, x, mask[0])
        if name not in trainers:
            trainers[name] = SAETrainer(rows.shape[1], config, device=device)
            buffers[name] = ActivationBuffer(rows.shape[1], cfg.buffer_tokens, config.batch_size,
                                             seed=config.seed + len(buffers) + 1)
            train_metrics[name] = SAEMetrics(rows.shape[1], config.d_latent).to(device)
        pending[name] = pending.get(name, 0) + buffers[name].add(rows)

    steps = 0
    while min((t.tokens_trained for t in trainers.values()), default=0) < cfg.tokens:
        progressed = False
        for batch in datamodule.train_dataloader():
            batch = _to(batch, device)
            mask[0] = DEFAULT_ADAPTER.mask(batch)
            with torch.no_grad(), tap(selected, collect):
                DEFAULT_ADAPTER.forward(model, batch)
            for name, trainer in trainers.items():
                while pending[name] >= config.batch_size and buffers[name].ready:
                    x = buffers[name].sample()
                    trainer.step(x)
                    o = trainer.last_output
                    train_metrics[name].update(x, o.x_hat, o.z, trainer.sae.b_pre, trainer.sae.input_scale)
                    pending[name] -= config.batch_size
                    progressed = True
            steps += 1
            if steps % cfg.log_every_n_batches == 0:
                _log(logger, "train", _values(trainers, train_metrics), steps)
            if min(t.tokens_trained for t in trainers.values()) >= cfg.tokens:
                break
        if not progressed:
            raise RuntimeError("the train dataloader gave too few tokens for one SAE batch; lower sae.batch_size")
    final = _evaluate(cfg, model, datamodule, selected, trainers, device)
    logged = _log(logger, "val", final, steps)
    logger.finalize("success")
    (out / "saes").mkdir(parents=True, exist_ok=True)
    for name, trainer in trainers.items():
        torch.save({"config": config.to_dict(), "d_in": trainer.d_in, "state_dict": trainer.sae.state_dict()},
                   out / "saes" / f"{name}.pt")
    _density_figures(out, final)
    return logged, {"saes": {n: t.sae for n, t in trainers.items()}, "trainers": trainers}


def _values(trainers: dict[str, SAETrainer], metrics: dict[str, SAEMetrics]) -> dict[str, dict[str, torch.Tensor]]:
    values = {}
    for name, trainer in trainers.items():
        computed = metrics[name].compute() if metrics[name].update_called else {}
        metrics[name].reset()
        values[name] = {k: v for k, v in computed.items() if k != "density_hist"} | {
            "dead_fraction": trainer.dead.float().mean(), "tokens": torch.tensor(float(trainer.tokens_trained))}
        if "density_hist" in computed:
            values[name]["density_hist"] = computed["density_hist"]
    return values


@torch.no_grad()
def _evaluate(cfg: DictConfig, model: nn.Module, datamodule: Any, selected: dict[str, Site],
              trainers: dict[str, SAETrainer], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    metrics = {n: SAEMetrics(t.d_in, t.config.d_latent).to(device) for n, t in trainers.items()}
    for trainer in trainers.values():
        trainer.sae.eval()
    mask: list[torch.Tensor | None] = [None]

    def evaluate(name: str, module: nn.Module, x: torch.Tensor) -> None:
        rows = _rows(name, module, x, mask[0])
        rows = rows[torch.isfinite(rows).all(dim=1)]
        sae = trainers[name].sae
        o = sae(rows)
        metrics[name].update(rows, o.x_hat, o.z, sae.b_pre, sae.input_scale)

    recovered_batches = []
    for i, batch in enumerate(datamodule.val_dataloader()):
        if i >= cfg.eval_batches:
            break
        batch = _to(batch, device)
        mask[0] = DEFAULT_ADAPTER.mask(batch)
        with tap(selected, evaluate):
            DEFAULT_ADAPTER.forward(model, batch)
        if i < cfg.loss_recovered_batches:
            recovered_batches.append(batch)
    values = {}
    for name, trainer in trainers.items():
        computed = metrics[name].compute()
        values[name] = computed | {"dead_fraction": trainer.dead.float().mean()} | decoder_epsilon(trainer.sae)
        if recovered_batches:
            values[name] |= loss_recovered(model, selected[name], trainer.sae, recovered_batches)
    return values


def _log(logger, stage: str, per_module: dict[str, dict[str, torch.Tensor]], step: int) -> dict[str, float]:
    flat: dict[str, float] = {}
    for name, stats in per_module.items():
        for stat, value in stats.items():
            if stat != "density_hist":
                flat[f"{stage}/sae/{stat}/{name}"] = float(value)
    stats_names = {s for stats in per_module.values() for s in stats if s != "density_hist"}
    for stat in sorted(stats_names):
        per = [float(stats[stat]) for stats in per_module.values() if stat in stats]
        flat[f"{stage}/sae/{stat}/mean"] = sum(per) / len(per)
    logger.log_metrics(flat, step=step)
    logger.save()
    return flat


def _density_figures(out: Path, final: dict[str, dict[str, torch.Tensor]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "figures").mkdir(parents=True, exist_ok=True)
    for name, stats in final.items():
        hist = stats["density_hist"].cpu()
        edges = torch.linspace(*DENSITY_RANGE, hist.numel() + 1)
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(edges[:-1].tolist(), hist.tolist(), width=float(edges[1] - edges[0]), align="edge")
        ax.set_xlabel("log10 feature density")
        ax.set_ylabel("latents")
        ax.set_title(f"SAE feature density: {name}")
        fig.tight_layout()
        fig.savefig(out / "figures" / f"sae_density_{name}.png")
        plt.close(fig)


# ----------------------------------------------------------------------------------------------- sweep figure
def fvu_vs_l0_figure(sweep_dir: Path) -> Path | None:
    """``<sweep_dir>/figures/sae_fvu_vs_l0.png`` from every job below ``sweep_dir``
    (:func:`lit_act.sae.figures.sweep_fvu_vs_l0`); ``None`` when no job has both keys."""
    from lit_act.report import find_jobs, load_job, varying_overrides
    from lit_act.sae.figures import sweep_fvu_vs_l0

    jobs = [load_job(p, Path(sweep_dir)) for p in find_jobs(Path(sweep_dir))]
    varying, _ = varying_overrides(jobs) if jobs else ([], {})
    return sweep_fvu_vs_l0(jobs, [v for v in varying if v not in ("source", "modules")],
                           Path(sweep_dir) / "figures" / "sae_fvu_vs_l0.png")


def _sweep_figure_when_last(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        fvu_vs_l0_figure(Path(hydra_cfg.sweep.dir))  # redrawn after every job: the last one has them all


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lit_act.sae.cli <source> --modules ...`` (the same as ``lit-act sae``)."""
    parser = argparse.ArgumentParser(prog="lit-act")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["sae", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
