"""``lit-act report``: compare the jobs of a run or multirun directory from their local logs (no network).

Each job directory (Hydra's ``<sweep dir>/<job num>`` or a single run's directory) is read from

* ``.hydra/overrides.yaml``: the command-line overrides of the job (``activation=gelu``);
* ``job_status.json`` (written by :func:`lit_act.utils.task.task_wrapper`): ``completed`` or ``failed`` with the error;
  a job without it was killed (time limit, OOM kill) or is still running and shows as ``incomplete``;
* ``**/metrics.csv`` (Lightning ``CSVLogger``; the newest when there are several): every logged key's history. The
  *final* value of a key is its last logged value (NaN included: a diverged run shows NaN, not an earlier value);
  keys only in ``job_status.json``'s metrics (e.g. runs without the CSV logger) are taken from there.

Outputs (in ``--out``, default ``<dir>/report``):

* ``comparison.csv``: one row per job: job, every override that varies across jobs, status, error, and the final
  value of every metric key (``val/...``, ``test/...``, ``train/...`` statistics, ...) except ``epoch``/``step``; a
  key logged both per step and per epoch (``train/loss_step``, ``train/loss_epoch``) appears once, as its epoch
  aggregate under its own name (``train/loss``);
* ``comparison.md``: the same rows with the summary keys only (no per-module or per-neuron keys, see
  :func:`is_per_unit`; ``--metrics`` patterns choose the columns instead), the overrides common to every job, and
  each failure's error;
* ``figures/final_<key>.png``: bar chart of each summary key's final value per job, labelled by the varying
  overrides (failed jobs marked);
* ``figures/curve_<key>.png``: every job's history of each top-level ``val/...`` key over training steps;
* ``figures/sae_fvu_vs_l0.png``: when jobs logged SAE metrics (``val/sae/fvu/mean``, ``val/sae/l0/mean``), FVU
  against L0 per job (:func:`lit_act.sae.figures.sweep_fvu_vs_l0`).
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lit_act.utils.task import STATUS_FILE

SKIPPED_COLUMNS = ("epoch", "step")
NOT_SET = "(default)"  # an override that a job did not set
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
_UNITS = (("acc", "fraction of samples"), ("loss", "mean over samples"), ("fraction", "fraction of neurons"),
          ("sparsity", "fraction"), ("dead", "fraction of neurons"), ("seconds", "s"), ("cos", "cosine"),
          ("eig", "eigenvalue"), ("trace", "sum of eigenvalues"))


@dataclass
class JobRecord:
    """What one job left on disk: its overrides, outcome and metric histories ``key -> [(step, value)]``."""

    path: Path
    name: str
    overrides: dict[str, str]
    status: str
    error: str = ""
    final: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Report:
    """The written files."""

    markdown: Path
    csv: Path
    figures: list[Path]


def _is_job_dir(path: Path) -> bool:
    return (path / STATUS_FILE).is_file() or (path / OVERRIDES_FILE).is_file()


def _natural_key(path: Path) -> list[tuple[int, int, str]]:
    """Job 2 before job 10; numbered job directories before named ones."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def find_jobs(root: Path) -> list[Path]:
    """``root`` itself when it is a job directory, else every job directory below it, in job-number order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    if _is_job_dir(root):
        return [root]
    found = {p.parent for p in root.rglob(STATUS_FILE)} | {p.parent.parent for p in root.rglob(str(OVERRIDES_FILE))}
    return sorted(found, key=_natural_key)


def parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    """``["activation=gelu", "+trainer.limit_train_batches=3"]`` -> ``{"activation": "gelu", ...}`` (``+``/``++``
    prefixes dropped; a deletion ``~key`` maps to ``"<deleted>"``)."""
    parsed = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        if key.startswith("~"):
            parsed[key[1:]] = "<deleted>"
        else:
            parsed[key.lstrip("+")] = value
    return parsed


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Histories ``key -> [(step, value), ...]`` from a Lightning ``CSVLogger`` ``metrics.csv`` (sparse rows)."""
    history: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = _float(row.get("step") or "")
            for key, text in row.items():
                if key in SKIPPED_COLUMNS or text in (None, ""):
                    continue
                value = _float(text)
                if value is not None:
                    history.setdefault(key, []).append((int(step) if step is not None else -1, value))
    return canonical_keys(history)


