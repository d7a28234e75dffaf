"""`train`: dataset in, run directory out.

Default recipe (fast on a CPU, see DESIGN.md): decode once; cache the frozen backbone's outputs for a few
augmented views; phase 1 fits the head on pooled features; phase 2 fine-tunes the top stages on the cached
boundary activations. `full_finetune` trains everything on fresh augmentations instead (GPU-friendly, AMP).
"""

from __future__ import annotations

import random
import sys
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
from visiontune.training import run_dir as rd
from visiontune.training.feature_cache import FrozenFeatures, FrozenRunner, ViewCache, build_view_cache
from visiontune.training.full_finetune import full_finetune
from visiontune.training.loops import BALANCE, BestState, Score, evaluate_logits, make_loss, run_epochs


@dataclass
class TrainResult:
    run_dir: Path
    meta: ModelMeta
    metrics: dict
    history: list[dict]
    notes: list[str] = field(default_factory=list)


@dataclass
class Sets:
    """Indices (into the decoded image list) and labels of each split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    labels: np.ndarray  # per decoded image


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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
    out.mkdir(parents=True, exist_ok=True)
    return out


def train_dataset(dataset: Dataset, cfg: TrainConfig, out: Path, *, data_label: str, root: str | None = None,
                  quiet: bool = False, overwrite: bool = False) -> TrainResult:
    started = time.perf_counter()
    validate_config(cfg)
    seed_everything(cfg.seed, cfg.deterministic)
    run_dir = prepare_run_dir(out, overwrite)
    device = pick_device()
    notes: list[str] = []

    report = scan_dataset(dataset, cfg.scan, quiet=quiet)
    if report.unusable_reason:
        raise DatasetError(report.unusable_reason)
    for path, reason in report.skipped():
        notes.append(f"skipped {path}: {reason}")
    split = split_dataset(dataset, report.usable, cfg.split)
    notes += split.notes
    if not len(split.indices("val")):
        notes.append("no validation images: the last epoch is kept, not the best")
    rd.write_config(run_dir, data_label, root, cfg)
    split.write_csv(run_dir / rd.SPLIT_FILE)

    model, spec = build_classifier(cfg.model, len(dataset.classes), dropout=cfg.dropout,
                                   weights=Path(cfg.weights) if cfg.weights else None,
                                   from_scratch=cfg.from_scratch, allow_download=cfg.download)
    model.to(device)
    sets, images = _decode(dataset, split, spec.preprocess, cfg, quiet, notes)
    history = rd.History(run_dir, quiet)
    try:
        if cfg.full_finetune:
            scores = full_finetune(model, spec.preprocess, cfg, augment_from(cfg), images, sets, device, history, quiet)
        else:
            scores = cached_recipe(model, spec.preprocess, cfg, images, sets, device, history, quiet, notes)
    finally:
        history.close()

    meta = ModelMeta(spec.name, spec.timm_name, list(dataset.classes), spec.preprocess, cfg.dropout, current_versions())
    save_bundle(run_dir, model.cpu().eval(), meta)
    metrics = {
        "model": spec.name,
        "parameters": count_parameters(model),
        "train_seconds": round(time.perf_counter() - started, 1),
        "device": str(device),
        "images": {name: int(len(getattr(sets, name))) for name in ("train", "val", "test")},
        **{name: {"loss": s.loss, "top1": s.accuracy} for name, s in scores.items()},
        "notes": notes,
    }
    rd.write_metrics(run_dir, metrics)
    return TrainResult(run_dir, meta, metrics, history.rows, notes)


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
    return sets, decoded.images


def cached_recipe(model: nn.Module, spec, cfg: TrainConfig, images: list, sets: Sets, device: torch.device,
                  history: rd.History, quiet: bool, notes: list[str]) -> dict[str, Score]:
    parts = frozen_trainable(model, cfg.trainable_stages)
    bottom, top = parts if parts else (None, None)
    if parts is None and cfg.trainable_stages > 0:
        notes.append(f"{type(model).__name__} has no known stage split: only the head is trained "
                     f"(use --full-finetune to train everything)")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    runner = FrozenRunner(FrozenFeatures(model, bottom, top), spec, device, notes)
    aug = augment_from(cfg)

    def cache(indices: np.ndarray, views: int, desc: str) -> ViewCache | None:
        if not len(indices):
            return None
        return build_view_cache(images, indices, views, runner, spec, aug, cfg.seed, desc=desc, quiet=quiet)

    train_cache = cache(sets.train, 1 + cfg.views, "cache train views")
    val_cache = cache(sets.val, 1, "cache val")
    test_cache = cache(sets.test, 1, "cache test")
    y_train = sets.labels[sets.train]
    y_val, y_test = sets.labels[sets.val], sets.labels[sets.test]
    loss_fn = make_loss(cfg, y_train, int(sets.labels.max()) + 1)

    head = model.get_classifier()
    fit_head(head, cfg, train_cache, y_train, val_cache, y_val, loss_fn, device, history)
    head_forward = lambda x: head(x)  # noqa: E731
    scores = {}
    if top is not None and cfg.finetune_epochs > 0:
        finetune_top(model, top, cfg, train_cache, y_train, val_cache, y_val, loss_fn, device, history)
        forward = lambda x: model.forward_head(top(x))  # noqa: E731
        key = "boundary"
    else:
        forward, key = head_forward, "pooled"
    model.eval()
    for name, c, y in (("val", val_cache, y_val), ("test", test_cache, y_test)):
        if c is not None:
            scores[name], _ = evaluate_logits(forward, getattr(c, key)[0], y, device)
    return scores


def fit_head(head: nn.Module, cfg: TrainConfig, train: ViewCache, y_train: np.ndarray, val: ViewCache | None,
             y_val: np.ndarray, loss_fn, device: torch.device, history: rd.History) -> None:
    """Phase 1: the linear head on pooled features of every cached view (seconds, even on a CPU)."""
    views, n, dim = train.pooled.shape
    features = torch.from_numpy(train.pooled.reshape(views * n, dim)).to(device)
    labels = np.tile(y_train, views)
    target_all = torch.from_numpy(labels.astype(np.int64)).to(device)
    for p in head.parameters():
        p.requires_grad_(True)

    def step(idx, optimizer):
        head.train()
        x = F.dropout(features[idx], p=cfg.dropout, training=True)
        logits = head(x)
        target = target_all[idx]
        loss = loss_fn(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item(), (logits.argmax(1) == target).sum().item()

    def validate():
        if val is None:
            return None
        head.eval()
        return evaluate_logits(head, val.pooled[0], y_val, device)[0]

    best = BestState(head)
    run_epochs("head", cfg.head_epochs, [{"params": list(head.parameters()), "lr": cfg.head_lr}], len(labels), cfg,
                step, validate, best, history, cfg.head_batch_size, labels)


def finetune_top(model: nn.Module, top: nn.Module, cfg: TrainConfig, train: ViewCache, y_train: np.ndarray,
                 val: ViewCache | None, y_val: np.ndarray, loss_fn, device: torch.device, history: rd.History) -> None:
    """Phase 2: the top stages and the head, on boundary activations cached for every view."""
    views, n = train.boundary.shape[:2]
    activations = train.boundary.reshape(views * n, *train.boundary.shape[2:])
    labels = np.tile(y_train, views)
    head = model.get_classifier()
    for p in list(top.parameters()) + list(head.parameters()):
        p.requires_grad_(True)

    def step(idx, optimizer):
        model.train()
        x = torch.from_numpy(activations[np.sort(idx)].astype(np.float32)).to(device)
        target = torch.from_numpy(labels[np.sort(idx)].astype(np.int64)).to(device)
        logits = model.forward_head(top(x))
        loss = loss_fn(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item(), (logits.argmax(1) == target).sum().item()

    def validate():
        if val is None:
            return None
        model.eval()
        return evaluate_logits(lambda x: model.forward_head(top(x)), val.boundary[0], y_val, device)[0]

    params = [{"params": list(top.parameters()), "lr": cfg.finetune_lr},
              {"params": list(head.parameters()), "lr": cfg.finetune_lr}]
    run_epochs("finetune", cfg.finetune_epochs, params, len(labels), cfg, step, validate, BestState(model), history,
                cfg.batch_size, labels)


def log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)
