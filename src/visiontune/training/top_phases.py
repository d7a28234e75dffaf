"""The two phases of the cached recipe on cached views: phase 1 fits the head on pooled features, phase 2 fine-tunes
the top stages on boundary activations; and the safeguard that keeps the head alone when phase 2 did not beat it.

Each phase runs under a name (`head`, `finetune`, or `fold2.head`, ... in a cross-fit), the name its history rows
and checkpoints carry, so a resumed run continues the phase it was in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.config import TrainConfig
from visiontune.models.attention import head_modules
from visiontune.settings import override
from visiontune.training.checkpoint import Checkpoint
from visiontune.training.feature_cache import ViewCache
from visiontune.training.loops import batch_rng, optimizer_step, repeat_views, run_epochs, target_tensor
from visiontune.training.phases import BestState, PhaseContext, WeightAverage

HEAD_ALONE = "head_alone"  # the phase-1 model, kept in phase-2 checkpoints


@dataclass
class Fitted:
    """What one fit of both phases chose on its held-out images (epochs count from 1; 0: the phase did not run)."""

    head_epoch: int
    finetune_epoch: int
    head_alone: dict | None  # the model as phase 1 left it, when phase 2 ran


def fit_phases(model: nn.Module, top: nn.Module | None, cfg: TrainConfig, train: ViewCache, y_train: np.ndarray,
               held: ViewCache | None, y_held: np.ndarray, loss_fn, ctx: PhaseContext, prefix: str = "") -> Fitted:
    """Phase 1, then phase 2 when the backbone splits and epochs are asked for; each keeps its best epoch on the
    held-out images' centre crops (`held`), or its last one without them."""
    head_epoch = fit_head(model, cfg, train, y_train, held, y_held, loss_fn, ctx, prefix + "head")
    head_epoch = _remembered_epoch(ctx, prefix + "head", head_epoch)
    if top is not None and ctx.budget is not None:  # a --budget run: the epochs again, from the speed measured so far
        cfg = override(cfg, finetune_epochs=ctx.budget.finetune_epochs(cfg.finetune_epochs, prefix + "finetune"))
    if top is None or cfg.finetune_epochs <= 0:
        return Fitted(head_epoch, 0, None)
    head_alone = head_alone_state(model, ctx, prefix)
    began = time.perf_counter()
    finetune_epoch = finetune_top(model, top, cfg, train, y_train, held, y_held, loss_fn, ctx, prefix + "finetune")
    if ctx.budget is not None:
        ctx.budget.observe_phase2(cfg.finetune_epochs * train.boundary.shape[0] * train.boundary.shape[1],
                                  time.perf_counter() - began)
    return Fitted(head_epoch, finetune_epoch, head_alone)


def _remembered_epoch(ctx: PhaseContext, phase: str, epoch: int) -> int:
    """A finished phase's best epoch, also across a resume (the checkpoint keeps it for the later phases)."""
    if epoch < 0 and ctx.resume is not None:
        kept = Checkpoint.kept_from(ctx.resume.tensors, f"{phase}.best_epoch")
        epoch = int(kept["epoch"]) if kept else 0
    if ctx.checkpoint is not None:
        ctx.checkpoint.keep(f"{phase}.best_epoch", {"epoch": torch.tensor(epoch)})
    return epoch


def head_alone_state(model: nn.Module, ctx: PhaseContext, prefix: str = "") -> dict[str, torch.Tensor]:
    """The model as phase 1 left it (the pretrained top stages, the fitted head). It goes into every phase-2
    checkpoint, so a resumed run can still fall back to it."""
    if ctx.resume is not None and ctx.resume.is_past(prefix + "head"):
        state = Checkpoint.kept_from(ctx.resume.tensors, prefix + HEAD_ALONE)
    else:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ctx.checkpoint is not None:
        ctx.checkpoint.keep(prefix + HEAD_ALONE, state)
    return state


