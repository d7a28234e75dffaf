"""Ensemble → distill → INT8 on a benchmark split: does the recipe deliver "the accuracy of several models at
the cost of one"?

Trains the members (default: Lite0 seed 0, Lite2 seed 0, Lite0 seed 1) on one split file, builds two
ensembles of them (equal weights, and weights fitted on validation), distils a Lite0 student from the one with
the better validation score, exports the student to INT8, scores everything on the test split and measures
batch-1 latency. Every step is the user's command (`visiontune train / ensemble / distill / export / bench`) run
as its own process, one after another; the plain Lite0 baseline is the first member (same recipe, no teacher).

    .venv/bin/python bench/ensemble_benchmark.py                                        # flower_photos (~80 min, 2 cores)
    .venv/bin/python bench/ensemble_benchmark.py --data oxford102/split_random.csv
    .venv/bin/python bench/ensemble_benchmark.py --limit 4 --extra "--views 1 --head-epochs 2 --epochs 1" \
        --bench-runs 10 --export-extra "--calibration-images 16 --int8-agreement 0.5"              # smoke, ~15 min

`--limit N` keeps N images per class and split (a manifest of absolute paths under --out; no image is copied).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
DEFAULT_MEMBERS = ["efficientnet_lite0|--seed 0", "efficientnet_lite2|--seed 0", "efficientnet_lite0|--seed 1"]
EXE = Path(sys.executable).with_name("visiontune")


def command(args: list[str], log: list[dict], reuse: Path | None = None) -> float | None:
    """Run one visiontune command; its wall time. A failure stops the benchmark with its last lines.
    With `reuse` (a folder whose metrics.json says it finished), the command is skipped: wall time None."""
    if reuse is not None and (reuse / "metrics.json").is_file() and (reuse / "model.json").is_file():
        print(f"[reused   ] {reuse}", file=sys.stderr, flush=True)
        return None
    cmd = [str(EXE), *map(str, args)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = round(time.perf_counter() - started, 1)
    log.append({"command": " ".join(shlex.quote(c) for c in ["visiontune", *map(str, args)]), "wall_seconds": wall,
                "exit": done.returncode})
    print(f"[{wall:7.1f} s] {log[-1]['command']}", file=sys.stderr, flush=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {log[-1]['command']}\n{done.stderr.strip()[-2000:]}")
    return wall


def limited_manifest(data: Path, per_split: int, out: Path) -> Path:
    """The first `per_split` images of every class in every split, as a manifest of absolute paths."""
    kept, counts = [], {}
    with open(data, newline="") as fh:
        for row in csv.DictReader(fh):
            key = (row["label"], row["split"])
            if counts.get(key, 0) < per_split:
                counts[key] = counts.get(key, 0) + 1
                kept.append({"path": str((data.parent / row["path"]).resolve()), "label": row["label"], "split": row["split"]})
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"limit{per_split}-{data.stem}.csv"
    with open(target, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    return target


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def int8_test_top1(run: Path) -> float:
    """Top-1 of export/model.int8.onnx on the run's whole test split (parity.json looks at a sample)."""
    from visiontune.config import EvalConfig
    from visiontune.evaluation.scoring import run_split, score, select
    from visiontune.inference import Classifier

    clf = Classifier.load(run / "export" / "model.int8.onnx")
    scored = score(clf, select(run_split(run), "test", clf.labels, allow_subset=True), EvalConfig())
    return float((scored.logits.argmax(1) == scored.labels).mean())


