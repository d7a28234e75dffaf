"""`visiontune serve` under load and bad input, on loopback.

    .venv/bin/python bench/serve_benchmark.py --run bench/out/train/flower_photos-efficientnet_lite0-0 --json bench/out/serve.json
    .venv/bin/python bench/serve_benchmark.py --clients 2 --requests 5        # a smoke run

What it does, in order:
1. makes RUN/export/model.int8.onnx with `visiontune export --precision int8` defaults if it is missing
   (the server serves a run's INT8 export first), unless --model names a model file to serve instead;
2. times the engine alone: the model the server will load (same export, engine and threads) in its own process,
   images/s at `--engine-batch` (8) from decoded crops, and one thread's decode-and-crop rate; the served
   requests/s are reported as a ratio of it (`served_vs_engine`), both measured in the same run;
   then starts `visiontune serve` in its own process on a free loopback port and waits for /readyz;
3. reads real 224-px JPEGs from the test split of ../shared/datasets/flower_photos (read-only);
4. warms up, then `--clients` concurrent clients (threads, one kept-alive connection each) send
   `--requests` raw-body JPEG requests each: throughput, p50/p95/p99 latency, errors, images per model call;
5. runs the same load again while `--slow-clients` connections send headers and 100 body bytes and stall
   (their bodies must not take the legitimate requests' places), then again while every bad input is sent
   (truncated JPEG, 50 MB body with and without a length, zip-bomb PNG header, a 9 KB PNG of 300000 x 32,
   empty body, wrong content type, 10k-character file name, a slow client, ...): the status each got, and
   whether the load's clients saw any error;
6. sends SIGTERM and times the graceful shutdown;
7. prints a markdown table and the JSON (with the command, machine and date; --json writes it to a file).

The clients run in this process on the same cores as the server, so the numbers include their cost; on
a 2-core machine that is a real share. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402
from visiontune.serve import loadtest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VISIONTUNE = Path(sys.executable).parent / "visiontune"
HOST = "127.0.0.1"


def jpeg_paths(data: Path, count: int) -> list[Path]:
    with open(data / "split.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    return [data / r["path"] for r in rows[:count]]


def jpegs(data: Path, count: int) -> list[bytes]:
    return [path.read_bytes() for path in jpeg_paths(data, count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_settings(flags: list[str]) -> dict:
    """The ServeConfig settings among `visiontune serve` flags that choose the model and its engine."""
    wanted = {"--backend": "backend", "--precision": "precision", "--threads": "threads", "--workers": "workers",
              "--streams": "streams"}
    return {wanted[flag]: (int(value) if value.isdigit() else value)
            for flag, value in zip(flags, flags[1:]) if flag in wanted}


def start_server(model: Path, port: int, flags: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    proc = subprocess.Popen([str(VISIONTUNE), "serve", str(model), "--host", HOST, "--port", str(port), *flags],
                            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if loadtest.request(HOST, port, "GET", "/readyz", timeout=5).status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the server was not ready after 300 s; see {log}")


def stop_server(proc: subprocess.Popen) -> dict:
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return {"exit_status": code, "seconds": round(time.perf_counter() - start, 2)}


ENGINE_ALONE = """
import json, sys, threading, time
import numpy as np
from pathlib import Path
from visiontune.config import ServeConfig, override
from visiontune.serve.model import load_model, model_streams, model_threads
from visiontune.serve.uploads import decode_crop
model, batch, seconds, flags = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])
bodies = [Path(p).read_bytes() for p in sys.argv[5:]]
def rate(work, images_each, callers=1):
    work(0)
    done, stop = [0] * callers, time.perf_counter() + seconds
    def loop(i):
        while time.perf_counter() < stop:
            work(i * 7 + done[i])
            done[i] += images_each
    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return round(sum(done) / (time.perf_counter() - start), 1)
