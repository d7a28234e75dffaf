"""Multi-label on real photos: 2 x 2 mosaics of flower_photos images (labels = the classes present), generated with a
fixed seed in /tmp; a visiontune multi-label run against a linear probe (per-label logistic regression on the same
backbone's pretrained centre-crop features, thresholds chosen the same way on val), both scored on the same test
images with the same metrics.

    .venv/bin/python bench/multilabel_mosaics.py                     # 400 mosaics, lite0, seed 0
    .venv/bin/python bench/multilabel_mosaics.py --images 1000 --views 4
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import visiontune  # noqa: E402
from machine import describe, save_json  # noqa: E402
from visiontune.data.loader import load_all  # noqa: E402
from visiontune.data.transforms import center_crop, normalize  # noqa: E402
from visiontune.evaluation.multilabel import multilabel_metrics  # noqa: E402
from visiontune.models.classifier import build_classifier  # noqa: E402
from visiontune.training.thresholds import choose_thresholds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "datasets" / "flower_photos"
KEYS = ("mAP", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss")


def make_mosaics(out: Path, images: int, seed: int, side: int = 448) -> Path:
    """Each mosaic: 1 to 3 classes, each tile a different photo of one of them; labels = the classes shown."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in PHOTOS.iterdir() if p.is_dir())
    photos = {c: sorted((PHOTOS / c).glob("*.jpg")) for c in classes}
    out.mkdir(parents=True, exist_ok=True)
    half = side // 2
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels"])
        for i in range(images):
            present = sorted(rng.choice(classes, size=int(rng.integers(1, 4)), replace=False).tolist())
            tiles = present + [present[int(rng.integers(len(present)))] for _ in range(4 - len(present))]
            rng.shuffle(tiles)
            canvas = Image.new("RGB", (side, side))
            for k, c in enumerate(tiles):
                with Image.open(photos[c][int(rng.integers(len(photos[c])))]) as im:
                    canvas.paste(im.convert("RGB").resize((half, half)), ((k % 2) * half, (k // 2) * half))
            canvas.save(out / f"m{i:05d}.jpg", quality=90)
            writer.writerow([f"m{i:05d}.jpg", "|".join(present)])
    return out / "labels.csv"


def read_split(run: Path, labels: list[str]):
    rows = list(csv.DictReader(open(run / "split.csv")))
    paths = [str((run / r["path"]).resolve()) for r in rows]
    y = np.array([[name in r["labels"].split("|") for name in labels] for r in rows], dtype=np.uint8)
    return paths, y, np.array([r["split"] for r in rows])


@torch.no_grad()
def features(paths: list[str], model: str) -> np.ndarray:
    net, spec = build_classifier(model, 2, dropout=0.0)
    net.eval()
    decoded = load_all(paths, spec.preprocess, quiet=True)
    out = []
    for start in range(0, len(paths), 64):
        crops = np.stack([center_crop(im, spec.preprocess.input_size) for im in decoded.images[start:start + 64]])
        x = torch.from_numpy(normalize(crops, spec.preprocess))
        out.append(net.forward_head(net.forward_features(x), pre_logits=True).numpy())
    return np.concatenate(out)


def linear_probe(paths, y, split, labels, model, min_positives):
    from sklearn.linear_model import LogisticRegression

    x = features(paths, model)
    tr, va, te = (split == s for s in ("train", "val", "test"))
    probs = np.zeros((len(y), len(labels)))
    for c in range(len(labels)):
        clf = LogisticRegression(C=1.0, max_iter=2000).fit(x[tr], y[tr, c])
        probs[:, c] = clf.predict_proba(x)[:, 1]
    thresholds = choose_thresholds(probs[va], y[va], labels, min_positives, [])
    return multilabel_metrics(y[te], probs[te], np.array([thresholds[n] for n in labels]), labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/visiontune-multilabel-bench"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    manifest = make_mosaics(args.work / "data", args.images, args.seed)
    began = time.perf_counter()
    result = visiontune.train(manifest, out=args.work / "run", overwrite=True, model=args.model, views=args.views,
                              seed=args.seed, quiet=True)
    run_seconds = time.perf_counter() - began
    run_metrics = result.metrics["evaluation"]
    labels = [r["label"] for r in run_metrics["per_label"]]
    paths, y, split = read_split(args.work / "run", labels)
    began = time.perf_counter()
    probe = linear_probe(paths, y, split, labels, args.model, 3)
    probe_seconds = time.perf_counter() - began
    record = {**describe(), "images": args.images, "test_images": run_metrics["images"], "model": args.model,
              "views": args.views,
              "visiontune": {**{k: run_metrics[k] for k in KEYS}, "intervals": run_metrics["intervals"],
                             "seconds": round(run_seconds, 1)},
              "linear_probe": {**{k: probe[k] for k in KEYS}, "intervals": probe["intervals"],
                               "seconds": round(probe_seconds, 1)}}
    for name in ("visiontune", "linear_probe"):
        r = record[name]
        print(f"{name:12s} " + "  ".join(f"{k} {r[k]:.3f}" for k in KEYS) + f"  ({r['seconds']} s)")
    if args.json:
        save_json(args.json, record)


if __name__ == "__main__":
    main()
