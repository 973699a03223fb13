"""Runs the stages an ablation asks for, from a composed Hydra config (``train.py`` is a thin wrapper).

The run folder's layout (``run_info.yaml``, ``summary.yaml``, one folder per stage) is :mod:`ldct_lightning.runs`'s.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldct_lightning.errors import LDCTError
from ldct_lightning.runs import CheckpointError, Run, latest_checkpoint

log = logging.getLogger(__name__)

STAGES = ("first", "second")


class ConfigError(LDCTError):
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
    init = cfg.stages.second.generator_init
    if "second" in stages and init not in (None, "random", "first") and not Path(init).is_file():
        raise ConfigError(
            f"stages.second.generator_init={init!r}: no such checkpoint file (use first, random or a path)"
        )
    return stages


def write_run_info(run_dir: Path, cfg: DictConfig, split_hash: str | None) -> None:
    """Write the resolved config, git commit and data split hash beside the run's outputs (rank 0 only)."""
    if rank_zero_only.rank != 0:  # DDP: every rank runs this script; one writes the run's files
        return
    config = OmegaConf.to_container(cfg, resolve=True)
    Run(run_dir).write_info(config, git_commit(Path(__file__).resolve().parent), split_hash)


def build_loggers(cfg: DictConfig, stage_dir: Path, stage: str, resuming: bool = False) -> list[Any]:
    """Instantiate the configured loggers, writing under the stage's folder.

    When resuming, CSV logs go to a new ``resume-N`` subfolder: the CSV logger would otherwise delete the
    interrupted run's ``metrics.csv``.
    """
    loggers = []
    for key, logger_cfg in (cfg.get("logger") or {}).items():
        kwargs: dict[str, Any] = {"save_dir": str(stage_dir)}
        if resuming and "CSVLogger" in logger_cfg._target_:
            kwargs["version"] = f"resume-{len(list(stage_dir.glob('resume-*'))) + 1}"
        if "WandbLogger" in logger_cfg._target_:
            kwargs["name"] = f"{cfg.experiment_name}-{cfg.ablation.name}-s{cfg.seed}-{stage}"
            if logger_cfg.get("offline") is None:
                kwargs["offline"] = not os.environ.get("WANDB_API_KEY")
        log.info("logger %s -> %s", key, stage_dir)
        loggers.append(instantiate(logger_cfg, **kwargs))
    return loggers


def build_callbacks(cfg: DictConfig, checkpoint_dir: Path) -> list[Any]:
    """Instantiate the configured callbacks; checkpoints go to ``checkpoint_dir``."""
    callbacks = []
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if cb_cfg is None:  # switched off, e.g. `callbacks.lr_monitor=null`
            continue
        kwargs = {"dirpath": str(checkpoint_dir)} if name == "model_checkpoint" else {}
        callbacks.append(instantiate(cb_cfg, **kwargs))
    return callbacks


def resolve_generator_init(cfg: DictConfig, first_ckpt: str | None) -> str | None:
    """Turn ``stages.second.generator_init`` into a checkpoint path, or None for random initialisation."""
    init = cfg.stages.second.generator_init
    if init in (None, "random"):
        return None
    if init == "first":
        return first_ckpt or str(latest_stage1_checkpoint(Path(cfg.paths.log_dir), cfg.experiment_name))
    return str(init)


