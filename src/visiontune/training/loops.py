"""The pieces every training phase shares: batches, loss, schedules, evaluation, best-state tracking."""

from __future__ import annotations

import math
import time
import zlib
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.config import TrainConfig
from visiontune.training.checkpoint import Checkpoint, restore
from visiontune.training.phases import BestState, Resume, WeightAverage


def batch_rng(seed: int, epoch: int, batch: np.ndarray) -> np.random.Generator:
    """A generator for one batch's random choices (mixup), fixed by the seed, the epoch and the batch's
    members, so a resumed run draws exactly what an uninterrupted one would."""
    return np.random.default_rng([seed, epoch, zlib.crc32(np.ascontiguousarray(batch).tobytes())])


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                   scaler: torch.amp.GradScaler | None = None) -> tuple[float, int]:
    """Backward and step (through the AMP scaler when there is one); returns the loss and the correct count."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if target.ndim == 2:  # multi-label: an image counts as right when its whole label set is
        return loss.item(), int(((logits > 0) == (target > 0.5)).all(1).sum().item())
    return loss.item(), int((logits.argmax(1) == target).sum().item())


def repeat_views(labels: np.ndarray, views: int) -> np.ndarray:
    """The labels of `views` stacked copies of the images (class ids, or multi-label rows)."""
    return np.concatenate([labels] * views) if labels.ndim == 2 else np.tile(labels, views)


def target_tensor(labels: np.ndarray, device) -> torch.Tensor:
    """Class ids as int64; multi-label rows as float32 (what binary cross-entropy takes)."""
    return torch.from_numpy(labels.astype(np.float32 if labels.ndim == 2 else np.int64)).to(device)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised so a balanced dataset gets all ones."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def batches(labels: np.ndarray, batch_size: int, rng: np.random.Generator, balance: str) -> Iterator[np.ndarray]:
    """Indices into `labels`, one epoch's worth. With balance="sampler", classes are drawn equally often."""
    n = len(labels)
    if balance == "sampler" and labels.ndim == 1:
        counts = np.bincount(labels)
        p = 1.0 / counts[labels]
        order = rng.choice(n, size=n, replace=True, p=p / p.sum())
    else:
        order = rng.permutation(n)
    for start in range(0, n, batch_size):
        chunk = order[start:start + batch_size]
        if len(chunk) > 1 or n == 1:  # a batch of one breaks BatchNorm in train mode
            yield chunk


def make_loss(cfg: TrainConfig, train_labels: np.ndarray, num_classes: int) -> Callable:
    if train_labels.ndim == 2:  # multi-label rows: one sigmoid per label
        return multilabel_loss(train_labels, cfg.balance == "weights")
    weight = class_weights(train_labels, num_classes) if cfg.balance == "weights" else None

    def loss(logits: torch.Tensor, target: torch.Tensor, rows=None, mix=None) -> torch.Tensor:
        # rows / mix (the batch's cached-view rows, phase 2's mixup) matter only to a distillation loss
        w = weight.to(logits.device) if weight is not None else None
        if target.dtype.is_floating_point:  # soft targets (mixup/cutmix)
            return torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()
        return F.cross_entropy(logits.float(), target, weight=w, label_smoothing=cfg.label_smoothing)

    return loss


