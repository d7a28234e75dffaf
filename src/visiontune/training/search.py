"""`--budget`'s search: the recipe chosen per dataset, on out-of-fold predictions, in the time the plan leaves.

Why: every setting measured so far helped one benchmark dataset and not the other (BENCHMARKS.md), and a linear
probe on several backbones' features beat one backbone by 3 to 4 points on oxford102. So a budget run tries
recipes on the run's own data and keeps the one that scores best on the images it held out.

How the time is spent, cheapest first, each step only while the prediction of what is left fits the budget:
1. the plan's recipe on `--model` (the ladder's views and phase-2 epochs), so the search never ends worse out of
   fold than the run without it;
2. wider backbones (`--model` with Lite1, then Lite1 and Lite2 as extra branches, or `--search-models`): each costs
   a frozen pass of all its branches, with fewer views when the budget needs it;
3. Optuna's TPE on the best backbone so far: learning rates, label smoothing, dropout, and for a backbone with a
   stage split phase-2 epochs and EMA, each trial pruned on its per-epoch held-out scores (median rule).
Every trial reuses the cached views; the chosen one's folds are not fitted again: the run refits on train + val.

The study lives in the run (`search_study.jsonl`, Optuna's journal), so `--resume` continues it; every trial is a
row of `search_trials.csv`, and metrics.json and the report say what was chosen and why.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field

import numpy as np

from visiontune.config import TrainConfig
from visiontune.files import atomic_write_text
from visiontune.models.classifier import build_classifier
from visiontune.models.registry import get_spec
from visiontune.models.run_dir import RunDir
from visiontune.settings import override
from visiontune.training.budget import Counts, Rates, evaluation_seconds, fit_seconds, fits_of
from visiontune.training.cached_recipe import ViewCaches
from visiontune.training.crossfit import OutOfFold, crossfit
from visiontune.training.feature_cache import DiskCache
from visiontune.training.history import History
from visiontune.training.loops import make_loss
from visiontune.training.phases import PhaseContext, Sets
from visiontune.training.trials import TrialContext, pruner, suggest

_LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Views a wider backbone's cache may hold, richest first: its frozen pass costs every branch, so views give way first.
_VIEW_LADDER = (4, 2, 1)
# Trials a stage is given before the next backbone is opened (its first trial is the plan's recipe).
_TRIALS_BEFORE_WIDER = 1
# A study's trials at most: past this, TPE's gains on a few hundred held-out images are mostly chance.
_MOST_TRIALS = 48
TRIAL_COLUMNS = ("trial", "model", "views", "state", "oof_top1", "oof_loss", "seconds", "head_lr", "dropout",
                 "label_smoothing", "finetune_epochs", "finetune_lr", "ema", "chosen_head_epochs",
                 "chosen_finetune_epochs")


def candidate_models(cfg: TrainConfig) -> list[str]:
    """The backbones the search may choose among, `--model` first; all share its preprocessing (one decode)."""
    if cfg.search_models:
        extra = [m.strip() for m in cfg.search_models.split(",") if m.strip()]
    elif cfg.model in _LITES and not cfg.weights and not cfg.from_scratch and cfg.head == "linear":
        others = [m for m in _LITES if m != cfg.model]
        extra = ["+".join([cfg.model, *others[:k]]) for k in range(1, len(others) + 1)]
    else:
        extra = []
    return [cfg.model] + [m for m in extra if m != cfg.model]


@dataclass
class Stage:
    """One backbone (or set of branches) and the views its cache holds; its trials run on that cache."""

    model: str
    views: int
    rates: Rates
    net: object = None  # the built model, its spec, top stages, caches and pooled views once opened
    spec: object = None
    top: object = None
    caches: ViewCaches | None = None
    pool: object = None
    initial: dict | None = None  # the pretrained weights every trial starts from
    timed: list = field(default_factory=list)  # (phase-2 epochs, seconds) of each finished trial
    best: tuple[float, float] | None = None  # (top-1, -loss) of its best trial
    best_oof: OutOfFold | None = None
    best_cfg: TrainConfig | None = None


@dataclass
class Chosen:
    cfg: TrainConfig
    model: object
    spec: object
    known: OutOfFold | None
    summary: dict = field(default_factory=dict)
    runner: object = None  # the chosen backbone's frozen layers, ready for the test split's pass


class RecipeSearch:
    """Runs the stages and trials described in the module's docstring."""

    def __init__(self, cfg: TrainConfig, spec, images: list, digests: list[str], sets: Sets, ctx: PhaseContext,
                 disk: DiskCache, run: RunDir, counts: Counts, rates: Rates, budget: float, started: float,
                 num_classes: int, measure_rates):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.cfg, self.spec, self.images, self.digests, self.sets, self.ctx = cfg, spec, images, digests, sets, ctx
        self.disk, self.run_dir, self.counts, self.rates, self.budget, self.started = disk, run, counts, rates, budget, started
        self.num_classes, self.measure_rates = num_classes, measure_rates
        self.pool = np.concatenate([sets.train, sets.val])
        self.y_pool = sets.labels[self.pool]
        self.rows: list[dict] = []
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run.search_study)))
        self.storage = storage
        self.studies: dict[str, object] = {}

    # --- time ------------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _folds_seconds(self, stage: Stage, epochs: int) -> float:
        """A trial's fits: the slowest of the stage's trials so far, per phase-2 epoch when it has them (the warm-up's
        rates for the first: a trial of seconds is timed far better by the trials themselves)."""
        if stage.timed:
            return max(s * max(epochs, 1) / max(e, 1) for e, s in stage.timed)
        fits = fits_of(self.counts, self.cfg.folds)[:-1]
        return sum(sum(fit_seconds(t, h, stage.views, epochs, self.cfg.head_epochs, stage.rates, epochs > 0))
                   for t, h in fits)

    def _end_seconds(self, stage: Stage, epochs: int) -> float:
        """The refit of `stage`'s recipe (its images are the folds' together), the test split's frozen pass and the
        evaluation: what must stay free."""
        trained = sum(t for t, _ in fits_of(self.counts, self.cfg.folds)[:-1])
        refit = self._folds_seconds(stage, epochs) * (self.counts.train + self.counts.val) / max(trained, 1)
        scored = self.counts.test / stage.rates.frozen_views
        return refit + scored + (evaluation_seconds(self.counts, stage.rates, True) if self.cfg.evaluate else 0.0)

    def _fits(self, seconds: float) -> bool:
        return self.elapsed() + seconds <= self.budget

    # --- stages ----------------------------------------------------------------------------------------------
    def _open(self, model_name: str, views: int, rates: Rates, net, spec, runner=None) -> Stage:
        """A stage ready for trials: its frozen pass done (or read from the cache), its starting weights kept."""
        stage = Stage(model_name, views, rates, net, spec)
        for p in net.parameters():
            p.requires_grad_(False)
        net.eval()
        stage.caches = ViewCaches(net, spec, override(self.cfg, model=model_name, views=views), self.images,
                                  self.digests, self.ctx, self.disk, runner)
        stage.top = stage.caches.top
        stage.pool = stage.caches.pool(self.sets)
        stage.initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
        return stage

    def _epochs_of(self, stage: Stage) -> int:
        return self.cfg.finetune_epochs if stage.top is not None else 0

    def run(self, base_model, base_runner, on_trial=None) -> Stage:
        """Every stage and trial that fits; returns the best stage (its best trial's settings and folds)."""
        stages = [self._open(self.cfg.model, self.cfg.views, self.rates, base_model, self.spec, base_runner)]
        self._trials(stages[0], _TRIALS_BEFORE_WIDER, on_trial, always=True)
        for name in candidate_models(self.cfg)[1:]:
            known = max((s for s in stages if s.best is not None), key=lambda s: s.best)
            # a wider backbone costs several times a trial of the narrower one: no warm-up when twice that is not left
            if self._capped() or not self._fits(2 * (self._folds_seconds(known, self._epochs_of(known))
                                                     + self._end_seconds(known, self._epochs_of(known)))):
                break
            stage = self._wider(name)
            if stage is None:
                break
            stages.append(stage)
            self._trials(stage, _TRIALS_BEFORE_WIDER, on_trial)
        best = max((s for s in stages if s.best is not None), key=lambda s: s.best)
        self._trials(best, None, on_trial)
        return max((s for s in stages if s.best is not None), key=lambda s: s.best)

    def _capped(self) -> bool:
        return bool(self.cfg.search_trials) and len(self.rows) >= self.cfg.search_trials

    def _wider(self, name: str) -> Stage | None:
        """Open a backbone with several branches when its frozen pass, one trial and the end fit what is left."""
        if get_spec(name).at_size(self.cfg.input_size).preprocess != self.spec.preprocess:  # before building them
            self.ctx.notes.append(f"search: {name} skipped (its preprocessing differs from {self.cfg.model}'s, and "
                                  f"the images are decoded once)")
            return None
        net, spec = build_classifier(name, self.num_classes, dropout=self.cfg.dropout, weights=None,
                                     from_scratch=self.cfg.from_scratch, allow_download=self.cfg.download,
                                     input_size=self.cfg.input_size, head="linear")
        net.to(self.ctx.device)
        rates, runner = self.measure_rates(net, spec, override(self.cfg, model=name))
        for views in [v for v in _VIEW_LADDER if v <= max(self.cfg.views, 1)]:
            stage = Stage(name, views, rates)
            pool = self.counts.train + self.counts.val
            frozen = pool * (1 + views) / rates.frozen_views
            if self._fits(frozen + self._folds_seconds(stage, 0) + self._end_seconds(stage, 0)):
                self.ctx.notes.append(f"search: {name} opened with {views} views a training image (predicted frozen "
                                      f"pass {frozen:.0f} s at {rates.frozen_views:.0f} views/s)")
                return self._open(name, views, rates, net, spec, runner)
        self.ctx.notes.append(f"search: {name} not tried (its frozen pass and a fit would not fit the budget)")
        return None

    # --- trials ----------------------------------------------------------------------------------------------
    def _study(self, stage: Stage):
        import optuna

        key = f"{stage.model}@{stage.views}"
        if key not in self.studies:
            study = optuna.create_study(
                study_name=key, storage=self.storage, direction="maximize", load_if_exists=True,
                sampler=optuna.samplers.TPESampler(seed=self.cfg.seed, n_startup_trials=3), pruner=pruner())
            if not study.trials:  # the plan's recipe first: the search never ends worse out of fold than without it
                study.enqueue_trial(self._defaults(stage))
            self.studies[key] = study
        return self.studies[key]

    def _defaults(self, stage: Stage) -> dict:
        c = self.cfg
        values = {"head_lr": c.head_lr, "dropout": c.dropout, "label_smoothing": c.label_smoothing}
        if self._epochs_of(stage):
            values.update(finetune_epochs=c.finetune_epochs, finetune_lr=c.finetune_lr, ema=c.ema)
        return values

    def _trials(self, stage: Stage, most: int | None, on_trial, always: bool = False) -> None:
        study, epochs = self._study(stage), self._epochs_of(stage)
        self._replay(stage, study)
        done = sum(r["model"] == stage.model and r["views"] == stage.views for r in self.rows)  # resumed ones count
        if most is None and self.cfg.search_ray is not None:
            from visiontune.training.search_ray import trials_on_ray

            trials_on_ray(self, stage, study, epochs, on_trial)
            return
        while self.may_start(stage, study, epochs, most, done, always=always):
            self._one(stage, study, epochs, on_trial)
            done += 1

    def may_start(self, stage: Stage, study, epochs: int, most: int | None, done: int, running: int = 0,
                  always: bool = False) -> bool:
        """Whether one more trial of `stage` may start (`done` of its trials finished, `running` under way)."""
        if (most is not None and done + running >= most) or len(study.trials) >= _MOST_TRIALS:
            return False
        if always and not done and not running:  # the plan's recipe runs whatever is left
            return True
        if self.cfg.search_trials and len(self.rows) + running >= self.cfg.search_trials:
            return False
        return self._fits(self._folds_seconds(stage, epochs) + self._end_seconds(stage, epochs))

    def _replay(self, stage: Stage, study) -> None:
        """Trials a resumed search finished before it was stopped: rows again, never fitted again."""
        import optuna

        for t in study.trials:
            if any(r["trial"] == f"{stage.model}@{stage.views}#{t.number}" for r in self.rows):
                continue
            if t.state == optuna.trial.TrialState.COMPLETE:
                self._row(stage, t.number, "complete (resumed)", t.params, t.value, t.user_attrs.get("oof_loss"),
                          t.user_attrs.get("seconds", 0.0), t.user_attrs.get("epochs", [0, 0]))
                score = (t.value, -(t.user_attrs.get("oof_loss") or 0.0))
                if stage.best is None or score > stage.best:  # folds refitted by the final run (known=None)
                    stage.best, stage.best_oof, stage.best_cfg = score, None, self._trial_cfg(stage, t.params)
            elif t.state == optuna.trial.TrialState.RUNNING:  # stopped mid-trial: Optuna is told, it is asked again
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)

    def _trial_cfg(self, stage: Stage, params: dict) -> TrainConfig:
        return override(self.cfg, model=stage.model, views=stage.views, **params,
                        **({} if self._epochs_of(stage) else {"finetune_epochs": 0}))

    def ask(self, stage: Stage, study, epochs: int):
        """(a new trial of `study`, its settings, the run's settings with them)."""
        trial = study.ask()
        params = suggest(trial, epochs)
        return trial, params, self._trial_cfg(stage, params)

    def _one(self, stage: Stage, study, epochs: int, on_trial) -> None:
        import optuna

        trial, params, trial_cfg = self.ask(stage, study, epochs)
        began = time.perf_counter()
        try:
            oof = crossfit(stage.net, stage.top, trial_cfg, stage.pool, self.y_pool, len(self.sets.train),
                           lambda y: make_loss(trial_cfg, y, self.num_classes), TrialContext(self.ctx, trial),
                           refit=False)
        except optuna.TrialPruned:
            stage.net.load_state_dict(stage.initial)
            oof = None
        self.tell(stage, study, trial, params, trial_cfg, oof, time.perf_counter() - began, on_trial)

    def tell(self, stage: Stage, study, trial, params: dict, trial_cfg: TrainConfig, oof: OutOfFold | None,
             seconds: float, on_trial, failed: bool = False) -> None:
        """A finished trial (`oof` None: pruned, or `failed`: its worker was lost) told to the study, written as a
        row, and kept when it is the best."""
        import optuna

        if oof is None:
            state = optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.PRUNED
            study.tell(trial, state=state)
            self._row(stage, trial.number, "failed" if failed else "pruned", params, None, None, seconds, [0, 0])
            return
        stage.timed.append((trial_cfg.finetune_epochs if self._epochs_of(stage) else 0, seconds))
        top1, loss = oof.summary["oof_top1"], oof.summary["oof_loss"]
        trial.set_user_attr("oof_loss", loss)
        trial.set_user_attr("seconds", round(seconds, 1))
        trial.set_user_attr("epochs", [oof.head_epochs, oof.finetune_epochs])
        study.tell(trial, top1)
        self._row(stage, trial.number, "complete", params, top1, loss, seconds, [oof.head_epochs, oof.finetune_epochs])
        if stage.best is None or (top1, -loss) > stage.best:
            stage.best, stage.best_oof, stage.best_cfg = (top1, -loss), oof, trial_cfg
        if on_trial is not None:
            on_trial(self.rows[-1])

    def _row(self, stage: Stage, number: int, state: str, params: dict, top1, loss, seconds: float, epochs) -> None:
        row = {"trial": f"{stage.model}@{stage.views}#{number}", "model": stage.model, "views": stage.views,
               "state": state, "oof_top1": None if top1 is None else round(top1, 4),
               "oof_loss": None if loss is None else round(loss, 4), "seconds": round(seconds, 1),
               **{k: params.get(k, "") for k in ("head_lr", "dropout", "label_smoothing", "finetune_epochs",
                                                 "finetune_lr", "ema")},
               "chosen_head_epochs": epochs[0], "chosen_finetune_epochs": epochs[1]}
        self.rows.append(row)
        write_trials(self.run_dir, self.rows)
        if not self.ctx.quiet:
            score = "pruned" if top1 is None else f"out-of-fold {self.sets.score_name} {top1:.2%}"
            import sys

            print(f"search trial {len(self.rows)} ({row['trial']}): {score} in {seconds:.0f} s", file=sys.stderr)