def canonical_keys(values: dict) -> dict:
    """Lightning logs a key with ``on_step`` and ``on_epoch`` as ``<key>_step`` and ``<key>_epoch``: keep the epoch
    aggregate under ``<key>`` and drop the per-step copy."""
    epoch_keys = {k[: -len("_epoch")] for k in values if k.endswith("_epoch")}
    renamed = {}
    for key, value in values.items():
        if key.endswith("_step") and key[: -len("_step")] in epoch_keys:
            continue
        base = key[: -len("_epoch")] if key.endswith("_epoch") else key
        if base not in renamed or key.endswith("_epoch"):
            renamed[base] = value
    return renamed


def load_job(path: Path, root: Path) -> JobRecord:
    """Read one job directory (see the module docstring)."""
    overrides_path = path / OVERRIDES_FILE
    overrides = parse_overrides(yaml.safe_load(overrides_path.read_text()) or []) if overrides_path.is_file() else {}
    status_path = path / STATUS_FILE
    status = json.loads(status_path.read_text()) if status_path.is_file() else {"status": "incomplete"}
    csv_files = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    history = read_metrics_csv(csv_files[-1]) if csv_files else {}
    final = {key: values[-1][1] for key, values in history.items()}
    for key, value in canonical_keys(status.get("metrics", {})).items():
        final.setdefault(key, float(value))
    name = str(path.relative_to(root)) if path != root else path.name
    error = " ".join(status.get("error", "").split())
    return JobRecord(path=path, name=name, overrides=overrides, status=status.get("status", "unknown"),
                     error=error[:300], final=final, history=history)


def varying_overrides(jobs: Sequence[JobRecord]) -> tuple[list[str], dict[str, str]]:
    """Override keys whose value differs between jobs (or is missing in some), and the overrides common to all."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    varying = [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]
    common = {k: jobs[0].overrides[k] for k in keys if k not in varying}
    return varying, common


def _metric_order(key: str) -> tuple:
    stage = key.split("/", 1)[0]
    return ({"val": 0, "test": 1, "train": 2}.get(stage, 3), key)


def is_per_unit(key: str, keys: set[str]) -> bool:
    """Whether ``key`` is one module's or one neuron's entry of a statistic: a path component holds a module name
    (``train/sparsity/hidden.0.act``), or the statistic has a ``mean`` over its entries next to it
    (``teacher_student/max_cos/neuron_0`` beside ``teacher_student/max_cos/mean``)."""
    parent, _, last = key.rpartition("/")
    return any("." in part for part in key.split("/")) or (last != "mean" and f"{parent}/mean" in keys)


def summary_keys(keys: Sequence[str], patterns: Sequence[str] | None = None) -> list[str]:
    """Keys for the Markdown table and bar charts: those matching ``patterns`` (fnmatch), or by default every key
    that is not per unit (:func:`is_per_unit`)."""
    if patterns:
        chosen = [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    else:
        chosen = [k for k in keys if not is_per_unit(k, set(keys))]
    return sorted(chosen, key=_metric_order)


def axis_label(key: str) -> str:
    """``val/acc`` -> ``val/acc (fraction of samples)``: the key with its unit where the name tells it."""
    last = key.rsplit("/", 1)[-1]
    for marker, unit in _UNITS:
        if marker in last or (marker in key and last in ("mean", "max", "min")):
            return f"{key} ({unit})"
    return key


def _format(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def job_label(job: JobRecord, varying: Sequence[str]) -> str:
    """``activation=gelu, model.lr=0.01`` (the varying overrides; ``(default)`` where the job did not set one) or the
    job's directory name."""
    parts = [f"{k}={job.overrides.get(k, NOT_SET)}" for k in varying]
    return ", ".join(parts) if parts else job.name


