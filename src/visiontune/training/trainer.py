"""`train`: dataset in, run directory out. This module keeps the sequence; the recipes train.

Model first (a wrong name fails before minutes of work), then scan, split, decode once, then either the cached
recipe (`cached_recipe.py`, the default) or every layer on fresh augmentations (`full_finetune.py`), then the
bundle and metrics.
"""

from __future__ import annotations

import contextlib
import io
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from visiontune.config import DEFAULT_VIEWS, TrainConfig
from visiontune.data.index import Dataset
from visiontune.data.integrity import scan_dataset
from visiontune.data.loader import load_all
from visiontune.data.split import Split, split_dataset
from visiontune.errors import ConfigError, DatasetError
from visiontune.files import atomic_write_text, exclusive_lock, remove_stale_temporaries
from visiontune.models.bundle import ModelMeta, current_versions, save_bundle
from visiontune.models.classifier import build_classifier, count_parameters
from visiontune.models.run_dir import RunDir
from visiontune.settings import override
from visiontune.training import distributed
from visiontune.training.budget import measure_model, plan_budget, whole_time
from visiontune.training.cached_recipe import cached_recipe
from visiontune.training.checkpoint import Checkpoint
from visiontune.training.crossfit import phase_names, uses_refit
from visiontune.training.distill import check_settings
from visiontune.training.distributed import Dist
from visiontune.training.feature_cache import DiskCache
from visiontune.training.full_finetune import full_finetune
from visiontune.training.history import History
from visiontune.training.multilabel import choose_task, multilabel_entry
from visiontune.training.phases import PhaseContext, Resume, Sets, augment_from
from visiontune.training.search import search_recipe


@dataclass
class TrainResult:
    run_dir: Path
    meta: ModelMeta
    metrics: dict
    history: list[dict]
    notes: list[str] = field(default_factory=list)
    evaluation: object = None  # filled in by the API when the run is evaluated at the end


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def describe_preprocess(spec) -> str:
    p = spec.preprocess
    return (f"preprocessing of {spec.timm_name}: {p.input_size} px (shorter side {p.resize_size}, centre crop), "
            f"mean {tuple(p.mean)}, std {tuple(p.std)}, {p.interpolation}")


