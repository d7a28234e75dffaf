"""`--budget`: plan the cached recipe to finish within a wall-clock time on this machine.

A short warm-up measures what the run's time is made of here (frozen-pass views per second, phase-2 training and
scoring views per second, the head's steps), then the richest plan of a fixed ladder whose predicted time fits what
is left of the budget is chosen. The ladder gives up phase-2 epochs before cached views and views before phase 2
itself, the order in which they cost accuracy least on both benchmark datasets (BENCHMARKS.md, "--budget").
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from visiontune.config import TrainConfig
from visiontune.models.stages import frozen_trainable
from visiontune.settings import override, parse_duration
from visiontune.training.cached_recipe import training_preprocess
from visiontune.training.feature_cache import FrozenFeatures, FrozenRunner, build_view_cache
from visiontune.training.phases import augment_from
from visiontune.training.top_phases import TopAndHead

# (views, phase-2 epochs), richest first; the head's epochs stay as configured (they cost seconds).
LADDER = ((4, 4), (4, 3), (4, 2), (2, 2), (1, 2), (1, 1), (0, 1), (0, 0))
_WARMUP_IMAGES = 32
# What the end of a run costs besides scoring its images: saving, the report, plots and a few Grad-CAM overlays.
_FIXED_END_SECONDS = 6.0


@dataclass(frozen=True)
class Rates:
    """Measured on this machine by the warm-up, per second."""

    frozen_views: float  # crops made and pushed through the frozen layers
    train_views: float  # phase-2 training (forward and backward of the top stages and head)
    score_views: float  # phase-2 scoring (forward of the top stages)
    head_views: float  # phase-1 training steps on pooled features
    decode_images: float  # decoding, as the run's own decode went (the evaluation at the end decodes again)


@dataclass(frozen=True)
class Counts:
    train: int
    val: int
    test: int


@dataclass(frozen=True)
class Plan:
    views: int
    finetune_epochs: int
    head_epochs: int
    seconds: float  # predicted for the whole run, from its start
    budget: float
    fits: bool

    def describe(self) -> str:
        phase2 = f"{self.finetune_epochs} phase-2 epoch{'s' * (self.finetune_epochs != 1)}" if self.finetune_epochs \
            else "no phase 2"
        verdict = "" if self.fits else " (the smallest plan; the budget is shorter than it needs)"
        return (f"budget {_clock(self.budget)}: {self.views} augmented view{'s' * (self.views != 1)} per image, "
                f"{self.head_epochs} head epochs, {phase2}; predicted {_clock(self.seconds)}{verdict}")

    def to_dict(self) -> dict:
        return {"budget_seconds": round(self.budget, 1), "views": self.views, "finetune_epochs": self.finetune_epochs,
                "head_epochs": self.head_epochs, "predicted_seconds": round(self.seconds, 1), "fits": self.fits}

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        """The settings the run trains with; `budget` is cleared so a resumed or repeated run keeps this plan."""
        return override(cfg, views=self.views, finetune_epochs=self.finetune_epochs, budget=None)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def fits_of(counts: Counts, folds: int) -> list[tuple[float, float]]:
    """(images trained on, images held out) of every fit a run makes: the folds, then the refit on train + val
    (folds 0: no refit, one fit on train chosen on val)."""
    pool = counts.train + counts.val
    if not folds:
        return [(counts.train, counts.val)]
    held = [(counts.train, counts.val)] if folds == 1 else [(pool * (folds - 1) / folds, pool / folds)] * folds
    return held + [(pool, 0)]


def predict_seconds(views: int, finetune_epochs: int, head_epochs: int, counts: Counts, rates: Rates,
                    phase2: bool, folds: int = 0) -> float:
    """Seconds from the frozen pass to the end of the run's evaluation (`folds`: as `fits_of` takes them)."""
    viewed = (counts.train + (counts.val if folds else 0)) * (1 + views)
    seconds = (viewed + (0 if folds else counts.val) + counts.test) / rates.frozen_views
    for trained, held in fits_of(counts, folds):
        cached = trained * (1 + views)
        seconds += head_epochs * (cached / rates.head_views) + held / rates.score_views
        if phase2 and finetune_epochs:
            seconds += finetune_epochs * (cached / rates.train_views + held / rates.score_views)
            seconds += 2 * held / rates.score_views  # the head alone against phase 2 on the held-out images
    seconds += counts.test / rates.score_views
    scored = counts.val + counts.test  # the evaluation at the end decodes and scores validation and test again
    return seconds + scored / rates.decode_images + scored / rates.frozen_views + _FIXED_END_SECONDS