def write_tables(jobs: Sequence[JobRecord], out: Path, patterns: Sequence[str] | None, source: Path) -> tuple[Path, Path]:
    """``comparison.csv`` (every key) and ``comparison.md`` (summary keys); see the module docstring."""
    varying, common = varying_overrides(jobs)
    all_keys = sorted({k for job in jobs for k in job.final}, key=_metric_order)
    csv_path = out / "comparison.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["job", *varying, "status", "error", *all_keys])
        for job in jobs:
            writer.writerow([job.name, *(job.overrides.get(k, "") for k in varying), job.status, job.error,
                             *(repr(job.final[k]) if k in job.final else "" for k in all_keys)])
    keys = summary_keys(all_keys, patterns)
    counts = {s: sum(job.status == s for job in jobs) for s in dict.fromkeys(job.status for job in jobs)}
    lines = [f"# lit-act report: {source}", "",
             f"{len(jobs)} job(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".", ""]
    if common:
        lines += ["Overrides common to every job: " + " ".join(f"`{k}={v}`" for k, v in common.items()), ""]
    header = ["job", *varying, "status", *keys]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job in jobs:
        cells = [job.name, *(job.overrides.get(k, NOT_SET) for k in varying), job.status,
                 *(_format(job.final[k]) if k in job.final else "-" for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"All {len(all_keys)} metric keys, per-module ones included: [comparison.csv](comparison.csv)."]
    failures = [job for job in jobs if job.status != "completed"]
    if failures:
        lines += ["", "## Jobs that did not complete", ""]
        lines += [f"- `{job.name}` ({job.status}): "
                  + (job.error.replace("|", "\\|") or f"no {STATUS_FILE} (killed or still running)") for job in failures]
    md_path = out / "comparison.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def final_value_figure(jobs: Sequence[JobRecord], key: str, varying: Sequence[str], path: Path) -> Path:
    """Bar chart of ``key``'s final value per job; jobs without a value are marked with their status."""
    labels = [job_label(job, varying).replace(", ", "\n") for job in jobs]
    fig = _new_figure(max(5.0, 1.1 * len(jobs) + 2.0), 4.0)
    ax = fig.subplots()
    for x, job in enumerate(jobs):
        value = job.final.get(key, math.nan)
        if math.isfinite(value):
            ax.bar(x, value, color="tab:blue" if job.status == "completed" else "tab:orange")
            ax.annotate(f"{value:.4g}", (x, value), ha="center", va="bottom", fontsize=8)
        else:
            ax.text(x, 0.03, "nan" if key in job.final else job.status, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=9, fontweight="bold", color="tab:red")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(jobs)), labels, rotation=45 if len(jobs) > 6 else 0,
                  ha="right" if len(jobs) > 6 else "center", fontsize=8)
    ax.set_xlabel(", ".join(varying) if varying else "job")
    ax.set_ylabel(axis_label(key))
    ax.set_title(f"Final {key} per job")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:blue", label="completed"), Patch(color="tab:orange", label="failed / incomplete")],
              fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def curve_figure(jobs: Sequence[JobRecord], key: str, varying: Sequence[str], path: Path) -> Path:
    """Every job's history of ``key`` over training steps (dashed: jobs that did not complete)."""
    fig = _new_figure(7.0, 4.5)
    ax = fig.subplots()
    for job in jobs:
        points = job.history.get(key)
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, label=job_label(job, varying),
                    linestyle="-" if job.status == "completed" else "--")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("training step (optimizer steps)")
    ax.set_ylabel(axis_label(key))
    ax.set_title(f"{key} over training, one line per job")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=", ".join(varying) if varying else None, title_fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _file_name(key: str) -> str:
    return key.replace("/", "_").replace(".", "_")


def write_report(source: Path, out: Path | None = None, metrics: Sequence[str] | None = None) -> Report:
    """Read every job under ``source`` and write the tables and figures (module docstring) into ``out``."""
    source = Path(source)
    paths = find_jobs(source)
    if not paths:
        raise FileNotFoundError(f"no runs under {source}: expected a run directory (with {STATUS_FILE} or "
                                f"{OVERRIDES_FILE}) or a multirun directory containing them")
    jobs = [load_job(p, source) for p in paths]
    out = Path(out) if out is not None else source / "report"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    md_path, csv_path = write_tables(jobs, out, metrics, source)
    varying, _ = varying_overrides(jobs)
    keys = summary_keys(sorted({k for job in jobs for k in job.final}), metrics)
    figures = [final_value_figure(jobs, key, varying, out / "figures" / f"final_{_file_name(key)}.png")
               for key in keys]
    curve_keys = sorted({k for job in jobs for k, points in job.history.items()
                         if k.startswith("val/") and k.count("/") == 1 and len(points) > 1})
    figures += [curve_figure(jobs, key, varying, out / "figures" / f"curve_{_file_name(key)}.png")
                for key in curve_keys]
    from lit_act.sae.figures import sweep_fvu_vs_l0  # the SAE sparsity-fidelity figure, when jobs logged SAEs

    figures += [p for p in [sweep_fvu_vs_l0(jobs, varying, out / "figures" / "sae_fvu_vs_l0.png")] if p]
    with open(md_path, "a") as handle:
        handle.write("\n## Figures\n\n" + "\n".join(f"![{p.stem}](figures/{p.name})" for p in figures) + "\n")
    return Report(markdown=md_path, csv=csv_path, figures=figures)
