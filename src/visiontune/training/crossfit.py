"""Cross-fitting: the choices held-out images drive (the best epoch of each phase, whether phase 2 beats the head
alone) are made on out-of-fold predictions, then the kept model is refit on every labelled image, train and val,
with what was chosen. The test split is never touched.

With one fold the val split is the held-out fold (today's run, then a refit); with k >= 2 folds, stratified over
train + val and seeded, every labelled image is held out once. The folds reuse the cached views: a fold is a subset
of the rows of one cache, so k folds cost k fits of the phases and no extra frozen pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from visiontune.config import TrainConfig
from visiontune.data.multilabel import iterative_folds
from visiontune.settings import override
from visiontune.training.checkpoint import Checkpoint
from visiontune.training.feature_cache import ViewCache
from visiontune.training.phases import PhaseContext, Score, evaluate_logits
from visiontune.training.top_phases import fit_phases


@dataclass
class OutOfFold:
    """What the held-out folds said, and what the refit was given."""

    positions: np.ndarray  # rows of the pool (train then val) that were held out, in the order of `logits`
    logits: np.ndarray  # the kept kind of model (phase 2, or the head alone) on each held-out image
    labels: np.ndarray
    head_epochs: int
    finetune_epochs: int  # 0 when phase 2 lost to the head alone out of fold, or did not run
    summary: dict


def uses_refit(cfg: TrainConfig, has_val: bool, distributed: bool, teacher) -> str | None:
    """None when the run refits; otherwise why not (a note)."""
    if not cfg.refit:
        return "no refit (--no-refit): the model is trained on the train split, chosen on val"
    if distributed:
        return "no refit under several processes: the model is trained on the train split, chosen on val"
    if teacher is not None:
        return "no refit when distilling: the teacher's logits are for the train split's views"
    if not has_val:
        return "no refit: no validation images to choose on"
    return None


def phase_names(cfg: TrainConfig) -> list[str]:
    """Every phase a cached-recipe run may have, in order (what a resumed checkpoint's phase is placed in)."""
    folds = [f"fold{k}.{phase}" for k in range(1, cfg.folds + 1) for phase in ("head", "finetune")]
    return folds + ["head", "finetune"]


def fold_positions(y_pool: np.ndarray, n_train: int, folds: int, seed: int) -> list[np.ndarray]:
    """The held-out rows of the pool, one array a fold: the val split itself for one fold, else stratified folds."""
    if folds == 1:
        return [np.arange(n_train, len(y_pool))]
    if y_pool.ndim == 2:  # multi-label: folds stratified over the label sets
        return iterative_folds(y_pool, folds, seed)
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(y_pool)[np.unique(y_pool)].min())
    if smallest < folds:  # StratifiedKFold would warn and leave folds without some classes: plain folds then
        from sklearn.model_selection import KFold

        splitter = KFold(folds, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return [np.sort(held) for _, held in splitter.split(np.zeros(len(y_pool)), y_pool)]


def rows(cache: ViewCache, positions: np.ndarray, views: int | None = None) -> ViewCache:
    """The cache of the images at `positions` (the first `views` views, all by default)."""
    v = slice(None) if views is None else slice(0, views)
    return ViewCache(cache.boundary[v, positions] if cache.boundary is not None else None, cache.pooled[v, positions])


def crossfit(model: nn.Module, top: nn.Module | None, cfg: TrainConfig, pool: ViewCache, y_pool: np.ndarray,
             n_train: int, make_loss, ctx: PhaseContext, *, refit: bool = True,
             known: OutOfFold | None = None) -> OutOfFold:
    """Fit every fold from the same starting weights, choose out of fold, then refit on the whole pool; the model is
    left as the refit made it. `make_loss(labels)`: the loss for a fold's training labels. `refit=False` (a search
    trial) stops after the choices and puts the starting weights back; `known`: the folds' outcome with these
    settings, already fitted (by the search's trial), so only the refit runs."""
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    oof = known if known is not None else _choose(model, top, cfg, pool, y_pool, n_train, make_loss, ctx, initial)
    if not refit:
        model.load_state_dict(initial)
        return oof
    ctx.notes.append(f"refit on train + val ({len(y_pool)} images) with {oof.head_epochs} head epochs and "
                     f"{oof.finetune_epochs} phase-2 epochs, chosen on {oof.summary['held_out']}; validation numbers "
                     f"are out-of-fold")
    model.load_state_dict(initial)
    refit_cfg = override(cfg, head_epochs=oof.head_epochs, finetune_epochs=oof.finetune_epochs)
    fit_phases(model, top if oof.finetune_epochs else None, refit_cfg, pool, y_pool, None, y_pool[:0],
               make_loss(y_pool), ctx)
    return oof


def _choose(model: nn.Module, top: nn.Module | None, cfg: TrainConfig, pool: ViewCache, y_pool: np.ndarray,
            n_train: int, make_loss, ctx: PhaseContext, initial: dict) -> OutOfFold:
    """Every fold's fit, and what they choose together."""
    folds = fold_positions(y_pool, n_train, cfg.folds, cfg.seed)
    results = [_fold(model, top, cfg, pool, y_pool, held, make_loss, ctx, initial, k)
               for k, held in enumerate(folds, 1)]
    positions = np.concatenate(folds)
    labels = y_pool[positions]
    alone = np.concatenate([r["alone"] for r in results])
    tuned = np.concatenate([r["tuned"] for r in results]) if all(len(r["tuned"]) for r in results) else None
    alone_score = _score(alone, labels)
    tuned_score = _score(tuned, labels) if tuned is not None else None
    phase2 = tuned_score is not None and tuned_score.better_than(alone_score)
    head_epochs = _median_epoch([r["head_epoch"] for r in results])
    finetune_epochs = _median_epoch([r["finetune_epoch"] for r in results]) if phase2 else 0
    if tuned_score is not None and not phase2:
        ctx.notes.append(f"phase 2 (fine-tuning the top stages) did not beat the head alone out of fold (top-1 "
                         f"{tuned_score.accuracy:.2%} against {alone_score.accuracy:.2%}): the refit trains the head "
                         f"alone")
    held_out = "the val split" if cfg.folds == 1 else f"{cfg.folds} stratified folds over train + val"
    kept = tuned if phase2 else alone
    kept_score = tuned_score if phase2 else alone_score
    summary = {"folds": cfg.folds, "held_out": held_out, "images": int(len(y_pool)), "oof_images": int(len(labels)),
               "oof_top1": kept_score.accuracy, "oof_loss": kept_score.loss,
               "oof_top1_head_alone": alone_score.accuracy,
               "oof_top1_finetuned": tuned_score.accuracy if tuned_score is not None else None,
               "head_epochs": head_epochs, "finetune_epochs": finetune_epochs,
               "per_fold": [{"held_out": int(len(f)), "head_epoch": r["head_epoch"],
                             "finetune_epoch": r["finetune_epoch"]} for f, r in zip(folds, results)]}
    return OutOfFold(positions, kept, labels, head_epochs, finetune_epochs, summary)


def _fold(model: nn.Module, top: nn.Module | None, cfg: TrainConfig, pool: ViewCache, y_pool: np.ndarray,
          held: np.ndarray, make_loss, ctx: PhaseContext, initial: dict, k: int) -> dict:
    """One fold: both phases on the other folds' views, and the held-out logits of the head alone and of phase 2.
    A fold finished before an interruption comes back from the checkpoint."""
    name = f"fold{k}.result"
    if ctx.resume is not None:
        kept = Checkpoint.kept_from(ctx.resume.tensors, name)
        if kept:
            result = _from_tensors(kept)
            if ctx.checkpoint is not None:
                ctx.checkpoint.keep(name, kept)
            return result
    train = np.setdiff1d(np.arange(len(y_pool)), held)
    model.load_state_dict(initial)
    held_cache = rows(pool, held, views=1)
    fitted = fit_phases(model, top, cfg, rows(pool, train), y_pool[train], held_cache, y_pool[held],
                        make_loss(y_pool[train]), ctx, prefix=f"fold{k}.")
    model.eval()
    y_held = y_pool[held]
    tuned = np.zeros((0, 0), dtype=np.float32)
    if fitted.head_alone is not None:
        tuned = evaluate_logits(lambda x: model.forward_head(top(x)), held_cache.boundary[0], y_held, ctx.device)[1]
        model.load_state_dict(fitted.head_alone)
    alone = evaluate_logits(model.get_classifier(), held_cache.pooled[0], y_held, ctx.device)[1]
    result = {"head_epoch": fitted.head_epoch, "finetune_epoch": fitted.finetune_epoch, "alone": alone, "tuned": tuned}
    if ctx.checkpoint is not None:
        ctx.checkpoint.keep(name, _to_tensors(result))
    return result


def _to_tensors(result: dict) -> dict[str, torch.Tensor]:
    return {"epochs": torch.tensor([result["head_epoch"], result["finetune_epoch"]]),
            "alone": torch.from_numpy(np.ascontiguousarray(result["alone"])),
            "tuned": torch.from_numpy(np.ascontiguousarray(result["tuned"]))}


def _from_tensors(tensors: dict[str, torch.Tensor]) -> dict:
    head_epoch, finetune_epoch = (int(x) for x in tensors["epochs"])
    return {"head_epoch": head_epoch, "finetune_epoch": finetune_epoch, "alone": tensors["alone"].numpy(),
            "tuned": tensors["tuned"].numpy()}


def _score(logits: np.ndarray, labels: np.ndarray) -> Score:
    return evaluate_logits(lambda x: x, logits, labels, torch.device("cpu"))[0]


def _median_epoch(epochs: list[int]) -> int:
    """The folds' best epochs, as one count for the refit (the upper median: the refit has more images a step)."""
    return int(sorted(epochs)[len(epochs) // 2]) if epochs else 0
