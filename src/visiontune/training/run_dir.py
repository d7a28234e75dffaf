"""The run directory's small files: config.yaml, history.csv (+ TensorBoard events), metrics.json."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import yaml

from visiontune.config import TrainConfig, from_dict, to_dict
from visiontune.errors import ConfigError

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
SPLIT_FILE = "split.csv"
BENCH_FILE = "bench.json"  # written by `visiontune bench RUN`, read by `compare`
HISTORY_COLUMNS = ["phase", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_config(run_dir: Path, data: str, root: str | None, cfg: TrainConfig) -> None:
    """Every setting used, plus where the data was, so `visiontune train --config` repeats the run."""
    payload = {"data": data, "root": root, **to_dict(cfg)}
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(payload, sort_keys=False))


def read_config(run_dir: Path) -> tuple[str, str | None, TrainConfig]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {CONFIG_FILE}; not a visiontune run directory")
    payload = yaml.safe_load(path.read_text()) or {}
    data, root = payload.pop("data", None), payload.pop("root", None)
    return data, root, from_dict(TrainConfig, payload, str(path))


def read_json(path: Path) -> dict:
    """A JSON file of the run (metrics.json, a benchmark's results) or {} when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_metrics(run_dir: Path, metrics: dict) -> None:
    atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")


class History:
    """One row per epoch: history.csv (rewritten whole, atomically), TensorBoard, and a line on stderr."""

    def __init__(self, run_dir: Path, quiet: bool, rows: list[dict] | None = None, write: bool = True):
        self.run_dir = run_dir
        self.quiet = quiet
        self.write = write  # False on every process but rank 0 of a distributed run
        self.rows: list[dict] = list(rows or [])
        self._writer = None

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def add(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in HISTORY_COLUMNS}
        self.rows.append(row)
        if not self.write:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.run_dir / HISTORY_FILE, buffer.getvalue())
        step = len(self.rows)
        tb = self._tensorboard()
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            if isinstance(row[key], (int, float)):
                tb.add_scalar(f"{key.replace('_', '/', 1)}", row[key], step)
        tb.flush()
        if not self.quiet:
            print(f"{row['phase']:>8} epoch {row['epoch']:>3}  loss {_fmt(row['train_loss'])}  acc {_fmt(row['train_acc'])}"
                  f"  val_loss {_fmt(row['val_loss'])}  val_acc {_fmt(row['val_acc'])}  {_fmt(row['images_per_s'], 0)} img/s",
                  file=sys.stderr)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
