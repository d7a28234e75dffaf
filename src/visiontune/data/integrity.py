"""`scan`: decode every file once, on every core, and report what is wrong with the dataset.

Nothing here writes to the user's files. Each file is read once: the bytes give the content digest,
the decoded pixels give the size, the conversions made and the perceptual hash.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from visiontune.config import ScanConfig
from visiontune.data import dedup
from visiontune.data.decode import decode_full, read_bytes
from visiontune.data.findings import Finding, sort_findings
from visiontune.data.index import NO_SPLIT, SPLITS, Dataset
from visiontune.data.multilabel import co_occurrence
from visiontune.data.parallel import parallel_map
from visiontune.data.split import class_set_problem, crossing_pair
from visiontune.errors import ImageDecodeError

# Small enough to compute the perceptual hash from, large enough that libjpeg still checks every block.
_SCAN_DRAFT = 64
# Members of a duplicate group a finding names; the rest are counted.
_LISTED_MEMBERS = 3


@dataclass
class FileCheck:
    """The verdict on one file; `problem` set means it is unusable and skipped."""

    width: int = 0
    height: int = 0
    format: str = ""
    digest: bytes = b""
    dhash: int = 0
    notes: tuple[str, ...] = ()
    problem: str | None = None


def check_file(path: str, cfg: ScanConfig = ScanConfig()) -> FileCheck:
    """Read and fully decode one file; never raises for a bad file, it says why instead."""
    try:
        data = read_bytes(path)
        if not data:
            return FileCheck(problem="zero-byte file")
        decoded = decode_full(data, draft=_SCAN_DRAFT, max_pixels=cfg.max_pixels, max_aspect=cfg.max_aspect,
                              where=path, max_jpeg_scans=cfg.max_jpeg_scans)
    except ImageDecodeError as exc:
        return FileCheck(problem=exc.reason)
    width, height = decoded.size
    check = FileCheck(width, height, decoded.format, hashlib.blake2b(data, digest_size=dedup.HASH_BYTES).digest(),
                      dedup.difference_hash(decoded.array), tuple(decoded.notes))
    if min(width, height) < cfg.min_side:
        check.problem = f"too small: {width}x{height} px (shorter side under {cfg.min_side})"
    return check


def _check_with_config(args: tuple[str, ScanConfig]) -> FileCheck:
    return check_file(*args)


def check_files(paths: list[str], cfg: ScanConfig, quiet: bool = False, desc: str = "scan") -> Iterator[FileCheck]:
    """check_file over many paths, in order, on `cfg.workers` processes, with a progress bar."""
    return parallel_map(_check_with_config, [(p, cfg) for p in paths], workers=cfg.workers, desc=desc, quiet=quiet)


@dataclass
class ScanReport:
    dataset: Dataset
    usable: np.ndarray  # bool per file
    widths: np.ndarray
    heights: np.ndarray
    formats: dict[str, int]
    findings: list[Finding]
    exact_duplicates: list[list[int]]
    near_duplicates: list[list[int]]
    leaks: list[list[int]] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (file index, why it is unusable)
    unusable_reason: str | None = None  # set when the dataset cannot be trained on as it is
    digests: np.ndarray | None = None  # content digest per file (rows of uint64; zeros where unusable)

    def digest(self, i: int) -> str:
        """File i's content digest in hex: the one the decoder gives (`load_all`), so the view cache's keys can be
        made from the scan, before anything is decoded."""
        return self.digests[i].tobytes().hex()

    @property
    def class_counts(self) -> dict[str, int]:
        return self.dataset.class_counts(self.usable)

    @property
    def imbalance_ratio(self) -> float:
        counts = [n for n in self.class_counts.values() if n > 0]
        return (max(counts) / min(counts)) if counts else 0.0

    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every file left out as unusable."""
        return [(str(self.dataset.abspath(i)), reason) for i, reason in self.problems]

    def size_stats(self) -> dict:
        ok = self.usable
        if not ok.any():
            return {}
        w, h = self.widths[ok], self.heights[ok]

        def summary(values: np.ndarray) -> dict:
            return {"min": int(values.min()), "median": float(statistics.median(values.tolist())), "max": int(values.max())}

        return {"width": summary(w), "height": summary(h)}

    def to_dict(self) -> dict:
        ds = self.dataset
        per_split = {}
        if ds.has_splits:
            for s, name in enumerate(SPLITS):
                mask = self.usable & (ds.splits == s)
                if mask.any():
                    per_split[name] = ds.class_counts(mask)

        def group_paths(groups: list[list[int]]) -> list[list[str]]:
            return [[ds.paths[i] for i in g] for g in groups]

        return {
            "source": str(ds.source),
            "root": str(ds.root),
            "layout": ds.layout,
            "files": len(ds),
            "usable_images": int(self.usable.sum()),
            "skipped_files": int((~self.usable).sum()),
            "classes": ds.classes,
            "task": ds.task,
            "class_counts": self.class_counts,
            **({"label_sets": label_set_summary(ds.targets[self.usable], ds.classes)} if ds.targets is not None else {}),
            "class_counts_per_split": per_split,
            "imbalance_ratio": round(self.imbalance_ratio, 3),
            "image_size": self.size_stats(),
            "formats": self.formats,
            "exact_duplicate_groups": group_paths(self.exact_duplicates),
            "near_duplicate_groups": group_paths(self.near_duplicates),
            "leaking_groups": group_paths(self.leaks),
            "findings": [f.to_dict() for f in self.findings],
            "counts_by_level": {lvl: sum(f.level == lvl for f in self.findings) for lvl in ("error", "warning", "info")},
            "usable": self.unusable_reason is None,
            "unusable_reason": self.unusable_reason,
        }


