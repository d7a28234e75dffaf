"""`evaluate`: score a run on its test split (or other data) and write what people read.

Writes into the run (or, for other data, into RUN/evaluations/<data>-<split>/): metrics.json's
"evaluation" key, classification_report.csv, predictions.csv, plots/*.png, report.html and MODEL_CARD.md.
With calibration on, a temperature fitted on validation and the "uncertain" threshold go into model.json,
where every later consumer (predict, export, serve) picks them up; so does the unknown score (`open_set.py`).
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visiontune.config import EvalConfig, TrainConfig
from visiontune.data.index import load_dataset
from visiontune.data.loader import load_for_model
from visiontune.errors import ConfigError, DatasetError, ImageDecodeError
from visiontune.evaluation import open_set, plots
from visiontune.evaluation.embedding import embedding_map, map_summary
from visiontune.evaluation.features import RunNetwork
from visiontune.evaluation.metrics import choose_uncertainty_threshold, compute_metrics, fit_temperature, reliability, roc_curves
from visiontune.evaluation.model_card import model_card
from visiontune.evaluation.multilabel_eval import evaluate_multilabel
from visiontune.evaluation.report import ReportData, build_html, thumbnail_jpeg
from visiontune.evaluation.scoring import Scored, run_split, score, select
from visiontune.files import atomic_write_text
from visiontune.inference.classifier import Classifier, softmax
from visiontune.models.bundle import read_meta, update_meta
from visiontune.models.run_dir import RunDir
from visiontune.training.budget import whole_time


@dataclass
class Evaluation:
    out_dir: Path
    metrics: dict  # the "evaluation" entry of metrics.json
    report: Path


def evaluate_run(run_dir: Path, *, data: str | Path | None = None, root: str | Path | None = None,
                 split: str | None = None, out: Path | None = None, allow_subset: bool = False,
                 config: EvalConfig | None = None, quiet: bool = True,
                 command_started: float | None = None) -> Evaluation:
    """`command_started`: when the `train` this evaluation ends began (time.perf_counter()): the run's metrics,
    report and model card then state the whole command's time, evaluation included."""
    cfg = config or EvalConfig()
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    split = split or cfg.split
    meta = read_meta(run_dir)
    if meta.task == "multilabel":
        return evaluate_multilabel(run_dir, data=data, root=root, split=split, out=out, allow_subset=allow_subset,
                                   cfg=cfg, quiet=quiet, command_started=command_started, result_type=Evaluation)
    own = data is None
    fit_open_set = own and cfg.open_set and not run.is_ensemble  # one network's features; an ensemble has several
    if cfg.negatives and not fit_open_set:
        raise ConfigError(f"--negatives {cfg.negatives}: the unknown threshold is chosen when a run (not an ensemble) "
                          f"is scored on its own split, with --open-set; drop --data or --negatives")
    negatives = open_set.negative_files(cfg.negatives)  # a bad folder is refused before anything is written
    run_data = run_split(run_dir) if own or cfg.calibrate else None
    network = RunNetwork(run_dir)  # loaded when a feature pass first needs it, then shared by the fit and the map
    unknown_fit = (open_set.fit_for_run(run_dir, run_data, meta, cfg, negatives, quiet, network) if fit_open_set
                   else None)
    if own and not cfg.open_set and not run.is_ensemble:
        unknown_fit = open_set.Fitted({}, open_set.forget(run_dir))
    classifier = Classifier.load(run_dir, backend=cfg.backend)
    if own:
        dataset = run_data
        selection = select(dataset, split, meta.labels, allow_subset=True)
        out_dir = Path(out) if out else run_dir
    else:
        dataset = load_dataset(data, root=root)
        selection = select(dataset, split, meta.labels, allow_subset=allow_subset, require_split=False)
        name = Path(str(data)).stem if Path(str(data)).suffix else Path(str(data)).name
        out_dir = Path(out) if out else run.evaluation(f"{name}-{split}")
    scored = score(classifier, selection, cfg, quiet, tta=cfg.tta)

    temperature, threshold = classifier.temperature, classifier.threshold
    calibration_note = None
    if own and cfg.calibrate:
        fitted = _calibrate(classifier, run, run_data, meta.labels, cfg, quiet, selection.notes)
        if fitted:
            temperature, threshold, source = fitted
            update_meta(run_dir, calibration={"temperature": temperature, "fitted_on": source},
                        uncertainty={"threshold": threshold, "chosen_on": source})
            if split == "val" and source == "val":
                calibration_note = "the temperature was fitted on this same validation split, so its ECE is optimistic"
    if own and split in ("train", "val") and run.out_of_fold.is_file():
        calibration_note = (f"the model was refit on train + val, so these {split} images were trained on: its "
                            f"numbers here are not held-out (metrics.json's refit has the out-of-fold ones)")
    probs = softmax(scored.logits, temperature).astype(np.float64)
    metrics = compute_metrics(scored.labels, probs, meta.labels, ece_bins=cfg.ece_bins, most_confused=cfg.most_confused)
    raw = reliability(scored.labels, softmax(scored.logits).astype(np.float64), cfg.ece_bins)
    confident = probs.max(axis=1) >= threshold
    metrics.update({
        "split": split, "data": selection.source, "backend": classifier.backend, "tta": cfg.tta,
        "temperature": temperature, "ece_uncalibrated": raw["ece"], "uncertainty_threshold": threshold,
        "uncertain_share": float(np.mean(~confident)),
        "top1_when_confident": (float(np.mean(probs[confident].argmax(1) == scored.labels[confident]))
                                if confident.any() else None),
        "skipped": [{"path": p, "reason": r} for p, r in scored.skipped],
        "notes": [f"{f.path}: {f.reason}" for f in dataset.findings if f.level != "info"] + selection.notes
                 + ([calibration_note] if calibration_note else []),
    })
    section, open_set_notes = open_set.report(unknown_fit, classifier, scored.unknown_scores)
    metrics["notes"] += open_set_notes
    if section:
        metrics["open_set"] = section
    embedding = None
    if cfg.map_points:
        embedding = embedding_map(run_dir, scored.paths, scored.labels, probs, meta.labels, cfg.map_points,
                                  chunk_images=cfg.batch_images, workers=cfg.workers, quiet=quiet, network=network)
        metrics["embedding_map"] = map_summary(embedding)

    out_dir.mkdir(parents=True, exist_ok=True)
    target = RunDir(out_dir)
    train_metrics = run.read_metrics()
    atomic_write_text(target.class_report, classification_report_csv(metrics))
    atomic_write_text(target.predictions, predictions_csv(scored, probs, meta.labels))
    drawn = _draw(target.plots, run, metrics, scored, probs, raw, meta.labels, dataset if own else None,
                  selection, cfg, classifier, quiet)
    if own and command_started is not None and "train_seconds" in train_metrics:
        # Taken as late as it can be: only writing this file, the report and the card are left (well under a second).
        seconds = time.perf_counter() - command_started
        train_metrics = whole_time(train_metrics, seconds, seconds - train_metrics["train_seconds"])
    if own:
        target.write_metrics({**train_metrics, "evaluation": metrics})
    else:
        target.write_metrics({"model": str(run_dir), "evaluation": metrics})
    notes = [n for n in train_metrics.get("notes", [])] + [f"{f.path}: {f.reason}" for f in dataset.findings
                                                            if f.level == "info"]
    notes += metrics["notes"] + [f"not scored: {s['path']}: {s['reason']}" for s in metrics["skipped"]]
    if own and not run.is_ensemble:  # an ensemble's config.yaml is its own, and it has no history
        gap = loss_gap_note(run.read_history(), run.read_config()[2] if run.config.is_file() else None)
        notes += [gap] if gap else []
    report = ReportData(
        title=f"{run_dir.resolve().name}: {meta.backbone}",
        subtitle=f"{len(meta.labels)} classes · scored on the {split} split of "
                 f"{_config_data(run_dir) if own else selection.source} · {classifier.backend} backend"
                 f"{' · test-time augmentation (6 views an image)' if cfg.tta else ''}",
        metrics=metrics, train=train_metrics, plots=drawn["plots"], mistakes=drawn["mistakes"], notes=notes,
        config_text=run.read_config_text(), versions=meta.versions, embedding=embedding)
    atomic_write_text(target.report, build_html(report))
    if own:
        card = model_card(run_dir.resolve().name, read_meta(run_dir).to_dict(), train_metrics, metrics,
                          _config_data(run_dir))
        atomic_write_text(target.card, card)
    return Evaluation(out_dir, metrics, target.report)


