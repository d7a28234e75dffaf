"""`predict --shards`: a source of any size through the model into a folder of shards, on this machine or on Ray.

Both paths share the plan (`inference.shard_plan`), the writer (`inference.shard_writer`) and the function that
turns one shard's paths into rows (`shard_writer.predict_rows`), so they write the same files with the same predictions; only
who runs `predict_rows` differs. Memory is one shard's predictions (plus Ray's blocks in flight), whatever the input.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from visiontune.config import InferenceConfig
from visiontune.files import refuse_output_over_inputs
from visiontune.inference.classifier import Classifier
from visiontune.inference.shard_plan import Plan, make_plan
from visiontune.inference.shard_writer import ShardFolder, predict_rows
from visiontune.version import __version__


@dataclass
class ShardRun:
    out: Path
    shards: int  # in the whole job
    written: int  # by this run
    skipped: int  # already there from an earlier run
    images: int  # predicted by this run
    errors: int  # of them, rows with an error (unreadable or missing files)
    seconds: float
    engine: str  # "this machine" or "ray (N model copies x T threads)"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.out}: {self.written} shard(s) written, {self.skipped} already there, of {self.shards}; "
                f"{self.images} image(s) ({self.errors} with an error) in {self.seconds:.1f} s, {rate:.1f} images/s "
                f"on {self.engine}")


def predict_shards(model: str | Path, sources: list[str | Path], out: str | Path, cfg: InferenceConfig, *,
                   ray: str | None = None, root: str | Path | None = None, quiet: bool = False) -> ShardRun:
    """ray: None on this machine; "" for `ray.init()`'s own choice (RAY_ADDRESS, a cluster started here, else a
    local one), or a cluster address ("auto", "ray://head:10001", "head:6379")."""
    out = Path(out)
    if ray is not None:  # before any file is written: without Ray installed this is one line and exit 2
        from visiontune.jobs.ray_predict import run_on_ray
    refuse_output_over_inputs(out, [model, *sources], folder=True, what="write the shards")
    model = str(Path(model).resolve())  # Ray workers do not share the driver's working directory
    job = {"model": model, "sources": [str(Path(s).resolve()) if Path(s).exists() else str(s) for s in sources],
           "shard_images": cfg.shard_images, "top_k": cfg.top_k, "tta": cfg.tta, "backend": cfg.backend,
           "format": cfg.shard_format, "visiontune": __version__}
    folder = ShardFolder(out, cfg.shard_format, job)
    plan = make_plan(sources, out, cfg.shard_images, root)
    pending = [s for s in plan.shards if not folder.done(s.index)]
    started = time.perf_counter()
    if ray is None:
        written, images, errors, engine = _here(model, plan, pending, folder, cfg, quiet)
    else:
        written, images, errors, engine = run_on_ray(model, plan, pending, folder, cfg, ray or None, quiet)
    return ShardRun(out, len(plan.shards), written, len(plan.shards) - len(pending), images, errors,
                    time.perf_counter() - started, engine)


def _here(model: str, plan: Plan, pending, folder: ShardFolder, cfg: InferenceConfig, quiet: bool):
    images = errors = 0
    if not pending:
        return 0, 0, 0, "this machine"
    clf = Classifier.load(model, cfg.backend, threads=cfg.threads, batch_size=cfg.batch_size)
    started = time.perf_counter()
    for done, shard in enumerate(pending, 1):
        shard_rows = predict_rows(clf, plan.paths(shard), cfg, cfg.decode_workers)
        folder.write(shard.index, shard_rows)
        images += len(shard_rows)
        errors += sum(r["error"] is not None for r in shard_rows)
        if not quiet:
            rate = images / max(time.perf_counter() - started, 1e-9)
            print(f"\rshard {done}/{len(pending)}  {images} images  {rate:.1f} images/s", end="", file=sys.stderr,
                  flush=True)
    if not quiet:
        print(file=sys.stderr)
    return len(pending), images, errors, f"this machine ({clf.engine_name})"
