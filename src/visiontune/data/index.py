"""Turn what the user points at into a `Dataset`: a list of files, their labels and (if given) their splits.

Three layouts, told apart automatically:
  class folders   root/<class>/**/<image>
  split folders   root/{train,val|valid|validation,test}/<class>/**/<image>
  CSV manifest    path,label[,split] with paths relative to the CSV's folder (or `root`)

Indexing streams: it holds one relative path string and one small integer per file, nothing heavier,
so a million files index in bounded memory. Nothing is opened here; `integrity` decides what is an image.
"""

from __future__ import annotations

import csv
import io
import os
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from visiontune import samples
from visiontune.config import SPLITS
from visiontune.data.findings import Finding
from visiontune.data.multilabel import parse_label_set
from visiontune.errors import DatasetError

NO_SPLIT = -1
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
MANIFEST_SUFFIXES = (".csv",)


@dataclass
class Dataset:
    """Files, labels and splits; `paths[i]` is relative to `root` (or absolute, from a manifest)."""

    root: Path
    paths: list[str]
    labels: np.ndarray  # int32, index into `classes`
    classes: list[str]
    splits: np.ndarray  # int8, index into SPLITS, NO_SPLIT where the data came without a split
    layout: str  # "class-folders" | "split-folders" | "manifest"
    source: Path
    findings: list[Finding] = field(default_factory=list)
    # Multi-label data: one row of 0/1 per file over `classes`; `labels` then holds each file's first label, so
    # what only needs one label per file (caches, thumbnails, counts of files) keeps working.
    targets: np.ndarray | None = None

    @property
    def task(self) -> str:
        return "multiclass" if self.targets is None else "multilabel"

    def present(self, mask: np.ndarray) -> set[int]:
        """Label ids carried by at least one file where `mask` is true."""
        if self.targets is None:
            return set(np.unique(self.labels[mask]).tolist())
        return set(np.flatnonzero(self.targets[mask].any(axis=0)).tolist())

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_splits(self) -> bool:
        return bool(len(self.splits)) and bool((self.splits != NO_SPLIT).all())

    def abspath(self, i: int) -> Path:
        return self.root / self.paths[i]

    def class_counts(self, mask: np.ndarray | None = None) -> dict[str, int]:
        if self.targets is not None:
            targets = self.targets if mask is None else self.targets[mask]
            return {name: int(n) for name, n in zip(self.classes, targets.sum(axis=0))}
        labels = self.labels if mask is None else self.labels[mask]
        counts = np.bincount(labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts)}

    def subset(self, mask: np.ndarray) -> "Dataset":
        """The files where `mask` is true, with the same classes (so label ids stay comparable)."""
        keep = np.flatnonzero(mask)
        return Dataset(self.root, [self.paths[i] for i in keep], self.labels[keep], self.classes,
                       self.splits[keep], self.layout, self.source, list(self.findings),
                       None if self.targets is None else self.targets[keep])


def natural_key(name: str) -> list:
    """Sort "2" before "10", so numbered class folders keep their human order."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def resolve_source(source: Union[str, Path]) -> Path:
    """A path on disk, or the name of an embedded sample dataset ("flowers-mini")."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if str(source) in samples.names():
        return samples.path(str(source))
    raise DatasetError(
        f"{source}: no such file or folder (nor an embedded sample; those are: {', '.join(samples.names())})"
    )


def load_dataset(source: Union[str, Path], root: Union[str, Path, None] = None) -> Dataset:
    """Index a dataset given as a folder, a split folder, a CSV manifest or a sample name."""
    path = resolve_source(source)
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise DatasetError(f"{path}: a dataset is a folder or a CSV manifest (path,label[,split]), "
                               f"not a {path.suffix or 'plain'} file")
        return _load_manifest(path, Path(root) if root else path.parent)
    if not os.access(path, os.R_OK | os.X_OK):
        raise DatasetError(f"{path}: folder is not readable (permission denied)")
    split_dirs = _split_folders(path)
    if split_dirs:
        return _load_split_folders(path, split_dirs)
    return _load_class_folders(path)


