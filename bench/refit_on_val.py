"""The refit judged on a validation split, never on test: the benchmark's val images become the scored split, and a
stratified part of its train images (as large a share as val is of train + val in the real split) becomes the
validation split the run chooses on. Then `--no-refit` (train on train', choose on val') against the refit (choose on
val', train on train' + val'), each scored on the real val split.

    .venv/bin/python bench/refit_on_val.py --data oxford102/split_official.csv
    .venv/bin/python bench/refit_on_val.py --data flower_photos/split.csv --extra "--folds 5"

With --variant (repeatable), refit runs only, one per variant's flags, all scored on the real val split:

    .venv/bin/python bench/refit_on_val.py --data oxford102/split_official.csv --variant "--views 4" --variant "--views 8"
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def derived_manifest(source: Path, out: Path, seed: int = 0) -> Path:
    """path,label,split with absolute paths: train -> train' + val', val -> test, the real test left out."""
    rows = list(csv.DictReader(open(source, newline="")))
    train = [r for r in rows if r["split"] == "train"]
    share = sum(r["split"] == "val" for r in rows) / max(1, sum(r["split"] in ("train", "val") for r in rows))
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[dict]] = {}
    for r in train:
        by_label.setdefault(r["label"], []).append(r)
    held = set()
    for members in by_label.values():
        order = rng.permutation(len(members))
        held.update(id(members[i]) for i in order[: max(1, round(share * len(members)))])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        for r in rows:
            split = {"train": "val" if id(r) in held else "train", "val": "test"}.get(r["split"])
            if split:
                writer.writerow([str((source.parent / r["path"]).resolve()), r["label"], split])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="flower_photos/split.csv", help="relative to ../shared/datasets")
    parser.add_argument("--extra", default="--cache-dir bench/out/cache", help="flags of both runs")
    parser.add_argument("--refit-extra", default="", help="flags of the refit run only (e.g. --folds 5)")
    parser.add_argument("--variant", action="append", default=[], help="refit runs only: these flags (repeat)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "refit_on_val"))
    args = parser.parse_args(argv)
    name = Path(args.data).parent.name
    manifest = derived_manifest(train_benchmark.DATASETS / args.data, Path(args.out) / f"{name}.csv")
    rel = manifest.relative_to(train_benchmark.DATASETS) if manifest.is_relative_to(train_benchmark.DATASETS) else manifest
    runs = ([f"{args.extra} {variant}" for variant in args.variant] if args.variant else
            [f"{args.extra} --no-refit", f"{args.extra} {args.refit_extra}".strip()])
    train_benchmark.main(["--data", str(rel), "--no-tta", "--out", str(Path(args.out) / name),
                          "--json", str(Path(args.out) / f"{name}.json"), *[a for r in runs for a in ("--extra", r)]])


if __name__ == "__main__":
    main()
