"""The public Python API: one function per CLI verb (serving is `visiontune.serve.serve`).

Every verb is `verb(target, *, config=None, **overrides)`: `config` is the verb's settings (a config from
`visiontune.config`, default: its defaults) and `overrides` change single settings by name (`epochs=8`,
`val=0.2`), checked before any work starts. The other keywords say where things are (`out=`, `root=`) and
how to behave (`quiet=`, `overwrite=`); none of them restates a setting's default.

Like the CLI, a verb shows its progress on stderr (bars, the plan line, epoch lines): a call that runs for minutes
must not look hung. `quiet=True` silences it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Union

from visiontune.config import (
    BenchConfig,
    DataConfig,
    DoctorConfig,
    EnsembleConfig,
    EvalConfig,
    ExplainConfig,
    ExportConfig,
    InferenceConfig,
    ScanConfig,
    TrackConfig,
    TrainConfig,
    override,
    to_dict,
)
from visiontune.data.index import Dataset, load_dataset
from visiontune.data.integrity import ScanReport, scan_dataset
from visiontune.data.split import Split, split_dataset
from visiontune.errors import ConfigError, DatasetError, SplitError
from visiontune.files import refuse_output_over_inputs
from visiontune.models.run_dir import RunDir, read_train_config

PathLike = Union[str, Path]
Track = Union[TrackConfig, dict, str, None]  # see `train`


def scan(data: PathLike | Dataset, *, root: PathLike | None = None, config: ScanConfig | None = None,
         quiet: bool = False, **overrides) -> ScanReport:
    """Check every file of a dataset; see `ScanReport.to_dict()` for what is reported."""
    cfg = override(config or ScanConfig(), **overrides)
    return scan_dataset(_dataset(data, root), cfg, quiet=quiet)


def split(data: PathLike | Dataset, *, out: PathLike | None = None, root: PathLike | None = None, check: bool = True,
          config: DataConfig | None = None, quiet: bool = False, **overrides) -> tuple[Split, ScanReport | None]:
    """Stratified split of the usable images; with `out`, written as a `path,label,split` manifest.

    Settings are DataConfig's (val=, test=, seed=, min_per_split=, and the scan's). Returns the split and the scan
    report (None with check=False) that says which files were left out.
    """
    cfg = override(config or DataConfig(), **overrides)
    dataset = _dataset(data, root)
    if out is not None:
        _refuse_to_overwrite_input(dataset, Path(out))
    report = None
    usable, duplicates = None, []
    if check:
        report = scan_dataset(dataset, cfg.scan, quiet=quiet)
        if report.unusable_reason:
            raise DatasetError(report.unusable_reason)
        usable, duplicates = report.usable, report.exact_duplicates + report.near_duplicates
    result = split_dataset(dataset, usable, cfg.split, duplicates)
    if out is not None:
        result.write_csv(Path(out))
    return result, report


def doctor(data: PathLike | Dataset, *, out: PathLike | None = None, root: PathLike | None = None,
           overwrite: bool = False, config: DoctorConfig | None = None, quiet: bool = False, **overrides):
    """Likely mislabelled images, outliers and differently labelled duplicates, from out-of-fold predictions on the
    pretrained backbone's features of every image (all splits). Writes issues.csv, issues.json, issues.html and
    fixed_manifest.csv into `out` (default: doctor/<data>-<model>, numbered if taken; never inside the data, never
    over a folder in use without `overwrite`); no file of the data is changed.

    Settings are DoctorConfig's (model=, weights=, folds=, l2=, rank_by=, cache_dir=, ...). Returns a DoctorResult
    (out_dir, issues, summary, relabelled())."""
    from visiontune.jobs.doctor import diagnose

    cfg = override(config or DoctorConfig(), **overrides)
    dataset = _dataset(data, root)
    label = str(dataset.source) if isinstance(data, Dataset) else str(data)
    out_dir = Path(out) if out is not None else default_run_dir(label, cfg.model, parent=Path("doctor"))
    return diagnose(dataset, cfg, out_dir, data_label=label, overwrite=overwrite, quiet=quiet)


def _dataset(data: PathLike | Dataset, root: PathLike | None) -> Dataset:
    return data if isinstance(data, Dataset) else load_dataset(data, root=root)


def _refuse_to_overwrite_input(dataset: Dataset, out: Path) -> None:
    target = out.resolve()
    if target == dataset.source.resolve():
        raise SplitError(f"{out}: that is the dataset's own manifest; write the split somewhere else")
    try:
        rel = target.relative_to(dataset.root.resolve()).as_posix()
    except ValueError:
        return
    if rel in dataset.paths:
        raise SplitError(f"{out}: that is one of the dataset's own files; write the split somewhere else")


def data_inputs(dataset: Dataset) -> list[Path]:
    """What an output must not overwrite, lie inside or hold: the dataset's folder, or a manifest and every folder
    its images lie in (a run beside the manifest, in the same folder, is fine)."""
    if dataset.layout != "manifest":
        return [dataset.root]
    return [dataset.source, *sorted({dataset.abspath(i).parent for i in range(len(dataset))})]


def default_run_dir(data: PathLike, model: str, parent: Path = Path("runs")) -> Path:
    """runs/<dataset>-<model>, numbered when taken, so a new run never lands on an old one."""
    name = Path(str(data)).stem if Path(str(data)).suffix else Path(str(data)).name
    base = parent / f"{name or 'data'}-{model}"
    candidate, n = base, 2
    while candidate.exists():
        candidate, n = parent / f"{base.name}-{n}", n + 1
    return candidate


def train_config(config: TrainConfig | PathLike | None = None, **overrides) -> TrainConfig:
    """TrainConfig from a base (a config, a config.yaml / settings file, or the defaults) and overrides."""
    if isinstance(config, (str, Path)):
        _, _, config = read_train_config(Path(config))
    return override(config or TrainConfig(), **overrides)


def train(data: PathLike | Dataset | None = None, *, out: PathLike | None = None, root: PathLike | None = None,
          resume: PathLike | None = None, overwrite: bool = False, config: TrainConfig | PathLike | None = None,
          quiet: bool = False, track: Track = None, **overrides):
    """Train a classifier on `data` and write a run directory; returns a TrainResult (run_dir, metrics, ...).

    Settings are TrainConfig's (model=, views=, epochs=, full_finetune=, seed=, val=, ...); `config` may also be a
    config.yaml to start from. `resume=RUN` continues an interrupted run with its own data and settings. `track`:
    send the finished run to MLflow ("mlflow", or TrackConfig's settings as a dict or a TrackConfig).
    """
    if resume is not None:
        if data is not None or overrides or config is not None:
            raise ConfigError("resume continues a run with its own data and settings; give no others")
        return _resume(Path(resume), quiet, track)
    if data is None:
        raise ConfigError("train needs a dataset (or resume=RUN)")
    cfg = train_config(config, **overrides)  # every setting checked before the data is touched
    return _train(data, cfg, out, root, overwrite, quiet, track=track)


def _train(data: PathLike | Dataset, cfg: TrainConfig, out: PathLike | None, root: PathLike | None, overwrite: bool,
           quiet: bool, run_name: str | None = None, track: Track = None):
    from visiontune.training.trainer import train_dataset

    started = time.perf_counter()  # the budget's clock, and the time reported: the whole command, evaluation included
    if out is not None and not isinstance(data, Dataset):  # before the teacher is loaded or a file indexed
        refuse_output_over_inputs(out, [data, *([root] if root else [])], folder=True, what="write the run")
    teacher = _teacher(cfg)
    dataset = _dataset(data, root)
    if out is not None:
        refuse_output_over_inputs(out, data_inputs(dataset), folder=True, what="write the run")
    label = str(dataset.source) if isinstance(data, Dataset) else str(data)
    run_dir = Path(out) if out is not None else default_run_dir(label, run_name or cfg.model)
    result = train_dataset(dataset, cfg, run_dir, data_label=label, root=str(root) if root else None,
                           quiet=quiet, overwrite=overwrite, teacher=teacher, started=started)
    return _tracked(_evaluate_after_training(result, cfg, quiet, started), track, quiet)


def _evaluate_after_training(result, cfg: TrainConfig, quiet: bool, started: float):
    """The end of every train: the report, which states the whole command's time (`started`: its start). Only the
    process that wrote the run (rank 0) has metrics."""
    from visiontune.evaluation.evaluate import evaluate_run

    if cfg.evaluate and result.metrics and result.metrics.get("images", {}).get("test"):
        result.evaluation = evaluate_run(result.run_dir, config=EvalConfig(), quiet=quiet, command_started=started)
        # metrics.json now has the whole time and the budget's verdict on it
        result.metrics = RunDir(result.run_dir).read_metrics()
    return result


def _tracked(result, track: Track, quiet: bool):
    """The finished run sent to the tracker by the process that wrote it (rank 0: the only one with metrics)."""
    if track is not None and result.metrics:
        from visiontune.tracking.verbs import after

        after("train", result.run_dir, track, quiet=quiet)
    return result


def _resume(run_dir: Path, quiet: bool, track: Track = None):
    from visiontune.training.checkpoint import Checkpoint
    from visiontune.training.trainer import train_dataset

    started = time.perf_counter()
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not Checkpoint(run_dir).exists() and not RunDir(run_dir).search_study.exists():
        finished = RunDir(run_dir).meta.exists()
        raise ConfigError(f"{run_dir}: nothing to resume ({'the run finished' if finished else 'no checkpoint was written yet'})")
    data, root, cfg = RunDir(run_dir).read_config()
    dataset = load_dataset(data, root=root)
    result = train_dataset(dataset, cfg, run_dir, data_label=data, root=root, quiet=quiet, resume=True,
                           teacher=_teacher(cfg), started=started)
    return _tracked(_evaluate_after_training(result, cfg, quiet, started), track, quiet)


def evaluate(run: PathLike, *, data: PathLike | None = None, root: PathLike | None = None, out: PathLike | None = None,
             allow_subset: bool = False, config: EvalConfig | None = None, quiet: bool = False, track: Track = None,
             **overrides):
    """Score a run on its test split (or `data`) and write metrics.json, plots/, report.html, MODEL_CARD.md.

    Settings are EvalConfig's (split=, calibrate=, backend=, tta=, top_losses=, map_points=, ...). Returns an Evaluation
    (out_dir, metrics, report).
    """
    from visiontune.evaluation.evaluate import evaluate_run

    cfg = override(config or EvalConfig(), **overrides)
    if out is not None and data is not None:  # the report's plots/ in a class folder would read as a class
        refuse_output_over_inputs(out, [data, *([root] if root else [])], folder=False, what="write the evaluation")
    if RunDir(run).is_ensemble:  # Grad-CAM needs one network's gradients; an ensemble has several
        cfg = override(cfg, gradcam_images=0)
    result = evaluate_run(Path(run), data=data, root=root, split=cfg.split, out=Path(out) if out else None,
                          allow_subset=allow_subset, config=cfg, quiet=quiet)
    if track is not None:
        from visiontune.tracking.verbs import after

        after("evaluate", result.out_dir, track, params={"evaluate": to_dict(cfg), "run": str(run)},
              metrics={"evaluation": result.metrics}, history=False, quiet=quiet)
    return result


def compare(runs: list[PathLike], *, out: PathLike | None = None):
    """Evaluated runs side by side: comparison.csv, .md and .html in `out` (default ./comparison); refuses runs
    scored on different splits."""
    from visiontune.evaluation.compare import compare_runs

    return compare_runs([Path(r) for r in runs], Path(out) if out is not None else None)


def explain(model: PathLike, images, *, target: str | None = None, out: PathLike | None = None, grid: bool = False,
            config: ExplainConfig | None = None, **overrides):
    """Grad-CAM (or `method=`) heat maps for image files, folders, globs, or in-memory images, with a run's PyTorch
    model; `target` is the class to explain (default: the top prediction). With `out`, one PNG per image
    (original, overlay, top-k), or one grid.png with `grid`. Settings are ExplainConfig's (method=, layer=,
    top_k=, faithfulness=, ...). Returns an ExplainResult (explanations, files, failed)."""
    from visiontune.explain.runner import explain_sources, load_explainer
    from visiontune.inference.sources import expand

    cfg = override(config or ExplainConfig(), **overrides)
    sources = images if isinstance(images, (list, tuple)) else [images]
    if out is not None:  # PNGs written into a folder of photos would be explained (and trained on) next time
        refuse_output_over_inputs(out, [model, *(s for s in sources if isinstance(s, (str, Path)))], folder=False,
                                  what="write the explanations")
    explainer = load_explainer(model, cfg.method, cfg.layer)
    missing = []
    if all(isinstance(s, (str, Path)) for s in sources):
        sources, missing = expand(sources)
    result = explain_sources(explainer, list(sources), target=target, top_k=cfg.top_k, batch_size=cfg.batch_size,
                             out=Path(out) if out else None, grid=grid, faithfulness=cfg.faithfulness)
    result.failed += missing
    return result


def export(run: PathLike, *, config: ExportConfig | None = None, quiet: bool = False, track: Track = None,
           **overrides):
    """Write RUN/export/model[.fp16|.int8].onnx, model.torchscript.pt, model[.int8].openvino.xml or
    model[.fp16].tflite after its parity check passes.

    Settings are ExportConfig's (format=, precision=, int8_agreement=, calibration_images=, ...). Returns an
    ExportResult (path, parity numbers), or an ExportResults list of them when format= or precision= names several
    ("onnx,openvino", "all"); raises ExportError when parity fails (see export/parity.json). `track`: as train's;
    with TrackConfig's register= (`track={"register": "flowers", "alias": "champion"}`), the ONNX file is logged as
    an MLflow model and registered as a new version.
    """
    from visiontune.export.exporter import export_run

    cfg = override(config or ExportConfig(), **overrides)
    if RunDir(run).is_ensemble:
        raise ConfigError(f"{run}: an ensemble is several networks, not exported as one file; distil it into one model "
                         f"(`visiontune distill --teacher {run} {RunDir(run).split}`) and export that")
    if track is None:
        return export_run(Path(run), cfg, quiet=quiet)
    from visiontune.tracking.verbs import export_and_track

    return export_and_track(Path(run), cfg, track, lambda: export_run(Path(run), cfg, quiet=quiet), quiet=quiet)


def predict(model, paths, *, config: InferenceConfig | None = None, **overrides) -> list:
    """Classify files, folders (recursively) and globs with a run, an ensemble, a .onnx or a TorchScript file (or a
    loaded Classifier). Settings are InferenceConfig's (top_k=, tta=, backend=, batch_size=, threads=). Returns one
    Prediction per file, in order, then one per name that matched nothing; unreadable ones carry `error`."""
    from visiontune.inference import Classifier, Prediction
    from visiontune.inference.sources import expand

    cfg = override(config or InferenceConfig(), **overrides)
    clf = model if isinstance(model, Classifier) else Classifier.load(model, cfg.backend, threads=cfg.threads,
                                                                       batch_size=cfg.batch_size)
    files, missing = expand([paths] if isinstance(paths, (str, Path)) else paths)
    found = clf.predict(files, top_k=cfg.top_k, tta=cfg.tta, workers=cfg.decode_workers)
    return found + [Prediction(path, error=reason) for path, reason in missing]


def predict_shards(model: PathLike, sources, out: PathLike, *, ray: str | None = None, root: PathLike | None = None,
                   config: InferenceConfig | None = None, quiet: bool = False, **overrides):
    """Classify a source of any size into a folder of shards (Parquet or CSV: path, label, probability, top_k,
    entropy, uncertain, unknown, unknown_score, error), streaming, resumable: a rerun skips the shards written.
    `sources`: folders, files, globs, or one CSV manifest with a `path` column (relative to its folder or `root`).
    `ray`: None on this machine; "" for a local Ray or the one RAY_ADDRESS names; else a cluster's address.
    Settings are InferenceConfig's (shard_images=, shard_format=, ray_actors=, threads=, ...). Returns a ShardRun."""
    from visiontune.jobs.batch_predict import predict_shards as run

    cfg = override(config or InferenceConfig(), **overrides)
    return run(model, [sources] if isinstance(sources, (str, Path)) else list(sources), out, cfg, ray=ray, root=root,
               quiet=quiet)


