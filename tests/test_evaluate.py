"""Evaluation run and report: rows, both protocols, figures, identity == LDCT, PSNR by hand, CLI errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom.uid import generate_uid
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio

from ldct_lightning.cli import evaluate as cli
from ldct_lightning.data.datamodule import LDCTDataModule
from ldct_lightning.data.dicom_write import CTSeriesSpec, write_ct_series
from ldct_lightning.eval.evaluate import EvaluationResult, Method, evaluate, identity_method
from ldct_lightning.eval.reader_study import load_stack
from ldct_lightning.eval.report import write_report
from ldct_lightning.eval.rois import LABEL_IDS, mask_to_box
from ldct_lightning.privacy import hash_identifier

SIZE, N_SLICES, N_PATIENTS = 48, 3, 4
# organ squares (y0, y1, x0, x1) and HU; the lesion lies inside the liver
ORGANS = {
    "heart": ((8, 20, 14, 26), 45.0),
    "liver": ((24, 40, 8, 24), 60.0),
    "spleen": ((24, 34, 28, 38), 50.0),
    "muscle": ((36, 42, 28, 40), 55.0),
    "lesion": ((29, 33, 14, 18), 90.0),
}


def write_dataset(root: Path, seed: int = 0) -> None:
    """Per patient an NDCT (shifted 1 pixel, like a second acquisition) and an LDCT series, plus truth."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    body = (yy**2 + xx**2) < (0.48 * SIZE) ** 2
    clean = np.where(body, 20.0, -1000.0)
    labels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for name, ((y0, y1, x0, x1), hu) in ORGANS.items():
        clean[y0:y1, x0:x1] = hu
        labels[y0:y1, x0:x1] = LABEL_IDS[name]
    for i in range(N_PATIENTS):
        pid = f"PAT-{i:03d}"
        z_ld = np.arange(N_SLICES) * 1.25 + 0.4
        ndct = np.roll(clean, 1, axis=1)[None] + rng.normal(0, 8, (N_SLICES, SIZE, SIZE)) * body
        ldct = clean[None] + rng.normal(0, 30, (N_SLICES, SIZE, SIZE)) * body
        study = generate_uid()  # one study, one frame of reference: z positions are comparable
        for role, volume, ctdi, z in (("ndct", ndct, 12.0, z_ld - 0.4), ("ldct", ldct, 1.5, z_ld)):
            spec = CTSeriesSpec(
                patient_id=pid,
                ctdi_vol=ctdi,
                series_description=role,
                study_uid=study,
                extra={"FrameOfReferenceUID": study},
            )
            write_ct_series(np.round(volume), spec, z, root / "dicom" / pid / role)
        (root / "truth").mkdir(exist_ok=True)
        np.savez(
            root / "truth" / f"{hash_identifier(pid, root)}.npz",
            clean_ld=np.repeat(clean[None], N_SLICES, 0).astype(np.float32),
            labels_ld=np.repeat(labels[None], N_SLICES, 0),
            z_ld=z_ld,
        )


def make_dm(root: Path, work: Path, **kwargs) -> LDCTDataModule:
    args = {
        "cache_dir": work / "cache",
        "split_file": work / "split.yaml",
        "n_val": 0,
        "n_test": 2,
        "val_batch_size": 2,
        "num_workers": 0,
    } | kwargs
    return LDCTDataModule(root, **args)