def loss_gap_note(history: list[dict], cfg: TrainConfig | None) -> str | None:
    """Why validation loss sits below training loss, when it does in most epochs: a newcomer reads it as a bug.
    Training loss is measured on augmented views with smoothed labels and dropout, validation loss on clean centre
    crops with hard labels and no dropout, so the training one is the harder number."""
    pairs = [(r["train_loss"], r["val_loss"]) for r in history
             if isinstance(r.get("train_loss"), (int, float)) and isinstance(r.get("val_loss"), (int, float))]
    below = sum(val < train for train, val in pairs)
    if not pairs or below * 2 < len(pairs) or cfg is None:
        return None
    harder = ["augmented images (random crops, flips, rotation, colour changes"
              + ("" if cfg.full_finetune else f"; {cfg.views} cached view(s) an image") + ")"]
    if cfg.label_smoothing:
        harder.append(f"label smoothing {cfg.label_smoothing:g} (its loss cannot reach 0)")
    mixes = [f"{name} {value:g}" for name, value in (("mixup", cfg.augment.mixup), ("cutmix", cfg.augment.cutmix),
                                                     ("feature mixup", cfg.feature_mixup)) if value]
    if mixes:
        harder.append(", ".join(mixes))
    if cfg.dropout:
        harder.append(f"dropout {cfg.dropout:g}")
    return (f"validation loss is below training loss in {below} of {len(pairs)} epochs: expected here, not a bug. "
            f"The training loss is measured on {'; '.join(harder)}; the validation loss on clean centre crops with "
            f"plain labels and no dropout. Overfitting shows the other way: validation loss rising above training "
            f"loss.")