class _Builder:
    """Accumulates files compactly: a path string and two small integers per file."""

    def __init__(self):
        self.paths: list[str] = []
        self.labels = array("i")
        self.splits = array("b")
        self.class_ids: dict[str, int] = {}
        self.findings: list[Finding] = []
        self.label_sets: list[list[int]] | None = None  # multi-label: the class ids of each file

    def class_id(self, name: str) -> int:
        if name not in self.class_ids:
            self.class_ids[name] = len(self.class_ids)
        return self.class_ids[name]

    def add(self, path: str, label: int, split: int) -> None:
        self.paths.append(path)
        self.labels.append(label)
        self.splits.append(split)

    def add_set(self, path: str, label_ids: list[int], split: int) -> None:
        self.label_sets = [] if self.label_sets is None else self.label_sets
        self.label_sets.append(label_ids)
        self.add(path, label_ids[0], split)

    def build(self, root: Path, layout: str, source: Path) -> Dataset:
        # Class ids follow the natural order of the names, whatever order the files came in.
        names = sorted(self.class_ids, key=natural_key)
        remap = np.zeros(max(len(names), 1), dtype=np.int32)
        for new_id, name in enumerate(names):
            remap[self.class_ids[name]] = new_id
        labels = remap[np.frombuffer(self.labels, dtype=np.int32)] if len(self.labels) else np.zeros(0, np.int32)
        splits = np.frombuffer(self.splits, dtype=np.int8).copy()
        targets = None
        if self.label_sets is not None:
            targets = np.zeros((len(self.paths), len(names)), dtype=np.uint8)
            for row, ids in enumerate(self.label_sets):
                targets[row, remap[ids]] = 1
            labels = targets.argmax(axis=1).astype(np.int32) if len(targets) else labels
        return Dataset(root, self.paths, labels.astype(np.int32), names, splits, layout, source, self.findings,
                       targets)


def walk_files(folder: Path, findings: list[Finding], dataset_root: Path | None = None) -> Iterator[str]:
    """Every non-hidden file below `folder` (recursively, sorted), as a path relative to it.

    Iterative and streaming: one directory listing is in memory at a time. A symlinked folder is followed only
    when it points inside `folder` (once: a loop is reported, not followed forever): one leading out of a class
    folder, `daisy/loop -> ..` say, would give another class's images this class's label. A symlinked file that
    points inside `dataset_root` is that file again: it is left out, so each file counts once.
    """
    base = os.path.realpath(folder)
    inside_root = os.path.realpath(dataset_root) + os.sep if dataset_root is not None else None
    seen: set[tuple[int, int]] = set()
    stack = [""]
    while stack:
        rel = stack.pop()
        current = folder / rel if rel else folder
        try:
            st = current.stat()
            if (st.st_dev, st.st_ino) in seen:
                findings.append(Finding("warning", str(current), "folder visited twice (symlink loop): skipped"))
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(current) as it:
                entries = sorted((e for e in it if not is_hidden(e.name)), key=lambda e: e.name)
        except PermissionError:
            findings.append(Finding("warning", str(current), "unreadable folder: permission denied"))
            continue
        except OSError as exc:
            findings.append(Finding("warning", str(current), f"unreadable folder: {exc.strerror or exc}"))
            continue
        subdirs = []
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            reason = _link_reason(entry, is_dir, base, inside_root) if entry.is_symlink() else None
            reason = reason or _name_reason(entry.name)
            if reason:
                findings.append(Finding("warning", printable_path(entry.path), reason))
            elif is_dir:
                subdirs.append(child)
            else:
                yield child
        stack.extend(reversed(subdirs))


def _name_reason(name: str) -> str | None:
    """Why a name is left out: one that is not valid UTF-8 (a Latin-1 `caf\\xe9.jpg` from an old archive) cannot be
    written to split.csv, model.json or a prediction file and read back as the same path."""
    if printable_path(name) == name:
        return None
    return "name is not valid UTF-8: skipped (rename it, e.g. with `convmv -f latin1 -t utf8`)"


