"""Wall time and accuracy of whole `visiontune train` commands on the shared benchmark datasets; each model is
then also scored on the test split with test-time augmentation (`visiontune evaluate --tta`, timed apart).

Each configuration runs as its own process (the time a user waits, start-up and decoding included),
one after another, so they are measured side by side on the same machine state.

    .venv/bin/python bench/train_benchmark.py                            # lite0 on flower_photos
    .venv/bin/python bench/train_benchmark.py --data oxford102/split_official.csv --models efficientnet_lite0
    .venv/bin/python bench/train_benchmark.py --extra "--trainable-stages 1" --extra "--trainable-stages 2"
"""

from __future__ import annotations

import argparse
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


def run(data: Path, model: str, extra: str, out: Path, tta: bool = True) -> dict:
    exe = Path(sys.executable).with_name("visiontune")
    cmd = [str(exe), "train", str(data), "--model", model, "--out", str(out), "--overwrite", "--quiet", *shlex.split(extra)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"model": model, "extra": extra, "error": done.stderr.strip().splitlines()[-1:]}
    metrics = json.loads((out / "metrics.json").read_text())
    return {"model": model, "extra": extra, "wall_seconds": round(wall, 1),
            "val_top1": metrics.get("val", {}).get("top1"), "test_top1": metrics.get("test", {}).get("top1"),
            **(tta_test_top1(exe, out) if tta else {}), "images": metrics["images"],
            "command": " ".join(shlex.quote(c) for c in cmd[1:])}


def tta_test_top1(exe: Path, run: Path) -> dict:
    """The same model scored on the test split with test-time augmentation (`evaluate --tta`), timed apart
    from training: what `predict --tta` users get."""
    out = run / "evaluations" / "test-tta"
    cmd = [str(exe), "evaluate", str(run), "--tta", "--no-calibrate", "--out", str(out), "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"tta_error": done.stderr.strip().splitlines()[-1:]}
    evaluation = json.loads((out / "metrics.json").read_text())["evaluation"]
    return {"test_top1_tta": evaluation["top1"], "tta_eval_seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="flower_photos/split.csv", help="relative to ../shared/datasets")
    parser.add_argument("--models", default="efficientnet_lite0", help="comma-separated")
    parser.add_argument("--extra", action="append", default=None, help="extra train flags; repeat for several configurations")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "train"), help="run directories go here")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="skip the test-time-augmentation scoring")
    args = parser.parse_args(argv)
    data = DATASETS / args.data
    results = []
    for model in args.models.split(","):
        for k, extra in enumerate(args.extra or [""]):
            result = run(data, model, extra, Path(args.out) / f"{data.parent.name}-{model}-{k}", args.tta)
            results.append(result)
            print(json.dumps(result), flush=True)
    report = {**describe(), "data": args.data, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print("| model | flags | wall s | val top-1 | test top-1 | test top-1, TTA |\n|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | `{r['extra']}` | error: {r['error']} | | | |")
        else:
            tta = f"{r['test_top1_tta']:.2%}" if "test_top1_tta" in r else r.get("tta_error", "not scored")
            print(f"| {r['model']} | `{r['extra']}` | {r['wall_seconds']:.0f} | {r['val_top1']:.2%} "
                  f"| {r['test_top1']:.2%} | {tta} |")
    return results


if __name__ == "__main__":
    main()
