"""The default recipe (fast on a CPU, see DESIGN.md): cache the frozen backbone's outputs for a few augmented
views; phase 1 fits the head on pooled features; phase 2 fine-tunes the top stages on the cached boundary
activations."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.config import TrainConfig
from visiontune.data.transforms import Preprocess
from visiontune.models.attention import head_modules
from visiontune.models.stages import frozen_trainable
from visiontune.training.checkpoint import Checkpoint
from visiontune.training.distill import distill_loss, teacher_view_logits
from visiontune.training.feature_cache import (
    DiskCache,
    FrozenFeatures,
    FrozenRunner,
    ViewCache,
    build_view_cache,
    view_cache_key,
    weights_identity,
)
from visiontune.training.loops import batch_rng, make_loss, optimizer_step, run_epochs
from visiontune.training.phases import BestState, PhaseContext, Score, Sets, WeightAverage, augment_from

HEAD_ALONE = "head_alone"  # the phase-1 model, kept in phase-2 checkpoints


def training_preprocess(spec: Preprocess, cfg: TrainConfig) -> Preprocess:
    """The preprocessing of the cached training views: the model's, at `cfg.train_size` when one is set."""
    if not cfg.train_size or cfg.train_size == spec.input_size:
        return spec
    return dataclasses.replace(spec, input_size=cfg.train_size)


def cached_recipe(model: nn.Module, spec, cfg: TrainConfig, images: list, digests: list[str], sets: Sets,
                  ctx: PhaseContext, disk: DiskCache, teacher=None, runner: FrozenRunner | None = None) -> dict[str, Score]:
    """`runner`: frozen layers already prepared for the training views (by a budget's warm-up)."""
    parts = frozen_trainable(model, cfg.trainable_stages)
    bottom, top = parts if parts else (None, None)
    if parts is None and cfg.trainable_stages > 0:
        ctx.notes.append(f"{type(model).__name__} has no known stage split: only the head is trained "
                         f"(use --full-finetune to train everything)")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    aug = augment_from(cfg)
    weights = weights_identity(spec.timm_name, cfg.weights, cfg.from_scratch, cfg.seed)
    runners: dict[int, FrozenRunner] = {}  # by input size, built on first use: cached views need no frozen pass
    split_at = cfg.trainable_stages if parts else 0
    train_spec = training_preprocess(spec.preprocess, cfg)
    if runner is not None:
        runners[train_spec.input_size] = runner

    def cache(indices: np.ndarray, views: int, pre, desc: str) -> ViewCache | None:
        if not len(indices):
            return None
        key = view_cache_key([digests[i] for i in indices], weights, pre, split_at, views, aug, cfg.seed)
        found = disk.load(key)
        if found is not None:
            return found
        if pre.input_size not in runners:
            runners[pre.input_size] = FrozenRunner(FrozenFeatures(model, bottom, top), pre, ctx.device, ctx.notes)
        built = build_view_cache(images, indices, views, runners[pre.input_size], pre, aug, cfg.seed, desc=desc,
                                 quiet=ctx.quiet)
        if not disk.save(key, built):
            ctx.notes.append(f"{desc}: not kept in {disk.folder} for the next run (no space left on the device)")
        return built

    if train_spec != spec.preprocess:
        ctx.notes.append(f"training views at {train_spec.input_size} px, validation and test at "
                         f"{spec.preprocess.input_size} px")
    train_cache = cache(sets.train, 1 + cfg.views, train_spec, "cache train views")
    val_cache = cache(sets.val, 1, spec.preprocess, "cache val")
    test_cache = cache(sets.test, 1, spec.preprocess, "cache test")
    y_train = sets.labels[sets.train]
    y_val, y_test = sets.labels[sets.val], sets.labels[sets.test]
    loss_fn = make_loss(cfg, y_train, int(sets.labels.max()) + 1)
    if teacher is not None:  # distillation: the teacher's logits for exactly these views, once
        targets = teacher_view_logits(teacher, images, digests, sets.train, 1 + cfg.views, train_spec, aug,
                                      cfg.seed, disk, cfg.distill.teacher_batch, quiet=ctx.quiet, notes=ctx.notes)
        loss_fn = distill_loss(loss_fn, targets, cfg.distill.alpha, cfg.distill.temperature, ctx.device)

    fit_head(model, cfg, train_cache, y_train, val_cache, y_val, loss_fn, ctx)
    forward, key = model.get_classifier(), "pooled"
    if top is not None and cfg.finetune_epochs > 0:
        head_alone = _head_alone_state(model, ctx)
        finetune_top(model, top, cfg, train_cache, y_train, val_cache, y_val, loss_fn, ctx)
        model.eval()
        if _keep_finetuned(model, top, head_alone, val_cache, y_val, ctx):
            forward, key = (lambda x: model.forward_head(top(x))), "boundary"
    model.eval()
    scores = {}
    for name, c, y in (("val", val_cache, y_val), ("test", test_cache, y_test)):
        score = ctx.evaluate(forward, getattr(c, key)[0] if c is not None else None, y)
        if score is not None:
            scores[name] = score
    return scores


def _head_alone_state(model: nn.Module, ctx: PhaseContext) -> dict[str, torch.Tensor]:
    """The model as phase 1 left it (the pretrained top stages, the fitted head). It goes into every phase-2
    checkpoint, so a resumed run can still fall back to it."""
    if ctx.resume is not None and ctx.resume.is_past("head"):
        state = Checkpoint.kept_from(ctx.resume.tensors, HEAD_ALONE)
    else:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ctx.checkpoint is not None:
        ctx.checkpoint.keep(HEAD_ALONE, state)
    return state


def _keep_finetuned(model: nn.Module, top: nn.Module, head_alone: dict, val: ViewCache | None, y_val: np.ndarray,
                    ctx: PhaseContext) -> bool:
    """Whether phase 2 beat the head alone on validation; if not, the model goes back to the head alone. Fine-tuning
    a few stages on a few cached views can overfit them, and must never leave a worse model than it started from."""
    if val is None and not ctx.dist.active:
        return True  # nothing to judge by: the last epoch is kept, as everywhere without validation
    tuned = ctx.evaluate(lambda x: model.forward_head(top(x)), val.boundary[0] if val is not None else None, y_val)
    tuned_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(head_alone)
    alone = ctx.evaluate(model.get_classifier(), val.pooled[0] if val is not None else None, y_val)
    if tuned is None or alone is None or tuned.better_than(alone):
        model.load_state_dict(tuned_state)
        return True
    ctx.notes.append(f"phase 2 (fine-tuning the top stages) did not beat the head alone on validation "
                     f"(top-1 {tuned.accuracy:.2%} against {alone.accuracy:.2%}): the head alone is kept")
    return False


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
    head = nn.ModuleList(head_modules(model))  # the classifier, and the attention pool when there is one
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
               ctx.history, cfg.batch_size, labels, model=model, checkpoint=ctx.checkpoint, resume=ctx.resume,
               # only what phase 2 trains is averaged: a pass over the frozen layers' tensors every step is wasted
               average=WeightAverage(nn.ModuleList([top, head]), cfg.ema) if cfg.ema else None)
