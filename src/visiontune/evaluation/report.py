"""report.html: one self-contained page (pictures embedded as data URIs, inline CSS and JS, a content
security policy that forbids any network request) that a user opens from disk."""

from __future__ import annotations

import base64
import colorsys
import datetime as _dt
import html
import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

import numpy as np
from PIL import Image

from visiontune.evaluation.intervals import span
from visiontune.version import __version__

TEMPLATES = "visiontune.evaluation.templates"
THUMBNAIL = 160  # px, the longer side of a gallery picture

# (section id, title, plot names shown in it)
PLOT_SECTIONS = [
    ("training", "Training", ["training_curves"]),
    ("data", "Data", ["class_distribution"]),
    ("errors", "Where it fails", ["confusion_matrix", "confused_block", "f1_bars"]),
    ("calibration", "Calibration", ["reliability", "reliability_uncalibrated"]),
    ("roc", "ROC", ["roc"]),
    ("gradcam", "What the model looks at (Grad-CAM)", ["gradcam_right", "gradcam_wrong"]),
]


@dataclass
class ReportData:
    title: str
    subtitle: str
    metrics: dict  # the evaluation (compute_metrics output plus split, temperature, ...)
    train: dict = field(default_factory=dict)  # the run's training metrics (time, images per split)
    plots: dict[str, Path] = field(default_factory=dict)
    mistakes: list[dict] = field(default_factory=list)  # jpeg (bytes), true, predicted, probability, path
    notes: list[str] = field(default_factory=list)
    config_text: str = ""
    versions: dict = field(default_factory=dict)
    embedding: dict | None = None  # embedding.embedding_map's output; None: the map is turned off


def template(name: str) -> str:
    return resources.files(TEMPLATES).joinpath(name).read_text(encoding="utf-8")


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cards(d: ReportData) -> str:
    m = d.metrics
    ci = m.get("intervals", {})

    def pct(key: str, value) -> str:  # the value, and its 95 % interval below it
        interval = ci.get(key)
        return _pct(value) + (f"\n95 %: {span(interval)}" if interval else "")

    cards = [("top-1", pct("top1", m["top1"]))]
    cards += [(f"top-{k}", pct(f"top{k}", m[f"top{k}"])) for k in (3, 5) if f"top{k}" in m]
    cards += [("balanced accuracy", pct("balanced_accuracy", m["balanced_accuracy"])),
              ("macro F1", pct("macro_f1", m["macro"]["f1"])),
              ("ECE", _num(m["ece"])), ("log loss", _num(m["log_loss"])),
              (f"{m['split']} images", str(m["images"]))]
    if d.train.get("command_seconds") is not None and d.train.get("evaluation_seconds") is not None:
        # the whole `train` command, its closing evaluation included: what the user waited, and what a budget is for
        cards.append(("train + evaluation", f"{d.train['command_seconds']:.0f} s\n{d.train['train_seconds']:.0f} s + "
                                            f"{d.train['evaluation_seconds']:.0f} s"))
    elif d.train.get("train_seconds") is not None:
        cards.append(("train time", f"{d.train['train_seconds']:.0f} s"))
    budget = d.train.get("budget") or {}
    if budget.get("seconds") is not None:
        cards.append(("budget", f"{budget['budget_seconds']:.0f} s\n" + (
            "kept" if budget["within"] else f"over by {budget['over_seconds']:.0f} s")))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{"<br><small>".join(html.escape(p) for p in v.split(chr(10)))}'
        f'{"</small>" if chr(10) in v else ""}</div><div class="k">{html.escape(k)}</div></div>'
        for k, v in cards) + "</div>"


def _img(path: Path, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="{data_uri(Path(path).read_bytes(), "image/png")}">'


def _plots(d: ReportData, names: list[str]) -> str:
    shown = [_img(d.plots[n], n.replace("_", " ")) for n in names if d.plots.get(n)]
    return f'<div class="plots">{"".join(shown)}</div>' if shown else ""


def _per_class_table(m: dict) -> str:
    head = "".join(f'<th class="{c}">{t}</th>' for t, c in (("class", ""), ("precision", "n"), ("recall", "n"),
                                                            ("F1", "n"), ("support", "n"), ("predicted", "n"),
                                                            ("ROC AUC", "n")))
    auc = m["roc_auc"]["per_class"]
    rows = []
    for r in m["per_class"]:
        cells = [f"<td>{html.escape(r['label'])}</td>"]
        for key in ("precision", "recall", "f1"):
            cells.append(f'<td class="n" data-v="{"" if r[key] is None else r[key]}">{_num(r[key])}</td>')
        cells.append(f'<td class="n">{r["support"]}</td><td class="n">{r["predicted"]}</td>')
        a = auc.get(r["label"])
        cells.append(f'<td class="n" data-v="{"" if a is None else a}">{_num(a)}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    avg = "".join(f"<tr class='muted'><td>{name} average</td>" + "".join(
        f'<td class="n">{_num(m[name][k])}</td>' for k in ("precision", "recall", "f1")) + "<td></td><td></td><td></td></tr>"
        for name in ("macro", "weighted"))
    return (f'<p class="muted">Click a column to sort. Precision of a class never predicted is 0; a class with '
            f'no {m["split"]} images has no recall or F1 and is left out of the macro average.</p>'
            f'<table class="sortable" id="per-class"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
            f'</table><table><tbody>{avg}</tbody></table>')