def latest_stage1_checkpoint(log_dir: Path, experiment_name: str) -> Path:
    """The newest best stage-1 checkpoint of the experiment's runs and multiruns."""
    found = []
    for kind in ("runs", "multiruns"):
        try:
            found.append(latest_checkpoint(log_dir / kind / experiment_name, stage="first", which="best"))
        except CheckpointError:
            pass
    if not found:
        raise CheckpointError(
            f"{log_dir}/{{runs,multiruns}}/{experiment_name}: no stage-1 checkpoint of experiment "
            f"{experiment_name!r}. Train stage 1 first (ablation=firstStep) or set stages.second.generator_init"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def multirun_safe_strategy(strategy: Any) -> Any:
    """Map a script-launched DDP strategy to its spawn variant for jobs of a Hydra multirun.

    Lightning's ``ddp`` starts the other ranks by re-running the command line, which under ``-m`` would
    re-launch the whole sweep in every rank. ``ddp_spawn`` starts them with multiprocessing instead. On
    SLURM (hydra/launcher=slurm) every rank is its own task and no re-launch happens, so nothing changes.
    """
    launched_by_script = isinstance(strategy, str) and strategy.startswith("ddp")
    if not launched_by_script or strategy.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
        return strategy
    if "SLURM_NTASKS" in os.environ:
        return strategy
    return strategy.replace("ddp", "ddp_spawn", 1)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def resolve_ckpt_path(ckpt_path: str | None, run: Run, stage: str) -> str | None:
    """``last`` means this stage's last.ckpt in the run directory (when it exists)."""
    if ckpt_path == "last":
        last = run.resume_checkpoint(stage)
        return str(last) if last is not None else None
    return ckpt_path


def train_stage(cfg: DictConfig, stage: str, run_dir: Path, init_ckpt: str | None) -> dict[str, Any]:
    """Train one stage and return its summary (checkpoint paths, final metrics).

    Args:
        cfg: the composed config.
        stage: ``first`` or ``second``.
        run_dir: the run directory.
        init_ckpt: stage 2 only: the checkpoint whose generator weights start the training.

    Returns:
        A dict with ``best_ckpt``, ``last_ckpt``, the last logged metrics, the split hash, and the cost:
        ``fit_seconds``, ``train_batches`` and ``device``.
    """
    stage_cfg = cfg.stages[stage]
    run = Run(run_dir)
    stage_dir = run.stage_dir(stage)
    datamodule = instantiate(cfg.data, **OmegaConf.to_container(stage_cfg.data, resolve=True))
    # scan, split and cache here, once, before any DDP rank starts (and so the split is known here)
    datamodule.prepare_data()
    # the networks the stage's module takes, by name, from the model config (e.g. generator, critic)
    nets: dict[str, Any] = {name: instantiate(cfg.model[name]) for name in stage_cfg.nets}
    if init_ckpt is not None:
        nets["generator_init"] = init_ckpt
    module = instantiate(stage_cfg.module, **nets)
    # every checkpoint of the stage carries the generator's config (a checkpoint alone is enough to denoise)
    module.generator_config = OmegaConf.to_container(cfg.model.generator, resolve=True)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run, stage)
    extra: dict[str, Any] = {}
    if _in_multirun() and cfg.trainer.get("strategy"):
        extra["strategy"] = multirun_safe_strategy(cfg.trainer.strategy)
        if extra["strategy"] != cfg.trainer.strategy:
            log.info(
                "multirun: strategy %s -> %s (see README, Multi-GPU)", cfg.trainer.strategy, extra["strategy"]
            )
    trainer = instantiate(
        cfg.trainer,
        **extra,
        max_epochs=stage_cfg.max_epochs,
        default_root_dir=str(stage_dir),
        logger=build_loggers(cfg, stage_dir, stage, resuming=ckpt_path is not None) or False,
        callbacks=build_callbacks(cfg, run.checkpoint_dir(stage)),
    )
    log.info("stage %s: training for %d epochs in %s", stage, stage_cfg.max_epochs, stage_dir)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - started
    # a W&B run stays open in the process: close it, or the next stage logs into this stage's run
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()
    ckpt_cb = trainer.checkpoint_callback
    return {
        "best_ckpt": getattr(ckpt_cb, "best_model_path", None) or None,
        "last_ckpt": getattr(ckpt_cb, "last_model_path", None) or None,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        "split_inputs_hash": datamodule.split.inputs_hash,
        # the training cost, for benchmarks (make bench-quality): wall time of fit (validation included)
        "fit_seconds": round(fit_seconds, 1),
        "train_batches": int(trainer.fit_loop.epoch_loop.batch_progress.total.completed),
        "device": f"{trainer.strategy.root_device} x{trainer.num_devices}",
    }


