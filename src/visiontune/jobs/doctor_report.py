"""What `doctor` writes and prints: issues.csv, issues.json, a self-contained issues.html with thumbnails, the fixed
manifest (every file, the suggestions that reach the cut-off applied; outliers keep theirs), and the terminal
table."""

from __future__ import annotations

import csv
import html
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from visiontune.config import SPLITS, DoctorConfig
from visiontune.data.decode import decode
from visiontune.data.index import Dataset
from visiontune.data.label_issues import Conflict
from visiontune.errors import ImageDecodeError
from visiontune.evaluation.report import data_uri, render_page, template, thumbnail_jpeg
from visiontune.files import atomic_write_text, write_json
from visiontune.models.run_dir import DoctorDir
from visiontune.settings import to_dict

# The kinds of issue, in the order they are listed; a file's suggestion comes from the first kind that has one.
KINDS = ("mislabel", "duplicate", "outlier")


@dataclass
class Issue:
    kind: str  # one of KINDS
    index: int  # the file's index in the dataset
    path: str  # as the dataset lists it (relative to its root, or absolute)
    split: str  # "" for data without splits
    given: str
    suggested: str  # "" when nothing is suggested (outliers; the label stays)
    given_probability: float | None  # out-of-fold probability of the given label
    suggested_probability: float | None
    score: float  # what issues of its kind are ranked by, lowest first (for an outlier: minus its distance)
    group: int | None = None  # which differently labelled duplicate group (kind "duplicate")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DoctorResult:
    out_dir: Path
    dataset: Dataset
    issues: list[Issue]
    summary: dict
    config: DoctorConfig
    conflicts: list[Conflict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return DoctorDir(self.out_dir).files()

    def of_kind(self, kind: str) -> list[Issue]:
        return [i for i in self.issues if i.kind == kind]

    def applies(self, issue: Issue) -> bool:
        """Whether the fixed manifest takes this issue's suggestion: one whose out-of-fold probability reaches
        `relabel_probability`. Below it, a suggestion is for a person to look at, not to apply blindly."""
        return bool(issue.suggested) and (issue.suggested_probability or 0.0) >= self.config.relabel_probability

    def relabelled(self) -> dict[int, str]:
        """File index -> the label the fixed manifest gives it (first applied suggestion by kind order)."""
        out: dict[int, str] = {}
        for issue in self.issues:
            if self.applies(issue) and issue.index not in out:
                out[issue.index] = issue.suggested
        return out

    def to_dict(self) -> dict:
        """What issues.json holds (and `doctor --json` prints)."""
        return to_json(self)

    def table(self, limit: int | None = None) -> str:
        """The terminal table: the first `limit` issues (default: the config's)."""
        return render_table(self, self.config.limit if limit is None else limit)


TITLES = {"mislabel": "Likely mislabelled", "duplicate": "Duplicates labelled differently", "outlier": "Outliers"}
CSV_COLUMNS = ["kind", "rank", "path", "split", "given", "suggested", "given_probability", "suggested_probability",
               "score", "group"]
_THUMB = 112  # px: small enough for hundreds of issues in one page
# Every file's row is embedded for the review's download: about 100 bytes each, so 20 MB at most.
_REVIEW_MAX_FILES = 200_000
_CSS = """
table.issues td { vertical-align: middle; }
table.issues img, .group img { width: 96px; height: 96px; object-fit: cover; display: block; border-radius: 4px; }
td.given { color: var(--bad); } td.suggested { color: var(--good); }
.group { display: flex; flex-wrap: wrap; gap: 10px; border-bottom: 1px solid var(--line); padding: 8px 0; }
.group figure { margin: 0; width: 110px; font-size: 12px; overflow-wrap: anywhere; }
"""


def write_outputs(result: DoctorResult) -> None:
    d = DoctorDir(result.out_dir)
    atomic_write_text(d.issues_csv, issues_csv(result))
    write_json(d.issues_json, to_json(result))
    atomic_write_text(d.fixed_manifest, fixed_manifest(result))
    atomic_write_text(d.issues_html, issues_html(result))


def _absolute(result: DoctorResult, i: int) -> str:
    return os.path.abspath(result.dataset.abspath(i))


def _rounded(value: float | None) -> float | str:
    return "" if value is None else round(value, 4)


def issues_csv(result: DoctorResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for kind in KINDS:
        for rank, issue in enumerate(result.of_kind(kind), start=1):
            writer.writerow([kind, rank, _absolute(result, issue.index), issue.split, issue.given, issue.suggested,
                             _rounded(issue.given_probability), _rounded(issue.suggested_probability),
                             round(issue.score, 4), "" if issue.group is None else issue.group])
    return buffer.getvalue()


def to_json(result: DoctorResult) -> dict:
    issues = []
    for kind in KINDS:
        for rank, issue in enumerate(result.of_kind(kind), start=1):
            issues.append({**issue.to_dict(), "rank": rank, "path": _absolute(result, issue.index)})
    classes = result.dataset.classes
    groups = [{"group": g, "paths": [_absolute(result, i) for i in c.members],
               "labels": [classes[result.dataset.labels[i]] for i in c.members],
               "suggested": classes[c.suggested] if c.suggested >= 0 else "",
               "probability": None if c.suggested < 0 else round(c.probability, 4)}
              for g, c in enumerate(result.conflicts)]
    return {"summary": result.summary, "issues": issues, "duplicate_groups": groups,
            "files": {p.name: str(p) for p in result.files}, "config": to_dict(result.config)}


def fixed_manifest(result: DoctorResult) -> str:
    """path,label[,split] for every file of the data, paths relative to the manifest's folder, labels suggested by
    a mislabel or a duplicate group applied; outliers and skipped files stay as they were (train skips the latter)."""
    ds = result.dataset
    here = os.path.abspath(result.out_dir)
    relabelled = result.relabelled()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "split"] if ds.has_splits else ["path", "label"])
    for i in range(len(ds)):
        row = [Path(os.path.relpath(_absolute(result, i), here)).as_posix(),
               relabelled.get(i, ds.classes[ds.labels[i]])]
        writer.writerow(row + [SPLITS[ds.splits[i]]] if ds.has_splits else row)
    return buffer.getvalue()


