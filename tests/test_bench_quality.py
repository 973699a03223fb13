"""make bench-quality's collector: every method of a multirun in one quality table, numbers from the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import open_dict
from skimage.metrics import peak_signal_noise_ratio
from test_baselines_config import TINY_NETS
from test_pipeline import tiny_cfg

from ldct_lightning import bench_quality
from ldct_lightning.data.datamodule import LDCTDataModule
from ldct_lightning.pipeline import run

SUMMARY_CSV = """method,protocol,roi,metric,mean,sd,n_patients
LDCT,reference,slice,psnr_abdomen,27.5,0.25,2
LDCT,reference,slice,ssim_abdomen,0.8,0.01,2
LDCT,reference,slice,rmse_hu,22.0,1.0,2
LDCT,reference,liver,psnr_abdomen,20.0,1.0,2
LDCT,paper,slice,psnr_abdomen,99.0,1.0,2
net,reference,slice,psnr_abdomen,31.0,0.5,2
net,reference,slice,ssim_abdomen,0.9,0.02,2
net,reference,slice,rmse_hu,15.5,,2
"""


def test_quality_rows_pick_the_whole_slice_reference_metrics(tmp_path: Path) -> None:
    path = tmp_path / "summary.csv"
    path.write_text(SUMMARY_CSV)
    rows = bench_quality.quality_rows(path, ["LDCT", "net"])
    assert rows[0] == {
        "method": "LDCT",
        "psnr_abdomen_db_mean": 27.5,
        "psnr_abdomen_db_sd": 0.25,
        "ssim_abdomen_mean": 0.8,
        "ssim_abdomen_sd": 0.01,
        "rmse_hu_mean": 22.0,
        "rmse_hu_sd": 1.0,
        "n_patients": 2,
    }
    assert rows[1]["rmse_hu_sd"] is None
    table = bench_quality.markdown_table(rows, {"LDCT": "none"})
    # the bone band and the largest error are not in this CSV: "-" cells
    assert "| LDCT | 27.50 ± 0.25 | 0.800 ± 0.010 | 22.0 ± 1.0 | - | - | none |" in table
    assert "| net | 31.00 ± 0.50 | 0.900 ± 0.020 | 15.5 | - | - | - |" in table
    with pytest.raises(ValueError, match="absent"):
        bench_quality.quality_rows(path, ["LDCT", "absent"])


SEEDS_CSV = """method,protocol,roi,metric,mean,sd,n_patients
LDCT,reference,slice,psnr_abdomen,27.0,0.5,3
LDCT,reference,slice,ssim_abdomen,0.8,0.01,3
LDCT,reference,slice,rmse_hu,22.0,1.0,3
LDCT,reference,bone_band,psnr_abdomen,24.0,1.0,3
LDCT,reference,liver,psnr_abdomen,20.0,1.0,3
LDCT,reference,lung,psnr_lung,30.0,1.0,3
proposed_s1,reference,slice,psnr_abdomen,31.0,0.4,3
proposed_s1,reference,slice,ssim_abdomen,0.9,0.01,3
proposed_s1,reference,slice,rmse_hu,15.0,1.0,3
proposed_s1,reference,bone_band,psnr_abdomen,23.0,1.0,3
proposed_s1,reference,liver,psnr_abdomen,25.0,1.0,3
proposed_s2,reference,slice,psnr_abdomen,32.0,0.4,3
proposed_s2,reference,slice,ssim_abdomen,0.92,0.01,3
proposed_s2,reference,slice,rmse_hu,14.0,1.0,3
proposed_s2,reference,bone_band,psnr_abdomen,25.0,1.0,3
proposed_s2,reference,liver,psnr_abdomen,26.0,1.0,3
proposed_s2,reference,lung,psnr_lung,29.5,1.0,3
firstStep_s1,reference,slice,psnr_abdomen,30.0,0.4,3
firstStep_s1,reference,slice,ssim_abdomen,0.88,0.01,3
firstStep_s1,reference,slice,rmse_hu,16.0,1.0,3
firstStep_s2,reference,slice,psnr_abdomen,31.0,0.4,3
firstStep_s2,reference,slice,ssim_abdomen,0.89,0.01,3
firstStep_s2,reference,slice,rmse_hu,15.0,1.0,3
"""


def test_seed_rows_merge_into_mean_and_sd_over_seeds_and_targets_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "summary.csv"
    path.write_text(SEEDS_CSV)
    methods = ["LDCT", "proposed_s1", "proposed_s2", "firstStep_s1", "firstStep_s2"]
    rows = bench_quality.over_seeds(bench_quality.quality_rows(path, methods))
    by_name = {row["method"]: row for row in rows}
    assert list(by_name) == ["LDCT", "proposed", "firstStep"]
    assert by_name["LDCT"]["psnr_abdomen_db_sd"] == 0.5  # no seeds: SD over patients as it was
    proposed = by_name["proposed"]
    assert proposed["seeds"] == [1, 2]
    # by hand: mean of 31 and 32; sample SD of two values a, b is |a - b| / sqrt(2)
    assert proposed["psnr_abdomen_db_mean"] == pytest.approx(31.5)
    assert proposed["psnr_abdomen_db_sd"] == pytest.approx(1 / np.sqrt(2))
    assert proposed["bone_band_psnr_abdomen_db_mean"] == pytest.approx(24.0)
    assert "bone_band_psnr_abdomen_db_mean" not in by_name["firstStep"]  # absent for one seed: left out

    below = bench_quality.rois_below_input(path, methods)
    # the lung is scored in the lung window only (the window that shows it): named with its window
    assert below["proposed_s1"] == ["bone_band"] and below["proposed_s2"] == ["lung (lung window)"]
    gain_first, gain_input, rmse, rois = bench_quality.target_checks(rows, below, "proposed")
    assert gain_first["value"] == pytest.approx(1.0) and gain_first["met"]  # 31.5 - 30.5
    assert gain_input["value"] == pytest.approx(4.5) and gain_input["met"]  # 31.5 - 27
    assert rmse["value"] == pytest.approx(14.5) and rmse["met"]
    assert rois["value"] == ["bone_band", "lung (lung window)"] and not rois["met"]
    assert "**not met**" in bench_quality.checks_markdown([rois])
    assert bench_quality.target_checks(rows[:1], below, "proposed") == []

    # generalisation targets, by hand: firstStep 30.5 and proposed 31.5 against LDCT 27 and an NLM row
    nlm = {"method": "NLM", "psnr_abdomen_db_mean": 31.0}
    checks = {c["check"]: c for c in bench_quality.generalize_checks([*rows, nlm], below, "proposed")}
    assert checks["firstStep >= LDCT + 3.0 dB (PSNR abdomen)"]["value"] == pytest.approx(3.5)
    assert checks["firstStep above NLM (PSNR abdomen, dB)"]["value"] == pytest.approx(-0.5)
    assert not checks["firstStep above NLM (PSNR abdomen, dB)"]["met"]
    assert checks["proposed above NLM (PSNR abdomen, dB)"]["met"]
    check = "no ROI of proposed (any seed) below the input (PSNR, each window that shows it)"
    assert checks[check]["value"] == ["bone_band", "lung (lung window)"]


MODELS = {
    "proposed": "attention_unet",
    "redcnn": "redcnn",
    "pix2pix": "pix2pix",
    "cyclegan": "cyclegan",
    "oracle": "oracle",
}


def _tiny_sweep(data: Path, sweep: Path) -> None:
    """A multirun-like folder: one tiny job per method (the proposed one trains both stages)."""
    for i, (name, model) in enumerate(MODELS.items()):
        cfg = tiny_cfg(data, sweep / f"{i}_{name}_s0", [f"model={model}", "trainer.num_sanity_val_steps=0"])
        with open_dict(cfg):
            for stage in cfg.run_stages:
                cfg.stages[stage].max_epochs = 1
                for net in cfg.stages[stage].nets:
                    if net.startswith("discriminator"):
                        cfg.model[net].base_channels = 8
            if model in TINY_NETS:
                for key in ("base_channels", "depth"):  # experiment=tiny's keys fit only the proposed U-Net
                    cfg.model.generator.pop(key, None)
                cfg.model.generator.update(TINY_NETS[model])
        run(cfg)


def test_every_method_of_a_sweep_is_in_the_quality_table(tiny_dataset: Path, tmp_path: Path) -> None:
    sweep, out = tmp_path / "sweep", tmp_path / "bench" / "quality.json"
    _tiny_sweep(tiny_dataset, sweep)
    code = bench_quality.main(["--data", str(tiny_dataset), "--sweep", str(sweep), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    names = [row["method"] for row in result["methods"]]
    expected = ["LDCT", "proposed", "redcnn", "pix2pix", "cyclegan", "oracle", "firstStep"]
    assert "NLM" in names  # the classical baseline that needs no extra
    assert sorted(n for n in names if n not in ("BM3D", "NLM")) == sorted(expected)
    for row in result["methods"]:
        assert np.isfinite([row["psnr_abdomen_db_mean"], row["ssim_abdomen_mean"], row["rmse_hu_mean"]]).all()
    proposed = next(j for j in result["jobs"] if j["name"] == "proposed")
    assert set(proposed["stages"]) == {"first", "second"}
    assert (
        proposed["stages"]["first"]["train_batches"] >= 1 and proposed["stages"]["first"]["fit_seconds"] > 0
    )
    markdown = out.with_suffix(".md").read_text()
    for name in names:
        assert f"| {name} |" in markdown
    report = (tmp_path / "sweep" / "evaluation" / "report.md").read_text()
    assert all(name in report for name in names)

    # the LDCT row by hand: PSNR of each test slice in the abdomen window (skimage), mean per patient, then
    # over patients
    split = yaml.safe_load((tiny_dataset / "split.yaml").read_text())
    params = split["params"]
    dm = LDCTDataModule(
        tiny_dataset,
        split_file=tiny_dataset / "split.yaml",
        n_val=params["n_val"],
        n_test=params["n_test"],
        split_seed=params["seed"],
        num_workers=0,
    )
    dm.setup("test")

    def window(hu: np.ndarray) -> np.ndarray:
        return np.clip((hu - (40.0 - 200.0)) / 400.0, 0.0, 1.0)

    per_patient = []
    for patient in dm.patients("test"):
        ldct, ref = np.asarray(patient.ldct, np.float64), np.asarray(patient.reference, np.float64)
        per_patient.append(
            np.mean(
                [
                    peak_signal_noise_ratio(window(r), window(x), data_range=1.0)
                    for r, x in zip(ref, ldct, strict=True)
                ]
            )
        )
    assert len(per_patient) == len(split["test"]) == result["data"]["n_test_patients"]
    ldct_row = result["methods"][names.index("LDCT")]
    assert ldct_row["psnr_abdomen_db_mean"] == pytest.approx(np.mean(per_patient), rel=1e-4)

    # the same models on a data set they never saw (here the same one): every patient is a test patient
    out_b = tmp_path / "bench" / "generalize.json"
    argv = ["--data", str(tiny_dataset), "--sweep", str(sweep), "--all-test", "--targets", "generalize"]
    argv += ["--evaluation", str(sweep / "evaluation_b"), "--out", str(out_b)]
    assert bench_quality.main(argv) == 0
    result_b = json.loads(out_b.read_text())
    n_patients = len(list((tiny_dataset / "truth").glob("*.npz")))
    assert result_b["data"]["n_test_patients"] == n_patients > len(split["test"])
    assert result_b["targets"] == "generalize"
    checks = {c["check"] for c in result_b["checks"]}
    assert (
        "firstStep above NLM (PSNR abdomen, dB)" in checks
        and "proposed >= LDCT + 3.0 dB (PSNR abdomen)" in checks
    )
    assert yaml.safe_load((tiny_dataset / "split.yaml").read_text()) == split  # the training split is kept


def test_missing_sweep_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = bench_quality.main(["--data", str(tmp_path), "--sweep", str(tmp_path / "none")])
    assert code == 2
    assert "--sweep" in capsys.readouterr().err


def _job(sweep: Path, folder: str, name: str, stages: list[str], seed: int = 42) -> None:
    job = sweep / folder
    job.mkdir(parents=True)
    summary = {s: {"best_ckpt": f"{job}/{s}/best.ckpt", "last_ckpt": f"{job}/{s}/last.ckpt"} for s in stages}
    (job / "summary.yaml").write_text(yaml.safe_dump(summary))
    (job / "run_info.yaml").write_text(yaml.safe_dump({"config": {"ablation": {"name": name}, "seed": seed}}))


def test_sweep_rows_add_first_step_from_a_two_stage_proposed_job(tmp_path: Path) -> None:
    from ldct_lightning.runs import Sweep

    _job(tmp_path / "a", "0_proposed_s42", "proposed", ["first", "second"])
    _job(tmp_path / "a", "1_redcnn_s42", "redcnn", ["first"])
    rows = {name: str(path) for name, path in Sweep(tmp_path / "a").methods().items()}
    assert list(rows) == ["proposed", "firstStep", "redcnn"]  # firstStep right after its job
    assert rows == {
        "proposed": f"{tmp_path}/a/0_proposed_s42/second/last.ckpt",
        "firstStep": f"{tmp_path}/a/0_proposed_s42/first/best.ckpt",
        "redcnn": f"{tmp_path}/a/1_redcnn_s42/first/best.ckpt",
    }
    # a sweep with its own firstStep job (make ablations) keeps that job's row
    _job(tmp_path / "b", "0_proposed_s42", "proposed", ["first", "second"])
    _job(tmp_path / "b", "2_firstStep_s42", "firstStep", ["first"])
    assert (
        str(Sweep(tmp_path / "b").methods()["firstStep"]) == f"{tmp_path}/b/2_firstStep_s42/first/best.ckpt"
    )


def test_the_proposed_row_of_a_seeded_sweep_is_its_first_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    names = {
        "proposed_s2": Path("a"),
        "firstStep_s2": Path("b"),
        "proposed_s1": Path("c"),
        "redcnn_s1": Path("d"),
    }
    monkeypatch.setattr(bench_quality.Sweep, "methods", lambda self: names)
    args = bench_quality.build_parser().parse_args(["--data", "d", "--sweep", "s"])
    assert bench_quality.evaluated_name(args) == "proposed_s1"
    args.proposed = "redcnn_s1"
    assert bench_quality.evaluated_name(args) == "redcnn_s1"  # a name the sweep has is kept


def test_seeded_names_split_back() -> None:
    from ldct_lightning.runs import seeded_name, split_seed

    assert seeded_name("proposed_eq9", 2) == "proposed_eq9_s2"
    assert split_seed("proposed_eq9_s2") == ("proposed_eq9", 2)
    assert split_seed("firstStep") == ("firstStep", None)
    assert split_seed("oracle_s") == ("oracle_s", None)  # no digits: not a seed
    assert split_seed(seeded_name("x_s1", -3)) == ("x_s1", -3)