def bench(model: PathLike, *, image: PathLike | None = None, config: BenchConfig | None = None, quiet: bool = False,
          **overrides):
    """Batch-1 latency (from a tensor and from JPEG bytes) and throughput per batch size for every engine of `model`
    (a run: PyTorch, ONNX fp32, ONNX INT8 when exported; the report is also saved as RUN/bench.json, where
    `compare` finds it). Settings are BenchConfig's (runs=, warmup=, batch_sizes=, throughput_seconds=, threads=)."""
    from visiontune.files import write_json
    from visiontune.inference.bench import run_bench

    cfg = override(config or BenchConfig(), **overrides)
    report = run_bench(Path(model), image=image, config=cfg, quiet=quiet)
    if Path(model).is_dir():
        write_json(RunDir(model).bench, report.to_dict())
    return report


# --- ensembles and distillation -----------------------------------------------------------------------------


def _teacher(cfg: TrainConfig):
    """The distillation teacher a TrainConfig names (loaded with `inference`, which training never imports)."""
    if not cfg.distill.teacher:
        return None
    from visiontune.jobs.teacher import RunTeacher

    return RunTeacher(cfg.distill.teacher, cfg.distill.teacher_backend)


def ensemble(runs: list[PathLike], *, out: PathLike, overwrite: bool = False, config: EnsembleConfig | None = None,
             quiet: bool = False, track: Track = None, **overrides):
    """Soft voting over runs trained on the same labels and the same split: writes the ensemble directory `out`
    (ensemble.json, model.json, split.csv, metrics.json), usable wherever a run is (Classifier.load, evaluate,
    predict, bench, compare, serve, and as a distillation teacher).

    Settings are EnsembleConfig's: weights= "equal", "fit" (minimum validation log loss of the soft vote) or one
    number per run (a string "w1,w2" or a list); backend=; evaluate= (score the test split at the end, like a
    run). Returns an EnsembleResult (out_dir, weights, weights_from, metrics, evaluation).
    """
    from visiontune.jobs.ensemble import build_ensemble

    if isinstance(overrides.get("weights"), (list, tuple)):
        overrides["weights"] = ",".join(str(float(w)) for w in overrides["weights"])
    cfg = override(config or EnsembleConfig(), **overrides)
    result = build_ensemble([Path(r) for r in runs], Path(out), config=cfg, overwrite=overwrite, quiet=quiet)
    if cfg.evaluate and result.metrics.get("images", {}).get("test"):
        result.evaluation = evaluate(result.out_dir, quiet=quiet, backend=cfg.backend)
        result.metrics["evaluation"] = result.evaluation.metrics
    if track is not None:
        from visiontune.tracking.verbs import after

        after("ensemble", result.out_dir, track, params={"ensemble": to_dict(cfg), "members": [str(r) for r in runs]},
              quiet=quiet)
    return result


