"""Where a served request's CPU goes: `visiontune serve` under the serving benchmark's load, for several sets of
server flags taken in turn (and repeated), with the server's and the clients' CPU seconds per request.

    .venv/bin/python bench/serve_cpu.py --run bench/out/sbs/ovrun --flags="--max-batch 16" --flags="--max-batch 8" --repeat 3
    .venv/bin/python bench/serve_cpu.py --run bench/out/sbs/ovrun --py-spy /tmp/pyspy/bin/py-spy   # and a profile

The server runs in its own process (as in `serve_benchmark.py`); the clients are this process's threads, so their
CPU is this process's. With `--py-spy` (a py-spy executable: `pip install py-spy` anywhere) the server's Python
threads are sampled during each load and the heaviest functions printed: native work inside the engine shows as
the Python call that made it (`InferRequest.infer`), and the engine's own threads are not sampled.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402
from serve_benchmark import ROOT, free_port, jpegs, start_server  # noqa: E402
from visiontune.serve import loadtest  # noqa: E402

HOST = "127.0.0.1"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def heaviest(raw: Path, top: int) -> list[tuple[str, float]]:
    """(function, share of the samples whose stack holds it) from py-spy's raw output."""
    total, inclusive = 0, collections.Counter()
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        total += int(count)
        for frame in set(stack.split(";")[1:]):
            inclusive[frame] += int(count)
    return [(frame, n / max(total, 1)) for frame, n in inclusive.most_common(top)]


def measure(model: Path, flags: list[str], bodies: list[bytes], args, log: Path) -> dict:
    port = free_port()
    server = start_server(model, port, ["--body-timeout", "5", *flags], log)
    try:
        loadtest.run_load(HOST, port, bodies, clients=args.clients, requests=args.warmup)
        spy, raw = None, Path(tempfile.mkstemp(suffix=".txt")[1])
        if args.py_spy:
            spy = subprocess.Popen([args.py_spy, "record", "-p", str(server.pid), "-o", str(raw), "-f", "raw",
                                    "-r", "200", "--nonblocking", "--duration", "5"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        server_cpu, client_cpu = cpu_seconds(server.pid), time.process_time()
        result = loadtest.run_load(HOST, port, bodies, clients=args.clients, requests=args.requests)
        server_cpu, client_cpu = cpu_seconds(server.pid) - server_cpu, time.process_time() - client_cpu
        out = result.to_dict()
        row = {"flags": " ".join(flags), "requests_per_s": out["requests_per_s"], "latency_ms": out["latency_ms"],
               "errors": out["errors"], "server_cores": round(server_cpu / result.seconds, 2),
               "server_cpu_ms_per_request": round(1000 * server_cpu / result.total, 2),
               "client_cpu_ms_per_request": round(1000 * client_cpu / result.total, 3)}
        if spy is not None:
            spy.wait()
            row["profile"] = [(frame, round(share, 3)) for frame, share in heaviest(raw, args.top)]
        raw.unlink(missing_ok=True)
        return row
    finally:
        server.terminate()
        server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run directory (or model file) to serve")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "flower_photos"))
    parser.add_argument("--flags", action="append", default=None, help="server flags of one configuration "
                                                                       "(repeatable; default: the defaults)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the configurations, in turn")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=100, help="per client")
    parser.add_argument("--warmup", type=int, default=5, help="requests per client before timing")
    parser.add_argument("--py-spy", help="a py-spy executable: profile the server during each load")
    parser.add_argument("--top", type=int, default=25, help="functions listed per profile")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    bodies = jpegs(Path(args.data), 200)
    configs = args.flags or [""]
    rows = []
    for _ in range(args.repeat):
        for flags in configs:
            row = measure(Path(args.run), flags.split(), bodies, args, ROOT / "bench" / "out" / "serve_cpu_server.log")
            rows.append(row)
            lat = row["latency_ms"]
            print(f"{row['flags'] or '(defaults)'}: {row['requests_per_s']} requests/s, p50 {lat['p50']} p99 "
                  f"{lat['p99']} ms, server {row['server_cpu_ms_per_request']} ms CPU a request on "
                  f"{row['server_cores']} cores, clients {row['client_cpu_ms_per_request']} ms", flush=True)
            for frame, share in row.get("profile", []):
                print(f"    {share:6.1%}  {frame}")
    result = {**describe(), "clients": args.clients, "requests": args.requests, "results": rows}
    if args.json:
        save_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
