"""What each verb sends to the tracker once its folder is written. After the work, never before or during it: a
tracker that is down costs one line on stderr (and `visiontune track FOLDER` sends the folder later), not the run."""

from __future__ import annotations

import sys
from pathlib import Path

from visiontune.config import TrackConfig
from visiontune.errors import TrackingError
from visiontune.models.run_dir import RunDir
from visiontune.settings import SettingError, override, to_dict
from visiontune.tracking.connect import is_rank_zero, mlflow_errors
from visiontune.tracking.register import Registered, log_onnx_model
from visiontune.tracking.run_log import (
    TrackedRun,
    folder_settings,
    log_folder,
    log_folder_artifacts,
    log_params_and_metrics,
    start_run,
)


def as_track_config(track: TrackConfig | dict | str | None) -> TrackConfig | None:
    """The API's `track=`: None (off), "mlflow", a mapping of TrackConfig's settings, or a TrackConfig."""
    if track is None or isinstance(track, TrackConfig):
        return track
    if isinstance(track, str):
        return TrackConfig(track=track)
    return override(TrackConfig(track="mlflow"), **track)  # settings given mean tracking is wanted


def after(verb: str, folder: Path, track: TrackConfig | dict | str | None, *, params: dict | None = None,
          metrics: dict | None = None, history: bool = True, quiet: bool = False) -> TrackedRun | None:
    """Send a written folder; on failure say so in one line and go on (the folder is the record)."""
    cfg = as_track_config(track)
    if cfg is None or not cfg.enabled or not is_rank_zero():
        return None
    try:
        tracked = log_folder(folder, cfg, verb, params=params, metrics=metrics, history=history)
    except TrackingError as exc:
        print(f"visiontune: warning: not tracked: {exc}; everything is in {folder}, and `visiontune track {folder}` "
              f"sends it later", file=sys.stderr)
        return None
    if verb == "train":
        _search_trials(folder, cfg)
    if not quiet:
        print(tracked.summary(), file=sys.stderr)
    return tracked


def _search_trials(folder: Path, cfg: TrackConfig) -> None:
    """A --budget search's trials, from the written run, as a parent run with one nested run per trial."""
    from visiontune.tracking.trials import search_run

    search = (RunDir(folder).read_metrics() if RunDir(folder).metrics.is_file() else {}).get("search") or {}
    if not search.get("rows"):
        return
    with search_run(cfg, f"{Path(folder).name}-search", {"chosen": search["chosen"]["trial"]}) as parent:
        for row in search["rows"]:
            params = {k: v for k, v in row.items() if k not in ("oof_top1", "oof_loss", "seconds") and v != ""}
            with parent.nested_trial(params, name=row["trial"]) as log:
                log({k: row[k] for k in ("oof_top1", "oof_loss", "seconds") if row.get(k) is not None})


def export_and_track(run: Path, export_config, track: TrackConfig | dict | str | None, export, quiet: bool = False):
    """`export()`'s results, then `after_export`; a registration without an ONNX export is refused first."""
    cfg = as_track_config(track)
    if cfg is not None and cfg.register and not any(f == "onnx" for f, _ in export_config.jobs()[0]):
        raise SettingError("register", f"registers the ONNX model, and --format {export_config.format} writes none: "
                                       "add onnx (e.g. --format onnx,openvino)")
    results = export()
    after_export(run, results, export_config, cfg, quiet)
    return results


def after_export(run: Path, results, export_config, track: TrackConfig | dict | str | None,
                 quiet: bool = False) -> Registered | None:
    """The export's tracked run (its settings and parity numbers, model.json, parity.json), its ONNX file logged as
    an MLflow model, and with --register, a new registered version. Unlike training, a registration that fails is
    an error: registering was the command's point, and nothing is lost by running it again."""
    cfg = as_track_config(track)
    if cfg is None or not cfg.enabled or not is_rank_zero():
        return None
    items = results if isinstance(results, list) else [results]
    onnx = [r.path for r in items if r.format == "onnx"]
    parity = {f"{r.format}.{r.precision}": r.parity for r in items}
    mlflow_client, tracked = start_run(cfg, "export", Path(run), cfg.run_name or f"{Path(run).name}-export")
    log_params_and_metrics(mlflow_client, tracked, {"export": to_dict(export_config), "run": folder_settings(Path(run))}, parity,
                           cfg.param_chars)
    log_folder_artifacts(mlflow_client, tracked, Path(run))
    if RunDir(run).parity.is_file():
        with mlflow_errors(tracked.uri):
            mlflow_client.log_artifact(tracked.run_id, str(RunDir(run).parity), RunDir.EXPORT)
    registered = log_onnx_model(mlflow_client, tracked, Path(run), onnx[0], cfg) if onnx else None
    with mlflow_errors(tracked.uri):
        mlflow_client.set_terminated(tracked.run_id, "FINISHED")
    if not quiet:
        print(tracked.summary(), file=sys.stderr)
        if registered:
            print(registered.summary(), file=sys.stderr)
    return registered

