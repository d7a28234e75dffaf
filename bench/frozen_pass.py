"""The cached recipe's frozen pass, old path against new, side by side in one process.

Builds the view cache (centre crop + augmented views through the frozen layers, boundary activations and pooled
features kept) for the same decoded training images with each variant in turn, several rounds interleaved so a
change in the machine's load hits them alike, and reports images/s (views pushed through the frozen layers per
second, crops included) and how far each variant's features are from the first's.

    .venv/bin/python bench/frozen_pass.py --data flower_photos/split.csv --images 256 --views 5 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402
from visiontune.config import TrainConfig  # noqa: E402
from visiontune.data.index import load_dataset  # noqa: E402
from visiontune.data.loader import load_all  # noqa: E402
from visiontune.data.transforms import color_jitter, normalize, random_box, resample  # noqa: E402
from visiontune.models.classifier import build_classifier  # noqa: E402
from visiontune.models.onnx_graph import open_session, trace  # noqa: E402
from visiontune.models.stages import frozen_trainable  # noqa: E402
from visiontune.training import feature_cache  # noqa: E402
from visiontune.training.feature_cache import FrozenFeatures, FrozenRunner, build_view_cache, view_crop  # noqa: E402
from visiontune.training.phases import augment_from  # noqa: E402

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def old_augment_crop(rgb: np.ndarray, spec, aug, rng: np.random.Generator) -> np.ndarray:
    """The augmented crop as it was made before: Pillow rotates the whole image, then resizes the box."""
    box = random_box(rgb.shape, aug, rng)
    image = Image.fromarray(rgb)
    if aug.rotate_degrees > 0:
        angle = float(rng.uniform(-aug.rotate_degrees, aug.rotate_degrees))
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, center=centre)
    image = image.resize((spec.input_size, spec.input_size), resample(spec.interpolation), box=box)
    if rng.random() < aug.hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return color_jitter(np.asarray(image), aug, rng)


class OldRunner:
    """The frozen pass as it was: crops normalised in numpy, then a plain trace (dynamic "same" padding, nothing
    folded) in ONNX Runtime."""

    def __init__(self, runner: FrozenRunner, size: int):
        self.spec, self.split = runner.spec, runner.split
        outputs = ["boundary", "pooled"] if runner.split else ["pooled"]
        graph = trace(runner.net, torch.zeros(1, 3, size, size), ["x"], outputs)
        self.session = open_session(graph, "plain trace", torch.get_num_threads())

    def __call__(self, crops: np.ndarray):
        out = self.session.run(None, {"x": normalize(crops, self.spec)})
        return (out[0].astype(np.float16), out[1]) if self.split else (None, out[0])


class Int8Runner:
    """An experiment, not a path of the tool: the new frozen graph quantized to INT8 (ONNX Runtime, static QDQ)."""

    def __init__(self, runner: FrozenRunner, calibration: np.ndarray, method: str):
        from visiontune.models.quantize import quantize_int8

        self.split = runner.split
        self.session = open_session(quantize_int8(_pixel_graph(runner), [calibration], input_name="x", method=method), "int8",
                                    torch.get_num_threads())

    def __call__(self, crops: np.ndarray):
        out = self.session.run(None, {"x": np.ascontiguousarray(crops)})
        return (out[0].astype(np.float16), out[1]) if self.split else (None, out[0])


def _pixel_graph(runner: FrozenRunner) -> bytes:
    from visiontune.models.onnx_graph import simplify
    from visiontune.models.static_pad import with_static_padding
    from visiontune.training.feature_cache import FromPixels

    size = runner.spec.input_size
    net = FromPixels(with_static_padding(runner.net, size), runner.spec).eval()
    outputs = ["boundary", "pooled"] if runner.split else ["pooled"]
    return simplify(trace(net, torch.zeros(1, size, size, 3, dtype=torch.uint8), ["x"], outputs)).SerializeToString()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="flower_photos/split.csv", help="split file under ../shared/datasets")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=256, help="training images (the first N of the split)")
    parser.add_argument("--views", type=int, default=5, help="views per image (1 centre + augmented)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", default="8", help="frozen-pass batch sizes of the new path to try, e.g. 8,16,32")
    parser.add_argument("--int8", default="minmax", help="INT8 calibration methods to try as an experiment "
                                                         "(comma-separated; '' for none)")
    parser.add_argument("--spin", action="store_true", help="also try ONNX Runtime threads that spin when idle")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    cfg = TrainConfig(model=args.model)
    dataset = load_dataset(DATASETS / args.data)
    train = np.flatnonzero(dataset.splits == 0)[: args.images]
    model, spec = build_classifier(cfg.model, len(dataset.classes), dropout=0.0)
    bottom, top = frozen_trainable(model, cfg.trainable_stages)
    decoded = load_all([str(dataset.abspath(i)) for i in train], spec.preprocess, quiet=True)
    images = [im for im in decoded.images if im is not None]
    indices = np.arange(len(images))
    net = FrozenFeatures(model.eval(), bottom, top)
    notes: list[str] = []
    setup = {}
    started = time.perf_counter()
    new = FrozenRunner(net, spec.preprocess, torch.device("cpu"), notes)
    setup["new"] = time.perf_counter() - started
    started = time.perf_counter()
    old = OldRunner(new, spec.preprocess.input_size)
    setup["old"] = time.perf_counter() - started
    variants = {"old: plain trace, numpy normalisation, batch 8": (old, 8)}
    for b in (int(x) for x in args.batches.split(",")):
        variants[f"new: static padding, folded, pixels in, idle threads sleep, batch {b}"] = (new, b)
    if args.spin:  # the tool's runner lets idle ONNX Runtime threads sleep; this one keeps them spinning
        spinning = FrozenRunner(net, spec.preprocess, torch.device("cpu"), notes)
        spinning.session = open_session(_pixel_graph(spinning), "spinning", torch.get_num_threads(), spinning=True)
        first_batch = int(args.batches.split(",")[0])
        variants[f"new, but ONNX Runtime threads spin when idle, batch {first_batch}"] = (spinning, first_batch)
    calibration = np.stack([view_crop(images[i], 0, i, cfg.seed, spec.preprocess, None)
                            for i in range(min(64, len(images)))])
    for method in (m for m in args.int8.split(",") if m):
        started = time.perf_counter()
        variants[f"new, INT8 ({method} calibration, {len(calibration)} images), batch 8"] = (Int8Runner(new, calibration,
                                                                                                      method), 8)
        setup[f"int8 {method}"] = time.perf_counter() - started

    aug = augment_from(cfg)
    seconds = {name: [] for name in variants}
    caches = {}
    new_crop = feature_cache.augment_crop
    for _ in range(args.rounds):
        for name, (runner, batch) in variants.items():
            feature_cache._FROZEN_BATCH = batch
            feature_cache.augment_crop = old_augment_crop if runner is old else new_crop
            start = time.perf_counter()
            caches[name] = build_view_cache(images, indices, args.views, runner, spec.preprocess, aug, cfg.seed,
                                            desc=name, quiet=True)
            seconds[name].append(time.perf_counter() - start)
    first = next(iter(variants))
    views = len(images) * args.views
    rows = []
    for name in variants:
        best = min(seconds[name])
        # centre views only: the augmented ones are resampled differently by the old and new crops
        diff = float(np.abs(caches[name].pooled[0] - caches[first].pooled[0]).max())
        b, b0 = caches[name].boundary[:1], caches[first].boundary[:1]
        bdiff = float(np.abs(b.astype(np.float32) - b0.astype(np.float32)).max()) if b.shape == b0.shape else \
            f"shape {b.shape[2:]} against {b0.shape[2:]}"
        rows.append({"variant": name, "views": views, "seconds": [round(s, 2) for s in seconds[name]],
                     "images_per_s": round(views / best, 1), "max_abs_diff_pooled": diff, "max_abs_diff_boundary": bdiff})
    base = rows[0]["images_per_s"]
    print(f"{len(images)} images x {args.views} views of {args.data}, {args.model}, {os.cpu_count()} cores, "
          f"best of {args.rounds} interleaved rounds")
    print("| variant | views/s | vs old | centre views: max |diff| pooled | boundary |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x | "
              f"{r['max_abs_diff_pooled']:.2e} | {r['max_abs_diff_boundary']} |")
    print("set-up seconds (trace, fold, quantize, open the session): "
          + ", ".join(f"{k} {v:.1f}" for k, v in setup.items()))
    result = {"command": " ".join(sys.argv), "machine": describe(), "rows": rows, "setup_seconds": setup}
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
