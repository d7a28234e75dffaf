"""`train`: dataset in, run directory out.

Default recipe (fast on a CPU, see DESIGN.md): decode once; cache the frozen backbone's outputs for a few
augmented views; phase 1 fits the head on pooled features; phase 2 fine-tunes the top stages on the cached
boundary activations. `full_finetune` trains everything on fresh augmentations instead (GPU-friendly, AMP).
"""

from __future__ import annotations

import hashlib
import io
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.config import TrainConfig
from visiontune.data.index import Dataset
from visiontune.data.integrity import scan_dataset
from visiontune.data.loader import load_all
from visiontune.data.split import Split, split_dataset
from visiontune.data.transforms import Augment
from visiontune.errors import ConfigError, DatasetError
from visiontune.models.bundle import META_FILE, ModelMeta, current_versions, save_bundle
from visiontune.models.classifier import build_classifier, count_parameters
from visiontune.models.stages import frozen_trainable
from visiontune.training import distributed
from visiontune.training import run_dir as rd
from visiontune.training.checkpoint import Checkpoint
from visiontune.training.distill import check_settings, distill_loss, teacher_view_logits
from visiontune.training.distributed import Dist
from visiontune.training.feature_cache import (DiskCache, FrozenFeatures, FrozenRunner, ViewCache, build_view_cache,
                                               cache_key)
from visiontune.training.full_finetune import full_finetune
from visiontune.training.loops import (BALANCE, BestState, Resume, Score, batch_rng, evaluate_logits, make_loss,
                                       optimizer_step, run_epochs)


@dataclass
class TrainResult:
    run_dir: Path
    meta: ModelMeta
    metrics: dict
    history: list[dict]
    notes: list[str] = field(default_factory=list)
    evaluation: object = None  # filled in by the API when the run is evaluated at the end


