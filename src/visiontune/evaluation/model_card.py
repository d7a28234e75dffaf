"""MODEL_CARD.md: what the model is for, what it was trained and measured on, where it is weak, how to load it."""

from __future__ import annotations

from visiontune.evaluation.intervals import span


def _refit_lines(refit: dict | None) -> list[str]:
    if not refit:
        return []
    return [f"- Refit: the model was trained on train + validation ({refit['images']} images) after its epochs were "
            f"chosen on {refit['held_out']}; the validation top-1 of this run, {_pct(refit['oof_top1'])}, is "
            f"out-of-fold ({refit['oof_images']} held-out images); with 30 or more of them the calibration is fitted "
            f"on those held-out predictions."]


def _search_lines(search: dict | None) -> list[str]:
    if not search:
        return []
    return [f"- Recipe: chosen by `--budget`'s search among {search['trials']} trials "
            f"({', '.join(search['models'])}), scored out of fold: {search['chosen']['trial']} at "
            f"{_pct(search['oof_top1'])} (the plan's recipe: {_pct(search['plan_oof_top1'])}); every trial is in "
            f"`{search['table']}`."]


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def model_card(run_name: str, meta_json: dict, train: dict, evaluation: dict, data: str) -> str:
    labels = [meta_json["id2label"][str(i)] for i in range(len(meta_json["id2label"]))]
    arch = meta_json["architecture"]
    pre = meta_json["preprocess"]
    m = evaluation
    images = train.get("images", {})
    weakest = sorted((r for r in m["per_class"] if r["f1"] is not None), key=lambda r: (r["f1"], r["label"]))[:5]
    lines = [
        f"# Model card: {run_name}",
        "",
        "## Intended use",
        f"Classifies a photo into one of {len(labels)} classes: {', '.join(labels[:20])}"
        f"{', …' if len(labels) > 20 else ''}. It always answers with one of these classes, so an image of "
        "anything else still gets one of them: use the `unknown` flag (features far from every training image, "
        "when the model has the unknown score) and the `uncertain` flag (top probability below the threshold "
        "stored in `model.json`) to route such images to a person. Not for decisions about people.",
        "",
        "## Model",
        f"- Backbone: `{arch['backbone']}` (timm `{arch['timm_name']}`), ImageNet-pretrained, fine-tuned; "
        f"{train.get('parameters', '?'):,} parameters." if isinstance(train.get("parameters"), int) else
        f"- Backbone: `{arch['backbone']}` (timm `{arch['timm_name']}`), ImageNet-pretrained, fine-tuned.",
        f"- Input: RGB, shorter side resized to {int(pre['input_size'] / pre['crop_pct'])} ({pre['interpolation']}, "
        f"preprocessing version {pre.get('version', 1)}), centre crop {pre['input_size']}, mean {pre['mean']}, "
        f"std {pre['std']}.",
        f"- Trained in {train.get('train_seconds', '?')} s on {train.get('device', '?')}"
        + (f"; the whole `train` command, this evaluation included, took {train['command_seconds']} s"
           if train.get("evaluation_seconds") is not None else "")
        + (f" (budget {train['budget']['budget_seconds']:.0f} s: "
           f"{'kept' if train['budget']['within'] else 'over by %.0f s' % train['budget']['over_seconds']})"
           if (train.get("budget") or {}).get("seconds") is not None else "") + ".",
        "",
        "## Data",
        f"- Source: `{data}`.",
        f"- Images: train {images.get('train', '?')}, validation {images.get('val', '?')}, test {images.get('test', '?')} "
        "(the exact files are in `split.csv`).",
        *_refit_lines(train.get("refit")),
        *_search_lines(train.get("search")),
        "",
        f"## Metrics (on the {m['split']} split, {m['images']} images)",
        "| metric | value | 95 % interval |",
        "|---|---|---|",
        f"| top-1 accuracy | {_pct(m['top1'])} | {_ci(m, 'top1')} |",
        *[f"| top-{k} accuracy | {_pct(m[f'top{k}'])} | {_ci(m, f'top{k}')} |" for k in (3, 5) if f"top{k}" in m],
        f"| balanced accuracy | {_pct(m['balanced_accuracy'])} | {_ci(m, 'balanced_accuracy')} |",
        f"| macro F1 | {_pct(m['macro']['f1'])} | {_ci(m, 'macro_f1')} |",
        f"| expected calibration error | {m['ece']:.3f} | |",
        "",
        "## Limitations",
        "- Measured on one split of one dataset; photos unlike the training ones (other cameras, lighting, "
        "framing) can score lower.",
        "- Weakest classes (F1): " + ", ".join(f"{r['label']} {_pct(r['f1'])}" for r in weakest) + ".",
    ]
    if m["most_confused"]:
        pair = m["most_confused"][0]
        lines.append(f"- Most frequent confusion: {pair['true']} predicted as {pair['predicted']} "
                     f"({pair['count']} {m['split']} images).")
    if m.get("absent_classes"):
        lines.append(f"- Not measured (no {m['split']} images): {', '.join(m['absent_classes'])}.")
    lines += [
        "",
        "## How to load it",
        "```python",
        "from visiontune import Classifier",
        f'classifier = Classifier.load("{run_name}")  # this folder',
        'print(classifier.predict(["photo.jpg"], top_k=3)[0].top_k)',
        "```",
        f"or `visiontune predict {run_name} photo.jpg`. The weights are `model.safetensors`; architecture, labels "
        "and preprocessing are in `model.json`.",
        "",
    ]
    return "\n".join(lines)


def _ci(metrics: dict, key: str) -> str:
    interval = metrics.get("intervals", {}).get(key)
    return span(interval) if interval else "-"
