"""One trial of `--budget`'s search: its settings drawn from Optuna, its pruning rule, and the phase context that
reports each held-out score to the study (here, or on a Ray worker through the study's storage proxy)."""

from __future__ import annotations

from visiontune.training.phases import PhaseContext


class TrialContext(PhaseContext):
    """A trial's phases: quiet, no checkpoint, and each held-out score reported to Optuna, which may prune."""

    def __init__(self, base: PhaseContext, trial):
        super().__init__(base.cfg, base.device, base.history, True, [], None, None, base.dist)
        self.trial, self.step = trial, 0

    def evaluate(self, forward, inputs, labels, batch_size: int = 256):
        score = super().evaluate(forward, inputs, labels, batch_size)
        if score is not None and self.trial is not None:
            import optuna

            self.trial.report(score.accuracy, self.step)
            self.step += 1
            if self.trial.should_prune():
                raise optuna.TrialPruned()
        return score


def pruner():
    """The median rule on a trial's per-epoch held-out scores, after two finished trials and the first epoch."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)


def suggest(trial, phase2_epochs: int) -> dict:
    """One trial's settings; a backbone without a stage split (several branches) trains its head only."""
    params = {"head_lr": trial.suggest_float("head_lr", 2e-4, 1e-2, log=True),
              "dropout": trial.suggest_float("dropout", 0.0, 0.5),
              "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.3)}
    if phase2_epochs:
        params["finetune_epochs"] = trial.suggest_int("finetune_epochs", 1, phase2_epochs)
        params["finetune_lr"] = trial.suggest_float("finetune_lr", 3e-5, 5e-4, log=True)
        params["ema"] = trial.suggest_categorical("ema", [0.0, 0.999])
    return params
