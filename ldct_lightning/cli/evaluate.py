"""``ldct-evaluate``: run checkpoints over the test split, score both protocols, and write the report.

Everything is written into a hidden temporary folder beside ``--out`` and renamed when complete, so an
interrupted run leaves no half-written report. Exit codes: 0 done, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ldct_lightning.data.split_defaults import (
    data_config_kind,
    data_split_defaults,
    split_params,
    split_size,
)
from ldct_lightning.errors import LDCTError
from ldct_lightning.runs import Run, RunError, Sweep, method_checkpoints

if TYPE_CHECKING:
    from ldct_lightning.eval.evaluate import Method

PROG = "ldct-evaluate"

EPILOG = """\
examples:
  ldct-evaluate --data data/demo \\
      --method proposed=outputs/runs/demo/2024-01-01_12-00-00/second/checkpoints/last.ckpt \\
      --method firstStep=outputs/runs/demo/2024-01-01_13-00-00/first/checkpoints/last.ckpt \\
      --proposed proposed --out outputs/demo/eval
  ldct-evaluate --report-only --out outputs/demo/eval      # re-render report.md from the records

Two protocols are always stated in the report: 'paper' (PSNR/SSIM/RMSE on ROI crops of normalised images
against the NDCT, which is not aligned unless --register; PSNR as eq. 11 and with MAX=1) and 'reference'
(windowed PSNR/SSIM with data range 1 after the window, RMSE in HU, noise SD, lesion CNR against an aligned
ground truth, when the data set has one). The LDCT input is always a row.
The split is read from the data set's split file (default <data>/split.yaml, written by training), so
evaluation runs on the same test patients; --n-val/--n-test/--split-seed only matter when there is none.
"""


class EvaluateCLIError(LDCTError):
    """Bad command-line input; ``str(e)`` names the argument, the problem and what to do."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate denoising checkpoints on the test split (Hu et al. 2024 Table 3/4 metrics, "
        "reference metrics, per-patient paired tests, figures) and write a report folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", type=Path, help="data folder (DICOM tree or synthetic set) given to the DataModule"
    )
    p.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="NAME=CHECKPOINT",
        help="a method row: its name and Lightning checkpoint (repeat for more methods)",
    )
    p.add_argument(
        "--sweep",
        type=Path,
        default=None,
        metavar="MULTIRUN_DIR",
        help="add one row per job of a train.py multirun (e.g. the three ablations): named by ablation (and "
        "seed when several), stage 2's last checkpoint when the job trained it, else stage 1's best",
    )
    p.add_argument(
        "--run",
        type=Path,
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="add the rows of one finished train.py run folder, named as --sweep names them (a proposed run "
        "that trained both stages also gives the firstStep row); repeatable",
    )
    p.add_argument(
        "--bm3d",
        nargs="?",
        const="auto",
        default=None,
        metavar="SIGMA_HU",
        help="add a BM3D row (optional extra `pip install -e .[bm3d]`, non-commercial licence); noise SD in "
        "HU, default auto (estimated per slice)",
    )
    p.add_argument(
        "--nlm",
        nargs="?",
        const="auto",
        default=None,
        metavar="SIGMA_HU",
        help="add a non-local means row (scikit-image); noise SD in HU, default auto (estimated per slice)",
    )
    p.add_argument("--proposed", help="the method every other one is tested against (one of the NAMEs)")
    p.add_argument(
        "--out", type=Path, required=True, help="report folder (must be new or empty, or --overwrite)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument(
        "--report-only", action="store_true", help="only re-render the report of an existing --out folder"
    )
    p.add_argument(
        "--split-file", type=Path, default=None, help="patient split file (default <data>/split.yaml)"
    )
    p.add_argument(
        "--n-val",
        type=split_size,
        default=None,
        help="validation patients when a new split is made (count, fraction or all)",
    )
    p.add_argument(
        "--n-test",
        type=split_size,
        default=None,
        help="test patients when a new split is made (count, fraction or all)",
    )
    p.add_argument("--split-seed", type=int, default=None, help="seed when a new split is made")
    p.add_argument(
        "--manifest", type=Path, default=None, help="series roles manifest (default <data>/manifest.csv)"
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="volume cache (default <data>/.cache)")
    p.add_argument(
        "--boxes", type=Path, default=None, help="ROI boxes per slice (CSV/YAML) for the paper protocol"
    )
    p.add_argument(
        "--register", action="store_true", help="rigidly register each NDCT slice to the input (translation)"
    )
    p.add_argument("--register-rotation", action="store_true", help="also search rotations up to 5 degrees")
    p.add_argument(
        "--protocols", default="paper,reference", help="comma-separated: paper, reference (default both)"
    )
    p.add_argument("--max-slices", type=int, default=None, help="at most N evenly spaced slices per patient")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--batch-size", type=int, default=4, help="slices per batch and forward pass (default 4)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument(
        "--tile", type=int, default=None, help="tile size for large matrices (default whole slices)"
    )
    p.add_argument("--no-volumes", action="store_true", help="do not keep the denoised volumes")
    p.add_argument(
        "--alpha", type=float, default=0.05, help="significance level of the * marks (default 0.05)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def parse_methods(specs: Sequence[str]) -> dict[str, Path]:
    """``["a=x.ckpt", ...]`` -> ``{"a": Path("x.ckpt")}`` with checks (names unique and safe, files exist)."""
    from ldct_lightning.eval.evaluate import EvaluationError, check_method_name

    methods: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise EvaluateCLIError(f"--method {spec!r}: expected NAME=CHECKPOINT, e.g. proposed=last.ckpt")
        try:
            check_method_name(name)
        except EvaluationError as e:
            raise EvaluateCLIError(f"--method {spec!r}: {e}") from e
        if name in methods:
            raise EvaluateCLIError(f"--method {spec!r}: the name {name!r} is given twice. Use unique names")
        ckpt = Path(path)
        if not ckpt.is_file():
            raise EvaluateCLIError(f"--method {spec!r}: {ckpt}: no such checkpoint file. Check the path")
        methods[name] = ckpt
    return methods


def run_methods(sweep: Path | None, run_dirs: Sequence[Path]) -> dict[str, Path]:
    """The rows of ``--sweep`` (its finished jobs) and ``--run`` (finished run folders), in that order."""
    runs = Sweep(sweep).jobs() if sweep is not None else []
    for run_dir in run_dirs:
        run = Run(run_dir)
        if not run.finished:
            raise RunError(f"--run {run_dir}: no {run.summary_path.name}: not a finished train.py run folder")
        runs.append(run)
    return method_checkpoints(runs)


def _split_params(args: argparse.Namespace) -> dict[str, object]:
    """Split parameters: given ones, else those stored in an existing split file, else the data config's."""
    split_file = args.split_file or args.data / "split.yaml"
    defaults = data_split_defaults(data_config_kind(args.data))
    return {
        "split_file": split_file,
        **split_params(split_file, defaults, args.n_val, args.n_test, args.split_seed),
    }


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EvaluateCLIError(f"--out {out}: exists and is not a folder. Give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise EvaluateCLIError(
            f"--out {out}: exists and is not empty. Give a new folder, or pass --overwrite"
        )


def _classical_method(name: str, sigma: str) -> Method:
    """The BM3D or NLM row from its option's value (a noise SD in HU or ``auto``)."""
    from ldct_lightning.eval.evaluate import bm3d_method, nlm_method

    option = f"--{name.lower()}"
    value: float | str = sigma
    if sigma != "auto":
        try:
            value = float(sigma)
        except ValueError:
            raise EvaluateCLIError(f"{option} {sigma!r}: give a noise SD in HU or 'auto'") from None
        if not value > 0:
            raise EvaluateCLIError(f"{option} {sigma!r}: the noise SD must be > 0 HU")
    try:
        return bm3d_method(name, value) if name == "BM3D" else nlm_method(name, value)
    except ImportError as e:
        raise EvaluateCLIError(f"{option}: {e}") from None


def run(args: argparse.Namespace) -> int:
    """Carry out the command; raises the library's errors for :func:`main` to report."""
    from ldct_lightning.eval.report import write_report

    if args.report_only:
        if not args.out.is_dir():
            raise EvaluateCLIError(f"--out {args.out}: no such folder to re-render. Run ldct-evaluate first")
        report = write_report(args.out, alpha=args.alpha)
        print(f"{PROG}: wrote {report.report_path}", file=sys.stderr)
        return 0

    if args.data is None:
        raise EvaluateCLIError("--data is required: the data folder (DICOM tree or synthetic set)")
    if not args.data.is_dir():
        raise EvaluateCLIError(f"--data {args.data}: not a folder. Give the data set's folder")
    classical = {name: sigma for name, sigma in (("BM3D", args.bm3d), ("NLM", args.nlm)) if sigma is not None}
    if not args.method and not classical and args.sweep is None and not args.run:
        raise EvaluateCLIError("no --method given: add --method NAME=CHECKPOINT (one per method)")
    methods = parse_methods(args.method)
    for name, ckpt in run_methods(args.sweep, args.run).items():
        if name in methods:
            raise EvaluateCLIError(f"method {name!r} of --sweep/--run is also given by --method")
        methods[name] = ckpt
    names = [*methods, *classical]
    for name in classical:
        if name in methods:
            raise EvaluateCLIError(
                f"--{name.lower()} adds a row named {name}: rename the --method called {name}"
            )
    if args.proposed is None:
        if len(names) != 1:
            raise EvaluateCLIError(f"--proposed is required with several methods: one of {names}")
        args.proposed = names[0]
    if args.proposed not in names:
        raise EvaluateCLIError(f"--proposed {args.proposed!r}: not a method name; give one of {names}")
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    bad = [p for p in protocols if p not in ("paper", "reference")]
    if bad or not protocols:
        raise EvaluateCLIError(f"--protocols {args.protocols!r}: use paper, reference or both")
    for key in ("batch_size", "max_slices"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise EvaluateCLIError(f"--{key.replace('_', '-')} {value}: must be >= 1")
    if args.boxes is not None and not args.boxes.is_file():
        raise EvaluateCLIError(f"--boxes {args.boxes}: no such file. Give a CSV or YAML of ROI boxes")
    _check_out(args.out, args.overwrite)

    from ldct_lightning.data.datamodule import LDCTDataModule
    from ldct_lightning.eval.evaluate import checkpoint_method, evaluate
    from ldct_lightning.eval.rois import read_boxes

    if args.boxes is not None:
        read_boxes(args.boxes)  # fail on a bad boxes file before the slow part
    loaded = {
        name: checkpoint_method(ckpt, name, device=args.device, batch_size=args.batch_size, tile=args.tile)
        for name, ckpt in methods.items()
    }
    for name, sigma in classical.items():
        loaded[name] = _classical_method(name, sigma)
    split = _split_params(args)
    datamodule = LDCTDataModule(
        args.data,
        cache_dir=args.cache_dir,
        manifest=args.manifest,
        val_batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        **split,
    )
    datamodule.setup("test")
    if not datamodule.split.test:
        raise EvaluateCLIError(
            f"--data {args.data}: the split ({split['split_file']}) has no test patient. "
            "Give --n-test > 0 with a new --split-file"
        )

    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        result = evaluate(
            loaded,
            datamodule,
            tmp,
            proposed=args.proposed,
            protocols=protocols,
            boxes_file=args.boxes,
            register=args.register,
            register_rotation=args.register_rotation,
            progress=not args.no_progress,
            max_slices=args.max_slices,
            batch_size=args.batch_size,
            save_volumes=not args.no_volumes,
            data_description=f"{len(datamodule.studies)} studies in the data set; test split of "
            f"{len(datamodule.split.test)} patients (split inputs hash {datamodule.split.inputs_hash[:12]})",
        )
        write_report(result, alpha=args.alpha)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{PROG}: wrote {out / 'report.md'}", file=sys.stderr)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ldct-evaluate``.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 success, 2 bad input, 130 interrupted.
    """
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return run(args)
        except LDCTError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"{PROG}: error: {e}. Check the paths, permissions and free space", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; nothing was written to --out", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
