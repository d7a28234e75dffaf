"""What `--budget` buys: test top-1 of whole `visiontune train --budget B` commands (the search included) at several
budgets on both benchmark datasets, beside the default run without a budget. Every run builds its own cached views
(no shared --cache-dir: a later run must not inherit an earlier one's frozen pass), one after another.

    .venv/bin/python bench/budget_curve.py --budgets 2m,5m,10m,20m
    .venv/bin/python bench/budget_curve.py --data oxford102/split_official.csv --budgets 20m --extra "--no-search"
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
from machine import describe, save_json  # noqa: E402
from train_benchmark import DATASETS, ROOT  # noqa: E402


def run(data: Path, budget: str, extra: str, out: Path) -> dict:
    exe = Path(sys.executable).with_name("visiontune")
    cmd = [str(exe), "train", str(data), "--out", str(out), "--overwrite", "--quiet",
           *(["--budget", budget] if budget else []), *shlex.split(extra)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    row = {"budget": budget or "none", "extra": extra, "command": " ".join(shlex.quote(c) for c in cmd[1:])}
    if done.returncode != 0:
        return {**row, "error": done.stderr.strip().splitlines()[-1:]}
    m = json.loads((out / "metrics.json").read_text())
    search = m.get("search") or {}
    chosen = search.get("chosen") or {}
    return {**row, "wall_seconds": round(wall, 1), "test_top1": m.get("test", {}).get("top1"),
            "oof_top1": (m.get("refit") or {}).get("oof_top1"), "within": (m.get("budget") or {}).get("within"),
            "trials": search.get("trials"), "models_tried": search.get("models"),
            "chosen": {k: chosen.get(k) for k in ("model", "views", "head_lr", "dropout", "label_smoothing",
                                                   "finetune_epochs", "finetune_lr", "ema")} if chosen else None}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="flower_photos/split.csv", help="relative to ../shared/datasets")
    parser.add_argument("--budgets", default="2m,5m,10m,20m", help="comma-separated; 'none' for no budget")
    parser.add_argument("--extra", default="", help="more train flags")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "budget_curve"))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    data = DATASETS / args.data
    rows = []
    for budget in [b.strip() for b in args.budgets.split(",")]:
        budget = "" if budget == "none" else budget
        out = Path(args.out) / f"{data.parent.name}_{budget or 'none'}{'_' + args.extra.replace(' ', '') if args.extra else ''}"
        rows.append(run(data, budget, args.extra, out))
        print(json.dumps(rows[-1]), flush=True)
    save_json(args.json, {"machine": describe(), "date": time.strftime("%Y-%m-%d"), "data": args.data, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
