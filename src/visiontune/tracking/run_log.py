"""A finished run folder (or evaluation, export or ensemble folder) as one MLflow run: its settings as parameters,
history.csv as per-epoch metrics with steps, metrics.json's numbers (95 % intervals as .low / .high), and the
report, model card, plots, model.json and config.yaml as artifacts.

Called only once the folder is written, so a tracker that is down never costs the run: `visiontune track RUN`
sends it later.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from visiontune.config import TrackConfig
from visiontune.models.run_dir import HISTORY_COLUMNS, RunDir
from visiontune.tracking.connect import client, mlflow_errors, tracking_uri
from visiontune.tracking.flatten import METRICS_PER_CALL, PARAMS_PER_CALL, chunks, clean_key, flat_metrics, flat_params

TRUNCATED_TAG = "visiontune.truncated_params"
FOLDER_TAG = "visiontune.folder"
VERB_TAG = "visiontune.verb"
# What a reader of the tracked run opens; the weights stay in the folder (an export is logged as a model instead).
ARTIFACT_FILES = (RunDir.REPORT, RunDir.CARD, RunDir.META, RunDir.CONFIG, RunDir.METRICS, RunDir.HISTORY,
                  RunDir.CLASS_REPORT, RunDir.ENSEMBLE)
HISTORY_NUMBERS = [c for c in HISTORY_COLUMNS if c not in ("phase", "epoch")]


@dataclass
class TrackedRun:
    run_id: str
    experiment_id: str
    uri: str | None
    truncated: list[str]

    def summary(self) -> str:
        where = self.uri or "MLflow's default store (./mlflow.db)"
        cut = f" ({len(self.truncated)} long parameter(s) truncated)" if self.truncated else ""
        return f"tracked: MLflow run {self.run_id} in experiment {self.experiment_id} at {where}{cut}"


def experiment_id(mlflow_client, name: str) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else mlflow_client.create_experiment(name)


def start_run(cfg: TrackConfig, verb: str, folder: Path | None, default_name: str, parent_id: str | None = None):
    """(client, TrackedRun) of a new MLflow run, tagged with the verb, the folder and --tags."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    uri = tracking_uri(cfg.tracking_uri)
    mlflow_client = client(uri)
    with mlflow_errors(uri):
        exp = experiment_id(mlflow_client, cfg.experiment)
        tags = {VERB_TAG: verb, **({FOLDER_TAG: str(folder.resolve())} if folder else {}), **cfg.tag_items()}
        if parent_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_id
        run = mlflow_client.create_run(exp, run_name=cfg.run_name or default_name, tags=tags)
    return mlflow_client, TrackedRun(run.info.run_id, exp, uri, [])


def log_params_and_metrics(mlflow_client, tracked: TrackedRun, params: dict, metrics: dict, max_chars: int,
                           history: list[dict] | None = None) -> None:
    from mlflow.entities import Metric, Param, RunTag

    flat, cut = flat_params(params, max_chars)
    tracked.truncated = cut
    now = int(time.time() * 1000)
    points = [Metric(k, v, now, 0) for k, v in flat_metrics(metrics).items()]
    for row in history or []:  # one curve per phase and column, stepped by the phase's epoch
        for column in HISTORY_NUMBERS:
            if row.get(column) not in (None, ""):
                points.append(Metric(clean_key(f"{row['phase']}/{column}"), float(row[column]), now, int(row["epoch"])))
    with mlflow_errors(tracked.uri):
        for part in chunks([Param(k, v) for k, v in flat.items()], PARAMS_PER_CALL):
            mlflow_client.log_batch(tracked.run_id, params=part)
        for part in chunks(points, METRICS_PER_CALL):
            mlflow_client.log_batch(tracked.run_id, metrics=part)
        if cut:
            mlflow_client.log_batch(tracked.run_id, tags=[RunTag(TRUNCATED_TAG, ",".join(cut)[:5000])])


def log_folder_artifacts(mlflow_client, tracked: TrackedRun, folder: Path) -> None:
    run = RunDir(folder)
    with mlflow_errors(tracked.uri):
        for name in ARTIFACT_FILES:
            if (run / name).is_file():
                mlflow_client.log_artifact(tracked.run_id, str(run / name))
        if run.plots.is_dir():
            mlflow_client.log_artifacts(tracked.run_id, str(run.plots), RunDir.PLOTS)


def read_history(folder: Path) -> list[dict]:
    path = RunDir(folder).history
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def folder_settings(folder: Path) -> dict:
    """config.yaml of a run (every setting it was trained with), or {} for a folder without one."""
    path = RunDir(folder).config
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def log_folder(folder: str | Path, cfg: TrackConfig, verb: str, *, params: dict | None = None,
               metrics: dict | None = None, history: bool = True) -> TrackedRun:
    """One MLflow run for `folder`: `params` (default: its config.yaml), `metrics` (default: its metrics.json), its
    history (unless `history` is False) and its artifacts. Raises TrackingError (one line) when MLflow cannot be
    reached or refuses."""
    folder = Path(folder)
    run = RunDir(folder)
    mlflow_client, tracked = start_run(cfg, verb, folder, folder.name)
    settings = folder_settings(folder) if params is None else params
    numbers = (run.read_metrics() if run.metrics.is_file() else {}) if metrics is None else metrics
    log_params_and_metrics(mlflow_client, tracked, settings, numbers, cfg.param_chars,
                           read_history(folder) if history else None)
    log_folder_artifacts(mlflow_client, tracked, folder)
    with mlflow_errors(tracked.uri):
        mlflow_client.set_terminated(tracked.run_id, "FINISHED")
    return tracked
