"""Settings and metrics as MLflow takes them: flat names, short values, numbers only.

MLflow servers refuse parameter values over their limit, names with some characters, and more than 100 parameters
or 1000 metrics in one call; these are the rules other integrations trip over.
"""

from __future__ import annotations

import math
import re

PARAMS_PER_CALL = 100
METRICS_PER_CALL = 1000
KEY_CHARS = 250  # MLflow's longest parameter or metric name
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def clean_key(key: str) -> str:
    """`key` with the characters MLflow refuses replaced by '_', at most KEY_CHARS long."""
    return _BAD_KEY_CHARS.sub("_", key)[:KEY_CHARS]


def flat_params(tree: dict, max_chars: int, prefix: str = "") -> tuple[dict[str, str], list[str]]:
    """({dotted name: value as text}, names whose values were cut to `max_chars`). Lists are written as
    comma-separated text; None as the empty string."""
    params: dict[str, str] = {}
    cut: list[str] = []
    for key, value in tree.items():
        name = clean_key(f"{prefix}{key}")
        if isinstance(value, dict):
            inner, inner_cut = flat_params(value, max_chars, f"{name}.")
            params.update(inner)
            cut += inner_cut
            continue
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else "" if value is None else str(value)
        if len(text) > max_chars:
            text = text[: max_chars - 3] + "..."
            cut.append(name)
        params[name] = text
    return params, cut


def flat_metrics(tree: dict, prefix: str = "") -> dict[str, float]:
    """Every finite number in `tree` by dotted name; a pair of numbers (a 95 % interval) as NAME.low / NAME.high.
    Other lists (per-class tables, notes) are left to the artifacts."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = clean_key(f"{prefix}{key}")
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{name}."))
        elif _number(value):
            out[name] = float(value)
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) for v in value):
            out[f"{name}.low"], out[f"{name}.high"] = float(value[0]), float(value[1])
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def chunks(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]
