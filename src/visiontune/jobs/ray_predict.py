"""`predict --shards OUT --ray`: the shards still to write, read, decoded and predicted on a Ray cluster with Ray
Data; the driver writes each shard when all its rows are back. Ray is imported here only, and only when asked for.

Around Ray's known pitfalls: no listing of the paths before work starts (each read task reads its own byte range of
the listing, see `inference.shard_plan`); the model's threads set per actor, since Ray gives a worker one thread
by default; rows keyed by (shard, line) since Ray does not keep their order and retries a task whose actor died;
and shards written once by the driver, temporary name then rename, so a rerun after any kill skips them.
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
from visiontune.inference.shard_writer import COLUMNS, ShardFolder, arrow_schema
from visiontune.jobs.batch_predict import predict_rows

try:  # this module is imported only for --ray
    import pyarrow as pa
    import ray
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
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
        ray.data.DataContext.get_current().enable_progress_bars = not quiet
        ds = ray.data.read_datasource(_Shards(plan, pending), override_num_blocks=len(pending), num_cpus=0)
        ds = ds.map_batches(_Predictor, fn_constructor_kwargs={"model": model, "cfg": cfg, "threads": threads},
                            batch_size=None, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=threads)
        written, images, errors = _collect(ds, plan, pending, folder, quiet)
        return written, images, errors, engine
    finally:
        if started_here:
            ray.shutdown()


def _collect(ds, plan: Plan, pending: list[Shard], folder: ShardFolder, quiet: bool) -> tuple[int, int, int]:
    expected: dict[int, int] = {}
    partial: dict[int, dict[int, dict]] = {}
    written = images = errors = 0
    begun = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            shard = row.pop("shard")
            expected[shard] = row.pop("shard_rows")
            partial.setdefault(shard, {})[row.pop("line")] = row
            if len(partial[shard]) == expected[shard]:
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


class _Shards(Datasource):
    """A Ray Data source: one read task per shard still to write."""

    def __init__(self, plan: Plan, pending: list[Shard]):
        super().__init__()
        self.plan = dataclasses.replace(plan, shards=())  # each task carries its own shard, not the whole list
        self.pending = pending

    def get_name(self) -> str:
        return "VisiontuneShards"

    def estimate_inmemory_data_size(self):
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        def task(shard: Shard):
            meta = BlockMetadata(num_rows=None, size_bytes=shard.end - shard.start, input_files=None, exec_stats=None)
            return ReadTask(lambda plan=self.plan, shard=shard: [_read(plan, shard)], meta)

        return [task(shard) for shard in self.pending]


def _read(plan: Plan, shard: Shard):
    paths = plan.paths(shard)
    return pa.table({"path": paths, "shard": [shard.index] * len(paths), "line": list(range(len(paths))),
                     "shard_rows": [len(paths)] * len(paths)})


class _Predictor:
    """One engine per actor, with its threads set here (Ray would give it one)."""

    def __init__(self, model: str, cfg: InferenceConfig, threads: int):
        self.cfg, self.threads = cfg, threads
        self.clf = Classifier.load(model, cfg.backend, threads=threads, batch_size=cfg.batch_size)

    def __call__(self, batch):
        found = predict_rows(self.clf, batch.column("path").to_pylist(), self.cfg, self.threads)
        table = pa.Table.from_pylist(found, schema=arrow_schema())
        for name in ("shard", "line", "shard_rows"):
            table = table.append_column(name, batch.column(name))
        assert table.column_names[:len(COLUMNS)] == list(COLUMNS)
        return table
