"""Stratified train/val/test splits that the same seed reproduces byte for byte.

A dataset that comes with splits keeps them; a missing val or test split is carved out of train.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from visiontune.config import SplitConfig
from visiontune.data.index import NO_SPLIT, SPLITS, Dataset
from visiontune.data.multilabel import SEPARATOR, iterative_stratification
from visiontune.errors import SplitError
from visiontune.files import atomic_write_text

TRAIN, VAL, TEST = range(3)


@dataclass
class Split:
    """Which split each usable file of `dataset` is in (NO_SPLIT for a file left out)."""

    dataset: Dataset
    assignment: np.ndarray  # int8 per file
    notes: list[str] = field(default_factory=list)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.assignment == SPLITS.index(split))

    def counts(self) -> dict[str, dict[str, int]]:
        """{class: {split: count}}."""
        table = {}
        for c, name in enumerate(self.dataset.classes):
            ds = self.dataset
            of_class = ds.labels == c if ds.targets is None else ds.targets[:, c].astype(bool)
            table[name] = {s: int((of_class & (self.assignment == k)).sum()) for k, s in enumerate(SPLITS)}
        return table

    def write_csv(self, out: Path | TextIO, relative_to: Path | None = None) -> None:
        """Write `path,label,split`, rows in dataset order. Paths are relative to `relative_to`
        (the CSV's own folder, so the file works as a manifest) or to the dataset root."""
        if isinstance(out, (str, Path)):
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.StringIO()
            self._write_rows(buffer, out.resolve().parent)
            atomic_write_text(out, buffer.getvalue())
        else:
            self._write_rows(out, relative_to)

    def _write_rows(self, fh: TextIO, relative_to: Path | None) -> None:
        ds = self.dataset
        root = ds.root.resolve()
        writer = csv.writer(fh, lineterminator="\n")
        # A multi-label split.csv is a multi-label manifest (`labels`, a|b), so it reads back as the same data.
        writer.writerow(["path", "label" if ds.targets is None else "labels", "split"])
        for i in np.flatnonzero(self.assignment != NO_SPLIT):
            path = ds.paths[i]
            if relative_to is not None:
                path = _relative(root / path, relative_to)
            label = (ds.classes[ds.labels[i]] if ds.targets is None
                     else SEPARATOR.join(ds.classes[c] for c in np.flatnonzero(ds.targets[i])))
            writer.writerow([path, label, SPLITS[self.assignment[i]]])


def _relative(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path, start)).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return path.as_posix()


def split_dataset(dataset: Dataset, usable: np.ndarray | None = None, cfg: SplitConfig = SplitConfig(),
                  duplicates: list[list[int]] = ()) -> Split:
    """Assign every usable file to train, val or test, stratified by class, driven by `cfg.seed`.

    `duplicates`: groups of file indices showing the same picture (the scan's exact and near duplicates). Each
    group lands whole in one split, its first copy's, so no photo is scored against a copy of itself."""
    usable = np.ones(len(dataset), dtype=bool) if usable is None else usable
    rng = np.random.default_rng(cfg.seed)
    notes: list[str] = []
    follows = _followers(duplicates, usable)
    if dataset.has_splits:
        assignment = np.where(usable, dataset.splits, NO_SPLIT).astype(np.int8)
        _check_class_sets(dataset, assignment)
        crossing = [g for g in duplicates if len({int(assignment[i]) for i in g if usable[i]}) > 1]
        wanted = {VAL: cfg.val, TEST: cfg.test}
        missing = {k: f for k, f in wanted.items() if f > 0 and not (assignment == k).any()}
        if missing:
            train_idx = np.flatnonzero(assignment == TRAIN)
            assignment[train_idx] = _stratify_grouped(dataset, train_idx, missing, rng, cfg, notes, follows)
            notes.append("carved " + " and ".join(f"{SPLITS[k]} ({f:.0%} of each class)" for k, f in missing.items())
                         + " out of the given train split")
        else:
            notes.append("kept the splits the dataset came with")
        if crossing:
            a, b = crossing_pair(assignment, [i for i in crossing[0] if usable[i]])
            notes.append(f"warning: {len(crossing)} group(s) of duplicate images cross the given splits (e.g. "
                         f"{dataset.paths[a]} in {SPLITS[assignment[a]]} and {dataset.paths[b]} "
                         f"in {SPLITS[assignment[b]]}): scores on them may be optimistic")
    else:
        idx = np.flatnonzero(usable)
        assignment = np.full(len(dataset), NO_SPLIT, dtype=np.int8)
        assignment[idx] = _stratify_grouped(dataset, idx, {VAL: cfg.val, TEST: cfg.test}, rng, cfg, notes, follows)
    return Split(dataset, assignment, notes)


def crossing_pair(splits: np.ndarray, group: list[int]) -> tuple[int, int]:
    """Two members of a group that lie in different splits (the first member and the first one elsewhere), so an
    example of leakage is a real crossing; the first two members when none crosses."""
    first = group[0]
    other = next((i for i in group[1:] if splits[i] != splits[first]), None)
    if other is None:
        return group[0], group[1]
    return first, other


