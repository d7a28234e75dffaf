"""`visiontune <verb>`: parses arguments, calls the Python API, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from visiontune.config import ScanConfig, SplitConfig
from visiontune.errors import VisiontuneError


def _data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="class folders, split folders, a CSV manifest (path,label[,split]), "
                                     "or an embedded sample name (flowers-mini)")
    parser.add_argument("--root", help="folder a manifest's relative paths start from (default: the manifest's folder)")


def _scan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-side", type=int, default=ScanConfig.min_side,
                        help="images whose shorter side is smaller are skipped (default %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=ScanConfig.max_pixels,
                        help="images with more pixels are refused as decompression bombs (default %(default)s)")
    parser.add_argument("--workers", type=int, default=ScanConfig.workers, help="processes (default: one per core)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _scan_config(args: argparse.Namespace) -> ScanConfig:
    return ScanConfig(min_side=args.min_side, max_pixels=args.max_pixels, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    from visiontune import __version__

    parser = argparse.ArgumentParser(prog="visiontune", description="Transfer-learning image classification, fast on a CPU.")
    parser.add_argument("--version", action="version", version=f"visiontune {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    scan = verbs.add_parser("scan", help="check a dataset's files, classes and duplicates; never changes a file")
    _data_argument(scan)
    _scan_arguments(scan)
    scan.add_argument("--json", action="store_true", help="print the full report as JSON")
    scan.add_argument("--strict", action="store_true", help="exit 1 when there are error-level findings (e.g. leakage)")
    scan.set_defaults(run=cmd_scan)

    split = verbs.add_parser("split", help="stratified train/val/test split, written as path,label,split")
    _data_argument(split)
    split.add_argument("--val", type=float, default=SplitConfig.val, help="fraction of each class (default %(default)s)")
    split.add_argument("--test", type=float, default=SplitConfig.test, help="fraction of each class (default %(default)s)")
    split.add_argument("--seed", type=int, default=SplitConfig.seed, help="same seed, byte-identical output")
    split.add_argument("--min-per-split", type=int, default=SplitConfig.min_per_split,
                       help="fewest images of each class in each split; 0 allows a class to be absent (default %(default)s)")
    split.add_argument("--out", help="CSV to write (paths relative to its folder); default: standard output")
    split.add_argument("--no-check", action="store_true", help="skip decoding every image (bad files then stay in)")
    _scan_arguments(split)
    split.set_defaults(run=cmd_split)
    return parser


def cmd_scan(args: argparse.Namespace) -> int:
    from visiontune.api import scan
    from visiontune.data.scan_text import render_scan

    report = scan(args.data, root=args.root, config=_scan_config(args), quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render_scan(report))
    if report.unusable_reason:
        if args.json:
            print(f"visiontune: error: {report.unusable_reason}", file=sys.stderr)
        return 2
    if args.strict and any(f.level == "error" for f in report.findings):
        return 1
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from visiontune.api import split

    result, report = split(args.data, val=args.val, test=args.test, seed=args.seed, min_per_split=args.min_per_split,
                           out=args.out, root=args.root, check=not args.no_check, scan_config=_scan_config(args),
                           quiet=args.quiet)
    log = sys.stderr
    if report is not None:
        for path, reason in report.skipped():
            print(f"left out: {path}: {reason}", file=log)
    if args.out is None:
        result.write_csv(sys.stdout, relative_to=None)
    if not args.quiet:
        counts = result.counts()
        totals = {s: sum(row[s] for row in counts.values()) for s in ("train", "val", "test")}
        print(f"split: train {totals['train']}, val {totals['val']}, test {totals['test']} "
              f"over {len(counts)} classes (seed {args.seed})", file=log)
        for note in result.notes:
            print(f"note: {note}", file=log)
        if args.out:
            print(f"wrote {args.out}", file=log)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VisiontuneError as exc:
        print(f"visiontune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("visiontune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