def check_run_dir(cfg: DictConfig, run_dir: Path, stages: list[str]) -> None:
    """Refuse to train over another run's checkpoints unless resuming it (``ckpt_path``)."""
    if cfg.ckpt_path is not None:
        return
    for stage in stages:
        found = Run(run_dir).saved_checkpoints(stage)
        if found:
            raise ConfigError(
                f"paths.output_dir={str(run_dir)!r} (hydra.run.dir) already holds checkpoints of stage {stage} "
                f"({found[0].name}): resume that run with ckpt_path=last, or choose a new hydra.run.dir"
            )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train every stage in ``cfg.run_stages`` in order and write ``run_info.yaml`` and ``summary.yaml``.

    Args:
        cfg: the composed Hydra config.

    Returns:
        Stage name -> stage summary.
    """
    stages = check_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    check_run_dir(cfg, run_dir, stages)
    L.seed_everything(cfg.seed, workers=True)
    write_run_info(run_dir, cfg, split_hash=None)
    summary: dict[str, Any] = {}
    for stage in stages:
        init = None
        if stage == "second":
            first = summary.get("first", {})
            init = resolve_generator_init(cfg, first.get("best_ckpt") or first.get("last_ckpt"))
            log.info("stage second: generator from %s", init or "random initialisation")
        summary[stage] = train_stage(cfg, stage, run_dir, init)
        write_run_info(run_dir, cfg, summary[stage]["split_inputs_hash"])
    if rank_zero_only.rank == 0:
        Run(run_dir).write_summary(summary)
    return summary


def _user_error(exc: BaseException) -> BaseException | None:
    """The bad-input error (data, config, checkpoint, file system) in ``exc`` or its causes, if any."""
    expected = (LDCTError, OSError)
    for _ in range(10):  # hydra.utils.instantiate wraps the errors of constructors
        if exc is None or isinstance(exc, expected):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def log_lightning_once() -> None:
    """Print each Lightning log line once.

    ``import lightning`` gives its ``lightning`` logger a console handler of its own and lets it propagate to the
    root logger, which Hydra has configured (console and the run's log file): every INFO line was printed twice.
    Lightning's own console handler goes when the root logger has handlers; Hydra's keeps the line.
    """
    if not logging.getLogger().hasHandlers():
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # FileHandler subclasses it: keep those
                logger.removeHandler(handler)
        logger.propagate = True


def _fail(message: str, code: int) -> None:
    print(f"train.py: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main(cfg: DictConfig) -> None:
    """``train.py``'s body: :func:`run` with one-line errors for bad input and clear exit codes."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ldct_lightning.callbacks import NonFiniteLossError

    # Exit codes: 0 done, 1 non-finite loss or Ctrl-C during fit (Lightning's status), 2 bad input or config,
    # 130 Ctrl-C outside fit, 143 SIGTERM. Bad input gets one line naming the file or key instead of a traceback
    # (HYDRA_FULL_ERROR=1 shows the traceback).
    log_lightning_once()
    try:
        run(cfg)
    except SIGTERMException:  # a SystemExit with status 0; InterruptCheckpoint printed how to resume
        _fail("stopped by SIGTERM", 143)
    except KeyboardInterrupt:  # outside trainer.fit (inside it Lightning exits with status 1)
        _fail("interrupted", 130)
    except Exception as e:
        error = _user_error(e)
        if error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = str(error) if not isinstance(error, OSError) else f"{error}. Check the path and free space"
        if _in_multirun():  # let Hydra run the sweep's other jobs; it reports the failure at the end
            print(f"train.py: error: {message}", file=sys.stderr, flush=True)
            raise
        _fail(f"error: {message}", 1 if isinstance(error, NonFiniteLossError) else 2)
