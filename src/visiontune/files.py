"""Writing files so a killed process leaves the old file or the new one, never half of one; reading JSON leniently.

Every file visiontune writes (run directory, exports, manifests, predictions) goes through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid keeps two processes writing the same file (a distributed run, two exports) off each other's temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    # surrogateescape: a file name that is not UTF-8 (held by Python as surrogates) is written as its own
    # bytes, so the path in a prediction CSV is the file's, not a crash.
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> dict:
    """A JSON object from `path`, or {} when the file is missing, unreadable or not an object: the files read
    this way (metrics, benchmark results, parity records) are optional extras, never the model itself."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
