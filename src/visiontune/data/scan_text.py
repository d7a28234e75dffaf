"""The terminal rendering of a scan report: a few readable tables, most serious findings first."""

from __future__ import annotations

from visiontune.data.integrity import ScanReport

_MAX_LISTED = 20  # per level; --json has them all


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    def line(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def render_scan(report: ScanReport) -> str:
    data = report.to_dict()
    out = [f"dataset  {data['source']}  ({data['layout']})",
           f"files    {data['files']}  usable {data['usable_images']}  skipped {data['skipped_files']}", ""]
    per_split = data["class_counts_per_split"]
    header = ["class" if data["task"] == "multiclass" else "label", "images"] + list(per_split)
    rows = [[name, str(n)] + [str(per_split[s].get(name, 0)) for s in per_split] for name, n in data["class_counts"].items()]
    out += _table(rows, header)
    out.append(f"imbalance ratio (largest / smallest class): {data['imbalance_ratio']:.2f}")
    if "label_sets" in data:
        sets = data["label_sets"]
        pairs = ", ".join(f"{'+'.join(p['labels'])} {p['images']}" for p in sets["co_occurrence"]) or "none"
        out.append(f"multi-label: {sets['labels_per_image']['mean']:.2f} labels an image (at most "
                   f"{sets['labels_per_image']['max']}); seen together most: {pairs}")
    sizes = data["image_size"]
    if sizes:
        w, h = sizes["width"], sizes["height"]
        out.append(f"image size: width {w['min']}-{w['max']} (median {w['median']:g}), "
                   f"height {h['min']}-{h['max']} (median {h['median']:g})")
    if data["formats"]:
        out.append("formats: " + ", ".join(f"{k} {v}" for k, v in data["formats"].items()))
    out.append(f"duplicates: {len(data['exact_duplicate_groups'])} exact group(s), "
               f"{len(data['near_duplicate_groups'])} near group(s), {len(data['leaking_groups'])} crossing splits")
    for level in ("error", "warning", "info"):
        found = [f for f in report.findings if f.level == level]
        if not found:
            continue
        out += ["", f"{level.upper()} ({len(found)})"]
        for f in found[:_MAX_LISTED]:
            out.append(f"  {f.path}: {f.reason}")
        if len(found) > _MAX_LISTED:
            out.append(f"  ... and {len(found) - _MAX_LISTED} more (see --json)")
    out.append("")
    out.append(f"NOT USABLE: {data['unusable_reason']}" if data["unusable_reason"] else "usable: yes")
    return "\n".join(out)