def smooth(hu: np.ndarray) -> np.ndarray:
    """A stand-in denoiser: Gaussian smoothing in-plane."""
    return ndimage.gaussian_filter(hu, sigma=(0, 1.2, 1.2)).astype(np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    write_dataset(root)
    return root


@pytest.fixture(scope="module")
def evaluated(dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("eval")
    dm = make_dm(dataset, work)
    methods = {
        "identity": identity_method("identity"),
        "smooth": Method("smooth", smooth, "Gaussian smoothing", {"sigma_px": 1.2}),
    }
    result = evaluate(methods, dm, work / "out", proposed="smooth", progress=False)
    report = write_report(result, log_to_wandb=False)
    return result, report, dm


def _by_key(records, method):
    return {
        (r["patient_key"], r["slice_index"], r["protocol"], r["roi"], r["metric"]): r["value"]
        for r in records
        if r["method"] == method
    }


def test_report_rows_protocols_and_figures(evaluated) -> None:
    result, report, dm = evaluated
    out = result.out_dir
    assert result.methods == ["LDCT", "identity", "smooth"]
    assert result.protocols == ["paper", "reference"]
    assert result.n_patients == 2 and set(result.info["patients"]) == set(dm.split.test)
    for name in ("paper_table3", "reference_table3", "reference_noise"):
        assert [p.suffix for p in report.table_paths[name]] == [".md", ".csv", ".tex"]
        rows = report.tables[name].rows()
        assert [r[1] for r in rows[:3]] == ["LDCT", "identity", "smooth"]
    csv_text = (out / "tables" / "paper_table3.csv").read_text()
    assert csv_text.splitlines()[0] == "Metric,Method,Heart,Liver,Spleen,Muscle,Mean"
    assert "paper_table4" not in report.tables  # no ablation names among the methods

    text = report.report_path.read_text()
    assert "**Paper protocol**" in text and "**Reference protocol**" in text
    assert "Not computed" not in text
    assert "eq. 11" in text and "MAX = 1" in text and "PSNR (MAX=1)" in text
    assert "NOT aligned" in text  # no registration: the NDCT is said to be unaligned
    assert "only 2 test patient(s)" in text  # n < 3 warning
    assert "Wilcoxon" in text and "Holm" in text
    assert "sigma_px: 1.2" in text  # the method's exact config
    for kind in ("comparison", "histograms", "difference"):
        for i in (1, 2):
            for suffix in (".png", ".pdf"):
                assert (out / "figures" / f"{kind}_{i}{suffix}").stat().st_size > 0
            assert f"](figures/{kind}_{i}.png)" in text
    for name in dm.split.test:
        assert name in text  # patients by hashed key
    assert "PAT-" not in text and "PAT-" not in (out / "records.csv").read_text()

    tests = (out / "stats" / "tests.csv").read_text().splitlines()
    assert tests[0].split(",")[:5] == ["method", "proposed", "protocol", "roi", "metric"]
    assert {line.split(",")[0] for line in tests[1:]} == {"LDCT", "identity"}


def test_identity_equals_ldct_row(evaluated) -> None:
    result, report, _ = evaluated
    ldct, ident = _by_key(result.records, "LDCT"), _by_key(result.records, "identity")
    assert ldct.keys() == ident.keys() and len(ldct) > 100
    for key, value in ldct.items():
        assert value == ident[key] or (math.isnan(value) and math.isnan(ident[key])), key
    table = report.tables["paper_table3"]
    for (metric, method, roi), cell in table.cells.items():
        if method == "identity":
            other = table.cells[(metric, "LDCT", roi)].mean
            assert cell.mean == other or (math.isnan(cell.mean) and math.isnan(other))  # SSIM: crop < 11 px
    # smoothing lowers the noise inside the liver (its edges against air are another matter)
    noise = report.tables["reference_noise"].cells
    assert (
        noise[("noise_sd_diff_hu", "smooth", "liver")].mean
        < noise[("noise_sd_diff_hu", "LDCT", "liver")].mean
    )


def test_psnr_matches_hand_computation(evaluated, dataset: Path) -> None:
    result, _, dm = evaluated
    out = result.out_dir
    key = dm.split.test[0]
    index = yaml.safe_load((out / "volumes" / "index.json").read_text())[key]
    slot = 1
    pred = np.load(out / "volumes" / "smooth" / f"{key}.npy")[slot].astype(np.float64)
    truth = np.load(dataset / "truth" / f"{key}.npz")
    ref = truth["clean_ld"][index[slot]].astype(np.float64)

    def window(hu, center=40.0, width=400.0):  # abdomen window, data range 1
        return np.clip((hu - (center - width / 2)) / width, 0.0, 1.0)

    expected = peak_signal_noise_ratio(window(ref), window(pred), data_range=1.0)
    got = _by_key(result.records, "smooth")[(key, index[slot], "reference", "slice", "psnr_abdomen")]
    assert got == pytest.approx(expected, rel=1e-5)

    # paper protocol, eq. 11: liver bounding box, normalised [-1024, 3071], MAX = max of the NDCT crop
    ndct = dm.patients("test")[0].ndct[index[slot]].astype(np.float64)
    box = mask_to_box(truth["labels_ld"][index[slot]] == LABEL_IDS["liver"])
    unit = lambda hu: (np.clip(hu, -1024, 3071) + 1024) / 4095  # noqa: E731
    p, r = unit(pred)[box.slices], unit(ndct)[box.slices]
    expected = 10 * np.log10(r.max() ** 2 / np.mean((p - r) ** 2))
    got = _by_key(result.records, "smooth")[(key, index[slot], "paper", "liver", "psnr")]
    assert got == pytest.approx(expected, rel=1e-5)


def test_outputs_volumes_stack_and_reload(evaluated) -> None:
    result, _, dm = evaluated
    out = result.out_dir
    patient = dm.patients("test")[0]
    volume = np.load(out / "volumes" / "smooth" / f"{patient.patient_key}.npy")
    assert volume.dtype == np.float32 and volume.shape == (N_SLICES, SIZE, SIZE)
    ldct_hu = np.asarray(patient.ldct, dtype=np.float32)
    np.testing.assert_allclose(volume, smooth(ldct_hu), atol=0.05)
    stack = load_stack(out / "stack.npz")
    assert len(stack) == 2 * N_SLICES
    assert list(stack[0].images) == ["LDCT", "identity", "smooth", "NDCT", "reference"]
    again = EvaluationResult.load(out)
    assert again.methods == result.methods and len(again.records) == len(result.records)
    as_text = lambda rows: [{**r, "value": repr(r["value"])} for r in rows]  # noqa: E731  (NaN != NaN)
    assert as_text(again.patient_records) == as_text(result.patient_records)


def test_wandb_table_logged_when_a_run_is_active(evaluated, tmp_path: Path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    result, _, _ = evaluated
    assert wandb.run is None and not write_report(result.out_dir).wandb_logged  # no run: nothing to log to
    run = wandb.init(mode="offline", dir=tmp_path, project="ldct-lightning-tests")
    files = Path(run.dir)
    try:
        report = write_report(result.out_dir)  # re-render from the folder
    finally:
        run.finish()
        wandb.teardown()  # the process-wide wandb state keeps this run's settings; later runs need their own
    assert report.wandb_logged
    # what the offline run wrote, read back from its files
    (table_file,) = files.glob("media/table/eval/paper_table3_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:2] == ["Metric", "Method"]
    assert [row[1] for row in table["data"][:3]] == ["LDCT", "identity", "smooth"]
    with (result.out_dir / "tables" / "paper_table3.csv").open(newline="") as f:
        written = list(csv.reader(f))
    assert table["columns"] == written[0] and table["data"] == written[1:]


def test_registration_and_single_protocol(dataset: Path, tmp_path: Path) -> None:
    dm = make_dm(dataset, tmp_path)
    result = evaluate(
        {"smooth": smooth},
        dm,
        tmp_path / "out",
        proposed="smooth",
        protocols=("paper",),
        register=True,
        max_slices=1,
        progress=False,
    )
    assert result.protocols == ["paper"] and result.info["n_slices"] == 2
    assert len(result.registration) == 2
    # the NDCT was rolled by one pixel in x: registration finds it back
    assert all(abs(r["shift_x_px"] + 1) < 0.3 and abs(r["shift_y_px"]) < 0.3 for r in result.registration)
    text = write_report(result, log_to_wandb=False).report_path.read_text()
    assert "rigidly registered" in text and "Residual RMSE" in text
    assert "**Not computed: it was not requested.**" in text  # the reference protocol


# --------------------------------------------------------------------------------------------- CLI


def _checkpoint(lightning_run, run: str, seed: int) -> Path:
    """A real Lightning checkpoint of a tiny stage-1 fit saved like a training run (with run_info.yaml)."""
    # the generator of test_denoise's checkpoints, so the session fits it once
    return lightning_run(run, seed=seed, info={"ablation": {"name": "firstStep"}}, base_channels=8).checkpoint


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ldct-evaluate: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_end_to_end_with_checkpoints(dataset: Path, tmp_path: Path, capsys, lightning_run) -> None:
    a, b = _checkpoint(lightning_run, "runA", 0), _checkpoint(lightning_run, "runB", 4)
    out = tmp_path / "report"
    argv = [
        "--data", str(dataset), "--method", f"proposed={a}", "--method", f"firstStep={b}",
        "--proposed", "proposed", "--out", str(out), "--split-file", str(tmp_path / "split.yaml"),
        "--cache-dir", str(tmp_path / "cache"), "--n-val", "0", "--n-test", "2", "--max-slices", "1",
        "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    text = (out / "report.md").read_text()
    assert "paper_table4" in " ".join(p.name for p in (out / "tables").iterdir())  # ablation table
    assert "ablation:" in text and "base_channels: 8" in text  # run_info.yaml shown
    assert "sha256" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.tmp")]  # temp folder renamed
    # the same out folder again: refused without --overwrite, replaced with it
    assert cli.main(argv) == 2
    assert "not empty" in _error_line(capsys)
    assert cli.main([*argv, "--overwrite", "--protocols", "paper"]) == 0
    assert "Not computed: it was not requested" in (out / "report.md").read_text()
    assert cli.main(["--report-only", "--out", str(out)]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "proposed=missing.ckpt", "--proposed", "proposed"], "no such checkpoint file"),
        (["--method", "a=CKPT", "--method", "b=CKPT", "--proposed", "c"], "not a method name"),
        (["--method", "LDCT=CKPT", "--proposed", "LDCT"], "reserved"),
        (["--method", "noequals", "--proposed", "x"], "NAME=CHECKPOINT"),
        (["--method", "a=CKPT", "--proposed", "a", "--n-test", "0", "--n-val", "0"], "no test patient"),
    ],
)
def test_cli_bad_input_one_line(dataset: Path, tmp_path: Path, capsys, lightning_run, extra, message) -> None:
    ckpt = _checkpoint(lightning_run, "run", 0)
    extra = [e.replace("CKPT", str(ckpt)) for e in extra]
    argv = ["--data", str(dataset), "--out", str(tmp_path / "o"), "--split-file", str(tmp_path / "s.yaml")]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--no-progress", *extra]
    assert cli.main(argv) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_cli_missing_data_folder(tmp_path: Path, capsys) -> None:
    assert cli.main(["--data", str(tmp_path / "nope"), "--method", "a=x", "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in _error_line(capsys)


def test_cli_bm3d_without_the_extra(dataset: Path, tmp_path: Path, capsys) -> None:
    from ldct_lightning.baselines.bm3d import bm3d_available

    if bm3d_available():
        pytest.skip("the optional bm3d package is installed")
    argv = ["--data", str(dataset), "--bm3d", "--out", str(tmp_path / "o"), "--no-progress"]
    assert cli.main(argv) == 2
    assert "pip install" in _error_line(capsys)


def test_tiny_synthetic_set(tiny_dataset: Path, tmp_path: Path) -> None:
    """The built-in synthetic set: both protocols, noise SD, and the LDCT row against skimage."""
    dm = make_dm(tiny_dataset, tmp_path)
    result = evaluate({"smooth": smooth}, dm, tmp_path / "out", proposed="smooth", progress=False)
    assert result.protocols == ["paper", "reference"]
    assert "liver" in {r["roi"] for r in result.records if r["metric"] == "noise_sd_diff_hu"}
    key = dm.split.test[0]
    truth = np.load(tiny_dataset / "truth" / f"{key}.npz")
    ldct = np.asarray(dm.patients("test")[0].ldct[2], dtype=np.float64)
    window = lambda hu: np.clip((hu + 160.0) / 400.0, 0, 1)  # noqa: E731  abdomen C40/W400
    expected = peak_signal_noise_ratio(
        window(truth["clean_ld"][2].astype(np.float64)), window(ldct), data_range=1
    )
    got = _by_key(result.records, "LDCT")[(key, 2, "reference", "slice", "psnr_abdomen")]
    assert got == pytest.approx(expected, abs=1e-3)
    report = write_report(result, log_to_wandb=False)
    assert (result.out_dir / "figures" / "histograms_1.png").is_file()
    assert "Not computed" not in report.report_path.read_text()


def test_report_describes_the_3d_registration_of_two_frame_studies() -> None:
    # studies in two frames of reference: the paper protocol's NDCT is the 3-D registered one, and the report
    # must say so with the mean NCC and residual (not "NOT aligned", not the per-slice rigid text)
    from types import SimpleNamespace

    from ldct_lightning.eval.report import ndct_label, protocol_statements

    studies = {
        "a": {"z_offset_mm": -70.0, "ncc_median": 0.94, "residual_hu": 10.0},
        "b": {"z_offset_mm": 53.0, "ncc_median": 0.96, "residual_hu": 14.0},
    }
    info = {"register": False, "ndct_registration_3d": studies}
    result = SimpleNamespace(info=info, registration=[], protocols=["paper", "reference"])
    text = protocol_statements(result)["paper"]
    assert "registered in 3-D" in text and "NOT aligned" not in text
    assert "2 test studies" in text and "NCC inside the body 0.950" in text and "residual 12.0 HU" in text
    assert ndct_label(info) == "NDCT, registered in 3-D onto the input"
    assert ndct_label({"ndct_registration_3d": {}}) == "NDCT, nearest slice in z, not aligned"
    assert ndct_label({"register": True, "ndct_registration_3d": studies}).startswith("NDCT, rigidly")


def test_test_studies_that_fail_to_register_are_counted_and_named(
    tiny_dataset: Path, tmp_path: Path, monkeypatch
) -> None:
    """A test study whose registration fails is not scored, but the evaluation names and counts it."""
    from ldct_lightning.registration import RegistrationCache, RegistrationError

    dm = make_dm(tiny_dataset, tmp_path)
    dm.prepare_data()
    failing = dm.split.test[0]
    real_get = RegistrationCache.get

    def get(self, *args, **kwargs):
        if args[-1] == failing:  # the hashed patient key
            raise RegistrationError(f"patient {failing}: registration residual too large (test)")
        return real_get(self, *args, **kwargs)

    monkeypatch.setattr(RegistrationCache, "get", get)
    with pytest.warns(UserWarning, match=f"patient {failing}.*left out of test"):
        result = evaluate({"smooth": smooth}, dm, tmp_path / "out", proposed="smooth", progress=False)
    assert result.info["registration_left_out"] == [failing]
    assert result.info["patients"] == [k for k in dm.split.test if k != failing]
    assert failing not in {r["patient_key"] for r in result.records}
    saved = json.loads((result.out_dir / "evaluation.json").read_text())
    assert saved["registration_left_out"] == [failing]
    text = write_report(result, log_to_wandb=False).report_path.read_text()
    assert "**1 test study was left out**" in text and failing in text
