"""Grad-CAM on a trained run: how long one explanation takes, and how faithful the maps are.

Timing (one process, after warm-up, torch's default threads): a single Grad-CAM of one 224-px crop
(forward + backward + map + overlay), the same end-to-end from a JPEG file through `Classifier.explain`,
and the per-image time when 8 crops are explained in one call. Faithfulness: deletion / insertion areas
(and their random-order baselines) over every image of the split, through `visiontune.explain`.

    .venv/bin/python bench/explain_benchmark.py --run bench/out/train/flower_photos-efficientnet_lite0-0 \
        --example docs/gradcam_example.png
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


def split_paths(split_file: Path, split: str) -> list[Path]:
    with open(split_file, newline="") as fh:
        return [split_file.parent / row["path"] for row in csv.DictReader(fh) if row["split"] == split]


def split_labels(split_file: Path) -> dict[str, str]:
    """Path -> label from the split file (oxford102's folders are numbers, its labels are names)."""
    with open(split_file, newline="") as fh:
        return {str(split_file.parent / row["path"]): row["label"] for row in csv.DictReader(fh)}


def timed(fn, runs: int, warmup: int = 3) -> dict:
    """p50 / p95 of `fn`'s wall time, with `visiontune bench`'s own timing loop."""
    from visiontune.inference.bench import _percentiles, _time_calls

    ms = _percentiles(_time_calls(fn, runs, warmup))
    return {"p50_ms": round(ms["p50"], 1), "p95_ms": round(ms["p95"], 1), "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(ROOT / "bench" / "out" / "train" / "flower_photos-efficientnet_lite0-0"))
    parser.add_argument("--data", default="flower_photos/split.csv", help="relative to ../shared/datasets")
    parser.add_argument("--split", default="test")
    parser.add_argument("--runs", type=int, default=50, help="timed single explanations")
    parser.add_argument("--methods", default="gradcam", help="comma-separated, for the timing")
    parser.add_argument("--limit", type=int, default=0, help="faithfulness on the first N images only (0: all)")
    parser.add_argument("--example", help="also write a grid PNG of 8 explained images here")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)

    import torch

    import visiontune
    from visiontune.data.loader import load_for_model
    from visiontune.explain.runner import load_explainer
    from visiontune.inference import Classifier

    paths = split_paths(DATASETS / args.data, args.split)
    report = {**describe(), "run": args.run, "data": args.data, "split": args.split,
              "torch_threads": torch.get_num_threads(), "timing": {}}
    clf = Classifier.load(args.run)
    for method in args.methods.split(","):
        explainer = load_explainer(args.run, method)
        one = load_for_model(paths[0], explainer.preprocess)[None]
        eight = np.stack([load_for_model(p, explainer.preprocess) for p in paths[:8]])
        single = timed(lambda: explainer.explain(one), args.runs)
        from_jpeg = timed(lambda: clf.explain(paths[0], method=method), args.runs)
        batch = timed(lambda: explainer.explain(eight), max(5, args.runs // 8))
        report["timing"][method] = {"single_crop": single, "single_from_jpeg": from_jpeg,
                                    "per_image_in_batch_of_8_ms": round(batch["p50_ms"] / 8, 1),
                                    "layer": explainer.layer.name}
        print(json.dumps({method: report["timing"][method]}), flush=True)

    chosen = paths[: args.limit] if args.limit else paths
    started = time.perf_counter()
    result = visiontune.api.explain(args.run, chosen, faithfulness=True)
    faith = dict(result.faithfulness)
    faith["seconds"] = round(time.perf_counter() - started, 1)
    labels = split_labels(DATASETS / args.data)
    for name, right in (("right", True), ("wrong", False)):
        rows = [r for r in result.per_image if (labels[r["source"]] == r["target"]) == right]
        faith[f"{name}_predictions"] = {"images": len(rows), **{k: round(float(np.mean([r[k] for r in rows])), 4)
                                        for k in ("deletion", "insertion") if rows}}
    report["faithfulness"] = faith
    print(json.dumps({"faithfulness": faith}), flush=True)
    if args.example:
        picks = paths[:: max(1, len(paths) // 8)][:8]
        visiontune.api.explain(args.run, picks, out=Path(args.example).parent / ".explain_example", grid=True)
        grid = Path(args.example).parent / ".explain_example" / "grid.gradcam.png"
        grid.replace(args.example)
        grid.parent.rmdir()
        report["example"] = args.example
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
