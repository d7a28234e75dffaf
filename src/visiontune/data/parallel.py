"""Map a function over many items on every core, in order, with a progress bar (images/s and ETA)."""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

from tqdm import tqdm

from visiontune.config import default_workers

T = TypeVar("T")
R = TypeVar("R")

# Below this many items, starting worker processes costs more than it saves.
MIN_ITEMS_FOR_POOL = 64


def progress(total: int, desc: str, quiet: bool, unit: str = "img") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, file=sys.stderr, dynamic_ncols=True, leave=False)


def parallel_map(fn: Callable[[T], R], items: Sequence[T], *, workers: int = 0, desc: str = "",
                 quiet: bool = False) -> Iterator[R]:
    """fn over items, results in input order. `fn` must be a module-level function (it is sent to workers)."""
    workers = default_workers(workers)
    with progress(len(items), desc, quiet) as bar:
        if workers == 1 or len(items) < MIN_ITEMS_FOR_POOL:
            for item in items:
                yield fn(item)
                bar.update()
            return
        # fork: workers need only PIL and numpy and start in milliseconds; spawn would re-import everything.
        context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            chunk = max(1, min(256, len(items) // (workers * 8)))
            for result in pool.map(fn, items, chunksize=chunk):
                yield result
                bar.update()
