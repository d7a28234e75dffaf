"""`evaluate` for a multi-label run: every image's probabilities against its label set, at the thresholds model.json
stores; writes metrics.json's "evaluation", classification_report.csv (one row a label), predictions.csv,
plots/ (training curves, precision-recall curves) and report.html. Calibration and the unknown score are the
single-label page's and are not fitted here."""

from __future__ import annotations

import csv
import html
import io
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from visiontune.config import EvalConfig
from visiontune.data.index import load_dataset
from visiontune.evaluation import plots
from visiontune.evaluation.intervals import span
from visiontune.evaluation.multilabel import multilabel_metrics, pr_curves
from visiontune.evaluation.report import _img, _num, _pct, render_page
from visiontune.evaluation.scoring import run_split, score, select
from visiontune.files import atomic_write_text
from visiontune.inference.classifier import Classifier
from visiontune.models.bundle import read_meta
from visiontune.models.run_dir import RunDir
from visiontune.training.budget import whole_time


def evaluate_multilabel(run_dir: Path, *, data=None, root=None, split: str, out: Path | None, allow_subset: bool,
                        cfg: EvalConfig, quiet: bool, command_started: float | None, result_type):
    run = RunDir(run_dir)
    meta = read_meta(run_dir)
    own = data is None
    classifier = Classifier.load(run_dir, backend=cfg.backend)
    if own:
        dataset = run_split(run_dir)
        selection = select(dataset, split, meta.labels, allow_subset=True, multilabel=True)
        out_dir = Path(out) if out else run_dir
    else:
        dataset = load_dataset(data, root=root)
        selection = select(dataset, split, meta.labels, allow_subset=allow_subset, require_split=False,
                           multilabel=True)
        name = Path(str(data)).stem if Path(str(data)).suffix else Path(str(data)).name
        out_dir = Path(out) if out else run.evaluation(f"{name}-{split}")
    scored = score(classifier, selection, cfg, quiet, tta=cfg.tta)
    probs = classifier.to_probabilities(scored.logits).astype(np.float64)
    metrics = multilabel_metrics(scored.labels, probs, classifier.thresholds, meta.labels,
                                 most_missed=cfg.most_confused)
    metrics.update({"split": split, "data": selection.source, "backend": classifier.backend, "tta": cfg.tta,
                    "thresholds_chosen_on": (meta.extra.get("multilabel") or {}).get("chosen_on"),
                    "skipped": [{"path": p, "reason": r} for p, r in scored.skipped],
                    "notes": [f"{f.path}: {f.reason}" for f in dataset.findings if f.level != "info"]
                             + selection.notes})
    if own and split in ("train", "val") and run.out_of_fold.is_file():
        metrics["notes"].append(f"the model was refit on train + val, so these {split} images were trained on")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = RunDir(out_dir)
    atomic_write_text(target.class_report, label_report_csv(metrics))
    atomic_write_text(target.predictions, predictions_csv(scored.paths, scored.labels, probs, classifier.thresholds,
                                                          meta.labels))
    drawn = {"training_curves": plots.training_curves(run.read_history(), target.plots / "training_curves.png"),
             "pr_curves": pr_plot(pr_curves(scored.labels, probs, meta.labels), metrics,
                                  target.plots / "pr_curves.png")}
    train_metrics = run.read_metrics()
    if own and command_started is not None and "train_seconds" in train_metrics:
        seconds = time.perf_counter() - command_started
        train_metrics = whole_time(train_metrics, seconds, seconds - train_metrics["train_seconds"])
    target.write_metrics({**train_metrics, "evaluation": metrics} if own
                         else {"model": str(run_dir), "evaluation": metrics})
    subtitle = (f"multi-label · {len(meta.labels)} labels · scored on the {split} split · {classifier.backend} "
                f"backend")
    notes = train_metrics.get("notes", []) + metrics["notes"]
    atomic_write_text(target.report, report_html(f"{run_dir.resolve().name}: {meta.backbone}", subtitle, metrics,
                                                 {k: v for k, v in drawn.items() if v}, notes,
                                                 run.read_config_text()))
    return result_type(out_dir, metrics, target.report)


