"""`visiontune ensemble RUN… --out ENS`: check the members, choose the weights, write the directory.

Checks: every member knows the same labels (order may differ; a different set is an error naming the
difference), and all were trained on the same split (the same files, labels and train/val/test roles in
their split.csv): otherwise an image one member held out for testing may be one another member trained on,
and the ensemble's test score would leak. Weights are equal, given, or fitted on the validation split
(minimum log loss of the soft vote); the test split is never looked at here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from visiontune.config import SPLITS, EnsembleConfig, InferenceConfig
from visiontune.data.index import Dataset, load_dataset
from visiontune.data.loader import load_all
from visiontune.data.parallel import progress
from visiontune.data.split import Split
from visiontune.data.transforms import center_crop
from visiontune.errors import ConfigError, DatasetError, ModelError
from visiontune.files import atomic_write_text, write_json
from visiontune.inference.ensemble import EnsembleVote, describe_label_difference
from visiontune.inference.resolve import open_model
from visiontune.inference.voting import accuracy, fit_weights, log_loss, normalise, parse_weights, soft_vote
from visiontune.models.bundle import ModelMeta, current_versions, read_meta, write_meta
from visiontune.models.manifest import FORMAT, FORMAT_VERSION, stored_path
from visiontune.models.run_dir import RunDir


@dataclass
class EnsembleResult:
    out_dir: Path
    weights: list[float]
    weights_from: str
    metrics: dict  # metrics.json (with "evaluation" once evaluated)
    notes: list[str] = field(default_factory=list)
    evaluation: object = None  # filled in by the API when the ensemble is evaluated at the end


def build_ensemble(runs: list[Path], out: Path, *, config: EnsembleConfig | None = None, overwrite: bool = False,
                   quiet: bool = True) -> EnsembleResult:
    cfg = config or EnsembleConfig()
    started = time.perf_counter()
    runs = [Path(r) for r in runs]
    out = Path(out)
    mode = parse_weights(cfg.weights)
    _check_members_and_out(runs, out, overwrite)
    metas = [read_meta(r) for r in runs]
    labels = list(metas[0].labels)
    for run, meta in zip(runs[1:], metas[1:]):
        if set(meta.labels) != set(labels):
            raise ModelError(f"{run}: trained on other labels than {runs[0]} "
                             f"({describe_label_difference(labels, meta.labels, str(runs[0]), str(run))}); "
                             f"an ensemble's members must know the same classes")
    if isinstance(mode, list):
        normalise(mode, len(runs))  # a wrong count or a negative weight fails before anything is scored
    notes: list[str] = []
    dataset = _common_split(runs, notes)
    largest = max(range(len(runs)), key=lambda k: metas[k].preprocess.input_size)  # first of the largest
    spec = metas[largest].preprocess

    val_labels, member_probs = None, None
    if dataset is not None and (dataset.splits == SPLITS.index("val")).any():
        members = [open_model(r, cfg.backend, batch_size=InferenceConfig.batch_size) for r in runs]
        vote = EnsembleVote(members, [1.0] * len(runs), labels, spec, str(out), InferenceConfig.batch_size)
        val_labels, member_probs = _score_val(vote, dataset, labels, cfg, quiet, notes)
    elif mode == "fit":
        raise ConfigError(f"--weights fit needs validation images, and the members' split has none"
                          f"{'' if dataset is not None else ' (they have no split.csv)'}; give --weights w1,w2,… or equal")

    if mode == "fit":
        w = fit_weights(member_probs, val_labels, cfg.fit_iterations, cfg.fit_tolerance)
        weights_from = "fitted on validation (minimum log loss of the soft vote)"
    elif mode == "equal":
        w = np.full(len(runs), 1.0 / len(runs))
        weights_from = "equal"
    else:
        w = normalise(mode, len(runs))
        weights_from = "given"
    w = [float(round(x, 6)) for x in w]

    members, member_metrics = [], []
    for k, (run, meta) in enumerate(zip(runs, metas)):
        train = RunDir(run).read_metrics()
        entry = {"path": stored_path(run, out), "weight": w[k], "backbone": meta.backbone,
                 "input_size": meta.preprocess.input_size}
        if member_probs is not None:
            entry["val"] = {"top1": accuracy(member_probs[k], val_labels), "loss": log_loss(member_probs[k], val_labels)}
            own = (train.get("val") or {}).get("top1")
            if own is not None:  # a user read 87.39 % here against 87.68 % from the run: say both, and why
                entry["val"]["run_top1"] = own
                if abs(own - entry["val"]["top1"]) > 1e-9:
                    notes.append(f"{entry['path']}: validation top-1 {entry['val']['top1']:.2%} in the ensemble, "
                                 f"{own:.2%} as its run measured it: the ensemble feeds every member the largest "
                                 f"member's centre crop resized to its size, on the {cfg.backend} backend")
        members.append(entry)
        member_metrics.append({**entry, "train_seconds": train.get("train_seconds"),
                               "parameters": train.get("parameters")})
    combined = None
    if member_probs is not None:
        vote = soft_vote(member_probs, w)
        combined = {"top1": accuracy(vote, val_labels), "loss": log_loss(vote, val_labels)}
        best = max(members, key=lambda m: m["val"]["top1"])
        notes.append(f"validation top-1: ensemble {combined['top1']:.2%}, best member {best['val']['top1']:.2%} "
                     f"({best['path']})")

    target = RunDir(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (target.meta, target.ensemble):  # model.json last of all below: the mark of a finished ensemble
        stale.unlink(missing_ok=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "members": members, "weights_from": weights_from,
                "labels": labels, "preprocess_from": members[largest]["path"], "val": combined,
                "backend": cfg.backend, "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_json(target.ensemble, manifest)
    if dataset is not None:
        Split(dataset, dataset.splits.copy()).write_csv(target.split)
    else:
        target.split.unlink(missing_ok=True)
    images = ({name: int((dataset.splits == k).sum()) for k, name in enumerate(SPLITS)} if dataset is not None else {})
    seconds = [m["train_seconds"] for m in member_metrics]
    build_seconds = round(time.perf_counter() - started, 1)
    parameters = [m["parameters"] for m in member_metrics]
    metrics = {
        "model": "ensemble",
        "members": member_metrics,
        "weights_from": weights_from,
        # what it cost to make: every member's training plus this step (None when a member did not record it)
        "train_seconds": round(sum(seconds) + build_seconds, 1) if all(isinstance(s, (int, float)) for s in seconds) else None,
        "build_seconds": build_seconds,
        "parameters": sum(parameters) if all(isinstance(p, int) for p in parameters) else None,
        "images": images,
        **({"val": {"loss": combined["loss"], "top1": combined["top1"]}} if combined else {}),
        "notes": notes,
    }
    target.write_metrics(metrics)
    _write_config(out, runs, members, weights_from)
    backbones = ", ".join(m.backbone for m in metas)
    meta = ModelMeta(f"ensemble of {len(runs)}: {backbones}", "+".join(m.timm_name for m in metas), labels, spec, 0.0,
                     current_versions(), {"ensemble": {"file": RunDir.ENSEMBLE, "members": [m["path"] for m in members],
                                                       "weights": w}})
    write_meta(out, meta)
    return EnsembleResult(out, w, weights_from, metrics, notes)


def _check_members_and_out(runs: list[Path], out: Path, overwrite: bool) -> None:
    if len(runs) < 2:
        raise ConfigError("an ensemble needs two or more runs")
    resolved = [r.resolve() for r in runs]
    for k, run in enumerate(runs):
        if not run.is_dir():
            raise ModelError(f"{run}: no such run directory")
        if resolved[k] in resolved[:k]:
            raise ConfigError(f"{run}: given twice; each member once (use --weights to count one more)")
    target = out.resolve()
    if target in resolved:
        raise ConfigError(f"--out {out}: that is one of the members; write the ensemble somewhere else")
    target = RunDir(out)
    if target.weights.exists():
        raise ConfigError(f"--out {out}: a trained run is there; write the ensemble somewhere else")
    if (target.meta.exists() or target.ensemble.exists()) and not overwrite:
        raise ConfigError(f"{out}: an ensemble is already there; pass --overwrite, or another --out")


def _split_rows(run: Path) -> dict[str, tuple[str, int]] | None:
    """{resolved path: (label, split)} of a member's split.csv; None when it has none."""
    path = RunDir(run).split
    if not path.is_file():
        return None
    dataset = load_dataset(path)
    return {str(dataset.abspath(i).resolve()): (dataset.classes[dataset.labels[i]], int(dataset.splits[i]))
            for i in range(len(dataset))}


