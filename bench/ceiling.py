"""What the backbone can reach on a dataset, to judge the fast recipe against: a long full fine-tune and a linear probe.

1. The linear probe: frozen centre-crop features of the backbone (ImageNet weights, no training), scikit-learn's
   logistic regression with its C chosen on validation; test top-1 of the chosen C.
2. The ceiling: `visiontune train DATA --full-finetune`, every layer, strong augmentation (RandAugment, mixup,
   random resized crops, flips, rotation), cosine schedule, label smoothing, an exponential moving average of the
   weights, until validation stops improving (early stopping) or the epochs run out. Hours on a CPU: run it in the
   background; killed, `--resume` continues it where it stopped (visiontune's own checkpoint, after every epoch).

    .venv/bin/python bench/ceiling.py --data oxford102/split_official.csv --out bench/out/ceiling/oxford
    .venv/bin/python bench/ceiling.py --data oxford102/split_official.csv --out bench/out/ceiling/oxford --resume
    .venv/bin/python bench/ceiling.py --data flower_photos/split.csv --out bench/out/ceiling/flowers --probe-only
"""

from __future__ import annotations

import argparse
import json
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
RECIPE = ["--full-finetune", "--randaugment", "--mixup", "0.2", "--label-smoothing", "0.1", "--schedule", "cosine",
          "--ema", "0.998", "--lr", "3e-4", "--weight-decay", "0.05", "--early-stopping", "8"]


def linear_probe(data: Path, model: str) -> dict:
    """Frozen centre-crop features + logistic regression (C chosen on validation)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from visiontune.config import SPLITS
    from visiontune.data.index import load_dataset
    from visiontune.data.loader import load_all
    from visiontune.data.transforms import center_crop
    from visiontune.models.classifier import build_classifier
    from visiontune.training.feature_cache import FrozenFeatures, FrozenRunner

    started = time.perf_counter()
    dataset = load_dataset(data)
    net, spec = build_classifier(model, len(dataset.classes), dropout=0.0)
    runner = FrozenRunner(FrozenFeatures(net.eval(), None, None), spec.preprocess, torch.device("cpu"), [])
    features, labels = {}, {}
    for code, split in enumerate(SPLITS):
        idx = np.flatnonzero(dataset.splits == code)
        decoded = load_all([str(dataset.abspath(i)) for i in idx], spec.preprocess, workers=0, quiet=True)
        keep = [k for k, img in enumerate(decoded.images) if img is not None]
        crops = [center_crop(decoded.images[k], spec.preprocess.input_size) for k in keep]
        features[split] = np.concatenate([runner(np.stack(crops[k:k + 32]))[1] for k in range(0, len(crops), 32)])
        labels[split] = dataset.labels[idx[keep]]
    scaler = StandardScaler().fit(features["train"])
    x = {s: scaler.transform(f) for s, f in features.items()}
    trials = []
    for c in (0.01, 0.03, 0.1, 0.3, 1.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(x["train"], labels["train"])
        trials.append({"C": c, "val_top1": float(clf.score(x["val"], labels["val"])), "clf": clf})
    best = max(trials, key=lambda t: t["val_top1"])
    return {"model": model, "C_tried": [{"C": t["C"], "val_top1": t["val_top1"]} for t in trials], "C": best["C"],
            "val_top1": best["val_top1"], "test_top1": float(best["clf"].score(x["test"], labels["test"])),
            "seconds": round(time.perf_counter() - started, 1)}


def full_finetune(data: Path, model: str, out: Path, epochs: int, resume: bool) -> dict:
    exe = Path(sys.executable).with_name("visiontune")
    if resume and (out / "checkpoint").is_dir():
        cmd = [str(exe), "train", "--resume", str(out), "--quiet"]
    else:
        cmd = [str(exe), "train", str(data), "--model", model, "--out", str(out), "--overwrite", "--quiet",
               "--epochs", str(epochs), *RECIPE]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-3:], "command": shlex.join(cmd[1:])}
    metrics = json.loads((out / "metrics.json").read_text())
    history = _history(out)
    best = max(history, key=lambda r: float(r["val_acc"] or 0))
    return {"command": shlex.join(cmd[1:]), "wall_seconds_this_call": round(wall, 1),
            "train_seconds_all_calls": round(sum(float(r["seconds"]) for r in history), 1),
            "epochs_run": len(history), "best_epoch": int(best["epoch"]), "val_top1": metrics["val"]["top1"],
            "test_top1": metrics["test"]["top1"],
            "test_top1_evaluated": (metrics.get("evaluation") or {}).get("top1"),
            "val_by_epoch": [round(float(r["val_acc"]), 4) for r in history]}


def _history(out: Path) -> list[dict]:
    import csv

    with open(out / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="flower_photos/split.csv", help="relative to ../shared/datasets")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--out", type=Path, required=True, help="the fine-tune's run directory")
    parser.add_argument("--epochs", type=int, default=40, help="at most (early stopping after 8 without a better val)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted fine-tune in --out")
    parser.add_argument("--probe-only", action="store_true")
    parser.add_argument("--json", help="write the results here (default: OUT.json)")
    args = parser.parse_args(argv)
    data = DATASETS / args.data
    result = {**describe(), "data": args.data, "linear_probe": linear_probe(data, args.model)}
    print(json.dumps(result["linear_probe"]), flush=True)
    if not args.probe_only:
        result["full_finetune"] = full_finetune(data, args.model, args.out, args.epochs, args.resume)
        print(json.dumps(result["full_finetune"]), flush=True)
    save_json(args.json or f"{args.out}.json", result)
    return result


if __name__ == "__main__":
    main()
