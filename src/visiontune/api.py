"""The public Python API: each function is one CLI verb, with the same arguments and defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import dataclasses

from visiontune.config import EvalConfig, ExplainConfig, ScanConfig, SplitConfig, TrainConfig
from visiontune.config import DistillConfig, EnsembleConfig
from visiontune.data.index import Dataset, load_dataset
from visiontune.data.integrity import ScanReport, scan_dataset
from visiontune.data.split import Split, split_dataset
from visiontune.errors import ConfigError, DatasetError, SplitError

PathLike = Union[str, Path]


def scan(data: PathLike | Dataset, *, root: PathLike | None = None, config: ScanConfig | None = None,
         quiet: bool = True) -> ScanReport:
    """Check every file of a dataset; see `ScanReport.to_dict()` for what is reported."""
    dataset = data if isinstance(data, Dataset) else load_dataset(data, root=root)
    return scan_dataset(dataset, config or ScanConfig(), quiet=quiet)


def split(data: PathLike | Dataset, *, val: float = SplitConfig.val, test: float = SplitConfig.test,
          seed: int = SplitConfig.seed, min_per_split: int = SplitConfig.min_per_split,
          out: PathLike | None = None, root: PathLike | None = None, check: bool = True,
          scan_config: ScanConfig | None = None, quiet: bool = True) -> tuple[Split, ScanReport | None]:
    """Stratified split of the usable images; with `out`, written as a `path,label,split` manifest.

    Returns the split and the scan report (None with check=False) that says which files were left out.
    """
    dataset = data if isinstance(data, Dataset) else load_dataset(data, root=root)
    if out is not None:
        _refuse_to_overwrite_input(dataset, Path(out))
    report = None
    usable = None
    if check:
        report = scan_dataset(dataset, scan_config or ScanConfig(), quiet=quiet)
        if report.unusable_reason:
            raise DatasetError(report.unusable_reason)
        usable = report.usable
    result = split_dataset(dataset, usable, SplitConfig(val=val, test=test, seed=seed, min_per_split=min_per_split))
    if out is not None:
        result.write_csv(Path(out))
    return result, report


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


def default_run_dir(data: PathLike, model: str, parent: Path = Path("runs")) -> Path:
    """runs/<dataset>-<model>, numbered when taken, so a new run never lands on an old one."""
    name = Path(str(data)).stem if Path(str(data)).suffix else Path(str(data)).name
    base = parent / f"{name or 'data'}-{model}"
    candidate, n = base, 2
    while candidate.exists():
        candidate, n = parent / f"{base.name}-{n}", n + 1
    return candidate


def train_config(config: TrainConfig | None = None, **settings) -> TrainConfig:
    """A TrainConfig from a base config and keyword overrides (`epochs` is phase 2's, `val`/`test`/`seed`
    also set the split's)."""
    cfg = dataclasses.replace(config) if config else TrainConfig()
    if "epochs" in settings:
        settings["finetune_epochs"] = settings.pop("epochs")
    split_keys = {k: settings.pop(k) for k in ("val", "test", "min_per_split") if k in settings}
    if "seed" in settings:
        split_keys["seed"] = settings["seed"]
    if split_keys:
        cfg.split = dataclasses.replace(cfg.split, **split_keys)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown training setting(s): {', '.join(unknown)}")
    return dataclasses.replace(cfg, **settings)


def train(data: PathLike | Dataset | None = None, *, out: PathLike | None = None, model: str = TrainConfig.model,
          root: PathLike | None = None, config: TrainConfig | None = None, quiet: bool = True,
          overwrite: bool = False, resume: PathLike | None = None, **settings):
    """Train a classifier on `data` and write a run directory; returns a TrainResult (run_dir, metrics, ...).

    Settings are TrainConfig's fields (views=, finetune_epochs= or epochs=, full_finetune=, seed=, ...).
    `resume=RUN` continues an interrupted run with its own data and settings, to the same result.
    """
    from visiontune.training.trainer import train_dataset

    if resume is not None:
        return _resume(Path(resume), quiet)
    if data is None:
        raise ConfigError("train needs a dataset (or resume=RUN)")
    cfg = train_config(config, model=model, **settings)
    dataset = data if isinstance(data, Dataset) else load_dataset(data, root=root)
    label = str(dataset.source) if isinstance(data, Dataset) else str(data)
    run_dir = Path(out) if out is not None else default_run_dir(label, cfg.model)
    result = train_dataset(dataset, cfg, run_dir, data_label=label, root=str(root) if root else None,
                           quiet=quiet, overwrite=overwrite, teacher=_teacher(cfg))
    return _evaluate_after_training(result, cfg, quiet)


def _evaluate_after_training(result, cfg: TrainConfig, quiet: bool):
    """The end of every train: the report. Only the process that wrote the run (rank 0) has metrics."""
    if cfg.evaluate and result.metrics and result.metrics.get("images", {}).get("test"):
        result.evaluation = evaluate(result.run_dir, quiet=quiet)
        result.metrics["evaluation"] = result.evaluation.metrics
    return result


def _resume(run_dir: Path, quiet: bool):
    from visiontune.training.checkpoint import Checkpoint
    from visiontune.training.run_dir import read_config
    from visiontune.training.trainer import train_dataset

    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not Checkpoint(run_dir).exists():
        finished = (run_dir / "model.json").exists()
        raise ConfigError(f"{run_dir}: nothing to resume ({'the run finished' if finished else 'no checkpoint was written yet'})")
    data, root, cfg = read_config(run_dir)
    dataset = load_dataset(data, root=root)
    result = train_dataset(dataset, cfg, run_dir, data_label=data, root=root, quiet=quiet, resume=True,
                           teacher=_teacher(cfg))
    return _evaluate_after_training(result, cfg, quiet)


def evaluate(run: PathLike, *, data: PathLike | None = None, root: PathLike | None = None, split: str | None = None,
             out: PathLike | None = None, allow_subset: bool = False, config: EvalConfig | None = None,
             quiet: bool = True, **settings):
    """Score a run on its test split (or `data`) and write metrics.json, plots/, report.html, MODEL_CARD.md.

    Settings are EvalConfig's fields (calibrate=, backend=, top_losses=, ...). Returns an Evaluation
    (out_dir, metrics, report).
    """
    from visiontune.evaluation.evaluate import evaluate_run

    cfg = _replace(config or EvalConfig(), settings, "evaluation")
    if _is_ensemble(run):  # Grad-CAM needs one network's gradients; an ensemble has several
        cfg = dataclasses.replace(cfg, gradcam_images=0)
    return evaluate_run(Path(run), data=data, root=root, split=split, out=Path(out) if out else None,
                        allow_subset=allow_subset, config=cfg, quiet=quiet)


def compare(runs: list[PathLike], *, out: PathLike = "comparison"):
    """Evaluated runs side by side: comparison.csv, .md and .html in `out`; refuses runs on different splits."""
    from visiontune.evaluation.compare import compare_runs

    return compare_runs([Path(r) for r in runs], Path(out))


def explain(model: PathLike, images, *, method: str = ExplainConfig.method, target: str | None = None,
            layer: str | None = None, out: PathLike | None = None, grid: bool = False,
            top_k: int = ExplainConfig.top_k, faithfulness: bool = False):
    """Grad-CAM (or `method`) heat maps for image files, folders, globs, or in-memory images, with a run's
    PyTorch model. With `out`, one PNG per image (original, overlay, top-k), or one grid.png with `grid`;
    with `faithfulness`, deletion/insertion scores. Returns an ExplainResult (explanations, files, failed)."""
    from visiontune.explain.runner import explain_sources, load_explainer

    _refuse_ensemble(model, "an ensemble has no single network for Grad-CAM's gradients; explain one of its members")
    sources = images if isinstance(images, (list, tuple)) else [images]
    missing = []
    if all(isinstance(s, (str, Path)) for s in sources):
        from visiontune.inference.sources import expand

        sources, missing = expand(sources)
    explainer = load_explainer(model, method, layer)
    result = explain_sources(explainer, list(sources), target=target, top_k=top_k, out=Path(out) if out else None,
                             grid=grid, faithfulness=faithfulness)
    result.failed += missing
    return result


def _replace(cfg, settings: dict, what: str):
    known = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown {what} setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(cfg, **settings)


# --- export, predict, bench -------------------------------------------------------------------------------


def export(run: PathLike, *, format: str = "onnx", precision: str = "fp32", int8_agreement: float | None = None,
           config=None, quiet: bool = True):
    """Write RUN/export/model[.fp16|.int8].onnx or model.torchscript.pt after its parity check passes.

    Returns an ExportResult (path, parity numbers); raises ExportError when parity fails (see parity.json).
    `int8_agreement`: the INT8 top-1 agreement with fp32 required (default ExportConfig.int8_agreement).
    """
    from visiontune.export.exporter import export_run

    _refuse_ensemble(run, f"an ensemble is several networks, not exported as one file; distil it into one model "
                          f"(`visiontune distill --teacher {run} {Path(run) / 'split.csv'}`) and export that")
    return export_run(Path(run), format, precision, config=config, int8_agreement=int8_agreement, quiet=quiet)


def predict(model, paths, *, top_k: int | None = None, tta: bool = False, backend: str | None = None,
            batch_size: int | None = None, threads: int | None = None) -> list:
    """Classify files, folders (recursively) and globs with a run, a .onnx or a TorchScript file (or a
    loaded Classifier). Returns one Prediction per file, in order, then one per name that matched nothing;
    unreadable ones carry `error` (a reason) instead of labels."""
    from visiontune.config import InferenceConfig
    from visiontune.inference import Classifier, Prediction
    from visiontune.inference.sources import expand

    d = InferenceConfig()
    clf = model if isinstance(model, Classifier) else Classifier.load(
        model, backend, threads=d.threads if threads is None else threads,
        batch_size=d.batch_size if batch_size is None else batch_size)
    files, missing = expand([paths] if isinstance(paths, (str, Path)) else paths)
    found = clf.predict(files, top_k=d.top_k if top_k is None else top_k, tta=tta)
    return found + [Prediction(path, error=reason) for path, reason in missing]


def bench(model: PathLike, *, image: PathLike | None = None, threads: int | None = None, quiet: bool = True, **settings):
    """Batch-1 latency (from a tensor and from JPEG bytes) and throughput per batch size for every engine of
    `model` (a run: PyTorch, ONNX fp32, ONNX INT8 when exported; the report is also saved as RUN/bench.json).
    Settings are BenchConfig's fields."""
    from visiontune.config import BenchConfig, InferenceConfig
    from visiontune.inference.bench import run_bench

    cfg = _replace(BenchConfig(), settings, "bench")
    report = run_bench(Path(model), image=image, config=cfg,
                       threads=InferenceConfig.threads if threads is None else threads, quiet=quiet)
    if Path(model).is_dir():  # kept with the run, where `compare` finds its latency
        import json

        from visiontune.training.run_dir import BENCH_FILE, atomic_write_text

        atomic_write_text(Path(model) / BENCH_FILE, json.dumps(report.to_dict(), indent=2))
    return report



# --- serve --------------------------------------------------------------------------------------------------


def serve(model: PathLike, *, config=None, **settings) -> None:
    """Serve a run directory, a .onnx or a TorchScript file over HTTP until SIGTERM or Ctrl-C: the JSON API
    under /v1, the web page at /, the OpenAPI docs at /docs. Settings are ServeConfig's fields (host=, port=,
    workers=, api_key=, backend=, queue_size=, ...)."""
    from visiontune.config import ServeConfig
    from visiontune.serve.server import run

    run(model, _replace(config or ServeConfig(), settings, "serve"))


# --- ensembles and distillation -----------------------------------------------------------------------------


def _is_ensemble(path) -> bool:
    from visiontune.ensemble.engine import is_ensemble

    return isinstance(path, (str, Path)) and is_ensemble(path)


def _refuse_ensemble(path, message: str) -> None:
    if _is_ensemble(path):
        raise ConfigError(f"{path}: {message}")


def _teacher(cfg: TrainConfig):
    """The distillation teacher a TrainConfig names (loaded with `inference`, which training never imports)."""
    if not cfg.distill.teacher:
        return None
    from visiontune.ensemble.distill import load_teacher

    return load_teacher(cfg.distill)


def ensemble(runs: list[PathLike], *, out: PathLike, weights: str | list[float] = EnsembleConfig.weights,
             backend: str = EnsembleConfig.backend, evaluate: bool = EnsembleConfig.evaluate,
             overwrite: bool = False, config: EnsembleConfig | None = None, quiet: bool = True):
    """Soft voting over runs trained on the same labels and the same split: writes the ensemble directory
    `out` (ensemble.json, model.json, split.csv, metrics.json), usable wherever a run is (Classifier.load,
    evaluate, predict, bench, compare, serve, and as a distillation teacher).

    weights: "equal", "fit" (minimum validation log loss of the soft vote) or one number per run. With
    `evaluate`, the ensemble is scored on its test split at the end, like a run. Returns an EnsembleResult
    (out_dir, weights, weights_from, metrics, evaluation).
    """
    from visiontune.ensemble.build import build_ensemble

    base = config or EnsembleConfig()
    cfg = dataclasses.replace(base, backend=backend, evaluate=evaluate)
    if cfg.backend not in ("onnx", "torch"):
        raise ConfigError(f"backend must be onnx or torch, got {cfg.backend!r}")
    result = build_ensemble([Path(r) for r in runs], Path(out), weights, config=cfg, overwrite=overwrite, quiet=quiet)
    if cfg.evaluate and result.metrics.get("images", {}).get("test"):
        result.evaluation = _evaluate_ensemble(result.out_dir, quiet, cfg.backend)
        result.metrics["evaluation"] = result.evaluation.metrics
    return result


def _evaluate_ensemble(out: Path, quiet: bool, backend: str):
    return evaluate(out, quiet=quiet, backend=backend)  # `ensemble`'s own `evaluate` flag shadows the function


def distill(data: PathLike | Dataset | None = None, *, teacher: PathLike, student: str = TrainConfig.model,
            alpha: float = DistillConfig.alpha, temperature: float = DistillConfig.temperature,
            out: PathLike | None = None, root: PathLike | None = None, config: TrainConfig | None = None,
            quiet: bool = True, overwrite: bool = False, **settings):
    """Train `student` on `data` against a teacher (a run or an ensemble directory): the loss on every cached
    view is alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * label loss, with the
    teacher's logits computed once for exactly the views the student trains on. Otherwise the same recipe
    and settings as `train`, and the result is an ordinary run (its config.yaml records the teacher), so
    evaluate, export (INT8 too) and predict work unchanged. Returns a TrainResult.
    """
    base = config or TrainConfig()
    distill_cfg = dataclasses.replace(base.distill, teacher=str(teacher), alpha=alpha, temperature=temperature)
    base = dataclasses.replace(base, distill=distill_cfg)
    if out is None and data is not None:
        label = str(data.source) if isinstance(data, Dataset) else str(data)
        out = default_run_dir(label, f"{student}-distilled")
    return train(data, out=out, model=student, root=root, config=base, quiet=quiet, overwrite=overwrite, **settings)
