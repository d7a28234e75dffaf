"""Benchmark: index a generated tree of 1,000,000 tiny files with `visiontune.data.index.load_dataset`.

Indexing opens no file, so the files only need to exist: each holds a few bytes. The tree is
  <tmp>/million/class_000 .. class_099/sub_00 .. sub_09/<1000 files>      (nested inside each class)
made under a temporary folder outside the repository (default: the system temp dir) and removed
afterwards unless --keep.

`load_dataset` runs in a fresh Python subprocess so its memory is its own: the subprocess reports its
peak RSS right after `import visiontune.data.index` and after indexing, and the parent also reads the
child's peak RSS from the kernel (`os.wait4` rusage, ru_maxrss). The per-file cost is
(peak after indexing - peak after import) / files.

    .venv/bin/python bench/index_million.py                 # 1,000,000 files, removed afterwards
    .venv/bin/python bench/index_million.py --files 100000  # quicker
    .venv/bin/python bench/index_million.py --keep --dir /tmp/vt-bench   # keep the tree for re-runs

The page cache is whatever the machine has: right after generation the directory entries are cached
(a warm run). Pass --repeat N to time N indexing runs, each in its own fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
def rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
import visiontune.data.index as index
after_import = rss_kib()
t0 = time.perf_counter()
ds = index.load_dataset(sys.argv[1])
seconds = time.perf_counter() - t0
print(json.dumps({"files": len(ds), "classes": len(ds.classes), "layout": ds.layout, "findings": len(ds.findings),
                  "seconds": seconds, "rss_after_import_kib": after_import, "rss_peak_kib": rss_kib()}))
"""


def generate(root: Path, files: int, classes: int, subfolders: int) -> float:
    """Write `files` tiny files spread evenly over classes x subfolders; returns seconds taken."""
    t0 = time.perf_counter()
    per_leaf, extra = divmod(files, classes * subfolders)
    n = 0
    for c in range(classes):
        for s in range(subfolders):
            leaf = root / f"class_{c:03d}" / f"sub_{s:02d}"
            leaf.mkdir(parents=True)
            count = per_leaf + (1 if c * subfolders + s < extra else 0)
            for i in range(count):
                fd = os.open(leaf / f"img_{i:05d}.jpg", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, b"\xff\xd8tiny")
                os.close(fd)
            n += count
        if (c + 1) % 10 == 0:
            print(f"  generated {n:,} files ({c + 1}/{classes} classes) in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    return time.perf_counter() - t0


def index_once(tree: Path) -> dict:
    """load_dataset(tree) in a fresh interpreter; its own measurements plus the kernel's ru_maxrss."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tree)], stdout=subprocess.PIPE)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"indexing subprocess failed with exit code {proc.returncode}")
    result = json.loads(out)
    result["subprocess_wall_seconds"] = wall
    result["kernel_ru_maxrss_kib"] = usage.ru_maxrss
    return result


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(), "platform": platform.platform()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--subfolders", type=int, default=10, help="sub-folders inside each class folder")
    parser.add_argument("--repeat", type=int, default=1, help="indexing runs, each in a fresh subprocess")
    parser.add_argument("--dir", help="where to make the tree (default: a new folder in the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="leave the tree on disk (re-used when --dir holds one)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="visiontune-index-bench-"))
    repo = Path(__file__).resolve().parent.parent
    if base.resolve().is_relative_to(repo):
        raise SystemExit(f"{base}: make the tree outside the repository (it holds {args.files:,} files)")
    tree = base / "million"
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "files_requested": args.files,
                     "classes": args.classes, "subfolders_per_class": args.subfolders}
    try:
        if tree.exists():
            print(f"re-using the tree in {tree}", file=sys.stderr)
            results["generate_seconds"] = None
        else:
            print(f"generating {args.files:,} files in {tree} ...", file=sys.stderr)
            results["generate_seconds"] = round(generate(tree, args.files, args.classes, args.subfolders), 1)
        runs = []
        for r in range(args.repeat):
            run = index_once(tree)
            runs.append(run)
            per_file = (run["kernel_ru_maxrss_kib"] - run["rss_after_import_kib"]) * 1024 / max(run["files"], 1)
            print(f"run {r + 1}: {run['files']:,} files, {run['classes']} classes in {run['seconds']:.1f} s "
                  f"({run['files'] / run['seconds']:,.0f} files/s); peak RSS {run['kernel_ru_maxrss_kib'] / 1024:.0f} MiB, "
                  f"{run['rss_after_import_kib'] / 1024:.0f} MiB after import, {per_file:.0f} bytes per file",
                  file=sys.stderr)
        results["runs"] = runs
    finally:
        if args.keep:
            print(f"kept {tree}", file=sys.stderr)
        else:
            shutil.rmtree(base if not args.dir else tree, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
