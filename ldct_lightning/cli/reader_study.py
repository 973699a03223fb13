"""``ldct-reader-study``: export a blinded reader-study kit, or analyse filled score sheets."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ldct_lightning.data.normalize import WINDOWS
from ldct_lightning.errors import LDCTError
from ldct_lightning.eval import reader_study as rs

EPILOG = """\
examples:
  ldct-reader-study export --stack outputs/eval/reader_stack.npz --out outputs/reader_study --n 20 --seed 0
      writes outputs/reader_study/reader_kit/ (give this folder to the readers) and
      outputs/reader_study/key.csv (keep it; it maps image letters to methods)
  ldct-reader-study analyze --key outputs/reader_study/key.csv --sheets r1.csv r2.csv --out report.md

The stack is an .npz written by ldct_lightning.eval.reader_study.save_stack: arrays image/<method> of shape
(N, H, W) in HU (include the input and the reference as methods), patient_key (N,) and slice_index (N,).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldct-reader-study",
        description="Blinded reader study (Hu et al. 2024, Table 2): export shuffled, windowed image groups "
        "with a key and a score sheet; analyse filled sheets (mean ± SD, ICC(2,1), Friedman + Wilcoxon/Holm).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser(
        "export",
        help="write the blinded kit and the key",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("--stack", required=True, type=Path, help="slices of every method (.npz from save_stack)")
    ex.add_argument(
        "--out", required=True, type=Path, help="output folder (kit in OUT/reader_kit, key in OUT/key.csv)"
    )
    ex.add_argument(
        "--n", type=int, default=20, help="number of slices (cases) to draw (default 20, as the paper)"
    )
    ex.add_argument(
        "--seed", type=int, default=0, help="seed of the slice draw and the image shuffles (default 0)"
    )
    ex.add_argument(
        "--window", default="abdomen", choices=sorted(WINDOWS), help="display window (default abdomen)"
    )
    ex.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods to include, e.g. input,reference,proposed (default all)",
    )
    ex.add_argument(
        "--criteria",
        default=",".join(rs.CRITERIA),
        help=f"comma-separated score columns (default {','.join(rs.CRITERIA)})",
    )

    an = sub.add_parser(
        "analyze",
        help="unblind and analyse filled score sheets",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    an.add_argument("--key", required=True, type=Path, help="key.csv written by export")
    an.add_argument(
        "--sheets", required=True, type=Path, nargs="+", help="filled score sheets, one per reader"
    )
    an.add_argument(
        "--out", type=Path, default=None, help="write the Markdown report here (default: print it)"
    )
    an.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    an.add_argument(
        "--methods", default=None, help="comma-separated method order in the report (default sorted)"
    )
    an.add_argument("--criteria", default=",".join(rs.CRITERIA), help="comma-separated criteria to analyse")
    return parser


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "export":
            slices = rs.load_stack(args.stack, _split(args.methods))
            res = rs.export_reader_study(
                slices,
                args.out,
                n=args.n,
                seed=args.seed,
                window=args.window,
                criteria=_split(args.criteria) or rs.CRITERIA,
            )
            print(f"wrote {len(res.images)} images for readers under {res.kit_dir}")
            print(f"key (do not give to readers): {res.key_path}")
        else:
            criteria = _split(args.criteria) or list(rs.CRITERIA)
            result = rs.analyze(
                rs.read_score_sheets(args.sheets, criteria),
                rs.read_key(args.key),
                criteria,
                _split(args.methods),
            )
            report = rs.to_markdown(result)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(report)
                print(f"wrote {args.out}")
            else:
                print(report, end="")
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result.to_dict(), indent=2))
                print(f"wrote {args.json}")
    except (LDCTError, FileNotFoundError, KeyError) as exc:
        print(f"ldct-reader-study: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
