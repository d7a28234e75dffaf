"""`--budget`: plan the cached recipe to finish within a wall-clock time on this machine, evaluation included.

A short warm-up measures what the run's time is made of here (frozen-pass views per second, phase-2 training and
scoring views per second, the head's steps), then the richest plan of a fixed ladder whose predicted time fits what
is left of the budget is chosen. The ladder gives up phase-2 epochs before cached views and views before phase 2
itself, the order in which they cost accuracy least on both benchmark datasets (BENCHMARKS.md, "--budget").

A warm-up of a second or two can be wrong by several times on a busy machine (a user's measured 11 frozen-pass
views/s where the pass then ran at 60), so the run re-plans (`Replanner`): the frozen pass over the training views
is timed as it runs, and before each fit's phase 2 the phase-2 epochs (the one choice still open by then) are
chosen again from what the run has measured so far and the time left.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from visiontune.config import EvalConfig, TrainConfig
from visiontune.models.stages import frozen_trainable
from visiontune.settings import override, parse_duration
from visiontune.training.cached_recipe import training_preprocess
from visiontune.training.feature_cache import FrozenFeatures, FrozenRunner, build_view_cache
from visiontune.training.phases import augment_from
from visiontune.training.top_phases import TopAndHead

# (views, phase-2 epochs), richest first; the head's epochs stay as configured (they cost seconds).
LADDER = ((4, 4), (4, 3), (4, 2), (2, 2), (1, 2), (1, 1), (0, 1), (0, 0))
# The warm-up's frozen pass: batches of this many images (two views each, one batch of the real pass), timed one by
# one; the median batch is the rate, so one batch slowed by another process does not set the plan.
_WARMUP_BATCH_IMAGES, _WARMUP_BATCHES = 8, 4
# What the end of a run costs besides scoring its images: saving, the report, plots and a few Grad-CAM overlays.
_FIXED_END_SECONDS = 6.0
# A pass timed for less than this says little about the rest (start-up costs dominate): the warm-up's rate stays.
_MIN_TIMED_SECONDS = 2.0


@dataclass(frozen=True)
class Rates:
    """Measured on this machine by the warm-up, per second."""

    frozen_views: float  # crops made and pushed through the frozen layers
    train_views: float  # phase-2 training (forward and backward of the top stages and head)
    score_views: float  # phase-2 scoring (forward of the top stages)
    head_views: float  # phase-1 training steps on pooled features
    decode_images: float  # decoding, as the run's own decode went (the evaluation at the end decodes again)
    # the whole network at the evaluation's input size (0: not measured, taken as the frozen pass then the top
    # stages); the evaluation's passes run whole images through it, and `--budget 2m` on flower_photos overran by
    # 82 s when they were predicted from the frozen pass
    whole_images: float = 0.0


@dataclass(frozen=True)
class Counts:
    train: int
    val: int
    test: int
    classes: int = 0  # 0: unknown (the evaluation's unknown score is then assumed to read every training image)


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


def fit_seconds(trained: float, held: float, views: int, finetune_epochs: int, head_epochs: int, rates: Rates,
                phase2: bool) -> tuple[float, float]:
    """(phase 1, phase 2) seconds of one fit on cached views."""
    cached = trained * (1 + views)
    head = head_epochs * (cached / rates.head_views) + held / rates.score_views
    if not (phase2 and finetune_epochs):
        return head, 0.0
    tuned = finetune_epochs * (cached / rates.train_views + held / rates.score_views)
    return head, tuned + 2 * held / rates.score_views  # the head alone against phase 2 on the held-out images


def evaluation_seconds(counts: Counts, rates: Rates, refit: bool) -> float:
    """The evaluation `train` ends with: it decodes and scores images again, with the whole network: the test split,
    the unknown score's training sample and validation images, the embedding map's sample, and the validation split
    again for calibration when there are no out-of-fold logits (EvalConfig's defaults)."""
    e = EvalConfig()
    passes = counts.test
    if e.open_set:
        sample = counts.train if not counts.classes else min(counts.train, e.open_set_images * counts.classes)
        passes += sample + counts.val
    passes += min(counts.test, e.map_points)
    passes += 0 if refit or not e.calibrate else counts.val
    forward = 1 / rates.whole_images if rates.whole_images else 1 / rates.frozen_views + 1 / rates.score_views
    per_image = 1 / rates.decode_images + forward
    return passes * per_image + _FIXED_END_SECONDS


def predict_seconds(views: int, finetune_epochs: int, head_epochs: int, counts: Counts, rates: Rates,
                    phase2: bool, folds: int = 0, evaluate: bool = True) -> float:
    """Seconds from the frozen pass to the end of the run's evaluation (`folds`: as `fits_of` takes them)."""
    viewed = (counts.train + (counts.val if folds else 0)) * (1 + views)
    seconds = (viewed + (0 if folds else counts.val) + counts.test) / rates.frozen_views
    for trained, held in fits_of(counts, folds):
        seconds += sum(fit_seconds(trained, held, views, finetune_epochs, head_epochs, rates, phase2))
    return seconds + _end_seconds(counts, rates, folds, evaluate)


def _end_seconds(counts: Counts, rates: Rates, folds: int, evaluate: bool) -> float:
    """Scoring the test split's cached views, then the evaluation (when it runs: `evaluate` and test images)."""
    scored = counts.test / rates.score_views
    return scored + (evaluation_seconds(counts, rates, bool(folds)) if evaluate and counts.test else 0.0)


def choose(budget: float, elapsed: float, counts: Counts, rates: Rates, head_epochs: int, phase2: bool,
           folds: int = 0, evaluate: bool = True) -> Plan:
    """The richest plan of the ladder that fits; the smallest one when none does."""
    plan = None
    for views, epochs in LADDER:
        epochs = epochs if phase2 else 0
        seconds = elapsed + predict_seconds(views, epochs, head_epochs, counts, rates, phase2, folds, evaluate)
        plan = Plan(views, epochs, head_epochs, seconds, budget, seconds <= budget)
        if plan.fits:
            return plan
    return plan


class Replanner:
    """Chooses phase 2's epochs again before each fit's phase 2, from the rates the run has measured by then and
    the time left: the first fit may get more epochs than the warm-up's plan (up to the configured ones) or fewer,
    the later ones (more folds, the refit) only fewer. The first fit's choice is written to config.yaml (`record`),
    so `--config` repeats the run and `--resume` continues it; a later cut is in the notes and metrics.json."""

    def __init__(self, plan: Plan, started: float, counts: Counts, rates: Rates, folds: int, most_epochs: int,
                 evaluate: bool, notes: list[str], record=None):
        self.plan, self.started, self.counts, self.rates, self.folds = plan, started, counts, rates, folds
        self.most, self.evaluate, self.notes, self.record = most_epochs, evaluate, notes, record
        self.warmup = rates
        self.fits = fits_of(counts, folds)
        self.done = 0  # fits whose phase 2 has been planned
        self.epochs: int | None = None  # the first fit's choice: the folds after it get the same
        self.replans: list[dict] = []
        self.frozen = (0, 0.0)  # views through the frozen layers in the run's own passes, and their seconds

    def observe_frozen(self, views: int, seconds: float) -> None:
        """A real frozen pass (`views` crops in `seconds`): the rate of all of them so far replaces the warm-up's."""
        self.frozen = (self.frozen[0] + views, self.frozen[1] + seconds)
        if self.frozen[1] >= _MIN_TIMED_SECONDS:
            self.rates = dataclasses.replace(self.rates, frozen_views=self.frozen[0] / self.frozen[1])

    def observe_phase2(self, rows: float, seconds: float) -> None:
        """A finished phase 2 (`rows`: cached views trained on, all epochs together); its per-epoch scoring is
        counted in, which errs towards finishing early."""
        if seconds >= _MIN_TIMED_SECONDS:
            self.rates = dataclasses.replace(self.rates, train_views=rows / seconds)

    def finetune_epochs(self, asked: int, phase: str) -> int:
        """Phase-2 epochs for the fit about to start its phase 2 (`asked`: what the run would give it; `phase`: its
        name, for the note)."""
        k = min(self.done, len(self.fits) - 1)
        self.done += 1
        refit = self.folds > 0 and k == len(self.fits) - 1
        most = self.most if self.epochs is None else (min(asked, self.epochs) if refit else self.epochs)
        elapsed = time.perf_counter() - self.started
        predicted = {e: elapsed + self._rest(k, e) for e in range(most, -1, -1)}
        epochs = next((e for e, s in predicted.items() if s <= self.plan.budget), 0)
        if self.epochs is None:
            self.epochs = epochs
            if epochs != self.plan.finetune_epochs and self.record is not None:
                self.record(epochs)
        r = self.rates
        self.replans.append({"phase": phase, "elapsed_seconds": round(elapsed, 1), "asked": asked,
                             "finetune_epochs": epochs, "predicted_seconds": round(predicted[epochs], 1),
                             "frozen_views_per_second": round(r.frozen_views, 1),
                             "train_views_per_second": round(r.train_views, 1)})
        if k == 0 or epochs != asked:
            what = (f"{epochs} phase-2 epoch{'s' * (epochs != 1)} kept" if epochs == asked else
                    f"re-planned to {epochs} phase-2 epoch{'s' * (epochs != 1)} instead of {asked}")
            self.notes.append(
                f"budget checked before {phase} after {_clock(elapsed)}: {what}; measured {r.frozen_views:.0f} "
                f"frozen-pass views/s in the pass itself (warm-up {self.warmup.frozen_views:.0f}), "
                f"{r.train_views:.0f} phase-2 views/s; predicted "
                f"{_clock(predicted[epochs])} of {_clock(self.plan.budget)}")
        return epochs

    def _rest(self, k: int, epochs: int) -> float:
        """Seconds from fit k's phase 2 to the end of the evaluation, with `epochs` phase-2 epochs from now on."""
        views, head = self.plan.views, self.plan.head_epochs
        seconds = fit_seconds(*self.fits[k], views, epochs, head, self.rates, True)[1]
        for trained, held in self.fits[k + 1:]:
            seconds += sum(fit_seconds(trained, held, views, epochs, head, self.rates, True))
        return seconds + _end_seconds(self.counts, self.rates, self.folds, self.evaluate)

    def summary(self) -> dict:
        """For metrics.json's budget: what the run trained with, beside the warm-up's plan."""
        return {"planned_finetune_epochs": self.plan.finetune_epochs,
                "finetune_epochs": self.plan.finetune_epochs if self.epochs is None else self.epochs,
                "replans": self.replans}


def whole_time(metrics: dict, seconds: float, evaluation: float | None = None) -> dict:
    """`metrics` with the whole command's time (`seconds`, from its start to now; `evaluation`: the part the
    evaluation at the end took) and the budget's verdict on it: the budget is the user's wall clock for all of it."""
    out = {**metrics, "command_seconds": round(seconds, 1)}
    if evaluation is not None:
        out["evaluation_seconds"] = round(evaluation, 1)
    if metrics.get("budget"):
        budget = metrics["budget"]["budget_seconds"]
        out["budget"] = {**metrics["budget"], "seconds": round(seconds, 1), "within": seconds <= budget,
                         "over_seconds": round(max(seconds - budget, 0.0), 1)}
    return out


def describe_time(metrics: dict) -> str:
    """A run's whole time (training, then the evaluation it ends with) and the budget's verdict on it, as train's
    last line says it: `219 s: training 116 s + evaluation 103 s; budget 180 s, over by 39 s`."""
    text = f"{metrics.get('command_seconds', metrics['train_seconds']):.0f} s"
    if metrics.get("evaluation_seconds") is not None:
        text += f": training {metrics['train_seconds']:.0f} s + evaluation {metrics['evaluation_seconds']:.0f} s"
    budget = metrics.get("budget")
    if budget:
        over = budget.get("over_seconds") or 0
        text += f"; budget {budget['budget_seconds']:.0f} s" + (f", over by {over:.0f} s" if over else "")
    return text


def plan_budget(model: torch.nn.Module, spec, cfg: TrainConfig, images: list, sets, device: torch.device,
                notes: list[str], started: float, decode_rate: float,
                record=None) -> tuple[Plan, FrozenRunner, Replanner]:
    """Measure, choose and note the plan; returns it, the frozen-pass runner it measured (the run reuses it) and
    the re-planner the run consults before each phase 2 (`record(epochs)`: writes a re-planned config.yaml)."""
    rates, runner = measure_model(model, spec, cfg, images, sets, device, notes, decode_rate)
    has_top = frozen_trainable(model, cfg.trainable_stages) is not None
    classes = int(sets.labels.max()) + 1 if len(sets.labels) else 0
    counts = Counts(len(sets.train), len(sets.val), len(sets.test), classes)
    refit = cfg.refit and counts.val > 0 and not cfg.distill.teacher  # as training.crossfit.uses_refit decides
    folds = cfg.folds if refit else 0
    phase2 = has_top and cfg.finetune_epochs > 0
    plan = choose(parse_duration(cfg.budget), time.perf_counter() - started, counts, rates, cfg.head_epochs,
                  phase2=phase2, folds=folds, evaluate=cfg.evaluate)
    notes.append(f"plan: {plan.describe()} (warm-up on this machine: {rates.frozen_views:.0f} frozen-pass views/s, "
                 f"{rates.train_views:.0f} phase-2 views/s, {rates.whole_images:.0f} images/s through the whole network)")
    replanner = Replanner(plan, started, counts, rates, folds, cfg.finetune_epochs if phase2 else 0, cfg.evaluate,
                          notes, record)
    return plan, runner, replanner


def measure_model(model: torch.nn.Module, spec, cfg: TrainConfig, images: list, sets, device: torch.device,
                  notes: list[str], decode_rate: float) -> tuple[Rates, FrozenRunner]:
    """The warm-up of one model (`plan_budget`'s, and the search's for each backbone it opens), and the frozen-pass
    runner it prepared."""
    parts = frozen_trainable(model, cfg.trainable_stages)
    bottom, top = parts if parts else (None, None)
    runner = FrozenRunner(FrozenFeatures(model, bottom, top), training_preprocess(spec.preprocess, cfg), device, notes)
    rates = measure(model, top, runner, images, sets.train, cfg, augment_from(cfg), decode_rate)
    if cfg.evaluate and len(sets.test):
        rates = dataclasses.replace(rates, whole_images=_whole_network_rate(model, spec, images, sets.train, cfg, device))
    return rates, runner


def measure(model: torch.nn.Module, top: torch.nn.Module | None, runner: FrozenRunner, images: list,
            train: np.ndarray, cfg: TrainConfig, aug, decode_rate: float) -> Rates:
    """A warm-up of a few seconds on the run's own training images; the model's weights are not changed."""
    count = min(_WARMUP_BATCH_IMAGES * _WARMUP_BATCHES, len(train))
    sample = train[np.linspace(0, len(train) - 1, count).astype(int)]
    batches = [sample[k:k + _WARMUP_BATCH_IMAGES] for k in range(0, len(sample), _WARMUP_BATCH_IMAGES)]
    build_view_cache(images, batches[0], 2, runner, runner.spec, aug, cfg.seed, desc="", quiet=True)  # first-call costs
    rates, parts = [], []
    for batch in batches:
        began = time.perf_counter()
        parts.append(build_view_cache(images, batch, 2, runner, runner.spec, aug, cfg.seed, desc="", quiet=True))
        rates.append(2 * len(batch) / max(time.perf_counter() - began, 1e-6))
    frozen = statistics.median(rates)
    pooled = torch.from_numpy(np.concatenate([p.pooled for p in parts], axis=1).reshape(-1, parts[0].pooled.shape[-1]))
    head = copy.deepcopy(model.get_classifier()).train()
    head_rate = _steps_per_second(lambda x: head(x), pooled, cfg.head_batch_size, train=True, params=head.parameters())
    if top is None or parts[0].boundary is None:  # the head alone: its held-out images are scored as it trains
        return Rates(frozen, head_rate, head_rate, head_rate, decode_rate)
    probe = copy.deepcopy(TopAndHead(model, top))  # one deep copy: its top stages are those of its model
    boundary = np.concatenate([p.boundary for p in parts], axis=1)
    boundary = torch.from_numpy(boundary.reshape(-1, *boundary.shape[2:]).astype(np.float32))
    trained = list(probe.top.parameters()) + list(probe.model.get_classifier().parameters())
    probe.train()
    train_rate = _steps_per_second(probe, boundary, cfg.batch_size, train=True, params=trained)
    probe.eval()
    score_rate = _steps_per_second(probe, boundary, 256, train=False, params=trained)
    return Rates(frozen, train_rate, score_rate, head_rate, decode_rate)


def _whole_network_rate(model: torch.nn.Module, spec, images: list, train: np.ndarray, cfg: TrainConfig,
                        device: torch.device) -> float:
    """Centre crops a second through the whole network at the evaluation's input size, run as the evaluation runs
    its long passes (ONNX Runtime on a CPU). Measured rather than derived: the PyTorch forward was 3 times slower
    than the evaluation's and the frozen pass 4 times faster (flower_photos, --budget 2m)."""
    runner = FrozenRunner(FrozenFeatures(model, None, None), spec.preprocess, device, [])
    count = min(3 * _WARMUP_BATCH_IMAGES, len(train))
    sample = train[np.linspace(0, len(train) - 1, count).astype(int)]
    first, timed = sample[:_WARMUP_BATCH_IMAGES], sample[_WARMUP_BATCH_IMAGES:] if count > _WARMUP_BATCH_IMAGES else sample
    build_view_cache(images, first, 1, runner, spec.preprocess, None, cfg.seed, desc="", quiet=True)  # first-call costs
    began = time.perf_counter()
    build_view_cache(images, timed, 1, runner, spec.preprocess, None, cfg.seed, desc="", quiet=True)
    return len(timed) / max(time.perf_counter() - began, 1e-6)


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