@dataclass
class Sets:
    """Indices (into the decoded image list) and labels of each split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    labels: np.ndarray  # per decoded image


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def augment_from(cfg: TrainConfig) -> Augment:
    a = cfg.augment
    return Augment(tuple(a.scale), tuple(a.ratio), a.hflip, a.rotate_degrees, a.brightness, a.contrast)


def validate_config(cfg: TrainConfig) -> None:
    if cfg.balance not in BALANCE:
        raise ConfigError(f"balance must be one of {', '.join(BALANCE)}, got {cfg.balance!r}")
    if cfg.views < 0 or cfg.head_epochs < 0 or cfg.finetune_epochs < 0:
        raise ConfigError("views and epochs must be 0 or more")
    if cfg.weights and cfg.from_scratch:
        raise ConfigError("--weights and --from-scratch contradict each other; pass one")


def prepare_run_dir(out: Path, overwrite: bool) -> Path:
    out = Path(out)
    if (out / META_FILE).exists() and not overwrite:
        raise ConfigError(f"{out}: a trained run is already there; pass --overwrite, or another --out")
    if Checkpoint(out).exists() and not overwrite:
        raise ConfigError(f"{out}: an interrupted run is there; continue it with --resume {out}, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    Checkpoint(out).remove()
    return out


def train_dataset(dataset: Dataset, cfg: TrainConfig, out: Path, *, data_label: str, root: str | None = None,
                  quiet: bool = False, overwrite: bool = False, resume: bool = False, teacher=None) -> TrainResult:
    """Train on `dataset` into run directory `out`; with `resume`, continue the interrupted run there.
    `teacher` (a training.distill.Teacher, for cfg.distill.teacher) makes it a distillation."""
    started = time.perf_counter()
    validate_config(cfg)
    check_settings(cfg, teacher)
    d = distributed.setup()
    try:
        return _train(dataset, cfg, out, d, started, data_label=data_label, root=root, quiet=quiet or not d.is_main,
                      overwrite=overwrite, resume=resume, teacher=teacher)
    finally:
        distributed.teardown(d)


def _train(dataset: Dataset, cfg: TrainConfig, out: Path, d: Dist, started: float, *, data_label: str,
           root: str | None, quiet: bool, overwrite: bool, resume: bool, teacher=None) -> TrainResult:
    seed_everything(cfg.seed, cfg.deterministic)
    if resume or not d.is_main:
        run_dir = Path(out)
    else:
        run_dir = prepare_run_dir(out, overwrite)
    d.barrier()
    checkpoint = Checkpoint(run_dir)
    device = d.device()
    notes: list[str] = []
    # The model first: a wrong name or missing weights should fail before minutes of decoding.
    model, spec = build_classifier(cfg.model, len(dataset.classes), dropout=cfg.dropout,
                                   weights=Path(cfg.weights) if cfg.weights else None,
                                   from_scratch=cfg.from_scratch, allow_download=cfg.download)
    model.to(device)

    report = scan_dataset(dataset, cfg.scan, quiet=quiet)
    if report.unusable_reason:
        raise DatasetError(report.unusable_reason)
    for path, reason in report.skipped():
        notes.append(f"skipped {path}: {reason}")
    split = split_dataset(dataset, report.usable, cfg.split)
    notes += split.notes
    if not len(split.indices("val")):
        notes.append("no validation images: the last epoch is kept, not the best")
    if teacher is not None:  # before minutes of decoding: wrong classes or a leaking teacher fail now
        notes += teacher.prepare(list(dataset.classes), split)
    split_text = _split_csv(split, run_dir)
    if resume:
        if (run_dir / rd.SPLIT_FILE).read_text() != split_text:
            raise DatasetError(f"{run_dir}: the data changed since this run started (its split.csv differs); "
                               f"start a new run instead of resuming")
    elif d.is_main:
        rd.write_config(run_dir, data_label, root, cfg)
        rd.atomic_write_text(run_dir / rd.SPLIT_FILE, split_text)

    all_sets, images, digests = _decode(dataset, split, spec.preprocess, cfg, quiet, notes)
    sets = Sets(d.train_shard(all_sets.train), d.eval_shard(all_sets.val), d.eval_shard(all_sets.test), all_sets.labels)
    loaded = None
    if resume:
        state, tensors = checkpoint.load()
        loaded = Resume(state, tensors, ["full"] if cfg.full_finetune else ["head", "finetune"])
    history = rd.History(run_dir, quiet, rd.read_history(run_dir)[: loaded.state["history_rows"]] if loaded else None,
                         write=d.is_main)
    context = PhaseContext(cfg, device, history, quiet, notes, checkpoint if d.is_main else None, loaded, d)
    try:
        if cfg.full_finetune:
            scores = full_finetune(model, spec.preprocess, cfg, augment_from(cfg), images, sets, context)
        else:
            cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "cache"
            scores = cached_recipe(model, spec, cfg, images, digests, sets, context, DiskCache(cache_dir), teacher)
            d.barrier()
            if not cfg.cache_dir and d.is_main:
                shutil.rmtree(cache_dir, ignore_errors=True)
    finally:
        history.close()
    if not d.is_main:
        return TrainResult(run_dir, None, {}, history.rows, notes)

    meta = ModelMeta(spec.name, spec.timm_name, list(dataset.classes), spec.preprocess, cfg.dropout, current_versions())
    save_bundle(run_dir, model.cpu().eval(), meta)
    metrics = {
        "model": spec.name,
        "parameters": count_parameters(model),
        "train_seconds": round(time.perf_counter() - started, 1),
        "resumed": resume,
        "device": str(device),
        "images": {name: int(len(getattr(all_sets, name))) for name in ("train", "val", "test")},
        "processes": d.world,
        **{name: {"loss": s.loss, "top1": s.accuracy} for name, s in scores.items()},
        "notes": notes,
    }
    rd.write_metrics(run_dir, metrics)
    checkpoint.remove()
    return TrainResult(run_dir, meta, metrics, history.rows, notes)


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
    labels = dataset.labels[order]
    sets = Sets(*(np.flatnonzero(ok & (which == k)) for k in range(3)), labels=labels)
    return sets, decoded.images, decoded.digests


@dataclass
class PhaseContext:
    """What every phase needs besides the model and the data."""

    cfg: TrainConfig
    device: torch.device
    history: rd.History
    quiet: bool
    notes: list[str]
    checkpoint: Checkpoint | None = None
    resume: Resume | None = None
    dist: Dist = field(default_factory=Dist)

    def evaluate(self, forward, inputs, labels: np.ndarray, batch_size: int = 256) -> Score | None:
        """Score of `forward` on this process's share, summed over all processes (None: nothing to score).
        Every process must call it, even with an empty share."""
        score = evaluate_logits(forward, inputs, labels, self.device, batch_size)[0] if len(labels) else None
        if not self.dist.active:
            return score
        n = len(labels)
        loss_sum, correct, count = self.dist.sum([score.loss * n if n else 0.0, score.accuracy * n if n else 0.0, float(n)])
        return Score(loss_sum / count, correct / count) if count else None


def _weights_identity(cfg: TrainConfig, spec) -> str:
    if cfg.from_scratch:
        return f"scratch:{cfg.seed}"
    if cfg.weights:
        return f"file:{hashlib.blake2b(Path(cfg.weights).read_bytes(), digest_size=16).hexdigest()}"
    return f"pretrained:{spec.timm_name}"


def cached_recipe(model: nn.Module, spec, cfg: TrainConfig, images: list, digests: list[str], sets: Sets,
                  ctx: PhaseContext, disk: DiskCache, teacher=None) -> dict[str, Score]:
    parts = frozen_trainable(model, cfg.trainable_stages)
    bottom, top = parts if parts else (None, None)
    if parts is None and cfg.trainable_stages > 0:
        ctx.notes.append(f"{type(model).__name__} has no known stage split: only the head is trained "
                         f"(use --full-finetune to train everything)")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    aug = augment_from(cfg)
    runner: list[FrozenRunner] = []  # built on first use: a run whose caches are all on disk never exports
    split_at = cfg.trainable_stages if parts else 0

    def cache(indices: np.ndarray, views: int, desc: str) -> ViewCache | None:
        if not len(indices):
            return None
        key = cache_key(files=[digests[i] for i in indices], weights=_weights_identity(cfg, spec),
                        preprocess=spec.preprocess.to_dict(), split_at=split_at, views=views,
                        augment=aug if views > 1 else None, seed=cfg.seed if views > 1 else None)
        found = disk.load(key)
        if found is not None:
            return found
        if not runner:
            runner.append(FrozenRunner(FrozenFeatures(model, bottom, top), spec.preprocess, ctx.device, ctx.notes))
        built = build_view_cache(images, indices, views, runner[0], spec.preprocess, aug, cfg.seed, desc=desc,
                                 quiet=ctx.quiet)
        disk.save(key, built)
        return built

    train_cache = cache(sets.train, 1 + cfg.views, "cache train views")
    val_cache = cache(sets.val, 1, "cache val")
    test_cache = cache(sets.test, 1, "cache test")
    y_train = sets.labels[sets.train]
    y_val, y_test = sets.labels[sets.val], sets.labels[sets.test]
    loss_fn = make_loss(cfg, y_train, int(sets.labels.max()) + 1)
    if teacher is not None:  # distillation: the teacher's logits for exactly these views, once
        targets = teacher_view_logits(teacher, images, digests, sets.train, 1 + cfg.views, spec.preprocess, aug,
                                      cfg.seed, disk, cfg.distill.teacher_batch, quiet=ctx.quiet, notes=ctx.notes)
        loss_fn = distill_loss(loss_fn, targets, cfg.distill.alpha, cfg.distill.temperature, ctx.device)

    fit_head(model, cfg, train_cache, y_train, val_cache, y_val, loss_fn, ctx)
    if top is not None and cfg.finetune_epochs > 0:
        finetune_top(model, top, cfg, train_cache, y_train, val_cache, y_val, loss_fn, ctx)
        forward, key = (lambda x: model.forward_head(top(x))), "boundary"
    else:
        forward, key = model.get_classifier(), "pooled"
    model.eval()
    scores = {}
    for name, c, y in (("val", val_cache, y_val), ("test", test_cache, y_test)):
        score = ctx.evaluate(forward, getattr(c, key)[0] if c is not None else None, y)
        if score is not None:
            scores[name] = score
    return scores


def fit_head(model: nn.Module, cfg: TrainConfig, train: ViewCache, y_train: np.ndarray, val: ViewCache | None,
             y_val: np.ndarray, loss_fn, ctx: PhaseContext) -> None:
    """Phase 1: the linear head on pooled features of every cached view (seconds, even on a CPU)."""
    head, device = model.get_classifier(), ctx.device
    views, n, dim = train.pooled.shape
    features = torch.from_numpy(train.pooled.reshape(views * n, dim)).to(device)
    labels = np.tile(y_train, views)
    target_all = torch.from_numpy(labels.astype(np.int64)).to(device)
    for p in head.parameters():
        p.requires_grad_(True)

    trained = ctx.dist.wrap(head, device)

    def step(idx, optimizer, epoch):
        head.train()
        x = F.dropout(features[idx], p=cfg.dropout, training=True)
        logits = trained(x)
        target = target_all[idx]
        return optimizer_step(optimizer, loss_fn(logits, target, rows=idx), logits, target)

    def validate():
        head.eval()
        return ctx.evaluate(head, val.pooled[0] if val is not None else None, y_val)

    run_epochs("head", cfg.head_epochs, [{"params": list(head.parameters()), "lr": cfg.head_lr}], len(labels), cfg,
               step, validate, BestState(head), ctx.history, cfg.head_batch_size, labels, model=model,
               checkpoint=ctx.checkpoint, resume=ctx.resume, every_epoch=False)


class TopAndHead(nn.Module):
    """The part phase 2 trains, as one module (what DistributedDataParallel wraps)."""

    def __init__(self, model: nn.Module, top: nn.Module):
        super().__init__()
        self.model, self.top = model, top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.top(x))


def finetune_top(model: nn.Module, top: nn.Module, cfg: TrainConfig, train: ViewCache, y_train: np.ndarray,
                 val: ViewCache | None, y_val: np.ndarray, loss_fn, ctx: PhaseContext) -> None:
    """Phase 2: the top stages and the head, on boundary activations cached for every view."""
    device = ctx.device
    views, n = train.boundary.shape[:2]
    activations = train.boundary.reshape(views * n, *train.boundary.shape[2:])
    labels = np.tile(y_train, views)
    head = model.get_classifier()
    for p in list(top.parameters()) + list(head.parameters()):
        p.requires_grad_(True)

    num_classes = model.get_classifier().out_features
    trained = ctx.dist.wrap(TopAndHead(model, top), device)

    def step(idx, optimizer, epoch):
        model.train()
        idx = np.sort(idx)  # ascending reads from a memory-mapped cache
        x = torch.from_numpy(activations[idx].astype(np.float32)).to(device)
        target = torch.from_numpy(labels[idx].astype(np.int64)).to(device)
        soft, mix = target, None
        if cfg.feature_mixup > 0:
            mix_rng = batch_rng(cfg.seed, epoch, idx)
            lam = float(mix_rng.beta(cfg.feature_mixup, cfg.feature_mixup))
            perm = torch.from_numpy(mix_rng.permutation(len(idx))).to(device)
            x = lam * x + (1 - lam) * x[perm]
            onehot = F.one_hot(target, num_classes).float()
            soft = lam * onehot + (1 - lam) * onehot[perm]
            mix = (lam, perm)
        logits = trained(x)
        return optimizer_step(optimizer, loss_fn(logits, soft, rows=idx, mix=mix), logits, target)

    def validate():
        model.eval()
        return ctx.evaluate(lambda x: model.forward_head(top(x)), val.boundary[0] if val is not None else None, y_val)

    params = [{"params": list(top.parameters()), "lr": cfg.finetune_lr},
              {"params": list(head.parameters()), "lr": cfg.finetune_lr}]
    run_epochs("finetune", cfg.finetune_epochs, params, len(labels), cfg, step, validate, BestState(model),
               ctx.history, cfg.batch_size, labels, model=model, checkpoint=ctx.checkpoint, resume=ctx.resume)