def choose(budget: float, elapsed: float, counts: Counts, rates: Rates, head_epochs: int, phase2: bool,
           folds: int = 0) -> Plan:
    """The richest plan of the ladder that fits; the smallest one when none does."""
    plan = None
    for views, epochs in LADDER:
        epochs = epochs if phase2 else 0
        seconds = elapsed + predict_seconds(views, epochs, head_epochs, counts, rates, phase2, folds)
        plan = Plan(views, epochs, head_epochs, seconds, budget, seconds <= budget)
        if plan.fits:
            return plan
    return plan


def plan_budget(model: torch.nn.Module, spec, cfg: TrainConfig, images: list, sets, device: torch.device,
                notes: list[str], elapsed: float, decode_rate: float) -> tuple[Plan, FrozenRunner]:
    """Measure, choose and note the plan; returns it and the frozen-pass runner it measured (the run reuses it)."""
    parts = frozen_trainable(model, cfg.trainable_stages)
    bottom, top = parts if parts else (None, None)
    started = time.perf_counter()
    runner = FrozenRunner(FrozenFeatures(model, bottom, top), training_preprocess(spec.preprocess, cfg), device, notes)
    rates = measure(model, top, runner, images, sets.train, cfg, augment_from(cfg), decode_rate)
    counts = Counts(len(sets.train), len(sets.val), len(sets.test))
    elapsed += time.perf_counter() - started
    refit = cfg.refit and counts.val > 0 and not cfg.distill.teacher  # as training.crossfit.uses_refit decides
    plan = choose(parse_duration(cfg.budget), elapsed, counts, rates, cfg.head_epochs,
                  phase2=top is not None and cfg.finetune_epochs > 0, folds=cfg.folds if refit else 0)
    notes.append(f"plan: {plan.describe()} (warm-up on this machine: {rates.frozen_views:.0f} frozen-pass views/s, "
                 f"{rates.train_views:.0f} phase-2 views/s)")
    return plan, runner


def measure(model: torch.nn.Module, top: torch.nn.Module | None, runner: FrozenRunner, images: list,
            train: np.ndarray, cfg: TrainConfig, aug, decode_rate: float) -> Rates:
    """A warm-up of a few seconds on the run's own training images; the model's weights are not changed."""
    sample = train[np.linspace(0, len(train) - 1, min(_WARMUP_IMAGES, len(train))).astype(int)]
    build_view_cache(images, sample[:4], 2, runner, runner.spec, aug, cfg.seed, desc="", quiet=True)  # first-call costs
    started = time.perf_counter()
    cache = build_view_cache(images, sample, 2, runner, runner.spec, aug, cfg.seed, desc="", quiet=True)
    frozen = 2 * len(sample) / (time.perf_counter() - started)
    pooled = torch.from_numpy(cache.pooled.reshape(-1, cache.pooled.shape[-1]))
    head = copy.deepcopy(model.get_classifier()).train()
    head_rate = _steps_per_second(lambda x: head(x), pooled, cfg.head_batch_size, train=True, params=head.parameters())
    if top is None or cache.boundary is None:
        return Rates(frozen, frozen, frozen, head_rate, decode_rate)
    probe = copy.deepcopy(TopAndHead(model, top))  # one deep copy: its top stages are those of its model
    boundary = torch.from_numpy(cache.boundary.reshape(-1, *cache.boundary.shape[2:]).astype(np.float32))
    trained = list(probe.top.parameters()) + list(probe.model.get_classifier().parameters())
    probe.train()
    train_rate = _steps_per_second(probe, boundary, cfg.batch_size, train=True, params=trained)
    probe.eval()
    score_rate = _steps_per_second(probe, boundary, 256, train=False, params=trained)
    return Rates(frozen, train_rate, score_rate, head_rate, decode_rate)


def _steps_per_second(forward, inputs: torch.Tensor, batch: int, *, train: bool, params) -> float:
    """Rows a second through `forward` (and backward when training), the first batch left out as warm-up."""
    params = list(params)
    for p in params:
        p.requires_grad_(train)
    batch = min(batch, len(inputs))
    chunks = [inputs[k:k + batch] for k in range(0, len(inputs) - batch + 1, batch)] or [inputs]
    chunks = [chunks[0]] + chunks  # the first pass pays for allocations
    rows, seconds = 0, 0.0
    for k, x in enumerate(chunks):
        started = time.perf_counter()
        with torch.set_grad_enabled(train):
            out = forward(x)
            if train:
                F.cross_entropy(out, torch.zeros(len(x), dtype=torch.long)).backward()
        if k:
            rows, seconds = rows + len(x), seconds + time.perf_counter() - started
    return rows / max(seconds, 1e-6)