out = {"batch": batch}
for streams in sorted({1, model_threads(override(ServeConfig(), **flags))}):
    cfg = override(ServeConfig(), **{**flags, "streams": streams})
    clf = load_model(model, cfg)
    crops = np.stack([decode_crop(b, clf.preprocess, 10**9) for b in bodies])
    def engine(k):
        clf.probabilities(crops[[(k + i) % len(crops) for i in range(batch)]])
    out[f"{streams}_calls_at_once"] = rate(engine, batch, model_streams(cfg))
    out["engine"] = clf.engine_name
out["images_per_s"] = max(v for k, v in out.items() if k.endswith("_at_once"))
def decoding(k):
    decode_crop(bodies[k % len(bodies)], clf.preprocess, 10**9)
out["decode_images_per_s_one_thread"] = rate(decoding, 1)
print(json.dumps(out))
"""


def engine_alone(model: Path, paths: list[Path], batch: int, seconds: float, flags: dict) -> dict:
    """The model the server would load (same choice of export and engine), alone in its own process: images/s at
    `batch` from crops already decoded, both as one call at a time on every model thread and as one call per
    thread at once; the better of the two is "the engine alone". Also one thread's JPEG decode-and-crop rate. The
    server's throughput is read against it, measured side by side in the same run."""
    done = subprocess.run([sys.executable, "-c", ENGINE_ALONE, str(model), str(batch), str(seconds), json.dumps(flags),
                           *map(str, paths)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the engine-alone measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def batching(before: dict, after: dict) -> float | None:
    calls = after["model_calls"] - before["model_calls"]
    return round((after["images"] - before["images"]) / calls, 2) if calls else None


def markdown(result: dict) -> str:
    load, under = result["load"], result["load_with_bad_inputs"]
    alone = result["engine_alone"]
    lines = [f"Model: `{result['model']}` ({result['engine']}), {result['clients']} clients x "
             f"{result['requests']} requests of real 224-px JPEGs (raw body), server flags `{' '.join(result['server_flags'])}`.",
             "",
             f"The engine alone (same model and engine, its own process, just before the server started): "
             f"**{alone['images_per_s']} images/s** at batch {alone['batch']} from decoded crops (the better of one "
             f"call at a time on every thread, {alone['1_calls_at_once']}, and one call per thread at once); one thread decodes "
             f"and crops {alone['decode_images_per_s_one_thread']} JPEGs/s. Served: **{load['requests_per_s']} "
             f"requests/s = {result['served_vs_engine']}x** the engine alone, p99 {load['latency_ms']['p99']} ms.",
             "",
             "| run | requests | errors | requests/s | p50 ms | p95 ms | p99 ms | images per model call |",
             "|---|---|---|---|---|---|---|---|"]
    slow = result["load_beside_slow_clients"]
    for name, r in (("load", load), (f"load beside {slow['slow_clients']} stalled uploads", slow),
                    ("load + bad inputs", under)):
        if r.get("skipped"):
            continue
        ms = r["latency_ms"]
        lines.append(f"| {name} | {r['total']} | {r['errors']} | {r['requests_per_s']} | {ms['p50']} | {ms['p95']} | "
                     f"{ms['p99']} | {r['images_per_model_call']} |")
    lines += ["", "| bad input (sent during the second load) | expected | got | code | seconds |", "|---|---|---|---|---|"]
    for p in result["bad_inputs"]:
        got = p["status"] if p["status"] is not None else "no answer"
        mark = "" if p["status"] == p["expected"] else " **(wrong)**"
        lines.append(f"| {p['input']} | {p['expected']} | {got}{mark} | {p['code'] or ''} | {p['seconds']} |")
    s = result["shutdown"]
    lines += ["", f"SIGTERM: exit status {s['exit_status']} after {s['seconds']} s. Server log: `{result['server_log']}`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(ROOT / "bench" / "out" / "train" / "flower_photos-efficientnet_lite0-0"),
                        help="run directory to serve (its INT8 export, made if missing)")
    parser.add_argument("--model", help="serve this model file or run directory as it is instead (no export made)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "flower_photos"),
                        help="dataset folder with split.csv; its test JPEGs are the requests")
    parser.add_argument("--images", type=int, default=200, help="distinct JPEGs sent in turn (default %(default)s)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--warmup", type=int, default=3, help="requests per client before timing")
    parser.add_argument("--server-args", default="--body-timeout 5",
                        help="extra `visiontune serve` flags, e.g. '--workers 2 --max-batch 8' (default %(default)r)")
    parser.add_argument("--engine-batch", type=int, default=8, help="batch of the engine-alone measurement")
    parser.add_argument("--engine-seconds", type=float, default=10.0, help="how long the engine alone is timed")
    parser.add_argument("--no-bad-inputs", action="store_true", help="skip step 5")
    parser.add_argument("--slow-clients", type=int, default=64,
                        help="connections that send headers and 100 body bytes, then stall, during a second load")
    parser.add_argument("--log", default=str(ROOT / "bench" / "out" / "serve_server.log"))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    if args.model:
        model = Path(args.model)
    else:
        model = Path(args.run)
        if not (model / "export" / "model.int8.onnx").is_file():
            import visiontune

            print(f"exporting {model}/export/model.int8.onnx ...", file=sys.stderr)
            print(visiontune.api.export(model, precision="int8").summary(), file=sys.stderr)
    paths = jpeg_paths(Path(args.data), args.images)
    bodies = [p.read_bytes() for p in paths]
    if not bodies:
        sys.exit(f"{args.data}/split.csv has no test images")
    flags = args.server_args.split()
    print(f"the engine alone at batch {args.engine_batch} ...", file=sys.stderr)
    alone = engine_alone(model, paths[:64], args.engine_batch, args.engine_seconds, server_settings(flags))
    port = free_port()
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = start_server(model, port, flags, log)
    try:
        info = loadtest.request(HOST, port, "GET", "/v1/model").json()
        if args.warmup:
            loadtest.run_load(HOST, port, bodies, clients=args.clients, requests=args.warmup)

        def timed_load():
            before = loadtest.request(HOST, port, "GET", "/readyz").json()
            r = loadtest.run_load(HOST, port, bodies, clients=args.clients, requests=args.requests)
            after = loadtest.request(HOST, port, "GET", "/readyz").json()
            return {**r.to_dict(), "images_per_model_call": batching(before, after)}

        print(f"load: {args.clients} clients x {args.requests} requests ...", file=sys.stderr)
        load = timed_load()
        print(f"load again, while {args.slow_clients} slow clients hold connections ...", file=sys.stderr)
        held = loadtest.hold_slow_clients(HOST, port, args.slow_clients, bodies[0])
        try:
            beside_slow = timed_load()
        finally:
            for sock in held:
                sock.close()
        probes = []
        under = {**load, "skipped": True}
        if not args.no_bad_inputs:
            print("load again, with bad inputs alongside ...", file=sys.stderr)
            prober, probes = loadtest.parallel_probes(HOST, port, bodies[0], slow_timeout=60)
            under = timed_load()
            prober.join(120)
        healthy = loadtest.request(HOST, port, "POST", "/v1/predict", bodies[0], {"Content-Type": "image/jpeg"}).status
    finally:
        shutdown = stop_server(proc)
    if alone["engine"] != info["engine"]:
        print(f"warning: the server runs {info['engine']}, the engine alone was {alone['engine']}", file=sys.stderr)
    result = {**describe(), "model": str(model), "engine": info["engine"], "server_flags": flags,
              "clients": args.clients, "requests": args.requests, "images": len(bodies), "cores": os.cpu_count(),
              "engine_alone": alone, "served_vs_engine": round(load["requests_per_s"] / alone["images_per_s"], 3),
              "load": load,
              "load_beside_slow_clients": {**beside_slow, "slow_clients": args.slow_clients,
                                           "throughput_kept": round(beside_slow["requests_per_s"] / load["requests_per_s"], 3)},
              "load_with_bad_inputs": under, "bad_inputs": [p.to_dict() for p in probes],
              "served_after_bad_inputs": healthy == 200, "shutdown": shutdown, "server_log": str(log)}
    print(markdown(result))
    print()
    print(json.dumps(result, indent=2))
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
