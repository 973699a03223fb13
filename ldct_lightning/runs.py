"""Run and sweep folders: the one module that knows their layout (everything else reads and writes through it).

A run folder (``hydra.run.dir``, or one job of a multirun)::

    <run>/run_info.yaml                  resolved config, git commit, data split hash
    <run>/summary.yaml                   stage -> best_ckpt, last_ckpt, last metrics, cost (when the run ends)
    <run>/<stage>/checkpoints/*.ckpt     last.ckpt and best-*.ckpt of each stage (first, second)

A sweep folder (``hydra.sweep.dir``) holds one run folder per job (``<n>_<ablation>_s<seed>/``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ldct_lightning.atomic import write_text_atomic
from ldct_lightning.errors import LDCTError

RUN_INFO = "run_info.yaml"
SUMMARY = "summary.yaml"
CHECKPOINTS = "checkpoints"
Which = Literal["best", "last"]
SEED_SUFFIX = re.compile(r"^(?P<method>.+)_s(?P<seed>-?\d+)$")


class RunError(LDCTError):
    """A run or sweep folder that cannot give what was asked; ``str(e)`` names the folder and what to do."""


class CheckpointError(LDCTError):
    """A checkpoint that cannot be found or cannot initialise the generator; ``str(e)`` names the file."""


def _read_yaml(path: Path) -> Any:
    """The YAML content of ``path``; None when it is missing or not valid YAML."""
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None


@dataclass(frozen=True)
class Run:
    """One run folder.

    Args:
        root: the run folder.
    """

    root: Path

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> Run | None:
        """The run a checkpoint lies in (``<run>/<stage>/checkpoints/x.ckpt``), or None when it lies in none.

        Args:
            checkpoint: a checkpoint file.

        Returns:
            The run when the checkpoint sits in a ``checkpoints`` folder two levels below a folder.
        """
        path = Path(checkpoint).resolve()
        if path.parent.name != CHECKPOINTS or len(path.parents) < 3:
            return None
        return cls(path.parents[2])

    @property
    def info_path(self) -> Path:
        return self.root / RUN_INFO

    @property
    def summary_path(self) -> Path:
        return self.root / SUMMARY

    def stage_dir(self, stage: str) -> Path:
        """The folder of one stage's logs and checkpoints."""
        return self.root / stage

    def checkpoint_dir(self, stage: str) -> Path:
        """Where the stage's checkpoints are written."""
        return self.stage_dir(stage) / CHECKPOINTS

    def saved_checkpoints(self, stage: str) -> list[Path]:
        """The stage's checkpoint files on disk, sorted by name."""
        return sorted(self.checkpoint_dir(stage).glob("*.ckpt"))

    def resume_checkpoint(self, stage: str) -> Path | None:
        """The stage's ``last.ckpt`` when it exists (``ckpt_path=last``)."""
        last = self.checkpoint_dir(stage) / "last.ckpt"
        return last if last.is_file() else None

    # --- what the run wrote -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any] | None:
        """``run_info.yaml`` as a dict; None when it is missing or unreadable."""
        info = _read_yaml(self.info_path)
        return info if isinstance(info, dict) else None

    def config(self) -> dict[str, Any]:
        """The run's resolved config (``{}`` without a readable ``run_info.yaml``)."""
        config = (self.info() or {}).get("config")
        return config if isinstance(config, dict) else {}

    def summary(self) -> dict[str, Any]:
        """``summary.yaml`` (stage -> results); ``{}`` while the run has not finished."""
        summary = _read_yaml(self.summary_path)
        return summary if isinstance(summary, dict) else {}

    @property
    def finished(self) -> bool:
        return self.summary_path.is_file()

    @property
    def ablation(self) -> str | None:
        """The ablation name of the run's config (e.g. ``proposed``)."""
        name = (self.config().get("ablation") or {}).get("name")
        return str(name) if name else None

    @property
    def seed(self) -> int | None:
        seed = self.config().get("seed")
        return int(seed) if seed is not None else None

    def generator_config(self) -> dict[str, Any] | None:
        """``model.generator`` of the run's config, or None."""
        generator = (self.config().get("model") or {}).get("generator")
        return dict(generator) if isinstance(generator, Mapping) else None

    def stage_config(self, stage: str) -> dict[str, Any]:
        """``stages.<stage>`` of the run's config, with ``data`` merged over the run's ``data`` group."""
        config = self.config()
        stage_cfg = dict((config.get("stages") or {}).get(stage) or {})
        stage_cfg["data"] = {**(config.get("data") or {}), **(stage_cfg.get("data") or {})}
        return stage_cfg

    def checkpoint(self, stage: str, which: Which = "best") -> Path | None:
        """A checkpoint the finished run recorded for ``stage``; ``best`` falls back to ``last``.

        Args:
            stage: ``first`` or ``second``.
            which: ``best`` (the monitored metric's best) or ``last``.

        Returns:
            The path, or None when the run did not train the stage or saved no such checkpoint.
        """
        result = self.summary().get(stage) or {}
        path = (
            result.get("best_ckpt") or result.get("last_ckpt") if which == "best" else result.get("last_ckpt")
        )
        return Path(path) if path else None

    def trained(self, stage: str) -> bool:
        return stage in self.summary()

    def final_checkpoint(self) -> Path:
        """The checkpoint of the run's method: stage 2's last when it trained stage 2, else stage 1's best.

        Raises:
            RunError: the run saved no checkpoint (e.g. a debug run).
        """
        ckpt = self.checkpoint("second", "last") if self.trained("second") else self.checkpoint("first")
        if ckpt is None:
            raise RunError(f"{self.summary_path}: the run saved no checkpoint (was it a debug run?)")
        return ckpt

    # --- writing (the pipeline, rank 0) -------------------------------------------------------------------

    def write_info(self, config: Mapping[str, Any], git_commit: str, split_hash: str | None) -> None:
        """Write ``run_info.yaml`` atomically."""
        info = {"git_commit": git_commit, "split_inputs_hash": split_hash, "config": dict(config)}
        write_text_atomic(self.info_path, yaml.safe_dump(info, sort_keys=False))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.yaml`` atomically."""
        write_text_atomic(self.summary_path, yaml.safe_dump(dict(summary), sort_keys=False))


@dataclass(frozen=True)
class Sweep:
    """A multirun folder of run folders.

    Args:
        root: the sweep folder (``hydra.sweep.dir``).
    """

    root: Path

    def jobs(self) -> list[Run]:
        """The finished jobs (those with a ``summary.yaml``), sorted by folder name.

        Raises:
            RunError: no job has finished.
        """
        jobs = [Run(p.parent) for p in sorted(Path(self.root).glob(f"*/{SUMMARY}"))]
        if not jobs:
            raise RunError(f"--sweep {self.root}: no finished job (no */{SUMMARY}). Run the multirun first")
        return jobs

    def methods(self) -> dict[str, Path]:
        """The evaluation rows of the finished jobs (:func:`method_checkpoints`)."""
        return method_checkpoints(self.jobs())


def latest_checkpoint(root: str | Path, stage: str = "first", which: Which = "last") -> Path:
    """The newest ``<run>/<stage>/checkpoints/*.ckpt`` anywhere under ``root``.

    Args:
        root: a folder holding run folders (searched recursively), or one run folder.
        stage: the stage's folder name inside a run (``first`` or ``second``).
        which: ``last`` (the ``last.ckpt`` files) or ``best`` (every other ``.ckpt``, e.g. ``best-epoch012.ckpt``).

    Returns:
        The most recently modified matching checkpoint.

    Raises:
        CheckpointError: ``root`` does not exist or holds no matching checkpoint.
    """
    if which not in ("last", "best"):
        raise ValueError(f"which={which!r}: use 'last' or 'best'")
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: no such directory. Train stage {stage!r} first or give a checkpoint path"
        )
    found = [
        p
        for p in root.glob(f"**/{stage}/{CHECKPOINTS}/*.ckpt")
        if p.is_file() and (p.stem.startswith("last") == (which == "last"))
    ]
    if not found:
        raise CheckpointError(
            f"{root}: no {which} checkpoint under */{stage}/{CHECKPOINTS}/. "
            f"Train stage {stage!r} first or give a checkpoint path"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def seeded_name(method: str, seed: int) -> str:
    """``("proposed", 3)`` -> ``proposed_s3``, the row name of one seed's job."""
    return f"{method}_s{seed}"


