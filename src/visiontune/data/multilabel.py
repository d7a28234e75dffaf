"""Label sets: the multi-hot matrix of a multi-label dataset, its counts and co-occurrence, and iterative
stratification (Sechidis, Tsoumakas & Vlahavas 2011), the split that keeps every label's share in every part.

A plain per-class shuffle cannot stratify label sets (an image is in several "classes" at once); iterative
stratification deals out the rarest label first, each image to the part that still wants that label most, so rare
labels are not left out of validation or test by chance.
"""

from __future__ import annotations

import numpy as np

SEPARATOR = "|"  # between the labels of one manifest cell: `dog|person`


def parse_label_set(cell: str) -> list[str]:
    """`"dog|person"` -> ["dog", "person"] (blanks dropped, order kept, repeats once)."""
    names = [part.strip() for part in cell.split(SEPARATOR)]
    return list(dict.fromkeys(n for n in names if n))


def label_counts(targets: np.ndarray, classes: list[str]) -> dict[str, int]:
    return {name: int(n) for name, n in zip(classes, targets.sum(axis=0))}


def co_occurrence(targets: np.ndarray, classes: list[str], limit: int = 10) -> list[dict]:
    """The label pairs seen together most often, most frequent first."""
    t = targets.astype(np.int64)
    both = t.T @ t
    pairs = [(int(both[a, b]), a, b) for a in range(len(classes)) for b in range(a + 1, len(classes)) if both[a, b]]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [{"labels": [classes[a], classes[b]], "images": n} for n, a, b in pairs[:limit]]


def iterative_stratification(targets: np.ndarray, fractions: list[float], rng: np.random.Generator) -> np.ndarray:
    """Part index (into `fractions`, which sum to 1) for each row of the multi-hot `targets`."""
    n, c = targets.shape
    fractions = np.asarray(fractions, dtype=np.float64)
    wanted = fractions * n  # images each part still wants
    wanted_label = np.outer(fractions, targets.sum(axis=0).astype(np.float64))  # part x label
    out = np.full(n, -1, dtype=np.int64)
    left = targets.astype(bool).copy()
    remaining = np.ones(n, dtype=bool)
    while remaining.any():
        counts = left[remaining].sum(axis=0)
        if not counts.any():  # rows without any label: to the parts that want the most images
            for r in rng.permutation(np.flatnonzero(remaining)):
                out[r] = _pick(wanted, np.ones_like(wanted), rng)
                wanted[out[r]] -= 1
            break
        label = int(np.flatnonzero(counts == counts[counts > 0].min())[0])
        rows = np.flatnonzero(remaining & left[:, label])
        for r in rows[rng.permutation(len(rows))]:
            part = _pick(wanted_label[:, label], wanted, rng)
            out[r] = part
            wanted_label[part] -= targets[r]
            wanted[part] -= 1
            remaining[r] = False
    return out


def _pick(first: np.ndarray, second: np.ndarray, rng: np.random.Generator) -> int:
    """The part wanting the most by `first`, ties broken by `second`, then at random."""
    best = np.flatnonzero(first == first.max())
    if len(best) > 1:
        best = best[second[best] == second[best].max()]
    return int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])


def iterative_folds(targets: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """k folds (the held-out rows of each, sorted), stratified over label sets."""
    part = iterative_stratification(targets, [1.0 / folds] * folds, np.random.default_rng(seed))
    return [np.flatnonzero(part == k) for k in range(folds)]


def merge_copies(labels: np.ndarray, num_classes: int, groups: list[list[int]],
                 usable: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Class folders as label sets: the same bytes under several class folders are one image with each of those
    labels. Returns the multi-hot rows, the files still used (each group's first copy carries the union; the other
    copies are left out) and how many copies were folded in."""
    targets = np.zeros((len(labels), num_classes), dtype=np.uint8)
    targets[np.arange(len(labels)), labels] = 1
    usable = usable.copy()
    folded = 0
    for group in groups:
        members = [i for i in group if usable[i]]
        for other in members[1:]:
            targets[members[0]] |= targets[other]
            usable[other] = False
            folded += 1
    return targets, usable, folded
