"""A real "unknown": does the open-set score tell flowers the model never saw from the ones it knows?

    .venv/bin/python bench/open_set.py --json bench/out/open_set.json            # ~30 min on 2 busy cores
    .venv/bin/python bench/open_set.py --ood-per-class 5 --no-int8               # a smoke run

A flower_photos model (default: bench/out/sbs/new-flower_photos, a default-recipe run) is copied to --work (the
original is never written), with its split.csv rewritten to absolute paths. Then, as a user would:
1. `visiontune.evaluate(copy)` fits the unknown score on its train split and chooses the threshold on its val split;
2. the copy (ONNX Runtime, fp32 exported in memory) predicts its test split (in distribution) and the test split of
   oxford102 without the classes that are flower_photos' own or look like them (EXCLUDED, printed);
3. both scores are compared on the same images: AUROC (in distribution vs unseen classes) and the false-accept rate
   at 95 % true-accept (the share of unseen-class images scored as known at the threshold that accepts 95 % of the
   test split), for the top probability (calibrated) and for the unknown score; and the decisions the model makes
   with its stored thresholds: `unknown` (the score's) and `uncertain` (the top probability's). The same again for
   24 synthetic images far from any photo (SYNTHETIC: uniform and blocky noise, flat colours, checkerboards, a
   gradient), written to --work;
4. unless --no-int8: the copy is exported to INT8 and step 2-3 repeated with model.int8.onnx, with the share of
   images on which INT8 and fp32 make the same unknown decision.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
DEFAULT_RUN = ROOT / "bench" / "out" / "sbs" / "new-flower_photos"
# oxford102 classes left out of the unseen set: flower_photos' five, and flowers a person (or the model) could
# fairly call one of them: daisy-like composites and single dahlias, dandelion-like yellow composites, roses and
# rose-like camellias, sunflower-like rudbeckias, and flowers named or shaped like tulips.
EXCLUDED = {
    "daisy": ["oxeye daisy", "barbeton daisy", "osteospermum", "english marigold", "mexican aster", "gazania",
              "purple coneflower", "blanket flower", "japanese anemone", "windflower", "tree poppy",
              "bishop of llandaff", "orange dahlia", "pink-yellow dahlia"],
    "dandelion": ["common dandelion", "colt's foot"],
    "roses": ["rose", "camellia", "desert-rose", "lenten rose"],
    "sunflowers": ["sunflower", "black-eyed susan"],
    "tulips": ["siam tulip", "magnolia", "spring crocus"],
}


def synthetic_images(folder: Path) -> list[str]:
    """24 PNGs far from any photo, the same every time (seeded)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:224, :224]
    images = {f"noise-{i}": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for i in range(10)}
    for i in range(5):
        blocks = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((224, 224), Image.NEAREST)
        images[f"blocky-{i}"] = np.asarray(blocks)
    for name, rgb in (("gray", (128, 128, 128)), ("black", (0, 0, 0)), ("white", (255, 255, 255)),
                      ("blue", (30, 60, 200)), ("red", (200, 30, 30))):
        images[f"flat-{name}"] = np.tile(np.array(rgb, np.uint8), (224, 224, 1))
    for square in (8, 16, 32):
        images[f"checkerboard-{square}"] = (((yy // square + xx // square) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    images["gradient"] = np.stack([xx, yy, 223 - xx], axis=2).astype(np.uint8)
    paths = []
    for name, rgb in images.items():
        Image.fromarray(np.ascontiguousarray(rgb)).save(folder / f"{name}.png")
        paths.append(str(folder / f"{name}.png"))
    return paths


def copy_run(run: Path, work: Path) -> Path:
    """The files a run needs to be evaluated and exported, with split.csv's paths made absolute."""
    target = work / run.name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in ("model.json", "model.safetensors", "config.yaml", "metrics.json", "history.csv"):
        if (run / name).is_file():
            shutil.copy2(run / name, target / name)
    with open(run / "split.csv", newline="") as src, open(target / "split.csv", "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["path", "label", "split"])
        for row in csv.DictReader(src):
            writer.writerow([str((run / row["path"]).resolve()), row["label"], row["split"]])
    return target


def rows(manifest: Path, split: str) -> list[tuple[str, str]]:
    with open(manifest, newline="") as fh:
        return [(str((manifest.parent / r["path"]).resolve()), r["label"]) for r in csv.DictReader(fh)
                if r["split"] == split]


def unseen_images(split: str, per_class: int | None, seed: int = 0) -> tuple[list[str], list[str]]:
    """(paths, labels) of oxford102's `split` images of the classes not EXCLUDED (at most `per_class` each)."""
    excluded = {name for names in EXCLUDED.values() for name in names}
    found = rows(DATASETS / "oxford102" / "split_official.csv", split)
    known = {label for _, label in found}
    missing = sorted(excluded - known)
    if missing:
        sys.exit(f"EXCLUDED names classes oxford102 does not have: {missing}")
    by_class: dict[str, list[str]] = {}
    for path, label in found:
        if label not in excluded:
            by_class.setdefault(label, []).append(path)
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for label in sorted(by_class):
        chosen = by_class[label]
        if per_class and len(chosen) > per_class:
            chosen = sorted(rng.choice(chosen, per_class, replace=False).tolist())
        paths += chosen
        labels += [label] * len(chosen)
    return paths, labels


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an unseen-class image scores as more unknown than an in-distribution one), ties counting half."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def far_at_tar(inside: np.ndarray, outside: np.ndarray, tar: float = 0.95) -> float:
    """Share of unseen-class images accepted at the threshold that accepts `tar` of the in-distribution ones
    (higher score = more unknown; accepted = score at or below the threshold)."""
    threshold = np.sort(inside)[min(len(inside) - 1, int(np.ceil(tar * len(inside))) - 1)]
    return float(np.mean(outside <= threshold))


def score(model, paths: list[str], what: str) -> dict:
    """Each image's top probability, unknown score and decisions, through `Classifier.predict`."""
    started = time.perf_counter()
    predictions = [p for p in model.predict(paths, top_k=1) if not p.error]
    seconds = time.perf_counter() - started
    print(f"  {what}: {len(predictions)} images in {seconds:.0f} s ({model.engine_name})", file=sys.stderr, flush=True)
    return {"probability": np.array([p.probability for p in predictions]),
            "score": np.array([p.unknown_score for p in predictions]),
            "unknown": np.array([p.unknown for p in predictions]),
            "uncertain": np.array([p.uncertain for p in predictions]), "seconds": round(seconds, 1)}


def compare(inside: dict, outside: dict) -> dict:
    """The two scores side by side (higher = more unknown: the top probability is negated)."""
    return {
        "max_probability": {"auroc": auroc(-inside["probability"], -outside["probability"]),
                            "far_at_95_tar": far_at_tar(-inside["probability"], -outside["probability"])},
        "unknown_score": {"auroc": auroc(inside["score"], outside["score"]),
                          "far_at_95_tar": far_at_tar(inside["score"], outside["score"])},
        "stored_thresholds": {
            "unknown": {"test_flagged": float(np.mean(inside["unknown"])),
                        "unseen_flagged": float(np.mean(outside["unknown"]))},
            "uncertain": {"test_flagged": float(np.mean(inside["uncertain"])),
                          "unseen_flagged": float(np.mean(outside["uncertain"]))},
            "unknown_or_uncertain": {"test_flagged": float(np.mean(inside["unknown"] | inside["uncertain"])),
                                     "unseen_flagged": float(np.mean(outside["unknown"] | outside["uncertain"]))}},
    }


def table(results: dict) -> str:
    lines = ["| engine | images | score | AUROC | false-accept at 95 % true-accept |", "|---|---|---|---|---|"]
    for engine, r in results.items():
        for images, part in (("unseen flowers", r), ("synthetic", r["synthetic"])):
            for key, name in (("max_probability", "top probability (calibrated)"), ("unknown_score", "unknown score")):
                lines.append(f"| {engine} | {images} | {name} | {part[key]['auroc']:.4f} | "
                             f"{part[key]['far_at_95_tar']:.2%} |")
    lines += ["", "| engine | flag (stored threshold) | test images flagged | unseen flowers flagged | "
                  "synthetic flagged |", "|---|---|---|---|---|"]
    for engine, r in results.items():
        for flag, values in r["stored_thresholds"].items():
            lines.append(f"| {engine} | {flag.replace('_', ' ')} | {values['test_flagged']:.2%} | "
                         f"{values['unseen_flagged']:.2%} | "
                         f"{r['synthetic']['stored_thresholds'][flag]['unseen_flagged']:.2%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import visiontune
    from visiontune.inference import Classifier

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(DEFAULT_RUN), help="a flower_photos run (copied, never written)")
    parser.add_argument("--work", default="/tmp/visiontune-open-set", help="where the copy goes (replaced)")
    parser.add_argument("--ood-split", default="test", choices=("train", "val", "test"), help="oxford102 split")
    parser.add_argument("--ood-per-class", type=int, help="at most this many unseen-class images per class (seeded)")
    parser.add_argument("--no-int8", action="store_true", help="skip the INT8 export and its scores")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)

    print("left out of the unseen classes (flower_photos' own and look-alikes):", file=sys.stderr)
    for cls, names in EXCLUDED.items():
        print(f"  {cls}: {', '.join(names)}", file=sys.stderr)
    run = copy_run(Path(args.run), Path(args.work))
    started = time.perf_counter()
    evaluation = visiontune.evaluate(run, gradcam_images=0, top_losses=0)
    fit_seconds = time.perf_counter() - started
    entry = evaluation.metrics["open_set"]
    print(f"evaluate (fit + threshold + test scoring): {fit_seconds:.0f} s; threshold {entry['threshold']:.3f}",
          file=sys.stderr)
    test_paths = [p for p, _ in rows(run / "split.csv", "test")]
    unseen, unseen_labels = unseen_images(args.ood_split, args.ood_per_class)
    print(f"{len(test_paths)} test images, {len(unseen)} unseen-class images of {len(set(unseen_labels))} classes",
          file=sys.stderr)

    results, raw = {}, {}
    engines = [("onnx fp32", Classifier.load(run, "onnx"))]
    if not args.no_int8:
        started = time.perf_counter()
        export = visiontune.api.export(run, precision="int8")
        print(f"{export.summary()}", file=sys.stderr)
        engines.append(("onnx int8", Classifier.load(export.path)))
    synthetic = synthetic_images(Path(args.work) / "synthetic")
    for name, model in engines:
        inside, outside = score(model, test_paths, "test"), score(model, unseen, "unseen")
        results[name] = compare(inside, outside)
        far = score(model, synthetic, "synthetic")
        results[name]["synthetic"] = compare(inside, far)
        results[name]["synthetic"]["per_image"] = {
            Path(p).stem: {"probability": round(float(pr), 4), "unknown_score": round(float(sc), 4),
                           "unknown": bool(u), "uncertain": bool(un)}
            for p, pr, sc, u, un in zip(synthetic, far["probability"], far["score"], far["unknown"], far["uncertain"])}
        raw[name] = (inside, outside)
    if "onnx int8" in raw:
        (f_in, f_out), (q_in, q_out) = raw["onnx fp32"], raw["onnx int8"]
        results["onnx int8"]["unknown_agreement_with_fp32"] = {
            "test": float(np.mean(f_in["unknown"] == q_in["unknown"])),
            "unseen": float(np.mean(f_out["unknown"] == q_out["unknown"]))}
        moved = np.abs(np.r_[q_in["score"] - f_in["score"], q_out["score"] - f_out["score"]])
        results["onnx int8"]["score_abs_difference"] = {"median": float(np.median(moved)),
                                                        "p99": float(np.percentile(moved, 99)),
                                                        "max": float(moved.max()), "threshold": entry["threshold"]}
    out = {**describe(), "run": str(Path(args.run).resolve()), "excluded": EXCLUDED,
           "open_set": {k: v for k, v in entry.items() if k != "fingerprint"}, "evaluate_seconds": round(fit_seconds, 1),
           "test_images": len(test_paths), "unseen_images": len(unseen), "unseen_classes": len(set(unseen_labels)),
           "results": results}
    print(table(results))
    if "onnx int8" in results:
        print(f"INT8 vs fp32 unknown decision agreement: {results['onnx int8']['unknown_agreement_with_fp32']}; "
              f"|score difference|: {results['onnx int8']['score_abs_difference']}")
    save_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