def _confused_table(m: dict) -> str:
    if not m["most_confused"]:
        return "<p>No confusions: every image was classified correctly.</p>"
    rows = "".join(f"<tr><td>{html.escape(p['true'])}</td><td>{html.escape(p['predicted'])}</td>"
                   f"<td class='n'>{p['count']}</td><td class='n'>{p['share_of_true']:.0%}</td></tr>"
                   for p in m["most_confused"])
    return ("<h3>Most confused pairs</h3><table><thead><tr><th>true class</th><th>predicted as</th>"
            f"<th class='n'>images</th><th class='n'>share of the class</th></tr></thead><tbody>{rows}</tbody></table>")


def _mistakes(d: ReportData) -> str:
    if not d.mistakes:
        return "<p>No mistakes to show.</p>"
    figures = []
    for item in d.mistakes:
        figures.append(
            f'<figure class="mistake"><img alt="{html.escape(Path(item["path"]).name)}" '
            f'src="{data_uri(item["jpeg"], "image/jpeg")}"><figcaption>'
            f'<div class="true">true: {html.escape(item["true"])}</div>'
            f'<div class="pred">predicted: {html.escape(item["predicted"])} ({item["probability"]:.0%})</div>'
            f'<div class="muted">{html.escape(Path(item["path"]).name)}</div></figcaption></figure>')
    return (f'<p class="muted">The {len(d.mistakes)} wrong predictions with the highest loss '
            f'(the lowest probability on the true class).</p><div class="gallery">{"".join(figures)}</div>')


# matplotlib's tab10: the ten most distinct colours; more classes get hues a golden angle apart, lightness alternating.
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def class_colours(n: int) -> list[str]:
    if n <= len(TAB10):
        return TAB10[:n]
    colours = []
    for i in range(n):
        r, g, b = colorsys.hls_to_rgb((i * 0.381966) % 1.0, (0.38, 0.55, 0.7)[i % 3], 0.7)
        colours.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return colours


def _embedding(d: ReportData) -> str:
    e = d.embedding
    if "points" not in e:
        return f"<p>{html.escape(e['note'])}</p>"
    points, classes = e["points"], e["classes"]
    colours = class_colours(len(classes))
    counts = [0] * len(classes)
    for p in points:
        counts[p[2]] += 1
    wrong = sum(p[2] != p[3] for p in points)
    shown = len(points)
    sample = f" (a stratified sample of the {e['scored']} scored)" if shown < e["scored"] else ""
    tta = (" Positions come from the centre crop; predictions from the six test-time-augmentation views."
           if d.metrics.get("tta") else "")
    text = (f"Each dot is one of {shown} {d.metrics['split']} images{sample}, placed by {e['method']}: images the "
            f"model sees alike sit close together. Colour: the true class; a dark ring: a wrong prediction. Hover "
            f"over a dot, or reach it with Tab, to see the image, its label and the prediction.{tta}")
    legend = "".join(
        f'<li data-c="{i}"><span class="swatch" style="background:{colours[i]}"></span>{html.escape(name)} '
        f'<span class="muted">{counts[i]}</span></li>' for i, name in enumerate(classes) if counts[i])
    legend += f'<li class="wrong-key"><span class="swatch ring"></span>wrong prediction <span class="muted">{wrong}</span></li>'
    payload = json.dumps({"classes": classes, "colours": colours, "points": points}, separators=(",", ":"))
    payload = payload.replace("</", "<\\/")  # "</" would end the script element early; "<\/" is the same JSON
    if e.get("note"):  # e.g. the features came from PyTorch because the network could not be traced
        text += f" ({e['note']})"
    return (f'<p>{html.escape(text)}</p><label class="muted"><input type="checkbox" id="map-only-wrong"> only the '
            f'wrong predictions</label><div class="map" id="map"><svg id="map-svg" role="group" '
            f'aria-label="embedding map of {shown} images"></svg><div class="map-tip" id="map-tip" hidden>'
            f'<div class="name"></div><div class="true"></div><div class="pred"></div></div></div>'
            f'<ul class="legend" id="map-legend">{legend}</ul>'
            f'<script type="application/json" id="map-data">{payload}</script>'
            f'<script>{template("embedding_map.js")}</script>')


