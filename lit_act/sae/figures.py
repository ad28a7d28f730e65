"""The SAE sweep figure: FVU against L0 over the jobs of a sweep (Gao et al. 2024, Fig. 1-style sparsity-fidelity
frontier), drawn by ``lit-act report`` for online sweeps (``experiment=sae_lm``) and after an offline ``lit-act sae``
multirun.

Example::

    from lit_act.report import find_jobs, load_job
    jobs = [load_job(p, root) for p in find_jobs(root)]
    sweep_fvu_vs_l0(jobs, ["callbacks.sae.k"], root / "figures" / "sae_fvu_vs_l0.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FVU_KEY = "val/sae/fvu/mean"
L0_KEY = "val/sae/l0/mean"


def sweep_points(jobs: Sequence[Any], varying: Sequence[str]) -> list[tuple[float, float, str]]:
    """``(L0, FVU, label)`` of every job (a :class:`lit_act.report.JobRecord`) whose final metrics hold finite
    :data:`L0_KEY` and :data:`FVU_KEY`; the label lists the job's values of the ``varying`` overrides."""
    points = []
    for job in jobs:
        l0, fvu = job.final.get(L0_KEY, math.nan), job.final.get(FVU_KEY, math.nan)
        if math.isfinite(l0) and math.isfinite(fvu):
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={job.overrides[k]}" for k in varying if k in job.overrides)
            points.append((l0, fvu, label or job.name))
    return points


def sweep_fvu_vs_l0(jobs: Sequence[Any], varying: Sequence[str], path: Path) -> Path | None:
    """Scatter of the final validation FVU against L0 (mean over modules) of each job, labelled by its varying
    overrides, saved to ``path``; ``None`` (nothing written) when fewer than one job has both keys."""
    points = sweep_points(jobs, varying)
    if not points:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.subplots()
    points.sort()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle=":", color="tab:blue")
    for l0, fvu, label in points:
        ax.annotate(label, (l0, fvu), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("L0 (active latents per token, validation)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title("SAE sweep: FVU vs L0")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
