"""The public Python API: each function is one CLI verb, with the same arguments and defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import dataclasses

from visiontune.config import ScanConfig, SplitConfig, TrainConfig
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
    return train_dataset(dataset, cfg, run_dir, data_label=label, root=str(root) if root else None,
                         quiet=quiet, overwrite=overwrite)


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
    return train_dataset(dataset, cfg, run_dir, data_label=data, root=root, quiet=quiet, resume=True)