def _calibration_text(m: dict) -> str:
    t = m.get("temperature")
    parts = [f"Expected calibration error {m['ece']:.3f} over {len(m['reliability'])} confidence bins."]
    if t is not None and t != 1.0:
        parts.append(f"Probabilities are divided by a temperature of {t:.3f} fitted on validation "
                     f"(ECE without it: {m.get('ece_uncalibrated', float('nan')):.3f}); every later consumer "
                     f"(predict, serve, export) applies it.")
    if m.get("uncertainty_threshold") is not None:
        parts.append(f"Predictions whose top probability is below {m['uncertainty_threshold']:.3f} are marked "
                     f"uncertain (chosen on validation).")
    unknown = m.get("open_set") or {}
    if "unknown_share" in unknown:
        parts.append(f"Images whose unknown score is above {unknown['threshold_applied']:.3f} are marked unknown: "
                     f"{unknown['unknown_share']:.1%} of these.")
    return "<p>" + " ".join(html.escape(p) for p in parts) + "</p>"


def _data_section(d: ReportData) -> str:
    images = d.train.get("images") or {}
    counts = ", ".join(f"{k} {v}" for k, v in images.items())
    text = f"<p>Images per split: {html.escape(counts)}.</p>" if counts else ""
    if d.notes:
        text += "<h3>Notes and findings</h3><ul class='notes'>" + "".join(
            f"<li>{html.escape(n)}</li>" for n in d.notes) + "</ul>"
    return text


def _search_section(search: dict) -> str:
    """What a --budget search tried, scored out of fold, and what it chose (metrics.json's train.search)."""
    columns = ("trial", "state", "oof_top1", "seconds", "head_lr", "dropout", "label_smoothing", "finetune_epochs",
               "finetune_lr", "ema")
    chosen = search["chosen"]["trial"]

    def cell(row: dict, key: str) -> str:
        value = row.get(key)
        text = _pct(value) if key == "oof_top1" and value is not None else (
            f"{value:.3g}" if isinstance(value, float) else html.escape(str(value if value is not None else "-")))
        return f'<td class="{"n" if key != "trial" and key != "state" else ""}">{text}</td>'

    marks = {True: ' class="chosen"', False: ""}
    rows = "".join(f"<tr{marks[r['trial'] == chosen]}>{''.join(cell(r, k) for k in columns)}</tr>"
                   for r in search.get("rows", []))
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in columns)
    return (f"<p>{search['trials']} trials in {search['seconds']:.0f} s over {html.escape(', '.join(search['models']))}"
            f", scored out of fold; chosen: <b>{html.escape(chosen)}</b> ({_pct(search['oof_top1'])}; the plan's "
            f"recipe {_pct(search['plan_oof_top1'])}).</p><table class='sortable' id='search'><thead><tr>{head}</tr>"
            f"</thead><tbody>{rows}</tbody></table>")


def build_html(d: ReportData) -> str:
    m = d.metrics
    sections = [("summary", "Summary", _cards(d))]
    for sid, title, names in PLOT_SECTIONS:
        body = _plots(d, names)
        if sid == "data":
            body = _data_section(d) + body
        elif sid == "errors":
            body += _confused_table(m)
        elif sid == "calibration":
            body = _calibration_text(m) + body
        elif sid == "gradcam" and body:
            body = ("<p>Heat maps of the last feature map before pooling, for the predicted class: first right "
                    "predictions (one per class), then the worst mistakes.</p>") + body
        if body:
            sections.append((sid, title, body))
    sections.insert(3, ("classes", "Per-class metrics", _per_class_table(m)))
    if d.train.get("search"):
        sections.append(("search", "Recipe search", _search_section(d.train["search"])))
    if d.embedding is not None:
        sections.append(("embedding", "Embedding map", _embedding(d)))
    sections.append(("mistakes", "Worst mistakes", _mistakes(d)))
    config = f"<pre>{html.escape(d.config_text)}</pre>" if d.config_text else ""
    versions = ", ".join(f"{k} {v}" for k, v in d.versions.items())
    sections.append(("config", "Settings", config + (f"<p class='muted'>{html.escape(versions)}</p>" if versions else "")))
    drawn_map = d.embedding is not None and "points" in d.embedding
    return render_page(d.title, d.subtitle, sections, template("embedding_map.css") if drawn_map else "")


def render_page(title: str, subtitle: str, sections: list[tuple[str, str, str]], extra_css: str = "") -> str:
    """The house page: `sections` are (id, title, HTML body), each a card, all linked from the header; tables of
    class "sortable" sort by the column clicked."""
    body = "\n".join(f'<section id="{sid}"><h2>{html.escape(heading)}</h2>{content}</section>'
                     for sid, heading, content in sections)
    nav = "".join(f'<a href="#{sid}">{html.escape(heading)}</a>' for sid, heading, _ in sections)
    return Template(template("report.html")).substitute(
        title=html.escape(title), subtitle=html.escape(subtitle), nav=nav, body=body,
        css=template("report.css") + extra_css, js=template("report.js"), version=__version__,
        date=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"))


def thumbnail_jpeg(rgb: np.ndarray, size: int = THUMBNAIL, quality: int = 85) -> bytes:
    """A small JPEG (longer side at most `size`) for a page's gallery."""
    image = Image.fromarray(rgb)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    # Optimised Huffman tables: the same pixels in ~18 % fewer bytes (64-px flower photos: 1.4 kB against 1.7 kB).
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()