def label_report_csv(m: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "threshold", "ap", "precision", "recall", "f1", "support", "predicted"])
    fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
    for r in m["per_label"]:
        writer.writerow([r["label"], fmt(r["threshold"]), fmt(r["ap"]), fmt(r["precision"]), fmt(r["recall"]),
                         fmt(r["f1"]), r["support"], r["predicted"]])
    for key in ("mAP", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss"):
        writer.writerow([key, "", "", "", "", fmt(m[key]), m["images"], ""])
    return buffer.getvalue()


def predictions_csv(paths: list[str], targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray,
                    labels: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "true", "predicted", *[f"p_{name}" for name in labels]])
    for path, y, p in zip(paths, targets, probs):
        true = "|".join(labels[c] for c in np.flatnonzero(y)) or "none"
        predicted = "|".join(labels[c] for c in np.flatnonzero(p >= thresholds)) or "none"
        writer.writerow([path, true, predicted, *[f"{v:.6f}" for v in p]])
    return buffer.getvalue()


def pr_plot(curves: dict, m: dict, path: Path) -> Path | None:
    if not curves:
        return None
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.subplots()
    ap = {r["label"]: r["ap"] for r in m["per_label"]}
    for name, (recall, precision) in curves.items():
        ax.step(recall, precision, where="post", lw=1.2, label=f"{name} (AP {ap[name]:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"precision-recall per label: mAP {m['mAP']:.3f}")
    if len(curves) <= 15:
        ax.legend(fontsize=7, loc="lower left")
    return plots._save(fig, path)


def report_html(title: str, subtitle: str, m: dict, drawn: dict, notes: list[str], config_text: str) -> str:
    ci = m["intervals"]

    def card(key: str, name: str) -> str:
        value = _pct(m[key]) + (f"<br><small>95 %: {span(ci[key])}</small>" if key in ci else "")
        return f'<div class="card"><div class="v">{value}</div><div class="k">{html.escape(name)}</div></div>'

    cards = "".join(card(k, n) for k, n in (("mAP", "mAP"), ("micro_f1", "micro F1"), ("macro_f1", "macro F1"),
                                           ("subset_accuracy", "subset accuracy"), ("hamming_loss", "Hamming loss")))
    cards += f'<div class="card"><div class="v">{m["images"]}</div><div class="k">{m["split"]} images</div></div>'
    head = "".join(f"<th class='n'>{t}</th>" for t in ("threshold", "AP", "precision", "recall", "F1", "support",
                                                       "predicted", "missed"))
    rows = "".join(
        f"<tr><td>{html.escape(r['label'])}</td><td class='n'>{r['threshold']:.3f}</td>"
        + "".join(f"<td class='n' data-v='{'' if r[k] is None else r[k]}'>{_num(r[k])}</td>"
                  for k in ("ap", "precision", "recall", "f1"))
        + f"<td class='n'>{r['support']}</td><td class='n'>{r['predicted']}</td><td class='n'>{r['missed']}</td></tr>"
        for r in m["per_label"])
    missed = "".join(f"<tr><td>{html.escape(r['label'])}</td><td class='n'>{r['missed']}</td>"
                     f"<td class='n'>{r['support']}</td></tr>" for r in m["most_missed"]) or \
        "<tr><td colspan='3'>no label was missed</td></tr>"
    sections = [
        ("summary", "Summary", f'<div class="cards">{cards}</div><p class="muted">Each label is predicted when its '
                               f'probability reaches its threshold (chosen on {m.get("thresholds_chosen_on")} '
                               f'predictions for the best F1); {m["images_with_no_label_predicted"]} image(s) got '
                               f'no label ("none").</p>'),
        ("labels", "Per-label metrics", f"<table class='sortable'><thead><tr><th>label</th>{head}</tr></thead>"
                                        f"<tbody>{rows}</tbody></table>"),
        ("missed", "Most-missed labels", "<table><thead><tr><th>label</th><th class='n'>missed</th>"
                                         f"<th class='n'>images with it</th></tr></thead><tbody>{missed}</tbody></table>"),
    ]
    if "pr_curves" in drawn:
        sections.append(("pr", "Precision-recall curves", _img(drawn["pr_curves"], "precision-recall curves")))
    if "training_curves" in drawn:
        sections.append(("training", "Training", _img(drawn["training_curves"], "training curves")))
    if notes:
        sections.append(("notes", "Notes", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"))
    if config_text:
        sections.append(("config", "Settings", f"<pre>{html.escape(config_text)}</pre>"))
    return render_page(title, subtitle, sections)