def render_table(result: DoctorResult, limit: int) -> str:
    s = result.summary
    counts = s["counts"]
    lines = [f"doctor: {s['scored']} images, {len(s['classes'])} classes; out-of-fold predictions ({s['folds']} folds, "
             f"{s['model']} features) agree with {s['out_of_fold_agreement']:.1%} of the given labels",
             f"found: {counts['mislabel']} likely mislabelled, {counts['duplicate']} images in "
             f"{len(result.conflicts)} duplicate group(s) labelled differently, {counts['outlier']} outlier(s)"]
    shown = [i for kind in KINDS for i in result.of_kind(kind)][:limit]
    if shown:
        widths = [max(len(text) for text in column) for column in zip(*([("kind", "given", "suggested")] + [
            (i.kind, i.given, i.suggested or "-") for i in shown]))]
        lines.append(f"  {'kind':<{widths[0]}}  {'given':<{widths[1]}}  {'suggested':<{widths[2]}}  p(given)  "
                     f"p(sugg.)  path")
        for i in shown:
            lines.append(f"  {i.kind:<{widths[0]}}  {i.given:<{widths[1]}}  {i.suggested or '-':<{widths[2]}}  "
                         f"{_pct(i.given_probability):>8}  {_pct(i.suggested_probability):>8}  {i.path}")
    if len(result.issues) > len(shown):
        lines.append(f"  ... {len(result.issues) - len(shown)} more in {DoctorDir(result.out_dir).issues_csv}")
    lines.append(f"wrote {', '.join(p.name for p in result.files)} to {result.out_dir} (the fixed manifest relabels "
                 f"{s['relabelled']} of {s['suggested']} suggestion(s), those at p(sugg.) "
                 f"{result.config.relabel_probability:.0%} or more (--relabel-probability); look at the others in "
                 f"{DoctorDir.ISSUES_HTML}; outliers keep their labels)")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


# --- issues.html ----------------------------------------------------------------------------------------------


