"""ensemble.json: an ensemble directory's members (paths kept relative to it) and their weights."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from visiontune.errors import ModelError
from visiontune.models.bundle import check_format
from visiontune.models.run_dir import RunDir

FORMAT = "visiontune-ensemble"
FORMAT_VERSION = 1


@dataclass
class MemberEntry:
    path: Path  # resolved against the ensemble folder
    stored: str  # as written in ensemble.json
    weight: float


def stored_path(member: Path, folder: Path) -> str:
    """A member's path as ensemble.json keeps it: relative to the ensemble's folder when one exists (so the
    two can move together), absolute otherwise."""
    member, folder = Path(member).resolve(), Path(folder).resolve()
    try:
        return Path(os.path.relpath(member, folder)).as_posix()
    except ValueError:  # another drive on Windows
        return member.as_posix()


def read_manifest(folder: Path) -> tuple[dict, list[MemberEntry]]:
    path = RunDir(folder).ensemble
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable ({exc})") from None
    check_format(data, str(path), FORMAT, FORMAT_VERSION, "ensemble")
    try:
        members = [MemberEntry(_resolve(folder, m["path"]), str(m["path"]), float(m["weight"])) for m in data["members"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: malformed member list (missing or bad {exc})") from None
    if not members:
        raise ModelError(f"{path}: an ensemble with no members")
    return data, members


def _resolve(folder: Path, stored: str) -> Path:
    p = Path(stored)
    return p if p.is_absolute() else Path(folder) / p