def prepare_run_dir(out: Path, overwrite: bool) -> Path:
    out = Path(out)
    if RunDir(out).meta.exists() and not overwrite:
        raise ConfigError(f"{out}: a trained run is already there; pass --overwrite, or another --out")
    if (Checkpoint(out).exists() or RunDir(out).search_study.exists()) and not overwrite:
        raise ConfigError(f"{out}: an interrupted run is there; continue it with --resume {out}, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    Checkpoint(out).remove()
    for stale in (RunDir(out).search_study, RunDir(out).search_trials):  # an earlier run's search
        stale.unlink(missing_ok=True)
    return out


def train_dataset(dataset: Dataset, cfg: TrainConfig, out: Path, *, data_label: str, root: str | None = None,
                  quiet: bool = False, overwrite: bool = False, resume: bool = False, teacher=None,
                  started: float | None = None) -> TrainResult:
    """Train on `dataset` into run directory `out`; with `resume`, continue the interrupted run there.
    `teacher` (a training.distill.Teacher, for cfg.distill.teacher) makes it a distillation. `started`: when the
    command began (time.perf_counter()), the clock a budget runs on; default now."""
    started = time.perf_counter() if started is None else started
    check_settings(cfg, teacher)
    if cfg.search_ray is not None and cfg.budget is None and not resume:  # a budget's plan clears budget, not ray
        raise ConfigError("--ray runs the trials of --budget's search: give --budget")
    created = not Path(out).exists()
    d = distributed.setup()
    try:
        # Rank 0 alone writes the run folder, so it alone locks it; a second train of the folder stops here.
        with exclusive_lock(RunDir(out).lock, "this run") if d.is_main else contextlib.nullcontext():
            if d.is_main:  # what a writer killed with -9 left half-written
                for folder in (out, RunDir(out).checkpoint, RunDir(out).cache):
                    remove_stale_temporaries(folder)
            return _train(dataset, cfg, out, d, started, data_label=data_label, root=root,
                          quiet=quiet or not d.is_main, overwrite=overwrite, resume=resume, teacher=teacher)
    except BaseException:
        # A run that failed before its first checkpoint leaves nothing behind in a folder it made (nothing to
        # resume, and an empty run folder would look like a result).
        if created and d.is_main and not Checkpoint(Path(out)).exists() and not RunDir(out).search_study.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        distributed.teardown(d)


def _train(dataset: Dataset, cfg: TrainConfig, out: Path, d: Dist, started: float, *, data_label: str,
           root: str | None, quiet: bool, overwrite: bool, resume: bool, teacher=None) -> TrainResult:
    if cfg.budget and d.active:  # before any work: each process would measure, and plan, on its own
        raise ConfigError("--budget plans a run of one process; give views and epochs to a distributed run")
    seed_everything(cfg.seed, cfg.deterministic)
    if resume or not d.is_main:
        run_dir = Path(out)
    else:
        run_dir = prepare_run_dir(out, overwrite)
    run = RunDir(run_dir)
    d.barrier()
    checkpoint = Checkpoint(run_dir)
    saved = checkpoint.load() if resume and checkpoint.exists() else None  # a damaged checkpoint fails before minutes of decoding
    device = d.device()
    notes: list[str] = []
    # The model first: a wrong name or missing weights should fail before minutes of decoding.
    model, spec = build_classifier(cfg.model, len(dataset.classes), dropout=cfg.dropout,
                                   weights=Path(cfg.weights) if cfg.weights else None,
                                   from_scratch=cfg.from_scratch, allow_download=cfg.download, input_size=cfg.input_size,
                                   head=cfg.head)
    notes.append(describe_preprocess(spec))
    model.to(device)

    notes += [f"{f.path}: {f.reason}" for f in dataset.findings if f.level != "info"]  # missing rows, links, ...
    report = scan_dataset(dataset, cfg.scan, quiet=quiet)
    if report.unusable_reason:
        raise DatasetError(report.unusable_reason)
    for path, reason in report.skipped():
        notes.append(f"skipped {path}: {reason}")
    dataset, usable = choose_task(dataset, report, cfg, notes, quiet)
    split = split_dataset(dataset, usable, cfg.split, report.exact_duplicates + report.near_duplicates)
    notes += split.notes
    if not len(split.indices("val")):
        notes.append("no validation images: the last epoch is kept, not the best")
    if teacher is not None:  # before minutes of decoding: wrong classes or a leaking teacher fail now
        notes += teacher.prepare(list(dataset.classes), split)
    split_text = _split_csv(split, run_dir)
    if resume:
        if run.split.read_text() != split_text:
            raise DatasetError(f"{run_dir}: the data changed since this run started (its split.csv differs); "
                               f"start a new run instead of resuming")
    elif d.is_main:
        run.write_config(data_label, root, cfg)
        atomic_write_text(run.split, split_text)

    decode_started = time.perf_counter()
    all_sets, images, digests = _decode(dataset, split, spec.preprocess, cfg, quiet, notes)
    if cfg.views is None and not cfg.budget:  # a budget's plan sets the views (at most 4)
        per_class = _images_per_class(all_sets, uses_refit(cfg, len(all_sets.val) > 0, d.active, teacher) is None,
                                      len(dataset.classes))
        cfg = override(cfg, views=cfg.views_for(per_class))
        if cfg.views > DEFAULT_VIEWS:
            notes.append(f"{cfg.views} augmented views an image, not {DEFAULT_VIEWS}: {per_class:.1f} labelled images "
                         f"a class (--class-views {cfg.class_views}; --views sets them)")
        if d.is_main:  # config.yaml says what the run did; a resume reads the same number back
            run.write_config(data_label, root, cfg, comment=f"views: {cfg.views}, chosen for "
                                                            f"--class-views {cfg.class_views}")
    plan = runner = replanner = known = searched = None
    if cfg.budget:  # never with --full-finetune: TrainConfig refuses the pair
        decode_rate = len(images) / max(time.perf_counter() - decode_started, 1e-6)
        planned = cfg

        def record(epochs: int) -> None:  # a re-plan before the first phase 2: config.yaml says what the run does
            if d.is_main:
                run.write_config(data_label, root, override(plan.apply(planned), finetune_epochs=epochs),
                                 comment=f"planned by --budget: {plan.describe()}; re-planned as it ran: {epochs} "
                                         f"phase-2 epochs")

        plan, runner, replanner = plan_budget(model, spec, cfg, images, all_sets, device, notes, started,
                                              decode_rate, record)
        budget_seconds, searching = plan.budget, cfg.search and uses_refit(cfg, len(all_sets.val) > 0, d.active,
                                                                            teacher) is None
        cfg = plan.apply(cfg)
        comment = f"planned by --budget: {plan.describe()}"
        if not quiet:
            print(f"plan: {plan.describe()}", file=sys.stderr)
        if searching:  # config.yaml keeps the budget until the search ends, so --resume continues the search

            def measure_rates(net, net_spec, net_cfg):
                return measure_model(net, net_spec, net_cfg, images, all_sets, device, notes, decode_rate)

            chosen = search_recipe(model, spec, cfg, budget_seconds, images, digests, all_sets, device, d, notes,
                                   quiet, _disk(cfg, run), run, replanner.counts, replanner.rates, started, runner,
                                   measure_rates)
            model, spec, cfg, known, searched = chosen.model, chosen.spec, chosen.cfg, chosen.known, chosen.summary
            replanner, runner = None, chosen.runner  # the search kept the time the end needs
            comment = f"chosen by --budget's search: {searched['chosen']['trial']} ({searched['trials']} trials)"
        if d.is_main:
            run.write_config(data_label, root, cfg, comment=comment)
    sets = Sets(d.train_shard(all_sets.train), d.eval_shard(all_sets.val), d.eval_shard(all_sets.test), all_sets.labels)
    loaded = None
    if saved is not None:
        state, tensors = saved
        loaded = Resume(state, tensors, ["full"] if cfg.full_finetune else phase_names(cfg))
    history = History(run, quiet, run.read_history()[: loaded.state["history_rows"]] if loaded else None,
                      write=d.is_main)
    context = PhaseContext(cfg, device, history, quiet, notes, checkpoint if d.is_main else None, loaded, d,
                           budget=replanner)
    try:
        if cfg.full_finetune:
            scores = full_finetune(model, spec.preprocess, cfg, augment_from(cfg), images, sets, context)
        else:
            disk = _disk(cfg, run)
            scores = cached_recipe(model, spec, cfg, images, digests, sets, context, disk, teacher, runner=runner,
                                   known=known)
            d.barrier()
            if not cfg.cache_dir and d.is_main:
                shutil.rmtree(disk.folder, ignore_errors=True)
    finally:
        history.close()
    if not d.is_main:
        return TrainResult(run_dir, None, {}, history.rows, notes)

    meta = ModelMeta(spec.name, spec.timm_name, list(dataset.classes), spec.preprocess, cfg.dropout, current_versions(),
                     img_size=spec.img_size, head=cfg.head,
                     extra=multilabel_entry(dataset, cfg, context.summary, notes) if dataset.targets is not None else {})
    save_bundle(run_dir, model.cpu().eval(), meta)
    train_seconds = time.perf_counter() - started
    metrics = {
        "model": spec.name,
        "parameters": count_parameters(model),
        "train_seconds": round(train_seconds, 1),
        "resumed": resume,
        "device": str(device),
        "images": {name: int(len(getattr(all_sets, name))) for name in ("train", "val", "test")},
        "processes": d.world,
        **({"budget": {**plan.to_dict(), **(replanner.summary() if replanner else {})}} if plan else {}),
        **({"search": searched} if searched else {}),
        **{name: {"loss": s.loss, ("top1" if dataset.targets is None else "mAP"): s.accuracy}
           for name, s in scores.items()},
        **({"refit": context.summary["refit"]} if "refit" in context.summary else {}),
        "notes": notes,
    }
    metrics = whole_time(metrics, train_seconds)  # the evaluation at the end, when there is one, adds its part
    if "out_of_fold" in context.summary:
        run.write_out_of_fold(*context.summary["out_of_fold"])
    run.write_metrics(metrics)
    checkpoint.remove()
    return TrainResult(run_dir, meta, metrics, history.rows, notes)


def _images_per_class(sets: Sets, refits: bool, classes: int) -> float:
    """Labelled images a class averages in what the kept model trains on (positives of a label, multi-label)."""
    labels = sets.labels[np.concatenate([sets.train, sets.val]) if refits else sets.train]
    return float(labels.sum() if labels.ndim == 2 else len(labels)) / max(classes, 1)


def _disk(cfg: TrainConfig, run: RunDir) -> DiskCache:
    return DiskCache(Path(cfg.cache_dir) if cfg.cache_dir else run.cache)


def _split_csv(split: Split, run_dir: Path) -> str:
    buffer = io.StringIO()
    split.write_csv(buffer, relative_to=run_dir.resolve())
    return buffer.getvalue()


def _decode(dataset: Dataset, split: Split, spec, cfg: TrainConfig, quiet: bool, notes: list[str]):
    """Decode every image of the split once; an image that fails now (changed since the scan) is dropped."""
    order = np.concatenate([split.indices(s) for s in ("train", "val", "test")])
    which = np.concatenate([np.full(len(split.indices(s)), k) for k, s in enumerate(("train", "val", "test"))])
    decoded = load_all([str(dataset.abspath(i)) for i in order], spec, workers=cfg.scan.workers, quiet=quiet)
    for i, reason in decoded.failed:
        notes.append(f"skipped {dataset.abspath(order[i])}: {reason}")
    ok = np.array([img is not None for img in decoded.images], dtype=bool)
    labels = dataset.labels[order] if dataset.targets is None else dataset.targets[order].astype(np.float32)
    sets = Sets(*(np.flatnonzero(ok & (which == k)) for k in range(3)), labels=labels)
    return sets, decoded.images, decoded.digests