def issues_html(result: DoctorResult) -> str:
    s = result.summary
    budget = result.config.page_images
    sections = [("summary", "Summary", _summary_html(result))]
    boxed: set[int] = set()  # files whose suggestion already has its box (kind order, as the fixed manifest)
    for kind in KINDS:
        issues = result.of_kind(kind)
        shown = issues[:budget]
        budget -= len(shown)
        more = (f"<p class='muted'>{len(issues) - len(shown)} more in {html.escape(DoctorDir.ISSUES_CSV)} "
                f"(--page-images sets how many are shown here).</p>") if len(shown) < len(issues) else ""
        body = _groups_html(result, shown, boxed) if kind == "duplicate" else _table_html(result, shown, kind, boxed)
        sections.append((kind, f"{TITLES[kind]} ({len(issues)})", _EXPLAIN[kind] + body + more))
    sections.append(("settings", "Settings", f"<pre>{html.escape(json.dumps(to_dict(result.config), indent=2))}</pre>"))
    subtitle = (f"{s['data']}: {s['scored']} images, {len(s['classes'])} classes, {s['model']} features, "
                f"{s['folds']} folds")
    return render_page("Label issues", subtitle, sections, _CSS)


_EXPLAIN = {
    "mislabel": "<p>Images whose given label disagrees with a confident out-of-fold prediction (confident learning: "
                "the suggested class reaches its own threshold, the mean probability it gets on the images labelled "
                "with it). Most likely wrong first. The fixed manifest gives them the suggested label when its "
                "probability reaches the cut-off.</p>",
    "duplicate": "<p>Copies of one picture (same bytes, or nearly the same) that carry different labels. The "
                 "suggestion is the class their out-of-fold probabilities favour; the fixed manifest applies it "
                 "when it reaches the cut-off.</p>",
    "outlier": "<p>Images far from every other image of the data (the mean cosine similarity of their features to "
               "the nearest few is unusually low): often not a photo of any class, or a rare view. The fixed "
               "manifest keeps them with their labels; remove the ones that do not belong.</p>",
}


def _summary_html(result: DoctorResult) -> str:
    s = result.summary
    cards = [("images scored", str(s["scored"])), ("agreement", f"{s['out_of_fold_agreement']:.1%}"),
             *[(TITLES[k].lower(), str(s["counts"][k])) for k in KINDS], ("relabelled", str(s["relabelled"]))]
    text = '<div class="cards">' + "".join(f'<div class="card"><div class="v">{html.escape(v)}</div>'
                                           f'<div class="k">{html.escape(k)}</div></div>' for k, v in cards) + "</div>"
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td class='n'>{t:.3f}</td></tr>"
                   for name, t in s["thresholds"].items())
    text += ("<h3>Per-class thresholds</h3><p class='muted'>The mean out-of-fold probability of each class over the "
             f"images labelled with it.</p><table><tbody>{rows}</tbody></table>")
    text += (f"<p>{html.escape(DoctorDir.FIXED_MANIFEST)} lists every file with the suggested labels applied where "
             f"the suggestion's out-of-fold probability is {result.config.relabel_probability:.0%} or more "
             f"({s['relabelled']} of {s['suggested']} changed; the rows marked <i>not applied</i> below are for you to "
             f"judge); train on it with <code>visiontune train "
             f"{html.escape(str(DoctorDir(result.out_dir).fixed_manifest))}</code>. No file of the data was changed.</p>")
    text += _review_html(result)
    if result.notes:
        text += "<h3>Notes</h3><ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in result.notes) + "</ul>"
    return text


