"""Train ldct-lightning models: `python train.py [stage/ablation/data/trainer/logger overrides]`.

Examples:
    python train.py experiment=demo                      # both stages (ablation=proposed) on the demo set
    python train.py experiment=demo ablation=firstStep   # stage 1 only
    python train.py -m experiment=demo ablation=proposed,oneStep,firstStep
    python train.py experiment=paper data=dicom data.root=/data/ldct trainer=gpu

All behaviour lives in conf/ and ldct_lightning/pipeline.py; `python train.py --help` lists the config groups.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from ldct_lightning.pipeline import main as run_main  # imported late so `--help` stays fast

    run_main(cfg)


if __name__ == "__main__":
    main()