def _common_split(runs: list[Path], notes: list[str]) -> Dataset | None:
    """The members' shared split (as a dataset), after checking they all have the same one."""
    rows = [_split_rows(r) for r in runs]
    missing = [str(r) for r, x in zip(runs, rows) if x is None]
    if len(missing) == len(runs):
        notes.append("no member has a split.csv: the ensemble has no test split of its own (evaluate it with --data)")
        return None
    if missing:
        raise ConfigError(f"{', '.join(missing)}: no {RunDir.SPLIT}, so nothing shows it did not train on the other "
                          f"members' test images; an ensemble needs members trained on one split")
    first = rows[0]
    for run, other in zip(runs[1:], rows[1:]):
        if other == first:
            continue
        leaked = _leaks(rows)
        example = f", e.g. {leaked[0]}" if leaked else ""
        why = (f"{len(leaked)} image(s) one of them holds out for testing, another trained or validated on{example}"
               if leaked else "their split.csv files list other images, labels or roles")
        raise ConfigError(f"{runs[0]} and {run} were trained on different splits ({why}), so the ensemble would "
                          f"have no clean test split; train every member on one split file, e.g. "
                          f"`visiontune train {RunDir(runs[0]).split} --model … --seed 1`")
    return load_dataset(RunDir(runs[0]).split)