def _review_html(result: DoctorResult) -> str:
    """The review step: tick or untick each suggestion's "apply" box below, then download the manifest those
    decisions make (absolute paths, so it works wherever the browser saves it). Every file's row is embedded, so
    the page stops offering it for very large data, where fixed_manifest.csv (the cut-off's decisions) remains."""
    ds = result.dataset
    if len(ds) > _REVIEW_MAX_FILES:
        return (f"<p class='muted'>{len(ds):,} files are too many to embed for a review in this page; "
                f"{html.escape(DoctorDir.FIXED_MANIFEST)} holds the suggestions that reach the cut-off.</p>")
    rows = [[_absolute(result, i), ds.classes[ds.labels[i]]] + ([SPLITS[ds.splits[i]]] if ds.has_splits else [])
            for i in range(len(ds))]
    data = {"header": ["path", "label", "split"] if ds.has_splits else ["path", "label"], "rows": rows,
            "defaults": {str(i): label for i, label in result.relabelled().items()}}
    embedded = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # no "</script>" inside
    return ("<h3>Review</h3><p>Untick a suggestion below to keep its given label, tick one to apply it, then "
            "<button id='review-download' type='button'>download reviewed_manifest.csv</button> "
            "(<span id='review-count'></span>; suggestions not shown on this page keep the cut-off's decision).</p>"
            f"<script type='application/json' id='review-data'>{embedded}</script>"
            f"<script>{template('review.js')}</script>")


def _apply_box(result: DoctorResult, issue: Issue, boxed: set[int]) -> str:
    """The "apply" box of a suggestion, on the first row of its file only (the one the fixed manifest follows)."""
    if not issue.suggested or issue.index in boxed:
        return ""
    boxed.add(issue.index)
    ticked = " checked" if result.applies(issue) else ""
    return (f"<label class='muted'><input type='checkbox' class='apply' data-i='{issue.index}' "
            f"data-label='{html.escape(issue.suggested, quote=True)}'{ticked}> apply</label>")


def _thumb(result: DoctorResult, i: int) -> str:
    try:
        jpeg = thumbnail_jpeg(decode(result.dataset.abspath(i), draft=_THUMB), _THUMB)
    except ImageDecodeError:  # changed since it was scanned
        return ""
    return f'<img alt="{html.escape(Path(result.dataset.paths[i]).name)}" src="{data_uri(jpeg, "image/jpeg")}">'


def _table_html(result: DoctorResult, issues: list[Issue], kind: str, boxed: set[int]) -> str:
    if not issues:
        return "<p>None found.</p>"
    heads = ["#", "image", "path", "split", "given", "suggested", "p(given)", "p(suggested)"]
    if kind == "outlier":
        heads[5:] = ["distance", "p(given)"]
    rows = []
    for rank, issue in enumerate(issues, start=1):
        cells = [f"<td class='n'>{rank}</td>", f"<td>{_thumb(result, issue.index)}</td>",
                 f"<td>{html.escape(issue.path)}</td>", f"<td>{html.escape(issue.split)}</td>",
                 f"<td{'' if kind == 'outlier' else ' class=given'}>{html.escape(issue.given)}</td>"]
        if kind == "outlier":
            cells += [f"<td class='n'>{-issue.score:.3f}</td>", _prob_cell(issue.given_probability)]
        else:
            held = "" if result.applies(issue) or not issue.suggested else "<div class='muted'>not applied</div>"
            cells += [f"<td class='suggested'>{html.escape(issue.suggested)}{held}{_apply_box(result, issue, boxed)}</td>",
                      _prob_cell(issue.given_probability), _prob_cell(issue.suggested_probability)]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    head = "".join(f"<th>{h}</th>" for h in heads)
    return f'<table class="sortable issues"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _prob_cell(p: float | None) -> str:
    return f"<td class='n' data-v='{'' if p is None else p}'>{_pct(p)}</td>"


def _groups_html(result: DoctorResult, issues: list[Issue], boxed: set[int]) -> str:
    if not issues:
        return "<p>None found.</p>"
    by_group: dict[int, list[Issue]] = {}
    for issue in issues:
        by_group.setdefault(issue.group, []).append(issue)
    blocks = []
    for g, members in by_group.items():
        conflict = result.conflicts[g]
        figures = "".join(f"<figure>{_thumb(result, m.index)}<figcaption>{html.escape(m.given)}"
                          f"<div class='muted'>{html.escape(m.path)}</div>{_apply_box(result, m, boxed)}"
                          f"</figcaption></figure>" for m in members)
        suggested = result.dataset.classes[conflict.suggested] if conflict.suggested >= 0 else "-"
        blocks.append(f"<div class='group'>{figures}<p>suggested: <b>{html.escape(suggested)}</b> "
                      f"({_pct(None if conflict.suggested < 0 else conflict.probability)})</p></div>")
    return "".join(blocks)