def _calibrate(classifier: Classifier, run: RunDir, run_data, labels: list[str], cfg: EvalConfig, quiet: bool,
               notes: list[str]):
    """(temperature, threshold, what they were fitted on): on the held-out logits of a refit run (its kept model has
    trained on val), else on the run's validation split; None when there are too few images."""
    held_out = run.read_out_of_fold()
    if held_out is not None and len(held_out[1]) >= cfg.calibrate_min_images and held_out[0].shape[1] == len(labels):
        logits, y = held_out
        temperature = fit_temperature(logits, y)
        threshold = choose_uncertainty_threshold(softmax(logits, temperature), y)
        return round(temperature, 4), round(threshold, 4), "out-of-fold"
    try:
        val = select(run_data, "val", labels, allow_subset=True)
    except DatasetError:
        notes.append("no validation split: probabilities are not calibrated")
        return None
    if len(val.paths) < cfg.calibrate_min_images:
        notes.append(f"only {len(val.paths)} validation images (fewer than {cfg.calibrate_min_images}): "
                     f"probabilities are not calibrated and the uncertainty threshold stays as it was")
        return None
    scored = score(classifier, val, cfg, quiet)
    temperature = fit_temperature(scored.logits, scored.labels)
    threshold = choose_uncertainty_threshold(softmax(scored.logits, temperature), scored.labels)
    return round(temperature, 4), round(threshold, 4), "val"


def _config_data(run_dir: Path) -> str:
    try:
        data, _, _ = RunDir(run_dir).read_config()
        return str(data)
    except Exception:  # an older or hand-made run without a readable config: the card says "unknown"
        return "unknown"


def classification_report_csv(m: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", "precision", "recall", "f1", "support", "predicted"])
    fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
    for r in m["per_class"]:
        writer.writerow([r["label"], fmt(r["precision"]), fmt(r["recall"]), fmt(r["f1"]), r["support"], r["predicted"]])
    total = sum(r["support"] for r in m["per_class"])
    for name in ("macro", "weighted"):
        writer.writerow([f"{name} avg", fmt(m[name]["precision"]), fmt(m[name]["recall"]), fmt(m[name]["f1"]), total, ""])
    writer.writerow(["accuracy", "", "", fmt(m["top1"]), total, ""])
    return buffer.getvalue()


def predictions_csv(scored: Scored, probs: np.ndarray, labels: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "true", "predicted", "probability", "true_probability", "loss"])
    predicted = probs.argmax(axis=1)
    for i, path in enumerate(scored.paths):
        p_true = float(probs[i, scored.labels[i]])
        writer.writerow([path, labels[scored.labels[i]], labels[predicted[i]], f"{probs[i, predicted[i]]:.6f}",
                         f"{p_true:.6f}", f"{-math.log(max(p_true, 1e-15)):.6f}"])
    return buffer.getvalue()


def worst_mistakes(scored: Scored, probs: np.ndarray, limit: int) -> list[int]:
    """Indices of wrong predictions, highest loss (lowest probability on the true class) first."""
    wrong = np.flatnonzero(probs.argmax(axis=1) != scored.labels)
    loss = -np.log(np.clip(probs[wrong, scored.labels[wrong]], 1e-15, 1.0))
    return [int(i) for i in wrong[np.argsort(-loss, kind="stable")][:limit]]


