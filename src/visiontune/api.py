"""The public Python API: each function is one CLI verb, with the same arguments and defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from visiontune.config import ScanConfig, SplitConfig
from visiontune.data.index import Dataset, load_dataset
from visiontune.data.integrity import ScanReport, scan_dataset
from visiontune.data.split import Split, split_dataset
from visiontune.errors import DatasetError, SplitError

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
