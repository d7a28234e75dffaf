"""Benchmark: `predict --shards` on this machine against `predict --shards --ray` (a local Ray), on N small images,
with the memory of each over time, and the kill-and-resume check at scale (every image written exactly once).

The images are made from ../shared/datasets/flower_photos: each a random crop (80-100 % of the side, mirrored
at random) of a photo, 160 px on its shorter side, JPEG quality 85, under --images-dir (default /tmp; reused when
complete). Every run is a fresh `python -m visiontune.cli predict MODEL DIR --shards OUT` in its own process
group; its memory is the RSS summed over the whole process tree (Ray's raylet, GCS, workers included), read every
0.5 s. The kill-and-resume run is `--ray`, killed (SIGKILL to the process group: driver, Ray and workers) once
--kill-at of the shards are written, then run again to completion.

    /work/venv-27/bin/python bench/ray_predict_benchmark.py --model /tmp/p27/run/export/model.int8.onnx \
        --images 20000 --json /tmp/p27/bench.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from PIL import Image

from machine import describe, save_json

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos"


def _make_folder(job: tuple[Path, list[Path], int, int, int]) -> None:
    target, photos, start, stop, seed = job
    rng = random.Random(seed * 1_000_003 + start)  # one stream per folder, so the processes agree on every image
    for i in range(start, stop):
        source = photos[i % len(photos)]
        folder = target / source.parent.name / f"{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as im:
            im = im.convert("RGB")
            side = int(min(im.size) * rng.uniform(0.8, 1.0))
            x, y = rng.randint(0, im.width - side), rng.randint(0, im.height - side)
            im = im.crop((x, y, x + side, y + side)).resize((160, 160), Image.BILINEAR)
            if rng.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            im.save(folder / f"img_{i:06d}.jpg", quality=85)


def make_images(target: Path, count: int, seed: int = 0) -> Path:
    done = target / f".complete-{count}"
    if done.exists():
        return target
    photos = sorted(PHOTOS.rglob("*.jpg"))
    jobs = [(target, photos, start, min(start + 1000, count), seed) for start in range(0, count, 1000)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        for _ in pool.imap_unordered(_make_folder, jobs):
            pass
    done.write_text("")
    return target


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(model: str, images: Path, out: Path, extra: list[str], kill_at: int | None = None) -> dict:
    command = [sys.executable, "-m", "visiontune.cli", "predict", model, str(images), "--shards", str(out), *extra]
    begun = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    watched, samples, killed = psutil.Process(proc.pid), [], False
    while proc.poll() is None:
        samples.append((round(time.perf_counter() - begun, 1), tree_rss(watched) >> 20))
        if kill_at is not None and sum(1 for _ in out.glob("part-*")) >= kill_at:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.5)
    stdout = proc.communicate()[0]
    if killed:  # Ray's processes started by the driver live in its process group: none is left running
        time.sleep(2)
    line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    rate = re.search(r"([\d.]+) images/s", line)
    return {"command": " ".join(command), "seconds": round(time.perf_counter() - begun, 1), "killed": killed,
            "returncode": proc.returncode, "summary": line, "images_per_s": float(rate.group(1)) if rate else None,
            "peak_rss_mib": max((m for _, m in samples), default=0), "rss_mib_over_time": samples[::max(1, len(samples) // 12)]}


def exactly_once(out: Path, expected: int) -> dict:
    import pyarrow.dataset as pads

    table = pads.dataset(out, format="parquet").to_table(columns=["path", "error"])
    paths = table.column("path").to_pylist()
    return {"rows": len(paths), "distinct": len(set(paths)), "expected": expected,
            "errors": sum(e is not None for e in table.column("error").to_pylist()),
            "exactly_once": len(paths) == len(set(paths)) == expected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a .onnx (or .xml, .tflite) model file")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--images-dir", default="/tmp/visiontune-ray-bench")
    parser.add_argument("--shard-images", type=int, default=1000)
    parser.add_argument("--kill-at", type=float, default=0.4, help="share of the shards written before the kill")
    parser.add_argument("--only", choices=("here", "ray", "resume"), action="append")
    parser.add_argument("--json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    images = make_images(Path(args.images_dir) / f"images-{args.images}", args.images)
    result = {**describe(), "images": args.images, "generate_s": round(time.perf_counter() - t0, 1),
              "model": args.model, "shard_images": args.shard_images}
    work = Path(args.images_dir) / "out"
    shards = -(-args.images // args.shard_images)
    common = ["--shard-images", str(args.shard_images), "--quiet"]
    for mode in args.only or ("here", "ray", "resume"):
        out = work / mode
        subprocess.run(["rm", "-rf", str(out)], check=True)
        if mode == "here":
            result[mode] = run(args.model, images, out, common)
        elif mode == "ray":
            result[mode] = run(args.model, images, out, [*common, "--ray"])
        else:
            first = run(args.model, images, out, [*common, "--ray"], kill_at=max(1, int(shards * args.kill_at)))
            written = sum(1 for _ in out.glob("part-*"))
            second = run(args.model, images, out, [*common, "--ray"])
            result[mode] = {"killed_run": first, "shards_before_kill": written, "rerun": second}
        result[mode]["check"] = exactly_once(out, args.images)
        print(mode, {k: v for k, v in result[mode].items() if k != "rss_mib_over_time"}, flush=True)
        save_json(args.json, result)


if __name__ == "__main__":
    main()