def _draw(folder: Path, run: RunDir, m: dict, scored: Scored, probs: np.ndarray, raw: dict, labels: list[str],
          run_dataset, selection, cfg: EvalConfig, classifier: Classifier, quiet: bool = True) -> dict:
    drawn = {
        "training_curves": plots.training_curves(run.read_history(), folder / "training_curves.png"),
        "confusion_matrix": plots.confusion_matrix(np.array(m["confusion_matrix"]), labels, folder / "confusion_matrix.png"),
        "confused_block": plots.confused_block(np.array(m["confusion_matrix"]), labels, folder / "confused_classes.png"),
        "f1_bars": plots.f1_bars(m["per_class"], folder / "per_class_f1.png"),
        "reliability": plots.reliability_diagram(m["reliability"], m["ece"], folder / "reliability.png",
                                                 "calibrated" if m["temperature"] != 1.0 else "reliability"),
        "roc": plots.roc(roc_curves(scored.labels, probs, labels), m["roc_auc"], folder / "roc.png"),
    }
    if m["temperature"] != 1.0:
        drawn["reliability_uncalibrated"] = plots.reliability_diagram(
            raw["bins"], raw["ece"], folder / "reliability_uncalibrated.png", "before calibration")
    if run_dataset is not None:
        table = {name: {"train": 0, "val": 0, "test": 0} for name in labels}
        for label, split in zip(run_dataset.labels, run_dataset.splits):
            name = run_dataset.classes[label]
            if name in table and split >= 0:
                table[name][("train", "val", "test")[split]] += 1
    else:
        table = {name: {selection.split: int((selection.labels == i).sum())} for i, name in enumerate(labels)}
    drawn["class_distribution"] = plots.class_distribution(table, folder / "class_distribution.png")
    mistakes = []
    for i in worst_mistakes(scored, probs, cfg.top_losses):
        try:
            crop = load_for_model(scored.paths[i], classifier.preprocess)
        except ImageDecodeError:  # changed since it was scored: leave it out of the gallery
            continue
        predicted = int(probs[i].argmax())
        mistakes.append({"image": crop, "path": scored.paths[i], "true": labels[scored.labels[i]],
                         "predicted": labels[predicted], "probability": float(probs[i, predicted]),
                         "jpeg": thumbnail_jpeg(crop)})
    drawn["top_losses"] = plots.gallery(mistakes, folder / "top_losses.png")
    for item in mistakes:
        del item["image"]
    if cfg.gradcam_images > 0:
        if not quiet:  # a few backward passes an image, unbarred: say what the wait is
            print(f"evaluate: Grad-CAM of up to {cfg.gradcam_images} right and {cfg.gradcam_images} wrong predictions",
                  file=sys.stderr, flush=True)
        drawn.update(_gradcam(folder, run.path, scored, probs, labels, cfg.gradcam_images))
    return {"plots": {k: v for k, v in drawn.items() if v is not None}, "mistakes": mistakes}


def _gradcam(folder: Path, run_dir: Path, scored: Scored, probs: np.ndarray, labels: list[str], n: int) -> dict:
    """Grad-CAM grids of right predictions (one per class, round robin) and of the worst mistakes."""
    from visiontune.explain.render import grid_png
    from visiontune.explain.runner import explain_sources, load_explainer

    predicted = probs.argmax(axis=1)
    right = [int(i) for i in np.flatnonzero(predicted == scored.labels)]
    by_class: dict[int, list[int]] = {}
    for i in right:
        by_class.setdefault(int(scored.labels[i]), []).append(i)
    picked: list[int] = []
    while len(picked) < min(n, len(right)):
        for members in by_class.values():
            if members and len(picked) < n:
                picked.append(members.pop(0))
    explainer = load_explainer(run_dir)
    drawn = {}
    for name, indices in (("gradcam_right", picked), ("gradcam_wrong", worst_mistakes(scored, probs, n))):
        if not indices:
            continue
        result = explain_sources(explainer, [scored.paths[i] for i in indices])
        captions = [f"true: {labels[scored.labels[i]]}" for i in indices]
        drawn[name] = grid_png(result.explanations, folder / f"{name}.png", columns=min(len(indices), 6),
                               captions=captions[:len(result.explanations)])
    return drawn
