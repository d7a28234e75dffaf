"""The task of a run: one label an image, or a set of labels (a sigmoid each); and what a multi-label run stores in
model.json beside its weights (the task, and a threshold per label chosen on held-out predictions)."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from visiontune.config import TrainConfig
from visiontune.data.index import Dataset
from visiontune.data.multilabel import merge_copies
from visiontune.errors import ConfigError
from visiontune.training.thresholds import choose_thresholds, sigmoid


def choose_task(dataset: Dataset, report, cfg: TrainConfig, notes: list[str], quiet: bool):
    """(dataset, usable files) for the run's task. Class folders trained as multilabel have their copies (the same
    bytes under several class folders) folded into one image carrying each of those labels."""
    usable = report.usable
    if cfg.task == "multiclass" and dataset.targets is not None:
        raise ConfigError(f"{dataset.source}: holds label sets (a `labels` column); train it with --task multilabel "
                          f"(or auto), or give one label an image in a `label` column")
    if cfg.task == "auto" and dataset.targets is None or cfg.task == "multiclass":
        return dataset, usable
    if dataset.targets is None:
        targets, usable, folded = merge_copies(dataset.labels, len(dataset.classes), report.exact_duplicates, usable)
        dataset = dataclasses.replace(dataset, targets=targets)
        line = (f"task: multilabel (--task multilabel): {folded} copies under other class folders folded into "
                f"label sets")
    else:
        line = f"task: multilabel (detected: {dataset.source.name} gives label sets)"
    if cfg.full_finetune or cfg.distill.teacher or cfg.balance == "sampler":
        raise ConfigError("multilabel trains with the cached recipe, without a teacher or --balance sampler "
                          "(--balance weights weighs each label's positives)")
    notes.append(line)
    if not quiet:
        print(line, file=sys.stderr)
    return dataset, usable


def multilabel_entry(dataset: Dataset, cfg: TrainConfig, summary: dict, notes: list[str]) -> dict:
    """model.json's task and thresholds: chosen on the out-of-fold predictions of a refit run, else on val."""
    held = summary.get("out_of_fold") or summary.get("held_out")
    source = "out-of-fold" if "out_of_fold" in summary else "val"
    if held is None:
        notes.append("no held-out images: every label's threshold is 0.5")
        thresholds, source = {name: 0.5 for name in dataset.classes}, "default"
    else:
        logits, targets = held
        thresholds = choose_thresholds(sigmoid(logits), np.asarray(targets), list(dataset.classes),
                                       cfg.threshold_min_positives, notes)
    return {"task": "multilabel", "multilabel": {"thresholds": thresholds, "chosen_on": source}}
