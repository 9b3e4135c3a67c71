"""The ``cxrstudy`` console script: ``cxrstudy predict IMAGE... [--profile P] [--run CONFIG_OR_RUN_ID] --out DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrstudy import config


def _parser() -> argparse.ArgumentParser:
    """Argument parser with one sub-command per action."""
    parser = argparse.ArgumentParser(prog="cxrstudy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="class probabilities and a Grad-CAM overlay for X-ray files")
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, TIFF, 16-bit, ...)")
    p.add_argument("--profile", default="default", help="profile whose saved run is used (default: default)")
    p.add_argument(
        "--run",
        default=None,
        help="a configuration id (its fold models' ensemble) or one run id (default: the headline configuration)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: reports/<profile>/predict)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-cam", action="store_true", help="skip the Grad-CAM overlays")
    return parser


def _predict(args: argparse.Namespace) -> int:
    """Run predict and print a line per image, a warning per film that fails the lung QC; non-zero exit only
    when no image could be read."""
    from cxrstudy.inference import UNCHECKED
    from cxrstudy.predict import predict

    out = args.out or config.profile_dir(args.profile) / "predict"
    res = predict(args.images, out, args.profile, args.run, args.device, cam=not args.no_cam)
    for row in res.predictions.itertuples():
        print(f"{row.image}: {row.pred}")
    for row in res.flagged.itertuples():
        print(f"warning: {row.image} is not a film the models can judge (lung QC: {row.qc})", file=sys.stderr)
    for row in res.unreadable.itertuples():
        print(f"unreadable: {row.image}: {row.reason}", file=sys.stderr)
    if res.predictions.empty:
        print(f"error: none of the {len(args.images)} file(s) could be read", file=sys.stderr)
        return 1
    if not res.lungs_checked:
        print(
            f"warning: profile {args.profile!r} has no lung model: only the image-level checks ran (qc: {UNCHECKED})",
            file=sys.stderr,
        )
    what = f"configuration {res.run_id} ({res.models.n_models} fold models)" if res.models.n_models > 1 else f"run {res.run_id}"
    print(f"{what}: {len(res.predictions)} prediction(s) in {out / 'predictions.csv'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    if argv is None:
        config.reexec_with_runtime_env()
    args = _parser().parse_args(argv)
    try:
        return _predict(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
