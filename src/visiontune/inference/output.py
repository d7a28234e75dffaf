"""Predictions as text: an aligned table for a terminal, or CSV / JSON / JSON Lines for programs."""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Iterable, TextIO

from visiontune.inference.classifier import Prediction

FORMATS = ("table", "csv", "json", "jsonl")


def write(predictions: Iterable[Prediction], out: TextIO, fmt: str, top_k: int) -> None:
    if fmt == "jsonl":
        for p in predictions:
            out.write(json.dumps(p.to_dict()) + "\n")
    elif fmt == "json":
        json.dump([p.to_dict() for p in predictions], out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        _write_csv(predictions, out, top_k)
    else:
        out.write(table(list(predictions), top_k))


def _write_csv(predictions: Iterable[Prediction], out: TextIO, top_k: int) -> None:
    writer = csv.writer(out, lineterminator="\n")
    ranks = [f"{what}_{k}" for k in range(2, top_k + 1) for what in ("label", "probability")]
    writer.writerow(["source", "label", "probability", *ranks, "entropy", "uncertain", "unknown", "unknown_score",
                     "error"])
    for p in predictions:
        others = [value for name, prob in p.top_k[1:top_k] for value in (name, f"{prob:.6f}")]
        others += [""] * (len(ranks) - len(others))
        writer.writerow([p.source, p.label or "", "" if p.probability is None else f"{p.probability:.6f}", *others,
                         "" if p.entropy is None else f"{p.entropy:.6f}",
                         _flag(p.uncertain), _flag(p.unknown), "" if p.unknown_score is None else f"{p.unknown_score:.6f}",
                         p.error or ""])


def _flag(value: bool | None) -> str:
    """true / false, or empty when the model cannot say (CSV has no null)."""
    return "" if value is None else str(value).lower()


def table(predictions: list[Prediction], top_k: int) -> str:
    """One line per image: file, label, probability, "unknown" (or '?' for uncertain), then the runners-up."""
    rows = [("file", "label", "prob", "", "next" if top_k > 1 else "")]
    for p in predictions:
        if p.error:
            continue
        others = ", ".join(f"{name} {prob:.0%}" for name, prob in p.top_k[1:top_k])
        rows.append((p.source, p.label, f"{p.probability:.1%}", "unknown" if p.unknown else "?" if p.uncertain else "",
                     others))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    buf = io.StringIO()
    for r in rows:
        buf.write("  ".join(cell.ljust(w) if i != 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r[:4], widths))))
        buf.write(("  " + r[4]) if r[4] else "")
        buf.write("\n")
    if any(p.uncertain and not p.unknown for p in predictions if not p.error):
        buf.write("?: uncertain (top probability below the model's threshold)\n")
    if any(p.unknown for p in predictions if not p.error):
        buf.write("unknown: unlike every class the model was trained on (unknown score above the model's threshold); "
                  "the label is only the nearest class\n")
    return "\n".join(line.rstrip() for line in buf.getvalue().split("\n"))


def emit(results: list[Prediction], out: str | None, fmt: str, top_k: int) -> int:
    """`predict`'s output: the predictions to `out` (atomically) or stdout, each unreadable file a line on stderr;
    the exit code (2 when no file could be read)."""
    from visiontune.files import atomic_write_text

    buffer = io.StringIO()
    write(results, buffer, fmt, top_k)
    if out:
        atomic_write_text(out, buffer.getvalue())
    else:
        sys.stdout.write(buffer.getvalue())
    failed = [p for p in results if p.error]
    for p in failed:
        print(f"skipped: {p.source}: {p.error}", file=sys.stderr)
    if failed and len(failed) == len(results):
        print(f"visiontune: error: none of the {len(results)} file(s) could be read as an image", file=sys.stderr)
        return 2
    if out:
        print(f"wrote {len(results) - len(failed)} prediction(s) to {out}", file=sys.stderr)
    return 0