def latency(model: Path, runs: int, log: list[dict], reuse: bool = False) -> dict[str, float]:
    """Batch-1 p50 (ms, from a decoded tensor) per engine, via `visiontune bench` (its bench.json with `reuse`)."""
    if not (reuse and (model / "bench.json").is_file()):
        command(["bench", model, "--runs", runs, "--warmup", max(3, runs // 10), "--batch-sizes", "1", "--seconds", "0.2",
                 "--quiet"], log)
    report = json.loads((model / "bench.json").read_text())
    return {e["engine"]: round(e["tensor_ms"]["p50"], 2) for e in report["engines"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="flower_photos/split.csv", help="split file, relative to ../shared/datasets")
    parser.add_argument("--member", action="append", default=None,
                        help='"MODEL|train flags", repeat for each member (default: ' + "; ".join(DEFAULT_MEMBERS) + ")")
    parser.add_argument("--extra", default="", help="train flags given to every training, members and student alike")
    parser.add_argument("--student", default="efficientnet_lite0")
    parser.add_argument("--alpha", type=float, help="distill --alpha (default: DistillConfig's)")
    parser.add_argument("--temperature", type=float, help="distill --temperature (default: DistillConfig's)")
    parser.add_argument("--limit", type=int, help="images per class and split (a smoke test)")
    parser.add_argument("--bench-runs", type=int, default=100, help="timed batch-1 calls per engine (default %(default)s)")
    parser.add_argument("--export-extra", default="", help="export flags for the INT8 student (a smoke run on a few "
                        "images needs e.g. \"--int8-agreement 0.5\")")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs already finished in --out (after an interruption) instead of retraining them")
    parser.add_argument("--out", help="where runs go (default bench/out/ensemble/<data>)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)

    data = DATASETS / args.data
    out = Path(args.out) if args.out else ROOT / "bench" / "out" / "ensemble" / f"{data.parent.name}-{data.stem}"
    if args.limit:
        out = out.with_name(f"{out.name}-limit{args.limit}")
        data = limited_manifest(data, args.limit, out)
    extra = shlex.split(args.extra)
    log: list[dict] = []
    rows: list[dict] = []

    members = []
    for k, spec in enumerate(args.member or DEFAULT_MEMBERS):
        model, _, flags = spec.partition("|")
        run = out / f"member{k}-{model}"
        wall = command(["train", data, "--model", model, "--out", run, "--overwrite", "--quiet", *shlex.split(flags), *extra],
                       log, run if args.reuse else None)
        m = metrics(run)
        members.append(run)
        rows.append({"name": f"member {k}: {model} {flags}".strip(), "run": str(run), "kind": "member",
                     "test_top1": m["evaluation"]["top1"], "val_top1": m["val"]["top1"],
                     "train_seconds": m["train_seconds"], "wall_seconds": wall,
                     "latency_ms": latency(run, args.bench_runs, log, args.reuse)})

    ensembles = []
    for weights in ("equal", "fit"):
        ens = out / f"ensemble-{weights}"
        wall = command(["ensemble", *members, "--out", ens, "--weights", weights, "--overwrite", "--quiet"], log,
                       ens if args.reuse else None)
        m = metrics(ens)
        ensembles.append((ens, m))
        rows.append({"name": f"ensemble ({weights} weights)", "run": str(ens), "kind": "ensemble",
                     "weights": [x["weight"] for x in m["members"]], "test_top1": m["evaluation"]["top1"],
                     "val_top1": m["val"]["top1"], "val_log_loss": m["val"]["loss"], "train_seconds": m["train_seconds"],
                     "wall_seconds": wall, "latency_ms": latency(ens, args.bench_runs, log, args.reuse)})
    teacher, _ = max(ensembles, key=lambda e: (e[1]["val"]["top1"], -e[1]["val"]["loss"]))

    student = out / f"distilled-{args.student}"
    flags = ["--alpha", args.alpha] if args.alpha is not None else []
    flags += ["--temperature", args.temperature] if args.temperature is not None else []
    wall = command(["distill", "--teacher", teacher, "--student", args.student, data, "--out", student, "--overwrite",
                    "--quiet", *flags, *extra], log, student if args.reuse else None)
    m = metrics(student)
    export_wall = command(["export", student, "--precision", "int8", "--quiet", *shlex.split(args.export_extra)], log)
    student_latency = latency(student, args.bench_runs, log)
    rows.append({"name": f"distilled {args.student} (teacher: {teacher.name})", "run": str(student), "kind": "student",
                 "test_top1": m["evaluation"]["top1"], "val_top1": m["val"]["top1"], "train_seconds": m["train_seconds"],
                 "wall_seconds": wall, "latency_ms": {k: v for k, v in student_latency.items() if k != "onnx int8"}})
    rows.append({"name": f"distilled {args.student}, INT8", "run": str(student / "export" / "model.int8.onnx"),
                 "kind": "student-int8", "test_top1": int8_test_top1(student), "val_top1": None,
                 "train_seconds": m["train_seconds"], "export_seconds": export_wall,
                 "latency_ms": {k: v for k, v in student_latency.items() if k == "onnx int8"}})

    best_member = max((r for r in rows if r["kind"] == "member"), key=lambda r: r["test_top1"])
    plain = next(r for r in rows if r["kind"] == "member" and args.student in r["name"])
    ens_row = next(r for r in rows if r["kind"] == "ensemble" and r["run"] == str(teacher))
    st, q = rows[-2], rows[-1]
    checks = {
        "ensemble beats its best member (test)": ens_row["test_top1"] > best_member["test_top1"],
        f"distilled beats plain {args.student} (test)": st["test_top1"] > plain["test_top1"],
        "distilled within 0.5 points of the ensemble": ens_row["test_top1"] - st["test_top1"] <= 0.005,
        "INT8 within 0.5 points of the distilled fp32": st["test_top1"] - q["test_top1"] <= 0.005,
    }
    report = {**describe(), "data": args.data, "limit": args.limit, "extra": args.extra, "teacher": str(teacher),
              "results": rows, "checks": checks, "commands": log}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print()
    print("| model | test top-1 | val top-1 | train s | batch-1 ms (engine) |\n|---|---|---|---|---|")
    for r in rows:
        fastest = min(r["latency_ms"].items(), key=lambda kv: kv[1]) if r["latency_ms"] else None
        ms = f"{fastest[1]:.1f} ({fastest[0]})" if fastest else "-"
        val = f"{r['val_top1']:.2%}" if r["val_top1"] is not None else "-"
        print(f"| {r['name']} | {r['test_top1']:.2%} | {val} | {r['train_seconds']:.0f} | {ms} |")
    print()
    for name, ok in checks.items():
        print(f"- {'yes' if ok else 'NO'}: {name}")
    return report


if __name__ == "__main__":
    main()
