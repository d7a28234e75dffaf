"""The default recipe (fast on a CPU, see DESIGN.md): cache the frozen backbone's outputs for a few augmented
views; phase 1 fits the head on pooled features; phase 2 fine-tunes the top stages on the cached boundary
activations."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from torch import nn

from visiontune.config import TrainConfig
from visiontune.data.transforms import Preprocess
from visiontune.models.stages import frozen_trainable
from visiontune.training.crossfit import crossfit, uses_refit
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
from visiontune.training.loops import make_loss
from visiontune.training.phases import PhaseContext, Score, Sets, augment_from, evaluate_logits
from visiontune.training.top_phases import fit_phases, keep_finetuned


def training_preprocess(spec: Preprocess, cfg: TrainConfig) -> Preprocess:
    """The preprocessing of the cached training views: the model's, at `cfg.train_size` when one is set."""
    if not cfg.train_size or cfg.train_size == spec.input_size:
        return spec
    return dataclasses.replace(spec, input_size=cfg.train_size)


class ViewCaches:
    """The cached views a run (or a search trial) trains on: looked up on disk by their key, else built by one frozen
    pass. `runner`: frozen layers already prepared for the training views (by a budget's warm-up)."""

    def __init__(self, model: nn.Module, spec, cfg: TrainConfig, images: list, digests: list[str], ctx: PhaseContext,
                 disk: DiskCache, runner: FrozenRunner | None = None):
        self.model, self.spec, self.cfg, self.images, self.digests = model, spec, cfg, images, digests
        self.ctx, self.disk = ctx, disk
        parts = frozen_trainable(model, cfg.trainable_stages)
        self.bottom, self.top = parts if parts else (None, None)
        self.has_split = parts is not None
        self.aug = augment_from(cfg)
        self.weights = weights_identity(spec.timm_name, cfg.weights, cfg.from_scratch, cfg.seed)
        self.split_at = cfg.trainable_stages if parts else 0
        self.train_spec = training_preprocess(spec.preprocess, cfg)
        self.runners: dict[int, FrozenRunner] = {}  # by input size, built on first use: cached views need no pass
        if runner is not None:
            self.runners[self.train_spec.input_size] = runner

    def get(self, indices: np.ndarray, views: int, pre, desc: str) -> ViewCache | None:
        if not len(indices):
            return None
        cfg, ctx = self.cfg, self.ctx
        key = view_cache_key([self.digests[i] for i in indices], self.weights, pre, self.split_at, views, self.aug,
                             cfg.seed)
        found = self.disk.load(key)
        if found is not None:
            return found
        if pre.input_size not in self.runners:
            self.runners[pre.input_size] = FrozenRunner(FrozenFeatures(self.model, self.bottom, self.top), pre,
                                                        ctx.device, ctx.notes)
        began = time.perf_counter()
        built = build_view_cache(self.images, indices, views, self.runners[pre.input_size], pre, self.aug, cfg.seed,
                                 desc=desc, quiet=ctx.quiet)
        if ctx.budget is not None:  # the pass itself, a far longer sample than the budget's warm-up
            ctx.budget.observe_frozen(len(indices) * views, time.perf_counter() - began)
        if not self.disk.save(key, built):
            ctx.notes.append(f"{desc}: not kept in {self.disk.folder} for the next run (no space left on the device)")
        return built

    def pool(self, sets: Sets) -> ViewCache:
        """Every view of train then val: what a cross-fit's folds and its refit train on."""
        views = 1 + self.cfg.views
        parts = (self.get(sets.train, views, self.train_spec, "cache train views"),
                 self.get(sets.val, views, self.train_spec, "cache val views"))
        return ViewCache(np.concatenate([p.boundary for p in parts], axis=1) if self.top is not None else None,
                         np.concatenate([p.pooled for p in parts], axis=1))


def cached_recipe(model: nn.Module, spec, cfg: TrainConfig, images: list, digests: list[str], sets: Sets,
                  ctx: PhaseContext, disk: DiskCache, teacher=None, runner: FrozenRunner | None = None,
                  known=None) -> dict[str, Score]:
    """`runner`: frozen layers already prepared for the training views (by a budget's warm-up). `known`: the folds'
    outcome (a crossfit.OutOfFold) when a search already fitted them with these settings."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    caches = ViewCaches(model, spec, cfg, images, digests, ctx, disk, runner)
    top, train_spec, aug, cache = caches.top, caches.train_spec, caches.aug, caches.get
    if not caches.has_split and cfg.trainable_stages > 0:
        ctx.notes.append(f"{type(model).__name__} has no known stage split: only the head is trained "
                         f"(use --full-finetune to train everything)")
    if train_spec != spec.preprocess:
        ctx.notes.append(f"training views at {train_spec.input_size} px, validation and test at "
                         f"{spec.preprocess.input_size} px")
    why_not = uses_refit(cfg, len(sets.val) > 0, ctx.dist.active, teacher)
    num_classes = sets.num_classes
    test_cache = cache(sets.test, 1, spec.preprocess, "cache test")
    y_test = sets.labels[sets.test]
    if why_not is None:
        pool = np.concatenate([sets.train, sets.val])
        oof = crossfit(model, top, cfg, caches.pool(sets), sets.labels[pool], len(sets.train),
                       lambda y: make_loss(cfg, y, num_classes), ctx, known=known)
        ctx.summary["refit"] = oof.summary
        ctx.summary["out_of_fold"] = (oof.logits, oof.labels)
        model.eval()
        if oof.finetune_epochs:
            forward, key = (lambda x: model.forward_head(top(x))), "boundary"
        else:
            forward, key = model.get_classifier(), "pooled"
        scores = {"val": evaluate_logits(lambda x: x, oof.logits, oof.labels, ctx.device)[0]}
        test = ctx.evaluate(forward, getattr(test_cache, key)[0] if test_cache is not None else None, y_test)
        return {**scores, **({"test": test} if test is not None else {})}
    ctx.notes.append(why_not)
    train_cache = cache(sets.train, 1 + cfg.views, train_spec, "cache train views")
    val_cache = cache(sets.val, 1, spec.preprocess, "cache val")
    y_train, y_val = sets.labels[sets.train], sets.labels[sets.val]
    loss_fn = make_loss(cfg, y_train, num_classes)
    if teacher is not None:  # distillation: the teacher's logits for exactly these views, once
        targets = teacher_view_logits(teacher, images, digests, sets.train, 1 + cfg.views, train_spec, aug,
                                      cfg.seed, disk, cfg.distill.teacher_batch, quiet=ctx.quiet, notes=ctx.notes)
        loss_fn = distill_loss(loss_fn, targets, cfg.distill.alpha, cfg.distill.temperature, ctx.device)

    fitted = fit_phases(model, top, cfg, train_cache, y_train, val_cache, y_val, loss_fn, ctx)
    forward, key = model.get_classifier(), "pooled"
    if fitted.head_alone is not None:
        model.eval()
        if keep_finetuned(model, top, fitted.head_alone, val_cache, y_val, ctx):
            forward, key = (lambda x: model.forward_head(top(x))), "boundary"
    model.eval()
    scores = {}
    for name, c, y in (("val", val_cache, y_val), ("test", test_cache, y_test)):
        score = ctx.evaluate(forward, getattr(c, key)[0] if c is not None else None, y)
        if score is not None:
            scores[name] = score
    if sets.labels.ndim == 2 and val_cache is not None:  # multi-label: the thresholds are chosen on these
        ctx.summary["held_out"] = (evaluate_logits(forward, getattr(val_cache, key)[0], y_val, ctx.device)[1], y_val)
    return scores
