"""Preprocessing version 1 (Pillow) against version 2 (OpenCV): CPU time per image of `load_for_model` (decode,
resize of the shorter side, centre crop: what a served request or a predicted file costs before the model) on the
flower_photos test JPEGs the serving benchmark sends, the two versions alternated in one process, one thread; and
how far their crops are apart.

    .venv/bin/python bench/preprocess_versions.py --json bench/out/preprocess_versions.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402
from serve_benchmark import jpegs  # noqa: E402
from visiontune.data.loader import load_for_model  # noqa: E402
from visiontune.models.registry import get_spec  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos"


def per_image_ms(images: list[bytes], spec) -> float:
    started = time.process_time()
    for data in images:
        load_for_model(data, spec)
    return (time.process_time() - started) / len(images) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    images = jpegs(DATA, args.images)
    new = get_spec("efficientnet_lite0").preprocess
    old = type(new)(**{**new.to_dict(), "version": 1})
    for spec in (old, new):  # imports (OpenCV's on first use) and first calls are not part of an image's cost
        load_for_model(images[0], spec)
    times = {1: [], 2: []}
    for _ in range(args.rounds):
        for spec in (old, new):
            times[spec.version].append(per_image_ms(images, spec))
    diffs = [np.abs(load_for_model(d, old).astype(int) - load_for_model(d, new).astype(int)) for d in images]
    result = {**describe(), "images": len(images),
              "ms_per_image": {f"v{v}": {"best": round(min(t), 3), "median": round(float(np.median(t)), 3)}
                               for v, t in times.items()},
              "pixel_difference": {"mean": round(float(np.mean([d.mean() for d in diffs])), 3),
                                   "max": int(max(d.max() for d in diffs)),
                                   "share_of_pixels_differing_by_more_than_2": round(
                                       float(np.mean([(d > 2).mean() for d in diffs])), 4)}}
    print(result)
    save_json(args.json, result)


if __name__ == "__main__":
    main()