def _followers(duplicates: list[list[int]], usable: np.ndarray) -> dict[int, int]:
    """{file: the first usable copy among all the groups it is linked to}, for every other usable copy (groups
    sharing a file, an exact pair inside a near-duplicate cluster say, are one group)."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.setdefault(i, i) != i:
            i = parent[i]
        return i

    for group in duplicates:
        members = [i for i in group if usable[i]]
        for m in members[1:]:
            a, b = root(members[0]), root(m)
            parent[max(a, b)] = min(a, b)
    return {i: root(i) for i in parent if root(i) != i}


def _stratify_grouped(dataset: Dataset, idx: np.ndarray, fractions: dict[int, float], rng: np.random.Generator,
                      cfg: SplitConfig, notes: list[str], follows: dict[int, int]) -> np.ndarray:
    """_stratify over the first copies only; every other copy goes where its first copy went."""
    position = {int(i): k for k, i in enumerate(idx)}
    moved = [k for k, i in enumerate(idx) if int(i) in follows and follows[int(i)] in position]
    leaders = np.delete(np.arange(len(idx)), moved)
    out = np.full(len(idx), TRAIN, dtype=np.int8)
    out[leaders] = _stratify(dataset, idx[leaders], fractions, rng, cfg.min_per_split, notes)
    for k in moved:
        out[k] = out[position[follows[int(idx[k])]]]
    if moved:
        notes.append(f"{len(moved)} duplicate image(s) put in the split of their first copy, so no photo is "
                     f"scored against a copy of itself")
    return out


def _stratify(dataset: Dataset, idx: np.ndarray, fractions: dict[int, float], rng: np.random.Generator,
              min_per_split: int, notes: list[str]) -> np.ndarray:
    """Split assignment for the files `idx` (in their order): per class, shuffle, then cut."""
    if dataset.targets is not None:
        return _stratify_sets(dataset, idx, fractions, rng, notes)
    out = np.full(len(idx), TRAIN, dtype=np.int8)
    labels = dataset.labels[idx]
    asked = [k for k in (VAL, TEST) if fractions.get(k, 0) > 0]
    for c, name in enumerate(dataset.classes):
        members = np.flatnonzero(labels == c)
        n = len(members)
        if n == 0:
            continue
        take = {k: int(round(n * fractions[k])) for k in asked}
        take = {k: max(v, min_per_split) for k, v in take.items()}
        needed = sum(take.values()) + max(min_per_split, 1)
        if n < needed:
            if min_per_split > 0:
                raise SplitError(
                    f"class {name!r} has {n} usable image(s), too few for at least {min_per_split} in each of "
                    f"{', '.join(['train'] + [SPLITS[k] for k in asked])}; add images, lower --val/--test, "
                    f"or pass --min-per-split 0 to allow splits without this class"
                )
            take = _shrink(take, n)
        order = members[rng.permutation(n)]
        start = 0
        for k in asked:
            out[order[start:start + take[k]]] = k
            start += take[k]
        empty = ["train" if start >= n else None] + [SPLITS[k] for k in asked if take[k] == 0]
        empty = [s for s in empty if s]
        if empty:
            notes.append(f"class {name!r} ({n} images) has none in {', '.join(empty)}")
    return out


def _stratify_sets(dataset: Dataset, idx: np.ndarray, fractions: dict[int, float], rng: np.random.Generator,
                   notes: list[str]) -> np.ndarray:
    """Multi-label data: iterative stratification over the label sets (a per-class cut cannot place an image that is
    in several classes)."""
    parts = [TRAIN] + [k for k in (VAL, TEST) if fractions.get(k, 0) > 0]
    shares = [1.0 - sum(fractions.get(k, 0) for k in parts[1:])] + [fractions[k] for k in parts[1:]]
    targets = dataset.targets[idx]
    out = np.array(parts, dtype=np.int8)[iterative_stratification(targets, shares, rng)]
    notes.append("multi-label split: iterative stratification over the label sets")
    for c, name in enumerate(dataset.classes):
        carried = targets[:, c].astype(bool)
        empty = [SPLITS[k] for k in parts if carried.any() and not (carried & (out == k)).any()]
        if empty:
            notes.append(f"label {name!r} ({int(carried.sum())} images) has none in {', '.join(empty)}")
    return out


def _shrink(take: dict[int, int], n: int) -> dict[int, int]:
    """Fit the requested counts into n images, keeping at least one for training when n > 1."""
    budget = max(n - 1, 0) if n > 1 else 0
    out = {}
    for k, v in take.items():
        out[k] = min(v, budget)
        budget -= out[k]
    return out


def _check_class_sets(dataset: Dataset, assignment: np.ndarray) -> None:
    problem = class_set_problem(dataset, assignment)
    if problem:
        raise SplitError(problem)


def class_set_problem(dataset: Dataset, assignment: np.ndarray) -> str | None:
    """Why given splits cannot be trained and scored on (no training image, or a class missing from a split)."""
    present = {s: dataset.present(assignment == k) for k, s in enumerate(SPLITS)}
    present = {s: labels for s, labels in present.items() if labels}
    if "train" not in present:
        return f"{dataset.source}: the given splits have no usable training image"
    all_labels = set().union(*present.values())
    problems = []
    for split, labels in present.items():
        missing = sorted(all_labels - labels)
        if missing:
            names = ", ".join(dataset.classes[c] for c in missing)
            problems.append(f"{split} lacks {names}")
    if problems:
        return f"{dataset.source}: class sets differ between the given splits: {'; '.join(problems)}"
    return None
