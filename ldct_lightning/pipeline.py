"""Runs the stages an ablation asks for, from a composed Hydra config (``train.py`` is a thin wrapper).

A run directory holds ``run_info.yaml`` (resolved config, git commit, split hash) and one folder per stage
(``first/``, ``second/``) with its checkpoints and logs.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldct_lightning.modules.handoff import find_latest_checkpoint

log = logging.getLogger(__name__)

STAGES = ("first", "second")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def git_commit(repo_dir: Path) -> str:
    """Return the git commit of ``repo_dir`` (with ``-dirty`` when it has changes), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def check_config(cfg: DictConfig) -> list[str]:
    """Validate the parts of the config the pipeline relies on.

    Args:
        cfg: the composed config.

    Returns:
        The stages to run, in order.
    """
    stages = list(cfg.run_stages)
    if not stages:
        raise ConfigError("run_stages is empty: choose an ablation (proposed, oneStep, firstStep)")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"run_stages has unknown stage(s) {unknown}; allowed: {list(STAGES)}")
    if stages != sorted(stages, key=STAGES.index) or len(set(stages)) != len(stages):
        raise ConfigError(f"run_stages {stages} must list each stage once, first before second")
    for name in stages:
        crop = int(cfg.stages[name].data.crop_size)
        if crop <= 0 or crop % 16:
            raise ConfigError(f"stages.{name}.data.crop_size={crop} must be a positive multiple of 16")
    return stages


def write_run_info(run_dir: Path, cfg: DictConfig, split_hash: str | None) -> None:
    """Write the resolved config, git commit and data split hash beside the run's outputs."""
    info = {
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "split_inputs_hash": split_hash,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".run_info.yaml.tmp"
    tmp.write_text(yaml.safe_dump(info, sort_keys=False))
    os.replace(tmp, run_dir / "run_info.yaml")


def build_loggers(cfg: DictConfig, stage_dir: Path, stage: str) -> list[Any]:
    """Instantiate the configured loggers, writing under the stage's folder."""
    loggers = []
    for key, logger_cfg in (cfg.get("logger") or {}).items():
        kwargs: dict[str, Any] = {"save_dir": str(stage_dir)}
        if "WandbLogger" in logger_cfg._target_:
            kwargs["name"] = f"{cfg.experiment_name}-{cfg.ablation.name}-s{cfg.seed}-{stage}"
            if logger_cfg.get("offline") is None:
                kwargs["offline"] = not os.environ.get("WANDB_API_KEY")
        log.info("logger %s -> %s", key, stage_dir)
        loggers.append(instantiate(logger_cfg, **kwargs))
    return loggers


def build_callbacks(cfg: DictConfig, stage_dir: Path) -> list[Any]:
    """Instantiate the configured callbacks; checkpoints go to ``<stage_dir>/checkpoints``."""
    callbacks = []
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        kwargs = {"dirpath": str(stage_dir / "checkpoints")} if name == "model_checkpoint" else {}
        callbacks.append(instantiate(cb_cfg, **kwargs))
    return callbacks


def resolve_generator_init(cfg: DictConfig, run_dir: Path, first_ckpt: str | None) -> str | None:
    """Turn ``stages.second.generator_init`` into a checkpoint path, or None for random initialisation."""
    init = cfg.stages.second.generator_init
    if init in (None, "random"):
        return None
    if init == "first":
        if first_ckpt:
            return first_ckpt
        experiment_dir = Path(cfg.paths.log_dir) / cfg.experiment_name
        return str(find_latest_checkpoint(experiment_dir, stage_dir="first"))
    if not Path(init).is_file():
        raise ConfigError(f"stages.second.generator_init={init!r}: no such checkpoint file")
    return str(init)


def resolve_ckpt_path(ckpt_path: str | None, stage_dir: Path) -> str | None:
    """``last`` means this stage's last.ckpt in the run directory (when it exists)."""
    if ckpt_path == "last":
        last = stage_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    return ckpt_path


def train_stage(cfg: DictConfig, stage: str, run_dir: Path, init_ckpt: str | None) -> dict[str, Any]:
    """Train one stage and return its summary (checkpoint paths, final metrics).

    Args:
        cfg: the composed config.
        stage: ``first`` or ``second``.
        run_dir: the run directory.
        init_ckpt: stage 2 only: the checkpoint whose generator weights start the training.

    Returns:
        A dict with ``best_ckpt``, ``last_ckpt`` and the last logged metrics.
    """
    stage_cfg = cfg.stages[stage]
    stage_dir = run_dir / stage
    datamodule = instantiate(cfg.data, **OmegaConf.to_container(stage_cfg.data, resolve=True))
    nets: dict[str, Any] = {"generator": instantiate(cfg.model.generator)}
    if stage == "second":
        nets["critic"] = instantiate(cfg.model.critic)
        nets["generator_init"] = init_ckpt
    module = instantiate(stage_cfg.module, **nets)
    trainer = instantiate(
        cfg.trainer,
        max_epochs=stage_cfg.max_epochs,
        default_root_dir=str(stage_dir),
        logger=build_loggers(cfg, stage_dir, stage) or False,
        callbacks=build_callbacks(cfg, stage_dir),
    )
    log.info("stage %s: training for %d epochs in %s", stage, stage_cfg.max_epochs, stage_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, stage_dir))
    ckpt_cb = trainer.checkpoint_callback
    return {
        "best_ckpt": getattr(ckpt_cb, "best_model_path", None) or None,
        "last_ckpt": getattr(ckpt_cb, "last_model_path", None) or None,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        "split_inputs_hash": datamodule.split.inputs_hash,
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train every stage in ``cfg.run_stages`` in order and write ``run_info.yaml`` and ``summary.yaml``.

    Args:
        cfg: the composed Hydra config.

    Returns:
        Stage name -> stage summary.
    """
    stages = check_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    write_run_info(run_dir, cfg, split_hash=None)
    summary: dict[str, Any] = {}
    for stage in stages:
        init = None
        if stage == "second":
            first = summary.get("first", {})
            init = resolve_generator_init(cfg, run_dir, first.get("best_ckpt") or first.get("last_ckpt"))
            log.info("stage second: generator from %s", init or "random initialisation")
        summary[stage] = train_stage(cfg, stage, run_dir, init)
        write_run_info(run_dir, cfg, summary[stage]["split_inputs_hash"])
    tmp = run_dir / ".summary.yaml.tmp"
    tmp.write_text(yaml.safe_dump(summary, sort_keys=False))
    os.replace(tmp, run_dir / "summary.yaml")
    return summary
