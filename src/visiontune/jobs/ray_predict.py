"""`predict --shards OUT --ray`: the shards still to write, predicted on a Ray cluster with Ray Data; the driver
writes each shard when all its rows are back. Ray is imported here only, and only when asked for.

Around Ray's known pitfalls: no listing of the paths before work starts (the dataset is one small row per shard,
its byte range of the listing, and the actor reads its own range: see `inference.shard_plan`); the model's
threads set per actor, since Ray gives a worker one thread by default; rows keyed by (shard, line), since Ray does
not keep their order and retries a task whose actor died; and shards written once by the driver, temporary name
then rename, so a rerun after any kill skips them.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

from visiontune.config import InferenceConfig
from visiontune.errors import ConfigError
from visiontune.inference.classifier import Classifier
from visiontune.inference.shard_plan import Plan, Shard
from visiontune.inference.shard_writer import ShardFolder, arrow_schema, predict_rows

try:  # this module is imported only for --ray
    import pyarrow as pa
    import ray
    import ray.data
except ImportError:
    raise ConfigError("--ray needs Ray: pip install 'visiontune[ray]' here and on every node of the cluster") from None

# A Ray worker decodes with as many threads as its model has: the two take turns on each batch.
DEFAULT_ACTOR_THREADS = 2


def run_on_ray(model: str, plan: Plan, pending: list[Shard], folder: ShardFolder, cfg: InferenceConfig,
               address: str | None, quiet: bool) -> tuple[int, int, int, str]:
    """(shards written, images, of them with an error, what ran them)."""
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=not quiet)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        threads = cfg.threads or min(DEFAULT_ACTOR_THREADS, cpus)
        actors = cfg.ray_actors or max(1, cpus // threads)
        engine = f"ray ({actors} model cop{'y' if actors == 1 else 'ies'} x {threads} thread(s), {cpus} CPUs)"
        if not pending:
            return 0, 0, 0, engine
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = not quiet
        context.enable_operator_progress_bars = not quiet
        listing = dataclasses.replace(plan, shards=())  # each row carries its own shard, not the whole list
        ds = ray.data.from_items([{"index": s.index, "start": s.start, "end": s.end} for s in pending],
                                 override_num_blocks=len(pending))
        ds = ds.map_batches(_Predictor, fn_constructor_kwargs={"model": model, "cfg": cfg, "threads": threads,
                                                               "plan": listing},
                            batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=threads)
        written, images, errors = _collect(ds, plan, pending, folder, quiet)
        return written, images, errors, engine
    finally:
        if started_here:
            ray.shutdown()


def _collect(ds, plan: Plan, pending: list[Shard], folder: ShardFolder, quiet: bool) -> tuple[int, int, int]:
    partial: dict[int, dict[int, dict]] = {}
    written = images = errors = 0
    begun = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            shard, expected = row.pop("shard"), row.pop("shard_rows")
            partial.setdefault(shard, {})[row.pop("line")] = row
            if len(partial[shard]) == expected:
                lines = partial.pop(shard)
                done = [lines[i] for i in sorted(lines)]
                folder.write(shard, done)
                written, images = written + 1, images + len(done)
                errors += sum(r["error"] is not None for r in done)
                if not quiet:
                    print(f"shard {written}/{len(pending)}  {images} images  "
                          f"{images / (time.perf_counter() - begun):.1f} images/s", file=sys.stderr, flush=True)
    for shard in pending:  # a shard of blank lines only has no rows to wait for
        if not folder.done(shard.index) and not plan.paths(shard):
            folder.write(shard.index, [])
            written += 1
    missing = [s.index for s in pending if not folder.done(s.index)]
    if missing:  # a bug, not a user's error: Ray reported success
        raise RuntimeError(f"Ray finished without the rows of shard(s) {missing[:5]}; rerun to write them")
    return written, images, errors


class _Predictor:
    """One engine per actor, with its threads set here (Ray would give it one); reads its shards' paths itself."""

    def __init__(self, model: str, cfg: InferenceConfig, threads: int, plan: Plan):
        self.cfg, self.threads, self.plan = cfg, threads, plan
        self.clf = Classifier.load(model, cfg.backend, threads=threads, batch_size=cfg.batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = []
        for index, start, end in zip(*(batch.column(name).to_pylist() for name in ("index", "start", "end"))):
            paths = self.plan.paths(Shard(index, start, end))
            table = pa.Table.from_pylist(predict_rows(self.clf, paths, self.cfg, self.threads), schema=arrow_schema())
            n = len(paths)
            tables.append(table.append_column("shard", pa.array([index] * n, pa.int64()))
                          .append_column("line", pa.array(range(n), pa.int64()))
                          .append_column("shard_rows", pa.array([n] * n, pa.int64())))
        return pa.concat_tables(tables)
