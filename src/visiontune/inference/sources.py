"""What `predict` is pointed at -> the image files to read: files as given, folders walked recursively
(hidden entries skipped), globs expanded. Names that match nothing are reported, not raised."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable

from visiontune.data.index import walk_files
from visiontune.errors import DatasetError

_GLOB_CHARS = set("*?[")


def expand(paths: Iterable[str | Path]) -> tuple[list[str], list[tuple[str, str]]]:
    """(files to predict, in the order given; [(path, reason)] for names that are not there)."""
    files: list[str] = []
    missing: list[tuple[str, str]] = []
    for item in paths:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            findings = []
            found = [str(path / rel) for rel in walk_files(path, findings)]
            # A name left out (not UTF-8, a link out of the folder) is listed among the files not predicted.
            missing.extend((f.path, f.reason) for f in findings)
            if not found:
                raise DatasetError(f"{path}: empty folder (no files to predict, hidden ones aside)")
            files.extend(found)
        elif path.exists() or path.is_symlink():
            files.append(text)
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            matched = [m for m in matches if Path(m).is_file()]
            if not matched:
                missing.append((text, "no file matches this pattern"))
            files.extend(matched)
        else:
            missing.append((text, "file not found"))
    if not files:
        reasons = "; ".join(f"{p}: {r}" for p, r in missing[:3]) or "no paths given"
        raise DatasetError(f"nothing to predict ({reasons})")
    return files, missing


def expand_one(text: str) -> list[str]:
    """The files one name that is not a folder stands for: itself, or a glob's matches; the name itself when it
    matches nothing (a sharded `predict` lists it, and its row says why it was not read)."""
    if _GLOB_CHARS & set(text) and not Path(text).exists():
        return [m for m in sorted(glob.glob(text, recursive=True)) if Path(m).is_file()] or [text]
    return [text]
