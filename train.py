"""lit-act main job. `python train.py` trains the default model; see conf/train.yaml and the README.

A bad config value or a model/data mismatch ends the run before any work with one line on stderr,
``error: trainer.max_epochs='abc': expected a non-negative integer (or -1 for no limit)``, and exit status 1
(``HYDRA_FULL_ERROR=1`` shows the full traceback instead). A multirun with failed jobs ends with a table of the
failures and exit status 1 (``allow_failed_jobs=true`` or ``LIT_ACT_ALLOW_FAILED_JOBS=1`` keeps 0).
"""

import os
import sys

import hydra
from omegaconf import DictConfig

from lit_act.training import optimized_metric, train
from lit_act.utils.task import config_error, set_default_root


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = train(cfg)
    except Exception as err:
        found = config_error(err)  # also behind Hydra's InstantiationException (a constructor's ConfigError)
        if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {found}", file=sys.stderr, flush=True)
        sys.exit(1)
    return optimized_metric(cfg, metrics)


if __name__ == "__main__":
    set_default_root()
    main()