def split_seed(name: str) -> tuple[str, int | None]:
    """``proposed_s3`` -> (``proposed``, 3); a name without a seed suffix -> (name, None)."""
    match = SEED_SUFFIX.match(name)
    return (match["method"], int(match["seed"])) if match else (name, None)


def method_checkpoints(runs: Iterable[Run]) -> dict[str, Path]:
    """The evaluation rows of finished runs: method name -> checkpoint.

    A run gives its ablation's row (:meth:`Run.final_checkpoint`). A ``proposed`` run that trained both stages
    also gives the ``firstStep`` row (its stage-1 best checkpoint), right after its own, unless the runs hold
    their own ``firstStep`` job of that seed. With several seeds every name gets the seed suffix
    (:func:`seeded_name`).

    Args:
        runs: finished runs (e.g. :meth:`Sweep.jobs`).

    Returns:
        Row name -> checkpoint, in the order of the runs.

    Raises:
        RunError: a run saved no checkpoint.
    """
    rows = []  # (name, seed, checkpoint, derived)
    for run in runs:
        name, seed = run.ablation or run.root.name, run.seed
        rows.append((name, seed, run.final_checkpoint(), False))
        first = run.checkpoint("first")
        if name == "proposed" and run.trained("second") and first is not None:
            rows.append(("firstStep", seed, first, True))
    jobs_run = {(name, seed) for name, seed, _, derived in rows if not derived}
    rows = [row for row in rows if not (row[3] and row[:2] in jobs_run)]
    several_seeds = len({row[1] for row in rows}) > 1
    return {seeded_name(name, seed) if several_seeds else name: ckpt for name, seed, ckpt, _ in rows}