def keep_finetuned(model: nn.Module, top: nn.Module, head_alone: dict, val: ViewCache | None, y_val: np.ndarray,
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
             y_val: np.ndarray, loss_fn, ctx: PhaseContext, phase: str = "head") -> int:
    """Phase 1: the linear head on pooled features of every cached view (seconds, even on a CPU). Returns the best
    epoch (-1 when the phase had finished before a resume)."""
    head, device = model.get_classifier(), ctx.device
    views, n, dim = train.pooled.shape
    features = torch.from_numpy(np.ascontiguousarray(train.pooled).reshape(views * n, dim)).to(device)
    labels = repeat_views(y_train, views)
    target_all = target_tensor(labels, device)
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

    if ctx.resume is not None and ctx.resume.is_past(phase):
        return -1
    best = BestState(head)
    run_epochs(phase, cfg.head_epochs, [{"params": list(head.parameters()), "lr": cfg.head_lr}], len(labels), cfg,
               step, validate, best, ctx.history, cfg.head_batch_size, labels, model=model,
               checkpoint=ctx.checkpoint, resume=ctx.resume, every_epoch=False)
    return best.epoch if best.epoch > 0 else cfg.head_epochs


class TopAndHead(nn.Module):
    """The part phase 2 trains, as one module (what DistributedDataParallel wraps)."""

    def __init__(self, model: nn.Module, top: nn.Module):
        super().__init__()
        self.model, self.top = model, top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.top(x))


def finetune_top(model: nn.Module, top: nn.Module, cfg: TrainConfig, train: ViewCache, y_train: np.ndarray,
                 val: ViewCache | None, y_val: np.ndarray, loss_fn, ctx: PhaseContext, phase: str = "finetune") -> int:
    """Phase 2: the top stages and the head, on boundary activations cached for every view. Returns the best epoch
    (the last one without validation)."""
    device = ctx.device
    views, n = train.boundary.shape[:2]
    activations = train.boundary.reshape(views * n, *train.boundary.shape[2:])
    labels = repeat_views(y_train, views)
    head = nn.ModuleList(head_modules(model))  # the classifier, and the attention pool when there is one
    for p in list(top.parameters()) + list(head.parameters()):
        p.requires_grad_(True)

    num_classes = model.get_classifier().out_features
    trained = ctx.dist.wrap(TopAndHead(model, top), device)

    def step(idx, optimizer, epoch):
        model.train()
        idx = np.sort(idx)  # ascending reads from a memory-mapped cache
        x = torch.from_numpy(activations[idx].astype(np.float32)).to(device)
        target = target_tensor(labels[idx], device)
        soft, mix = target, None
        if cfg.feature_mixup > 0:
            mix_rng = batch_rng(cfg.seed, epoch, idx)
            lam = float(mix_rng.beta(cfg.feature_mixup, cfg.feature_mixup))
            perm = torch.from_numpy(mix_rng.permutation(len(idx))).to(device)
            x = lam * x + (1 - lam) * x[perm]
            onehot = target if target.ndim == 2 else F.one_hot(target, num_classes).float()
            soft = lam * onehot + (1 - lam) * onehot[perm]
            mix = (lam, perm)
        logits = trained(x)
        return optimizer_step(optimizer, loss_fn(logits, soft, rows=idx, mix=mix), logits, target)

    def validate():
        model.eval()
        return ctx.evaluate(lambda x: model.forward_head(top(x)), val.boundary[0] if val is not None else None, y_val)

    params = [{"params": list(top.parameters()), "lr": cfg.finetune_lr},
              {"params": list(head.parameters()), "lr": cfg.finetune_lr}]
    best = BestState(model)
    run_epochs(phase, cfg.finetune_epochs, params, len(labels), cfg, step, validate, best,
               ctx.history, cfg.batch_size, labels, model=model, checkpoint=ctx.checkpoint, resume=ctx.resume,
               # only what phase 2 trains is averaged: a pass over the frozen layers' tensors every step is wasted
               average=WeightAverage(nn.ModuleList([top, head]), cfg.ema) if cfg.ema else None)
    return best.epoch if best.epoch > 0 else cfg.finetune_epochs
