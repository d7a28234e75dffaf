"""What the near-duplicate check finds on the benchmark datasets: the difference hash's candidate pairs (within
`--near-duplicate-distance` bits), the groups the hash alone would make, and the groups `scan` reports now that each
pair is confirmed on 32 x 32 thumbnails. Every candidate pair is printed with its two agreement scores (tones: pixel
correlation; detail: high-passed correlation, each at the best shift of up to 2 px), so a pair near a threshold can
be looked at. The scan is timed as a user waits for it (one process here: `--workers 1` by default).

    .venv/bin/python bench/near_duplicates.py                      # both datasets, their fixed split files
    .venv/bin/python bench/near_duplicates.py --json out.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402
from visiontune.config import ScanConfig  # noqa: E402
from visiontune.data import dedup  # noqa: E402
from visiontune.data.index import load_dataset  # noqa: E402
from visiontune.data.integrity import check_files, file_thumbnail, scan_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
DEFAULT = ["flower_photos/split.csv", "oxford102/split_official.csv"]


def measure(manifest: Path, cfg: ScanConfig) -> dict:
    dataset = load_dataset(manifest)
    start = time.perf_counter()
    report = scan_dataset(dataset, cfg, quiet=True)
    seconds = time.perf_counter() - start
    paths = [str(dataset.abspath(i)) for i in range(len(dataset))]
    hashes = np.array([c.dhash if not c.problem else 0 for c in check_files(paths, cfg, quiet=True)], dtype=np.uint64)
    candidates = dedup.candidate_pairs(hashes, report.usable, cfg.near_duplicate_distance, report.exact_duplicates)
    pairs = []
    for p, q in candidates:
        tones, detail = dedup.picture_agreement(file_thumbnail((paths[p], cfg)), file_thumbnail((paths[q], cfg)))
        kept = tones >= cfg.near_duplicate_correlation and detail >= dedup.MIN_DETAIL
        pairs.append({"files": [dataset.paths[p], dataset.paths[q]], "tones": round(tones, 3),
                      "detail": round(detail, 3), "kept": kept})
    by_hash = dedup.group_pairs(candidates, report.exact_duplicates)
    splits = dataset.splits
    return {"manifest": str(manifest), "files": len(dataset), "scan_seconds": round(seconds, 1),
            "candidate_pairs": len(candidates), "confirmed_pairs": sum(p["kept"] for p in pairs),
            "groups_by_hash_alone": len(by_hash),
            "largest_group_by_hash_alone": max((len(g) for g in by_hash), default=0),
            "crossing_by_hash_alone": sum(len({int(splits[i]) for i in g}) > 1 for g in by_hash),
            "near_groups": len(report.near_duplicates),
            "near_crossing": sum(len({int(splits[i]) for i in g}) > 1 for g in report.near_duplicates),
            "exact_groups": len(report.exact_duplicates), "crossing_splits": len(report.leaks), "pairs": pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=",".join(DEFAULT), help="manifests under ../shared/datasets, comma-separated")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    cfg = ScanConfig(workers=args.workers)
    results = []
    for name in args.data.split(","):
        result = measure(DATASETS / name, cfg)
        results.append(result)
        print(f"{name}: {result['files']} files, scan {result['scan_seconds']} s; hash candidates "
              f"{result['candidate_pairs']} pairs -> {result['groups_by_hash_alone']} group(s) "
              f"({result['crossing_by_hash_alone']} crossing splits); confirmed {result['confirmed_pairs']} pairs -> "
              f"{result['near_groups']} near group(s) ({result['near_crossing']} crossing splits); "
              f"{result['exact_groups']} exact group(s); {result['crossing_splits']} group(s) of either kind crossing")
        for p in result["pairs"]:
            print(f"  {'kept   ' if p['kept'] else 'DROPPED'} tones {p['tones']:.3f} detail {p['detail']:.3f}  "
                  f"{p['files'][0]}  {p['files'][1]}")
    save_json(args.json, {"machine": describe(), "results": results})


if __name__ == "__main__":
    main()