def distill(data: PathLike | Dataset | None = None, *, teacher: PathLike, out: PathLike | None = None,
            root: PathLike | None = None, overwrite: bool = False, config: TrainConfig | PathLike | None = None,
            quiet: bool = False, track: Track = None, **overrides):
    """Train a student (`model=` or `student=`) on `data` against a teacher (a run or an ensemble directory): the
    loss on every cached view is alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * label loss,
    with the teacher's logits computed once for exactly the views the student trains on. Otherwise the same recipe
    and settings as `train` (alpha= and temperature= are the distillation's), and the result is an ordinary run
    (its config.yaml records the teacher), so evaluate, export and predict work unchanged. Returns a TrainResult.
    """
    if data is None:
        raise ConfigError("distill needs a dataset")
    cfg = train_config(config, **overrides)
    cfg = override(cfg, distill={"teacher": str(teacher)})
    return _train(data, cfg, out, root, overwrite, quiet, run_name=f"{cfg.model}-distilled", track=track)


def track(folder: PathLike, *, config: TrackConfig | None = None, **overrides):
    """Send a finished run, ensemble or evaluation folder to MLflow now (e.g. after the server was down): its
    settings, per-epoch history, metrics and artifacts, as `--track mlflow` does. Settings are TrackConfig's
    (tracking_uri=, experiment=, run_name=, tags=). Returns a TrackedRun (run_id); raises TrackingError."""
    from visiontune.tracking.run_log import log_folder

    cfg = override(config or TrackConfig(track="mlflow"), **overrides)
    folder = Path(folder)
    if not RunDir(folder).metrics.is_file() and not RunDir(folder).meta.is_file():
        raise ConfigError(f"{folder}: not a finished visiontune folder ({RunDir.METRICS} and {RunDir.META} are missing)")
    verb = "ensemble" if RunDir(folder).is_ensemble else "train" if RunDir(folder).meta.is_file() else "evaluate"
    return log_folder(folder, cfg, verb)
