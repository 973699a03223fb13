"""Tiny end-to-end runs of the training pipeline on the tiny synthetic set (in-process and through train.py)."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from ldct_lightning.pipeline import run

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")


def tiny_cfg(data_root: Path, out_dir: Path, overrides: list[str]):
    """Compose ``experiment=tiny`` on ``data_root`` writing into ``out_dir`` (no Hydra run directory)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "experiment=tiny",
                f"data.root={data_root}",
                f"paths.root_dir={REPO}",
                f"paths.output_dir={out_dir}",
                f"paths.log_dir={out_dir.parent}",
                *overrides,
            ],
        )
    return cfg


def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def epoch_means(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    per_epoch: dict[int, list[float]] = {}
    for row in rows:
        if row.get(key):
            per_epoch.setdefault(int(row["epoch"]), []).append(float(row[key]))
    return {e: sum(v) / len(v) for e, v in per_epoch.items()}


def test_fast_dev_run_of_both_stages(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tiny_dataset, tmp_path / "run", ["debug=fast"])
    summary = run(cfg)
    assert set(summary) == {"first", "second"}
    for stage, loss in (("first", "train/loss"), ("second", "train/loss_critic")):
        assert summary[stage]["train_batches"] == 1, stage  # one batch, not the configured epochs
        metrics = summary[stage]["metrics"]
        assert math.isfinite(metrics[loss]) and math.isfinite(metrics["val/psnr_abdomen"]), stage
    # stage 2 starts from this run's stage-1 file, not from another run of the experiment nor at random
    second = torch.load(summary["second"]["last_ckpt"], map_location="cpu", weights_only=True)
    assert second["generator_init_source"] == summary["first"]["last_ckpt"]
    assert Path(summary["first"]["last_ckpt"]).parent == tmp_path / "run" / "first" / "checkpoints"
    info = yaml.safe_load((tmp_path / "run" / "run_info.yaml").read_text())
    assert info["split_inputs_hash"] == summary["second"]["split_inputs_hash"]
    assert info["config"]["trainer"]["fast_dev_run"] is True


def test_a_checkpoint_alone_is_enough_to_denoise(tiny_dataset: Path, tmp_path: Path) -> None:
    """Each stage's checkpoint carries the generator config and HU range: copied out of its run (no
    run_info.yaml beside it) it rebuilds the run's generator, not the class defaults."""
    from ldct_lightning.inference import Denoiser

    overrides = ["debug=fast", "model.generator.input_center=0.3", "model.generator.residual_scale=0.02"]
    cfg = tiny_cfg(tiny_dataset, tmp_path / "run", overrides)
    summary = run(cfg)
    hu = np.random.default_rng(0).uniform(-300, 300, (2, 32, 32)).astype(np.float32)
    for stage in ("first", "second"):
        alone = tmp_path / "elsewhere" / stage / "model.ckpt"
        alone.parent.mkdir(parents=True)
        shutil.copy(summary[stage]["last_ckpt"], alone)
        meta = torch.load(alone, map_location="cpu", weights_only=True)["ldct_lightning"]
        assert meta["generator"]["base_channels"] == 8 and meta["generator"]["depth"] == 2  # experiment=tiny
        assert (meta["hu_min"], meta["hu_max"]) == (-1024.0, 3071.0)  # normalize.py's range
        denoiser = Denoiser.from_checkpoint(alone)
        net = denoiser.generator
        assert (net.input_center, net.residual_scale) == (0.3, 0.02), stage  # the run's, not the defaults
        assert "own config" in denoiser.generator_source
        in_run = Denoiser.from_checkpoint(summary[stage]["last_ckpt"])
        np.testing.assert_array_equal(denoiser.denoise(hu), in_run.denoise(hu))


def test_stage1_fit_lowers_the_loss_and_writes_checkpoints(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_cfg(
        tiny_dataset,
        out,
        [
            "ablation=firstStep",
            "stages.first.max_epochs=4",
            "data.samples_per_epoch=24",
            "model.vgg.weights=random",
        ],
    )
    summary = run(cfg)
    first = summary["first"]
    assert Path(first["last_ckpt"]).is_file() and Path(first["best_ckpt"]).is_file()
    losses = epoch_means(read_metrics(out / "first" / "metrics.csv"), "train/loss")
    assert sorted(losses) == [0, 1, 2, 3]
    assert losses[3] < losses[0], losses
    # the checkpoint holds the generator but not the frozen VGG of the loss
    state = torch.load(first["last_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("generator.") for k in state)
    assert not any(k.startswith("loss.") for k in state)
    info = (out / "run_info.yaml").read_text()
    assert "git_commit" in info and "split_inputs_hash" in info
    assert first["split_inputs_hash"] in info


def test_proposed_hands_the_stage1_generator_to_stage2(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # learning rate 0 in stage 2: its generator's parameters stay the ones it was handed
    overrides = ["ablation=proposed", "stages.second.max_epochs=1", "stages.second.module.optimizer_g.lr=0"]
    summary = run(tiny_cfg(tiny_dataset, out, overrides))
    stage2_hparams = (out / "second" / "hparams.yaml").read_text()
    assert "generator_init" in stage2_hparams
    first_state = torch.load(summary["first"]["best_ckpt"], map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    second = torch.load(summary["second"]["last_ckpt"], map_location="cpu", weights_only=True)
    assert second["generator_init_source"] == summary["first"]["best_ckpt"]
    # batch-norm running statistics are re-estimated in stage 2 (freeze_generator_norm off): parameters only
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    params = [k for k in first_state if k.startswith("generator.") and not k.endswith(buffers)]
    assert params and all(k in second["state_dict"] for k in params)
    for k in params:
        assert torch.equal(second["state_dict"][k], first_state[k]), k


def test_wandb_offline_run_writes_its_files(tiny_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_dataset, out, ["ablation=firstStep", "logger=wandb", "stages.first.max_epochs=1"])
    run(cfg)
    runs = list((out / "first" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "first").rglob("*"))
    assert list(runs[0].glob("*.wandb")), "the offline run has no .wandb data file"


def test_resume_from_last_continues_the_epoch_count(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(tiny_cfg(tiny_dataset, out, ["ablation=firstStep", "stages.first.max_epochs=1"]))
    run(tiny_cfg(tiny_dataset, out, ["ablation=firstStep", "stages.first.max_epochs=2", "ckpt_path=last"]))
    last = torch.load(out / "first" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1  # epochs 0 and 1: the second run trained one more epoch, not two
    steps_per_epoch = 8 // 4  # samples_per_epoch / batch_size of experiment=tiny
    assert last["global_step"] == 2 * steps_per_epoch


def _train_py(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_multirun_of_the_three_ablations(tiny_dataset: Path, tmp_path: Path) -> None:
    # default paths (no paths.log_dir override): the sweep goes to <cwd>/outputs/multiruns/<experiment>/<time>
    proc = _train_py(
        [
            "-m",
            "experiment=tiny",
            f"data.root={tiny_dataset}",
            "ablation=proposed,oneStep,firstStep",
            "stages.first.max_epochs=1",
            "stages.second.max_epochs=1",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "multiruns" / "tiny").iterdir())
    assert len(sweeps) == 1
    runs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir() and p.name[0].isdigit())
    assert runs == ["0_proposed_s42", "1_oneStep_s42", "2_firstStep_s42"]
    stages = {
        r: sorted(p.name for p in (sweeps[0] / r).iterdir() if p.name in ("first", "second")) for r in runs
    }
    assert stages == {
        "0_proposed_s42": ["first", "second"],
        "1_oneStep_s42": ["second"],
        "2_firstStep_s42": ["first"],
    }
    # the evaluation table of the sweep (as `make ablations` runs it)
    from ldct_lightning.cli.evaluate import main as evaluate_main

    out = tmp_path / "evaluation"
    args = [
        "--data",
        str(tiny_dataset),
        "--sweep",
        str(sweeps[0]),
        "--proposed",
        "proposed",
        "--out",
        str(out),
    ]
    assert evaluate_main([*args, "--no-progress", "--no-volumes"]) == 0
    table = (out / "tables" / "paper_table4.md").read_text()
    for row in ("| PSNR | LDCT |", "|  | proposed |", "|  | oneStep |", "|  | firstStep |"):
        assert row in table, table


def test_cpu_ddp_fit_of_stage2_with_two_processes(tiny_dataset: Path, tmp_path: Path) -> None:
    proc = _train_py(
        [
            "experiment=tiny",
            f"data.root={tiny_dataset}",
            f"paths.log_dir={tmp_path}",
            "ablation=oneStep",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32",
            "stages.second.max_epochs=1",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list((tmp_path / "runs" / "tiny").iterdir())
    assert (run_dir / "second" / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "train_ddp_process_1.log").is_file()  # the second process ran


def test_config_errors_name_the_key(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tiny_dataset, tmp_path / "run", ["stages.first.data.crop_size=20"])
    with pytest.raises(ValueError, match="stages.first.data.crop_size"):
        run(cfg)
    with open_dict(cfg):
        cfg.stages.first.data.crop_size = 32
        cfg.stages.second.generator_init = str(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="generator_init"):
        run(cfg)


@pytest.mark.slow
def test_multirun_with_ddp_uses_spawn_and_does_not_relaunch_the_sweep(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    proc = _train_py(
        [
            "-m",
            "experiment=tiny",
            f"data.root={tiny_dataset}",
            f"paths.log_dir={tmp_path}",
            "ablation=proposed,firstStep",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32",
            "stages.first.max_epochs=1",
            "stages.second.max_epochs=1",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ddp_spawn_find_unused_parameters_true" in proc.stdout + proc.stderr
    (sweep,) = list((tmp_path / "multiruns" / "tiny").iterdir())
    lasts = sorted(str(p.relative_to(sweep)) for p in sweep.rglob("last.ckpt"))
    assert lasts == [
        "0_proposed_s42/first/checkpoints/last.ckpt",
        "0_proposed_s42/second/checkpoints/last.ckpt",
        "1_firstStep_s42/first/checkpoints/last.ckpt",
    ]


def test_stage2_alone_starts_from_the_latest_stage1_run_of_the_experiment(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    first = run(tiny_cfg(tiny_dataset, log_dir / "runs" / "tiny" / "a", ["ablation=firstStep"]))["first"]
    out = log_dir / "runs" / "tiny" / "b"
    cfg = tiny_cfg(
        tiny_dataset, out, ["ablation=proposed", "run_stages=[second]", "stages.second.max_epochs=1"]
    )
    with open_dict(cfg):
        cfg.paths.log_dir = str(log_dir)
    second = run(cfg)["second"]
    ckpt = torch.load(second["last_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["generator_init_source"] == first["best_ckpt"]


def test_stage2_alone_without_any_stage1_run_fails_clearly(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tiny_dataset, tmp_path / "logs" / "runs" / "tiny" / "b", ["run_stages=[second]"])
    with pytest.raises(ValueError, match="no stage-1 checkpoint of experiment 'tiny'"):
        run(cfg)


def test_train_py_prints_each_lightning_log_line_once(tiny_dataset: Path, tmp_path: Path) -> None:
    # Lightning's own console handler and Hydra's root handler both printed every INFO line (once with a
    # timestamp): a fit creates one Trainer, so its "GPU available" line must appear exactly once
    proc = _train_py(
        [
            "experiment=tiny",
            f"data.root={tiny_dataset}",
            f"paths.log_dir={tmp_path}",
            "ablation=firstStep",
            "stages.first.max_epochs=1",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "GPU available:" in line]
    assert len(lines) == 1, lines