def write_trials(run: RunDir, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TRIAL_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run.search_trials, buffer.getvalue())


def search_recipe(model, spec, cfg: TrainConfig, budget: float, images: list, digests: list[str], sets: Sets,
                  device, dist, notes: list[str], quiet: bool, disk: DiskCache, run: RunDir, counts: Counts,
                  rates: Rates, started: float, runner, measure_rates) -> Chosen:
    """The search of a budget run whose plan is `cfg`; returns the recipe, model and folds the run goes on with.
    `measure_rates(model, spec, cfg) -> (Rates, runner)`: the budget's warm-up, for a backbone the search opens."""
    began = time.perf_counter()
    ctx = PhaseContext(cfg, device, History(run, True, write=False), quiet, notes, dist=dist)
    num_classes = sets.num_classes
    search = RecipeSearch(cfg, spec, images, digests, sets, ctx, disk, run, counts, rates, budget, started,
                          num_classes, measure_rates)
    best = search.run(model, runner)
    rows = search.rows
    done = [r for r in rows if r["oof_top1"] is not None]
    first = done[0] if done else None
    kept = max(done, key=lambda r: (r["model"] == best.model and r["views"] == best.views,
                                    r["oof_top1"], -(r["oof_loss"] or 0)))
    summary = {"trials": len(rows), "complete": len(done), "pruned": sum(r["state"] == "pruned" for r in rows),
               "models": sorted({r["model"] for r in rows}), "seconds": round(time.perf_counter() - began, 1),
               "chosen": kept, "oof_top1": kept["oof_top1"],
               "plan_oof_top1": first["oof_top1"] if first else None,
               "table": RunDir.SEARCH_TRIALS, "study": RunDir.SEARCH_STUDY, "rows": rows}
    notes.append(f"search: {len(rows)} trials in {summary['seconds']:.0f} s over {', '.join(summary['models'])}; "
                 f"chose {kept['trial']} (out-of-fold {sets.score_name} {kept['oof_top1']:.2%}, the plan's recipe "
                 f"{summary['plan_oof_top1']:.2%}); every trial in {RunDir.SEARCH_TRIALS}")
    return Chosen(override(best.best_cfg, search_ray=None), best.net, best.spec, best.best_oof, summary,
                  best.caches.runners.get(best.caches.train_spec.input_size))
