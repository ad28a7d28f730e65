"""lit-act main job. `python train.py` trains the default model; see conf/train.yaml and the README."""

import hydra
from omegaconf import DictConfig

from lit_act.training import optimized_metric, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    metrics, _ = train(cfg)
    return optimized_metric(cfg, metrics)


if __name__ == "__main__":
    main()