def multilabel_loss(train_labels: np.ndarray, weighted: bool) -> Callable:
    """Binary cross-entropy over every label; with `weighted` (--balance weights), each label's positives are
    weighed by its negatives / positives, so a rare label is not learnt as "never"."""
    positives = train_labels.sum(axis=0).astype(np.float64)
    ratio = np.where(positives > 0, (len(train_labels) - positives) / np.maximum(positives, 1), 1.0)
    pos_weight = torch.tensor(ratio, dtype=torch.float32) if weighted else None

    def loss(logits: torch.Tensor, target: torch.Tensor, rows=None, mix=None) -> torch.Tensor:
        w = pos_weight.to(logits.device) if pos_weight is not None else None
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=w)

    return loss


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Per-step schedule (cosine or one-cycle, both with warm-up), or None for plateau (stepped per epoch)."""
    if cfg.schedule == "plateau":
        return None
    total_steps = max(1, total_steps)
    if cfg.schedule == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total_steps,
                                                   pct_start=max(cfg.warmup_fraction, 0.01))
    warmup = int(total_steps * cfg.warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plateau_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    if cfg.schedule != "plateau":
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.3, patience=1)


class EpochTimer:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def run_epochs(name: str, epochs: int, params: list[dict], n_train: int, cfg: TrainConfig, step_fn, validate,
               best: BestState, history, batch_size: int, labels: np.ndarray, *, model: nn.Module,
               checkpoint=None, resume: Resume | None = None, every_epoch: bool = True,
               average: WeightAverage | None = None) -> None:
    """The epoch loop every phase shares: AdamW, schedule, validation, best state, early stopping, and a
    checkpoint after each epoch (`every_epoch`) or at the end of the phase, from which `resume` continues.
    With `average`, its averaged weights are what is validated and kept (the training goes on from the raw ones)."""
    if resume is not None and resume.is_past(name):
        return  # finished before the interruption; its weights come back with the later phase's checkpoint
    optimizer = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, -(-n_train // batch_size))
    scheduler = make_scheduler(optimizer, cfg, epochs * steps_per_epoch)
    plateau = plateau_scheduler(optimizer, cfg)
    rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])  # str hash() varies per process
    start, stale = 1, 0
    if resume is not None and resume.state["phase"] == name:
        restore(resume.state, resume.tensors, model=model, optimizer=optimizer, scheduler=scheduler,
                plateau=plateau, rng=rng, best=best)
        if resume.state["finished"]:
            return
        start, stale = resume.state["epoch"] + 1, resume.state["stale"]
        if average is not None:
            average.load(Checkpoint.kept_from(resume.tensors, f"average.{name}"))

    def save(epoch: int, finished: bool) -> None:
        if checkpoint is not None:
            if average is not None:
                checkpoint.keep(f"average.{name}", average.tensors())
            checkpoint.save(phase=name, epoch=epoch, finished=finished, model=model, optimizer=optimizer,
                            scheduler=scheduler, plateau=plateau, rng=rng, best=best, stale=stale,
                            history_rows=len(history.rows))

    epoch = start - 1
    for epoch in range(start, epochs + 1):
        timer = EpochTimer()
        total_loss = correct = seen = 0.0
        for idx in batches(labels, batch_size, rng, cfg.balance):
            loss, hits = step_fn(idx, optimizer, epoch)
            if scheduler is not None:
                scheduler.step()
            if average is not None:
                average.update()
            total_loss += loss * len(idx)
            correct += hits
            seen += len(idx)
        if average is not None:
            average.swap()  # validate (and keep, if best) the averaged weights
        val = validate()
        offered = val is None or best.offer(val, epoch)
        if average is not None and (epoch < epochs or val is not None):
            average.swap()  # the raw weights train on; without validation the last average is what is kept
        if plateau is not None and val is not None:
            plateau.step(val.loss)
        seconds = timer.seconds()
        history.add({"phase": name, "epoch": epoch, "train_loss": total_loss / max(seen, 1),
                     "train_acc": correct / max(seen, 1), "val_loss": val.loss if val else "",
                     "val_acc": val.accuracy if val else "", "lr": optimizer.param_groups[0]["lr"],
                     "seconds": round(seconds, 2), "images_per_s": round(seen / max(seconds, 1e-9), 1)})
        stale = 0 if offered else stale + 1
        if cfg.early_stopping and stale >= cfg.early_stopping:
            break
        if every_epoch and epoch < epochs:
            save(epoch, finished=False)
    best.restore()  # no-op when there was no validation: the last epoch is kept
    save(epoch, finished=True)
