"""What the report's embedding map costs: `visiontune evaluate RUN` with the map off (--map-points 0) and on,
side by side, on runs already trained; the map's own parts (the torch feature pass with its decoding and
thumbnails, then PCA + t-SNE) from metrics.json; and report.html's size either way.

Each evaluation is the user's command in its own process, written to a folder under --out (the run itself is
only read; pass copies if in doubt). The runs' split.csv must point at the images.

    .venv/bin/python bench/embedding_map_benchmark.py /tmp/emb-flowers /tmp/emb-oxford --json bench/out/embedding_map.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402

EXE = Path(sys.executable).with_name("visiontune")


def evaluate(run: Path, out: Path, points: int) -> dict:
    args = ["evaluate", str(run), "--out", str(out), "--map-points", str(points), "--quiet"]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run([str(EXE), *args], capture_output=True, text=True)
    wall = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): visiontune {shlex.join(args)}\n{done.stderr.strip()[-2000:]}")
    e = json.loads((out / "metrics.json").read_text())["evaluation"]
    result = {"command": shlex.join(["visiontune", *args]), "wall_seconds": wall, "images": e["images"],
              "top1": e["top1"], "report_bytes": (out / "report.html").stat().st_size,
              "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2)}
    if "embedding_map" in e:
        result["map"] = e["embedding_map"]
    print(f"[{wall:7.1f} s] {result['command']}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="trained run directories")
    parser.add_argument("--points", type=int, default=1000, help="--map-points of the run with the map")
    parser.add_argument("--out", type=Path, default=Path("bench/out/embedding_map"))
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    result = {**describe(), "runs": {}}
    for run in args.runs:
        out = args.out / run.name
        off = evaluate(run, out / "off", 0)
        on = evaluate(run, out / "on", args.points)
        result["runs"][str(run)] = {"off": off, "on": on, "extra_seconds": round(on["wall_seconds"] - off["wall_seconds"], 1),
                                    "extra_report_bytes": on["report_bytes"] - off["report_bytes"]}
    print(json.dumps(result, indent=2))
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
