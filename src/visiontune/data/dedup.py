"""Exact duplicates (same bytes) and near-duplicates (close 64-bit difference hashes), in bulk.

Both work on numpy arrays and sorting, not on per-file Python objects, so they scale to a million files.
Near-duplicates use the pigeonhole trick: two 64-bit hashes within Hamming distance d agree exactly on
at least one of d + 1 disjoint bands, so only files sharing a band value are ever compared. A 9 x 8 hash is
too coarse on its own: different things photographed on one plain backdrop share it. So each pair it finds is
confirmed on 32 x 32 thumbnails (`same_picture`) before it is grouped.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_BYTES = 16
# A band value shared by more files than this is a degenerate image (blank, one colour), not a duplicate cluster.
_MAX_BUCKET = 256
# The second, stricter test of a near-duplicate pair. On the benchmark datasets every pair the hash found that shows
# one picture (re-encoded, recoloured, cropped a little) kept a detail correlation of 0.40 or more (a protea cropped
# tighter) and their two different-picture pairs (a daisy and a dandelion clock, two orchids on black) 0.09 or less;
# BENCHMARKS.md, bench/near_duplicates.py.
THUMBNAIL = 32
MIN_DETAIL = 0.3
_MAX_SHIFT = 2


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


def candidate_pairs(hashes: np.ndarray, valid: np.ndarray, max_distance: int,
                    exclude: list[list[int]]) -> list[tuple[int, int]]:
    """(i, j), i < j, of every two files whose hashes are within `max_distance` bits, leaving out pairs already in
    one group of `exclude` (exact copies)."""
    idx = np.flatnonzero(valid)
    if len(idx) < 2 or max_distance < 0:
        return []
    values = hashes[idx].astype(np.uint64)
    same_group = {}
    for g, members in enumerate(exclude):
        for m in members:
            same_group[m] = g
    bands = max_distance + 1
    width = -(-64 // bands)
    found: set[tuple[int, int]] = set()
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
                    p, q = sorted((int(idx[members[j]]), int(idx[members[j + 1 + k]])))
                    gp, gq = same_group.get(p), same_group.get(q)
                    if gp is None or gp != gq:
                        found.add((p, q))
    return sorted(found)


def group_pairs(pairs: list[tuple[int, int]], exclude: list[list[int]]) -> list[list[int]]:
    """The connected groups of `pairs` (file indices), each sorted, in order of their first file; a group made only
    of one exact-duplicate group of `exclude` is left out (it is reported as exact)."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for p, q in pairs:
        rp, rq = find(p), find(q)
        if rp != rq:
            parent[rp] = rq
    clusters: dict[int, list[int]] = {}
    for i in list(parent):
        clusters.setdefault(find(i), []).append(i)
    exact_sets = {tuple(g) for g in exclude}
    groups = [sorted(c) for c in clusters.values() if len(c) > 1]
    return sorted((g for g in groups if tuple(g) not in exact_sets), key=lambda g: g[0])


def near_groups(hashes: np.ndarray, valid: np.ndarray, max_distance: int, exclude: list[list[int]]) -> list[list[int]]:
    """Groups of files whose hashes are within `max_distance` bits, leaving out pairs already in `exclude`
    (the hash alone: `scan` confirms each pair with `same_picture` first)."""
    return group_pairs(candidate_pairs(hashes, valid, max_distance, exclude), exclude)


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """The 32 x 32 greyscale thumbnail (uint8) that `same_picture` compares, squashed like the hash's."""
    grey = Image.fromarray(rgb).convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.uint8)


def _detail(thumb: np.ndarray) -> np.ndarray:
    """The thumbnail less its 3 x 3 local mean: texture and edges, without the tones a backdrop shares."""
    padded = np.pad(thumb, 1, mode="edge")
    blur = sum(padded[i:i + thumb.shape[0], j:j + thumb.shape[1]] for i in range(3) for j in range(3)) / 9.0
    return thumb - blur


def _aligned_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """The best Pearson correlation of a and b's overlap over shifts of up to _MAX_SHIFT pixels each way (a copy
    cropped a little, or its border trimmed, is shifted against the original)."""
    n = a.shape[0]
    best = -1.0
    for dy in range(-_MAX_SHIFT, _MAX_SHIFT + 1):
        for dx in range(-_MAX_SHIFT, _MAX_SHIFT + 1):
            x = a[max(dy, 0):n + min(dy, 0), max(dx, 0):n + min(dx, 0)].ravel()
            y = b[max(-dy, 0):n + min(-dy, 0), max(-dx, 0):n + min(-dx, 0)].ravel()
            x, y = x - x.mean(), y - y.mean()
            norm = float(np.linalg.norm(x) * np.linalg.norm(y))
            if norm > 1e-6:
                best = max(best, float(x @ y) / norm)
            elif np.allclose(x, 0) and np.allclose(y, 0):  # both flat: nothing tells them apart
                best = 1.0
    return best


def picture_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(tones, detail): how well two thumbnails agree, as the best aligned correlation of their pixels and of their
    high-passed pixels."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return _aligned_correlation(a, b), _aligned_correlation(_detail(a), _detail(b))


def same_picture(a: np.ndarray, b: np.ndarray, min_correlation: float) -> bool:
    """Whether two thumbnails whose hashes are close show one picture: their pixels correlate at `min_correlation`
    or more and their detail at MIN_DETAIL or more. Different objects photographed on one plain backdrop share
    the hash's coarse layout; at 32 x 32 their shapes and textures differ."""
    tones, detail = picture_agreement(a, b)
    return tones >= min_correlation and detail >= MIN_DETAIL
