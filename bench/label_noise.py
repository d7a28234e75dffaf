"""How well `visiontune doctor` finds wrong labels: flip a known share of the training labels at random (seeded),
run the doctor on the noisy manifest, and score its ranked list of likely mislabelled images against the flips.

For k = the number of flipped images: precision = flipped images among the top k flagged / the top k flagged (all
of them when fewer than k are flagged), recall = flipped images among the top k flagged / k. The clean manifest is
run too: what the doctor flags there is either a real label problem of the dataset or a false alarm (look at them).

Each doctor run is its own process (`visiontune doctor ... --json`), timed as a user waits. With the train
benchmarks' `--cache-dir`, the backbone's features come from their cache (same files, same order, same model).

    .venv/bin/python bench/label_noise.py                                          # the defaults, flip seed 0
    .venv/bin/python bench/label_noise.py --l2 0.03,0.1,0.3,1 --rank-by self_confidence,margin --seeds 0
    .venv/bin/python bench/label_noise.py --seeds 0,1,2 --no-clean
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


def noisy_manifest(data: Path, out: Path, rate: float, seed: int) -> dict[str, str]:
    """`out`: the manifest `data` with `rate` of its training rows given another label (uniformly among the others);
    returns {absolute path: its true label} of the rows flipped. Row order is kept, so the cached features still
    match."""
    with open(data, newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = sorted({r["label"] for r in rows})
    train = [i for i, r in enumerate(rows) if r.get("split", "train") == "train"]
    rng = np.random.default_rng(seed)
    flipped = rng.choice(train, size=int(round(rate * len(train))), replace=False)
    truth = {int(i): rows[i]["label"] for i in flipped}
    for i in flipped:
        others = [c for c in classes if c != rows[i]["label"]]
        rows[i]["label"] = others[int(rng.integers(len(others)))]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "path": os.path.relpath(data.parent / r["path"], out.parent)})
    return {os.path.abspath(data.parent / rows[i]["path"]): truth[int(i)] for i in flipped}


def doctor(manifest: Path, out: Path, extra: list[str]) -> tuple[dict, float, str]:
    exe = Path(sys.executable).with_name("visiontune")
    cmd = [str(exe), "doctor", str(manifest), "--out", str(out), "--overwrite", "--json", *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"doctor failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout), wall, shlex.join(["visiontune", *cmd[1:]])


CUT_OFFS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)


def score(report: dict, flipped: dict[str, str]) -> dict:
    ranked = [i["path"] for i in report["issues"] if i["kind"] == "mislabel"]
    k = len(flipped)
    top = ranked[:k]
    hits = sum(p in flipped for p in top)
    return {"flipped": k, "flagged": len(ranked), "caught_among_all_flagged": sum(p in flipped for p in ranked),
            "precision_at_k": hits / len(top) if top else 0.0, "recall_at_k": hits / k if k else 0.0,
            "relabels": relabel_precision(report, flipped)}


def relabel_precision(report: dict, flipped: dict[str, str] | None) -> list[dict]:
    """Per cut-off on the suggested label's out-of-fold probability: how many likely-mislabelled images a fixed
    manifest would relabel, and (with the flips known) how many of those were flipped and how many get their true
    label back (the precision that matters: a relabel that is right)."""
    rows = []
    for cut in CUT_OFFS:
        chosen = [i for i in report["issues"] if i["kind"] == "mislabel" and i["suggested"]
                  and (i["suggested_probability"] or 0.0) >= cut]
        row = {"cut_off": cut, "relabelled": len(chosen)}
        if flipped is not None:
            right = sum(flipped.get(i["path"]) == i["suggested"] for i in chosen)
            row.update(flipped=sum(i["path"] in flipped for i in chosen), right=right,
                       precision=right / len(chosen) if chosen else None,
                       recall=right / len(flipped) if flipped else None)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="flower_photos/split.csv", help="relative to ../shared/datasets")
    parser.add_argument("--rate", type=float, default=0.05, help="share of the training labels flipped")
    parser.add_argument("--seeds", default="0", help="flip seeds, comma-separated")
    parser.add_argument("--l2", default="", help="doctor --l2 values to try, comma-separated (default: its own)")
    parser.add_argument("--rank-by", default="", help="doctor --rank-by values to try (default: its own)")
    parser.add_argument("--cache-dir", default=str(ROOT / "bench" / "out" / "cache"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "label_noise")
    parser.add_argument("--no-clean", action="store_true", help="skip the run on the clean manifest")
    parser.add_argument("--json", help="write the results here (default: OUT/results.json)")
    args = parser.parse_args(argv)
    data = DATASETS / args.data
    common = ["--cache-dir", args.cache_dir, "--quiet"]
    variants = [[]]
    for flag, values in (("--l2", args.l2), ("--rank-by", args.rank_by)):
        if values:
            variants = [v + [flag, x] for v in variants for x in values.split(",")]
    result = {**describe(), "data": args.data, "rate": args.rate, "runs": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        manifest = args.out / f"noisy-{seed}.csv"
        flipped = noisy_manifest(data, manifest, args.rate, seed)
        for extra in variants:
            report, wall, command = doctor(manifest, args.out / f"noisy-{seed}", common + extra)
            row = {"seed": seed, "settings": report["summary"]["settings"], **score(report, flipped),
                   "agreement": report["summary"]["out_of_fold_agreement"], "features": report["summary"]["features"],
                   "counts": report["summary"]["counts"], "wall_seconds": round(wall, 1), "command": command}
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
    if not args.no_clean:
        report, wall, command = doctor(data, args.out / "clean", common)
        mislabels = [i for i in report["issues"] if i["kind"] == "mislabel"]
        result["clean"] = {"counts": report["summary"]["counts"], "agreement": report["summary"]["out_of_fold_agreement"],
                           "relabels": relabel_precision(report, None),
                           "wall_seconds": round(wall, 1), "command": command,
                           "top": [{k: i[k] for k in ("path", "split", "given", "suggested", "given_probability",
                                                      "suggested_probability")} for i in mislabels[:20]]}
        print(json.dumps({k: v for k, v in result["clean"].items() if k != "top"}), flush=True)
    save_json(args.json or str(args.out / "results.json"), result)
    return result


if __name__ == "__main__":
    main()
