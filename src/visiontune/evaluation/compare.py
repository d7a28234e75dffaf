"""`compare`: several runs side by side (comparison.csv, .md, .html), best value per column marked.

Only runs scored on the same split are comparable: the split identity is the set of (file, label, split)
rows of each run's split.csv, with paths resolved, so runs in different folders still match.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from visiontune.errors import ConfigError
from visiontune.evaluation.intervals import mcnemar, span
from visiontune.evaluation.report import template
from visiontune.evaluation.scoring import run_split
from visiontune.files import atomic_write_text, read_json
from visiontune.models.bundle import read_meta
from visiontune.models.run_dir import RunDir

# (column, title, better): better is "max", "min" or None (not ranked)
COLUMNS = [
    ("run", "run", None),
    ("backbone", "backbone", None),
    ("settings", "settings that differ", None),
    ("train_seconds", "train s", "min"),
    ("parameters", "params", "min"),
    ("top1", "top-1", "max"),
    ("top1_ci", "top-1 95 % interval", None),
    ("vs_best", "against the best top-1 (McNemar, same images)", None),
    ("top3", "top-3", "max"),
    ("top5", "top-5", "max"),
    ("macro_f1", "macro F1", "max"),
    ("ece", "ECE", "min"),
    ("latency_ms", "batch-1 ms", "min"),
]
CSV_FILE, MD_FILE, HTML_FILE = "comparison.csv", "comparison.md", "comparison.html"
DEFAULT_FOLDER = Path("comparison")


@dataclass
class Comparison:
    rows: list[dict]
    best: dict[str, set[int]]  # column -> indices of the rows holding the best value
    files: list[Path]


def split_identity(run: Path) -> str:
    dataset = run_split(run)
    rows = sorted((str(dataset.abspath(i).resolve()), dataset.classes[dataset.labels[i]], int(dataset.splits[i]))
                  for i in range(len(dataset)))
    return hashlib.blake2b(repr(rows).encode(), digest_size=16).hexdigest()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _latency(run: Path) -> float | None:
    """Batch-1 p50 from a tensor of the fastest engine, where `visiontune bench RUN` saved its report."""
    data = read_json(RunDir(run).bench)
    values = [e["tensor_ms"]["p50"] for e in (data or {}).get("engines", []) if e.get("tensor_ms", {}).get("p50")]
    return float(min(values)) if values else None


def compare_runs(runs: list[Path], out: Path | None = None) -> Comparison:
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise ConfigError("compare needs two or more runs")
    identities, configs, rows = {}, [], []
    for run in runs:
        meta = read_meta(run)
        metrics = RunDir(run).read_metrics()
        evaluation = metrics.get("evaluation")
        if not evaluation:
            raise ConfigError(f"{run}: not evaluated yet (no \"evaluation\" in {RunDir.METRICS}); "
                              f"run `visiontune evaluate {run}` first")
        identities[run] = (split_identity(run), evaluation["split"])
        config_path = RunDir(run).config
        configs.append(_flatten(yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {})
        rows.append({"run": str(run), "backbone": meta.backbone, "train_seconds": metrics.get("train_seconds"),
                     "parameters": metrics.get("parameters"), "top1": evaluation["top1"],
                     "top3": evaluation.get("top3"), "top5": evaluation.get("top5"),
                     "macro_f1": evaluation["macro"]["f1"], "ece": evaluation["ece"], "latency_ms": _latency(run),
                     "top1_ci": evaluation.get("intervals", {}).get("top1")})
    if len(set(identities.values())) > 1:
        groups: dict = {}
        for run, identity in identities.items():
            groups.setdefault(identity, []).append(str(run))
        described = "; ".join(f"{' '.join(names)} ({identity[1]} of split {identity[0][:8]})"
                              for identity, names in groups.items())
        raise ConfigError(f"these runs were not scored on the same split, so their numbers do not compare: {described}")
    keys = sorted({k for c in configs for k in c} - {"data", "root", "cache_dir"})
    differing = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    for row, config in zip(rows, configs):
        row["settings"] = " ".join(f"{k}={config.get(k)}" for k in differing)
    _paired_tests(runs, rows)
    best = {}
    for column, _, better in COLUMNS:
        values = [(i, r[column]) for i, r in enumerate(rows) if isinstance(r[column], (int, float))]
        if better and len(values) > 1:
            target = (max if better == "max" else min)(v for _, v in values)
            best[column] = {i for i, v in values if v == target}
    out = Path(out) if out is not None else DEFAULT_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    files = [out / CSV_FILE, out / MD_FILE, out / HTML_FILE]
    atomic_write_text(files[0], _csv(rows))
    atomic_write_text(files[1], _markdown(rows, best))
    atomic_write_text(files[2], _html(rows, best))
    return Comparison(rows, best, files)


def _correct(run: Path) -> dict[tuple, bool]:
    """{image: whether the run's evaluation got it right}, from its predictions.csv. An image is named by its folder,
    file name and label: the paths themselves were written relative to wherever each evaluation ran."""
    path = RunDir(run).predictions
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {(*Path(r["path"]).parts[-2:], r["true"]): r["true"] == r["predicted"] for r in csv.DictReader(fh)}


def _paired_tests(runs: list[Path], rows: list[dict]) -> None:
    """Each run against the best top-1 run, on the images both scored: is the difference real (p < 0.05) or noise?"""
    leader = max(range(len(rows)), key=lambda i: rows[i]["top1"])
    best = _correct(runs[leader])
    for i, (run, row) in enumerate(zip(runs, rows)):
        if i == leader:
            row["vs_best"] = "best"
            continue
        mine = _correct(run)
        shared = sorted(set(best) & set(mine))
        if not shared:
            row["vs_best"] = None
            continue
        test = mcnemar(np.array([best[k] for k in shared]), np.array([mine[k] for k in shared]))
        verdict = "real difference" if test["significant"] else "within noise"
        row["vs_best"] = (f"{verdict} (p = {test['p_value']:.3g}; {test['only_first_right']} vs "
                          f"{test['only_second_right']} images only one gets right)")


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "top1_ci":
        return span(value)
    if column in ("top1", "top3", "top5", "macro_f1"):
        return f"{value:.2%}"
    if column == "ece":
        return f"{value:.3f}"
    if column == "train_seconds":
        return f"{value:.0f}"
    if column == "parameters":
        return f"{value / 1e6:.2f} M"
    if column == "latency_ms":
        return f"{value:.2f}"
    return str(value)


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[c for c, _, _ in COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else _cell(k, v) if k == "top1_ci" else v) for k, v in r.items()} for r in rows)
    return buffer.getvalue()


def _markdown(rows: list[dict], best: dict) -> str:
    lines = ["| " + " | ".join(t for _, t, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for i, r in enumerate(rows):
        cells = [_cell(c, r[c]).replace("|", "\\|") for c, _, _ in COLUMNS]
        cells = [f"**{v}**" if i in best.get(c, ()) else v for v, (c, _, _) in zip(cells, COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nBest value per column in bold.\n"


def _html(rows: list[dict], best: dict) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in COLUMNS)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for c, _, better in COLUMNS:
            text = html.escape(_cell(c, r[c]))
            mark = i in best.get(c, ())
            value = "" if r[c] is None else html.escape(str(r[c]))
            cells.append(f'<td class="{"n" if better else ""}{" best" if mark else ""}" data-v="{value}">'
                         f'{"<strong>" + text + "</strong>" if mark else text}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    table = f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'\"><title>visiontune comparison</title>"
            f"<style>{template('report.css')} td.best {{ background: #e8f3ea; }}</style></head><body><main><section>"
            f"<h2>Runs compared</h2><p class='muted'>Best value per column highlighted; click a column to sort.</p>{table}"
            f"</section></main><script>{template('report.js')}</script></body></html>")