def _leaks(rows: list[dict]) -> list[str]:
    test, seen = set(), set()
    for r in rows:
        test |= {p for p, (_, s) in r.items() if s == SPLITS.index("test")}
    leaked = set()
    for r in rows:
        seen = {p for p, (_, s) in r.items() if s in (SPLITS.index("train"), SPLITS.index("val"))}
        leaked |= test & seen
    return sorted(leaked)


def _score_val(vote: EnsembleVote, dataset: Dataset, labels: list[str], cfg: EnsembleConfig, quiet: bool,
               notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every member's calibrated probabilities on the validation images: labels (N) and M x N x C."""
    index = {name: i for i, name in enumerate(labels)}
    keep = np.flatnonzero(dataset.splits == SPLITS.index("val"))
    paths = [str(dataset.abspath(i)) for i in keep]
    targets = np.array([index[dataset.classes[dataset.labels[i]]] for i in keep], dtype=np.int64)
    spec, step = vote.preprocess, max(1, cfg.batch_images)
    probs, kept = [], []
    with progress(len(paths), "score members on val", quiet) as bar:
        for start in range(0, len(paths), step):
            decoded = load_all(paths[start:start + step], spec, workers=cfg.workers, quiet=True)
            failed = dict(decoded.failed)
            crops = []
            for k, image in enumerate(decoded.images):
                if k in failed:
                    notes.append(f"not scored: {paths[start + k]}: {failed[k]}")
                    continue
                crops.append(center_crop(image, spec.input_size))
                kept.append(start + k)
            if crops:
                probs.append(vote.member_probabilities(np.stack(crops)))
            bar.update(len(decoded.images))
    if not kept:
        raise DatasetError(f"none of the {len(paths)} validation images could be read")
    return targets[kept], np.concatenate(probs, axis=1)


def _write_config(out: Path, runs: list[Path], members: list[dict], weights_from: str) -> None:
    """config.yaml: the ensemble's own settings, and the training settings every member shares (so
    `compare` lists only what really differs between the ensemble and its members)."""
    configs = []
    for run in runs:
        path = RunDir(run).config
        try:
            configs.append(yaml.safe_load(path.read_text()) or {} if path.is_file() else {})
        except (OSError, yaml.YAMLError):
            configs.append({})
    shared = _common({k: v for k, v in configs[0].items() if k != "model"}, configs[1:])
    payload = {"model": "ensemble",
               "ensemble": {"members": [m["path"] for m in members], "weights": [m["weight"] for m in members],
                            "weights_from": weights_from},
               **shared}
    text = "# an ensemble of runs (see ensemble.json); the training settings below are the ones all members share\n"
    atomic_write_text(RunDir(out).config, text + yaml.safe_dump(payload, sort_keys=False))


def _common(first: dict, others: list[dict]) -> dict:
    """The settings of `first` that every one of `others` has too, with the same value (nested sections key by key)."""
    out = {}
    for key, value in first.items():
        theirs = [o.get(key) if isinstance(o, dict) else None for o in others]
        if isinstance(value, dict):
            inner = _common(value, theirs)
            if inner:
                out[key] = inner
        elif all(isinstance(o, dict) and key in o for o in others) and all(t == value for t in theirs):
            out[key] = value
    return out
