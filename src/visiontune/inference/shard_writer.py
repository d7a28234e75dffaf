"""Predictions written as shards into one folder, the same files whichever engine made them (one machine or Ray).

Each shard (`part-000012.parquet`, or `.csv`) is written to a temporary name and renamed, so it is there whole or
not at all; a rerun skips the shards that are there, so an image is written once however often the job was
killed. `_job.json` records what the shards are predictions of; a rerun asking for anything else is refused
rather than mixing two jobs in one folder.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable

from visiontune.config import InferenceConfig
from visiontune.errors import ConfigError
from visiontune.files import atomic_write_bytes, read_json, remove_stale_temporaries, write_json
from visiontune.inference.classifier import Classifier, Prediction

JOB = "_job.json"
COLUMNS = ("path", "label", "probability", "top_k", "entropy", "uncertain", "unknown", "unknown_score", "error")


def predict_rows(clf: Classifier, paths: list[str], cfg: InferenceConfig, workers: int) -> list[dict]:
    """One shard's paths through the model: what both engines (this machine, a Ray actor) run."""
    return rows(clf.iter_predict(paths, top_k=cfg.top_k, tta=cfg.tta, workers=workers))


def rows(predictions: Iterable[Prediction]) -> list[dict]:
    """One row per image; top_k as JSON text ([[label, probability], ...]) so CSV and Parquet hold the same."""
    return [{"path": p.source, "label": p.label, "probability": p.probability,
             "top_k": json.dumps([[name, round(prob, 6)] for name, prob in p.top_k]) if p.top_k else None,
             "entropy": p.entropy, "uncertain": p.uncertain, "unknown": p.unknown, "unknown_score": p.unknown_score,
             "error": p.error} for p in predictions]


def arrow_schema():
    import pyarrow as pa

    kinds = {"probability": pa.float64(), "entropy": pa.float64(), "unknown_score": pa.float64(),
             "uncertain": pa.bool_(), "unknown": pa.bool_()}
    return pa.schema([(name, kinds.get(name, pa.string())) for name in COLUMNS])


class ShardFolder:
    def __init__(self, out: str | Path, fmt: str, job: dict):
        self.out = Path(out)
        self.fmt = fmt
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ConfigError("Parquet shards need pyarrow: pip install 'visiontune[ray]', or give "
                                  "--shard-format csv") from None
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--shards {out}: is a file, not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)  # a killed writer's half shard
        before = read_json(self.out / JOB)
        if before and before != job:
            changed = ", ".join(k for k in sorted(set(job) | set(before)) if job.get(k) != before.get(k))
            raise ConfigError(f"--shards {out}: holds the shards of another job (it differs in {changed}); give a "
                              f"new folder, or the same settings to resume it (no file was changed)")
        if not before:
            if any(self.out.glob("part-*")):
                raise ConfigError(f"--shards {out}: holds shards with no {JOB}; give a new folder")
            write_json(self.out / JOB, job)

    def path(self, index: int) -> Path:
        return self.out / f"part-{index:06d}.{self.fmt}"

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def write(self, index: int, shard_rows: list[dict]) -> None:
        atomic_write_bytes(self.path(index), self._encode(shard_rows))

    def _encode(self, shard_rows: list[dict]) -> bytes:
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(shard_rows, schema=arrow_schema()), sink)
            return sink.getvalue().to_pybytes()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else str(v).lower() if isinstance(v, bool) else v for k, v in r.items()}
                         for r in shard_rows)
        return buffer.getvalue().encode("utf-8", "surrogateescape")


def read_shards(out: str | Path) -> list[dict]:
    """Every row of a shard folder, shard by shard (for checks and tests; a large job is read with pyarrow or
    pandas directly: `pandas.read_parquet(out)` reads the folder)."""
    found = []
    for path in sorted(Path(out).glob("part-*")):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            found += pq.read_table(path).to_pylist()
        else:
            with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
                found += list(csv.DictReader(fh))
    return found