def label_set_summary(targets: np.ndarray, classes: list[str]) -> dict:
    """Multi-label data: how many labels an image carries, and which labels come together."""
    per_image = targets.sum(axis=1)
    return {"labels_per_image": {"mean": round(float(per_image.mean()), 3) if len(per_image) else 0.0,
                                 "max": int(per_image.max()) if len(per_image) else 0},
            "co_occurrence": co_occurrence(targets, classes)}


def scan_dataset(dataset: Dataset, cfg: ScanConfig = ScanConfig(), quiet: bool = False) -> ScanReport:
    n = len(dataset)
    usable = np.zeros(n, dtype=bool)
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    digests = np.zeros((n, dedup.HASH_BYTES // 8), dtype=np.uint64)
    hashes = np.zeros(n, dtype=np.uint64)
    formats: dict[str, int] = {}
    problems: list[tuple[int, str]] = []
    findings = list(dataset.findings)
    paths = [str(dataset.abspath(i)) for i in range(n)]
    for i, check in enumerate(check_files(paths, cfg, quiet)):
        if check.problem:
            problems.append((i, check.problem))
            findings.append(Finding("warning", paths[i], check.problem))
            continue
        usable[i] = True
        widths[i], heights[i] = check.width, check.height
        digests[i] = np.frombuffer(check.digest, dtype=np.uint64)
        hashes[i] = np.uint64(check.dhash)
        formats[check.format] = formats.get(check.format, 0) + 1
        findings.extend(Finding("info", paths[i], note) for note in check.notes)

    exact = dedup.exact_groups(digests, usable)
    near = _near_groups(paths, hashes, usable, exact, cfg, quiet)
    leaks = _leaking_groups(dataset, exact + near)
    findings.extend(_duplicate_findings(dataset, exact, near, leaks))
    report = ScanReport(dataset, usable, widths, heights, dict(sorted(formats.items())), [], exact, near, leaks, problems,
                        digests=digests)
    findings.extend(_class_findings(dataset, usable))
    report.findings = sort_findings(findings)
    report.unusable_reason = unusable_reason(dataset, usable)
    return report


def file_thumbnail(args: tuple[str, ScanConfig]) -> np.ndarray | None:
    """`dedup.thumbnail` of a file, decoded as the scan decoded it; None if it no longer decodes."""
    path, cfg = args
    try:
        decoded = decode_full(read_bytes(path), draft=_SCAN_DRAFT, max_pixels=cfg.max_pixels,
                              max_aspect=cfg.max_aspect, where=path)
        return dedup.thumbnail(decoded.array)
    except ImageDecodeError:
        return None


def _near_groups(paths: list[str], hashes: np.ndarray, usable: np.ndarray, exact: list[list[int]], cfg: ScanConfig,
                 quiet: bool) -> list[list[int]]:
    """The hash's candidate pairs, each confirmed on thumbnails, grouped. Only the candidates' files are read again
    (usually a handful), so the scan keeps no per-file thumbnail."""
    candidates = dedup.candidate_pairs(hashes, usable, cfg.near_duplicate_distance, exact)
    files = sorted({i for pair in candidates for i in pair})
    thumbs = dict(zip(files, parallel_map(file_thumbnail, [(paths[i], cfg) for i in files], workers=cfg.workers,
                                          desc="near-duplicates", quiet=quiet)))
    confirmed = [(p, q) for p, q in candidates if thumbs[p] is not None and thumbs[q] is not None
                 and dedup.same_picture(thumbs[p], thumbs[q], cfg.near_duplicate_correlation)]
    return dedup.group_pairs(confirmed, exact)


def _leaking_groups(dataset: Dataset, groups: Iterable[list[int]]) -> list[list[int]]:
    if not dataset.has_splits:
        return []
    return [g for g in groups if len({int(dataset.splits[i]) for i in g}) > 1]


def _describe(dataset: Dataset, i: int) -> str:
    split = int(dataset.splits[i])
    where = f" [{SPLITS[split]}]" if split != NO_SPLIT else ""
    return f"{dataset.paths[i]}{where}"


def _listed(dataset: Dataset, members: list[int]) -> str:
    """The first few members, then how many more: a group of 88 stays one readable line (--json has them all)."""
    shown = ", ".join(_describe(dataset, i) for i in members[:_LISTED_MEMBERS])
    more = len(members) - _LISTED_MEMBERS
    return f"{shown} and {more} more (see --json)" if more > 0 else shown


def _duplicate_findings(dataset: Dataset, exact: list[list[int]], near: list[list[int]], leaks: list[list[int]]) -> list[Finding]:
    leak_set = {tuple(g) for g in leaks}
    findings = []
    for kind, groups in (("exact duplicate", exact), ("near-duplicate", near)):
        for group in groups:
            labels = sorted({dataset.classes[dataset.labels[i]] for i in group})
            differently = f" (labelled differently: {', '.join(labels)})" if len(labels) > 1 else ""
            if tuple(group) in leak_set:
                first, other = crossing_pair(dataset.splits, group)
                rest = [i for i in group if i not in (first, other)]
                also = f"; {len(rest)} more in the group: {_listed(dataset, rest)}" if rest else ""
                findings.append(Finding("error", str(dataset.abspath(first)),
                                        f"leakage: {kind} across splits: {_describe(dataset, first)} = "
                                        f"{_describe(dataset, other)}{differently}{also}"))
            else:
                findings.append(Finding("warning" if kind == "exact duplicate" else "info", str(dataset.abspath(group[0])),
                                        f"{kind} of {_listed(dataset, group[1:])}{differently}"))
    return findings


def _class_findings(dataset: Dataset, usable: np.ndarray) -> list[Finding]:
    findings = []
    counts = np.bincount(dataset.labels[usable], minlength=len(dataset.classes)) if len(dataset) else []
    all_counts = np.bincount(dataset.labels, minlength=len(dataset.classes)) if len(dataset) else []
    for name, n, total in zip(dataset.classes, counts, all_counts):
        if n == 0 and total > 0:
            findings.append(Finding("error", name, f"class {name!r} has no usable image ({total} file(s), all skipped)"))
    return findings


def unusable_reason(dataset: Dataset, usable: np.ndarray) -> str | None:
    """Why training on this dataset cannot work, in one line; None when it can."""
    if len(dataset) == 0:
        return f"{dataset.source}: no files found (expected class folders, split folders or a CSV manifest)"
    if not usable.any():
        return f"{dataset.source}: none of the {len(dataset)} file(s) is a usable image"
    counts = dataset.class_counts(usable)
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        return f"{dataset.source}: class(es) with no usable image: {', '.join(empty)}"
    if len(counts) < 2:
        return f"{dataset.source}: only one class ({next(iter(counts))}); a classifier needs at least two"
    if dataset.has_splits:
        return class_set_problem(dataset, np.where(usable, dataset.splits, NO_SPLIT))
    return None
