"""Exact duplicates (same bytes) and near-duplicates (close 64-bit difference hashes), in bulk.

Both work on numpy arrays and sorting, not on per-file Python objects, so they scale to a million files.
Near-duplicates use the pigeonhole trick: two 64-bit hashes within Hamming distance d agree exactly on
at least one of d + 1 disjoint bands, so only files sharing a band value are ever compared.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_BYTES = 16
# A band value shared by more files than this is a degenerate image (blank, one colour), not a duplicate cluster.
_MAX_BUCKET = 256


def difference_hash(rgb: np.ndarray) -> int:
    """64-bit dHash: is each pixel brighter than its right neighbour, on a 9 x 8 greyscale thumbnail."""
    grey = Image.fromarray(rgb).convert("L").resize((9, 8), Image.Resampling.BOX)
    pixels = np.asarray(grey, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def _popcount64(values: np.ndarray) -> np.ndarray:
    return np.unpackbits(values.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def _runs(sorted_keys: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of every run of equal keys longer than one, in a sorted 1-D or row array."""
    if len(sorted_keys) < 2:
        return []
    if sorted_keys.ndim == 1:
        change = sorted_keys[1:] != sorted_keys[:-1]
    else:
        change = (sorted_keys[1:] != sorted_keys[:-1]).any(axis=1)
    bounds = np.concatenate(([0], np.flatnonzero(change) + 1, [len(sorted_keys)]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b - a > 1]


def exact_groups(digests: np.ndarray, valid: np.ndarray) -> list[list[int]]:
    """Groups (each of 2+ indices) of files with identical content digests (rows of `digests`)."""
    idx = np.flatnonzero(valid)
    rows = digests[idx]
    order = np.lexsort(rows.T[::-1])
    rows, idx = rows[order], idx[order]
    return [sorted(idx[a:b].tolist()) for a, b in _runs(rows)]


def near_groups(hashes: np.ndarray, valid: np.ndarray, max_distance: int, exclude: list[list[int]]) -> list[list[int]]:
    """Groups of files whose hashes are within `max_distance` bits, leaving out pairs already in `exclude`."""
    idx = np.flatnonzero(valid)
    if len(idx) < 2 or max_distance < 0:
        return []
    values = hashes[idx].astype(np.uint64)
    same_group = {}
    for g, members in enumerate(exclude):
        for m in members:
            same_group[m] = g
    parent = list(range(len(idx)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bands = max_distance + 1
    width = -(-64 // bands)
    linked = False
    for band in range(bands):
        shift = np.uint64(band * width)
        mask = np.uint64((1 << min(width, 64 - band * width)) - 1)
        keys = (values >> shift) & mask
        order = np.argsort(keys, kind="stable")
        for a, b in _runs(keys[order]):
            members = order[a:b]
            if len(members) > _MAX_BUCKET:
                continue
            member_values = values[members]
            for j in range(len(members) - 1):
                dist = _popcount64(member_values[j + 1:] ^ member_values[j])
                for k in np.flatnonzero(dist <= max_distance):
                    p, q = int(members[j]), int(members[j + 1 + k])
                    gp, gq = same_group.get(int(idx[p])), same_group.get(int(idx[q]))
                    if gp is not None and gp == gq:
                        continue
                    rp, rq = find(p), find(q)
                    if rp != rq:
                        parent[rp] = rq
                        linked = True
    if not linked:
        return []
    clusters: dict[int, list[int]] = {}
    for i in range(len(idx)):
        clusters.setdefault(find(i), []).append(int(idx[i]))
    groups = [sorted(c) for c in clusters.values() if len(c) > 1]
    # A cluster made only of one exact-duplicate group is already reported as exact.
    exact_sets = {tuple(g) for g in exclude}
    return sorted((g for g in groups if tuple(g) not in exact_sets), key=lambda g: g[0])
