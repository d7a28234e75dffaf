"""The unknown score on the second benchmark dataset: an oxford102 model trained on half of its classes, against the
test images of the other half (species it never saw, of the same kind of photo) and 24 synthetic images.

    .venv/bin/python bench/open_set_holdout.py --json bench/out/open_set_holdout.json     # ~6 min on 2 quiet cores

bench/open_set.py and open_set_variants.py chose the score and its settings on a flower_photos model; this checks
them on oxford102 official (10 training and 10 validation images a class, so the 200-a-class sample is every
training image). Steps:
1. a manifest of the known classes (a seeded half of the 102, all three splits, absolute paths) in --work;
2. `visiontune train` on it with the defaults (its evaluation fits the unknown score and chooses its threshold on the
   known classes' validation images, as for any run);
3. the run's pooled features and logits (ONNX Runtime, centre crops) of its train, val and test images, of the
   held-out classes' test images and of the synthetic ones;
4. each candidate score fitted on the training features and compared: AUROC (known test vs held-out test), the
   held-out share accepted at the threshold that accepts 95 % of the known test images, and with the rule evaluation
   uses (95 % of validation accepted) the share of synthetic and of known test images flagged. "unknown score (the
   run's)" is the fit the run stored, scored as its graph does; the top probability uses the run's temperature.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402
from open_set import DATASETS, auroc, far_at_tar, rows, synthetic_images  # noqa: E402
from open_set_variants import from_logits, knn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VISIONTUNE = Path(sys.executable).parent / "visiontune"


def known_manifest(source: Path, share: float, seed: int, target: Path) -> tuple[list[str], list[str]]:
    """Write the known classes' rows to `target` (absolute paths); (known classes, held-out classes)."""
    with open(source, newline="") as fh:
        table = list(csv.DictReader(fh))
    classes = sorted({r["label"] for r in table})
    order = np.random.default_rng(seed).permutation(len(classes))
    known = sorted(classes[i] for i in order[:round(share * len(classes))])
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        writer.writeheader()
        for r in table:
            if r["label"] in known:
                writer.writerow({"path": str((source.parent / r["path"]).resolve()), "label": r["label"],
                                 "split": r["split"]})
    return known, sorted(set(classes) - set(known))


def features(run: Path, sets: dict[str, list[str]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{set: (logits, pooled features)} through the run's network, one traced graph for all sets."""
    from visiontune.evaluation.features import RunNetwork

    network = RunNetwork(run)
    out = {}
    for name, paths in sets.items():
        chunks = [c for c in network.iter(paths, onnx=True, desc=name, quiet=False) if len(c.indices)]
        out[name] = (np.concatenate([c.logits for c in chunks]), np.concatenate([c.features for c in chunks]))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATASETS / "oxford102" / "split_official.csv"))
    parser.add_argument("--known-share", type=float, default=0.5, help="share of the classes the model learns")
    parser.add_argument("--seed", type=int, default=0, help="which classes are known")
    parser.add_argument("--work", default=str(ROOT / "bench" / "out" / "open_set_holdout"))
    parser.add_argument("--cache-dir", default=str(ROOT / "bench" / "out" / "cache"),
                        help="training's view cache (shared with the train benchmarks)")
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--reuse", action="store_true", help="keep --work's run and features from an earlier run "
                                                                 "(to try other --dims)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from visiontune.models import open_set
    from visiontune.models.bundle import read_meta

    work, source = Path(args.work), Path(args.data)
    known, held_out = known_manifest(source, args.known_share, args.seed, work / "known.csv")
    run = work / "run"
    if not (args.reuse and (run / "metrics.json").is_file()):
        subprocess.run([str(VISIONTUNE), "train", str(work / "known.csv"), "--out", str(run), "--overwrite", "--quiet",
                        "--cache-dir", args.cache_dir], check=True)
    cache = work / "features.npz"
    if args.reuse and cache.is_file():
        stored_arrays = np.load(cache)
        got = {k[:-7]: (stored_arrays[k], stored_arrays[k[:-7] + "_pooled"]) for k in stored_arrays.files
               if k.endswith("_logits")}
    else:
        manifest = work / "known.csv"
        sets = {split: [p for p, _ in rows(manifest, split)] for split in ("train", "val", "test")}
        sets["held_out"] = [p for p, label in rows(source, "test") if label in set(held_out)]
        sets["synthetic"] = synthetic_images(work / "synthetic")
        got = features(run, sets)
        np.savez(cache, **{f"{k}_logits": v[0] for k, v in got.items()}, **{f"{k}_pooled": v[1] for k, v in got.items()})

    meta = read_meta(run)
    temperature = float((meta.extra.get("calibration") or {}).get("temperature", 1.0))
    stored = open_set.read_fit(run)
    candidates = {"top probability (calibrated)": ("logits", from_logits("top probability", temperature))}
    candidates["unknown score (the run's: k-NN cosine, 16 PCA, centred)"] = ("features", stored.score)
    candidates["k-NN cosine (raw features)"] = ("features", knn(got["train"][1], None))
    for d in args.dims:
        candidates[f"k-NN cosine ({d} PCA, centred)"] = ("features", knn(got["train"][1], d))
    results = []
    for name, (kind, fn) in candidates.items():
        s = {k: np.asarray(fn(v[0] if kind == "logits" else v[1]), np.float64) for k, v in got.items()}
        threshold = open_set.accept_threshold(s["val"], 0.95)
        results.append({"score": name, "auroc": auroc(s["test"], s["held_out"]),
                        "far_at_95_tar": far_at_tar(s["test"], s["held_out"]),
                        "synthetic_auroc": auroc(s["test"], s["synthetic"]),
                        "synthetic_flagged": float(np.mean(s["synthetic"] > threshold)),
                        "test_flagged": float(np.mean(s["test"] > threshold)),
                        "held_out_flagged": float(np.mean(s["held_out"] > threshold))})
    metrics = run_summary(run)
    out = {**describe(), "known_classes": len(known), "held_out_classes": held_out,
           "images": {k: len(v[0]) for k, v in got.items()}, "run": metrics, "results": results}
    print(f"known {len(known)} classes, held out {len(held_out)}; run: {metrics}")
    print("| score | held-out AUROC | held-out accepted at 95 % true-accept | synthetic AUROC | flagged (val rule): "
          "test / held-out / synthetic |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['score']} | {r['auroc']:.3f} | {r['far_at_95_tar']:.1%} | {r['synthetic_auroc']:.3f} | "
              f"{r['test_flagged']:.1%} / {r['held_out_flagged']:.1%} / {r['synthetic_flagged']:.0%} |")
    save_json(args.json, out)
    return out


def run_summary(run: Path) -> dict:
    """The run's own test top-1 and its stored unknown entry."""
    import json

    m = json.loads((run / "metrics.json").read_text())
    evaluation = m.get("evaluation", {})
    return {"test_top1": evaluation.get("top1"), "open_set": evaluation.get("open_set")}


if __name__ == "__main__":
    main()