def printable_path(path: str) -> str:
    """`path` with any byte that is not UTF-8 shown as \\xNN: safe to print and to write as text."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _link_reason(entry: os.DirEntry, is_dir: bool, base: str, inside_root: str | None) -> str | None:
    """Why a symlink is not followed (None: it is)."""
    target = os.path.realpath(entry.path)
    if is_dir and target != base and not target.startswith(base + os.sep):
        return f"symlink to a folder outside its class folder ({target}): not followed"
    if not is_dir and inside_root is not None and target.startswith(inside_root):
        return f"symlink to {target}, a file of this dataset: counted once, where it lies"
    return None


def _class_folders(root: Path, findings: list[Finding]) -> list[str]:
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: natural_key(e.name))
    except OSError as exc:
        raise DatasetError(f"{root}: cannot list folder ({exc.strerror or exc})") from None
    for entry in [e for e in entries if not is_hidden(e.name) and _name_reason(e.name)]:
        findings.append(Finding("warning", printable_path(entry.path), _name_reason(entry.name)))
    entries = [e for e in entries if not _name_reason(e.name)]
    loose = [e.name for e in entries if not is_hidden(e.name) and not e.is_dir()]
    if loose:
        manifests = [n for n in loose if n.lower().endswith(MANIFEST_SUFFIXES)]
        hint = f"; to use a manifest's labels and splits, pass it instead: {', '.join(manifests)}" if manifests else ""
        findings.append(Finding("info", str(root),
                                f"{len(loose)} file(s) at the top level are in no class folder and were ignored{hint}"))
    return [e.name for e in entries if not is_hidden(e.name) and e.is_dir()]


def _add_class_tree(builder: _Builder, root: Path, prefix: str, class_name: str, split: int) -> None:
    label = builder.class_id(class_name)
    before = len(builder.paths)
    for rel in walk_files(root / prefix, builder.findings, root):
        builder.add(f"{prefix}/{rel}", label, split)
    if len(builder.paths) == before:
        builder.findings.append(Finding("error", str(root / prefix), f"class {class_name!r} has no files"))


def _load_class_folders(root: Path) -> Dataset:
    builder = _Builder()
    for name in _class_folders(root, builder.findings):
        _add_class_tree(builder, root, name, name, NO_SPLIT)
    return builder.build(root, "class-folders", root)


def _split_folders(root: Path) -> dict[str, str]:
    """{"train": "train", "val": "validation", ...} when `root` holds split folders, else {}."""
    try:
        names = [e.name for e in os.scandir(root) if e.is_dir() and not is_hidden(e.name)]
    except OSError as exc:
        raise DatasetError(f"{root}: cannot list folder ({exc.strerror or exc})") from None
    found: dict[str, str] = {}
    for name in sorted(names):
        split = SPLIT_ALIASES.get(name.lower())
        if split and split in found:
            raise DatasetError(f"{root}: both {found[split]!r} and {name!r} look like the {split} split; "
                               f"merge them or rename one")
        if split:
            found[split] = name
    if "train" in found and len(found) >= 2:
        return found
    return {}


def _load_split_folders(root: Path, split_dirs: dict[str, str]) -> Dataset:
    builder = _Builder()
    others = sorted(e.name for e in os.scandir(root)
                    if e.is_dir() and not is_hidden(e.name) and e.name not in split_dirs.values())
    if others:
        builder.findings.append(Finding("info", str(root), f"folder(s) that are not a split were ignored: {', '.join(others)}"))
    for split, folder in sorted(split_dirs.items(), key=lambda kv: SPLITS.index(kv[0])):
        for name in _class_folders(root / folder, builder.findings):
            _add_class_tree(builder, root, f"{folder}/{name}", name, SPLITS.index(split))
    return builder.build(root, "split-folders", root)


def _manifest_text(csv_path: Path) -> str:
    """The manifest's text: UTF-8 (with or without a byte-order mark), or, failing that, Windows-1252, which is
    what Excel writes a CSV in on most Western machines (a superset of Latin-1 for printable text)."""
    try:
        data = csv_path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{csv_path}: cannot read manifest ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        utf8_error = exc
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        line = data[: utf8_error.start].count(b"\n") + 1
        raise DatasetError(f"{csv_path}:{line}: not UTF-8 or Windows-1252 text (byte {utf8_error.start}); "
                           f"save the manifest as CSV UTF-8") from None


def _load_manifest(csv_path: Path, root: Path) -> Dataset:
    builder = _Builder()
    seen_paths: set[str] = set()
    reader = csv.reader(io.StringIO(_manifest_text(csv_path), newline=""))
    try:
        _read_manifest_rows(reader, csv_path, root, builder, seen_paths)
    except csv.Error as exc:  # a field over the csv module's limit, a NUL byte, ...
        raise DatasetError(f"{csv_path}:{reader.line_num}: not a readable CSV ({exc})") from None
    return builder.build(root, "manifest", csv_path)


def _read_manifest_rows(reader, csv_path: Path, root: Path, builder: "_Builder", seen_paths: set[str]) -> None:
    header = [h.strip().lower() for h in next(reader, [])]
    multi = "labels" in header and "label" not in header
    if "path" not in header or not ("label" in header or multi):
        raise DatasetError(f"{csv_path}: a manifest needs a header with 'path' and 'label' columns (or 'labels', "
                           f"several per image as dog|person; and optionally 'split'); found {header}")
    col_path, col_label = header.index("path"), header.index("labels" if multi else "label")
    col_split = header.index("split") if "split" in header else None
    for line_no, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise DatasetError(f"{csv_path}:{line_no}: expected {len(header)} columns, got {len(row)}")
        rel, label = row[col_path].strip(), row[col_label].strip()
        if multi and rel and not parse_label_set(label):
            raise DatasetError(f"{csv_path}:{line_no}: empty label set for {rel} (give at least one label, "
                               f"several as a|b)")
        if not rel or not label:
            raise DatasetError(f"{csv_path}:{line_no}: empty path or label")
        split = NO_SPLIT
        if col_split is not None:
            split_name = SPLIT_ALIASES.get(row[col_split].strip().lower())
            if split_name is None:
                raise DatasetError(f"{csv_path}:{line_no}: unknown split {row[col_split]!r}; use train, val or test")
            split = SPLITS.index(split_name)
        if rel in seen_paths:
            builder.findings.append(Finding("warning", rel,
                                            f"listed twice in {csv_path.name}: later row (line {line_no}) ignored"))
            continue
        seen_paths.add(rel)
        if not (root / rel).is_file():
            builder.findings.append(Finding("warning", str(root / rel),
                                            f"listed in {csv_path.name} (line {line_no}) but missing"))
            continue
        if multi:
            builder.add_set(rel, [builder.class_id(name) for name in parse_label_set(label)], split)
        else:
            builder.add(rel, builder.class_id(label), split)
