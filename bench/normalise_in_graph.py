"""CPU time an image of a run's ONNX export, normalised by numpy before the call against normalised inside the graph
(`inference.pixel_input`), and the graph alone from a tensor normalised beforehand; the three in turn, `--rounds`
times, on one thread and one caller, so the numbers are read side by side.

    .venv/bin/python bench/normalise_in_graph.py RUN [--precision int8] [--batch 8] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402
from visiontune.data.transforms import normalize  # noqa: E402
from visiontune.inference.pixel_input import PIXELS, load_proto, with_pixel_input  # noqa: E402
from visiontune.models.bundle import read_meta  # noqa: E402
from visiontune.models.onnx_graph import open_session  # noqa: E402
from visiontune.models.run_dir import RunDir  # noqa: E402


def cpu_ms_an_image(call, images: int, calls: int) -> float:
    call()
    start = time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - start) / (calls * images) * 1000


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--precision", default="int8", choices=("fp32", "int8"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=40, help="model calls timed per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    spec = read_meta(args.run).preprocess
    path = RunDir(args.run).export_file("onnx", args.precision)
    plain = open_session(path, str(path), 1, spinning=False)
    wrapped_graph = with_pixel_input(load_proto(path), spec)
    if wrapped_graph is None:
        sys.exit(f"{path}: its preprocessing is not normalised inside the graph (per-channel mean or std)")
    wrapped = open_session(wrapped_graph, "normalised inside", 1, spinning=False)
    name = plain.get_inputs()[0].name
    crops = np.random.default_rng(0).integers(0, 256, (args.batch, spec.input_size, spec.input_size, 3), np.uint8)
    tensor = normalize(crops, spec)
    ways = {"numpy, then the graph": lambda: plain.run(None, {name: normalize(crops, spec)}),
            "the graph from a normalised tensor": lambda: plain.run(None, {name: tensor}),
            "normalised inside the graph": lambda: wrapped.run(None, {PIXELS: crops})}
    same = all(np.array_equal(a, b) for a, b in zip(ways["numpy, then the graph"](), ways["normalised inside the graph"]()))
    rounds = []
    for _ in range(args.rounds):
        rounds.append({way: round(cpu_ms_an_image(call, args.batch, args.calls), 3) for way, call in ways.items()})
        print(rounds[-1], file=sys.stderr, flush=True)
    result = {**describe(), "model": str(path), "batch": args.batch, "threads": 1, "same_outputs": same,
              "cpu_ms_an_image": rounds}
    save_json(args.json, result)
    print(result)
    return result


if __name__ == "__main__":
    main()
