"""What a sharded `predict` reads, cut into shards that every run cuts the same way.

The input is one listing: a CSV manifest given as the source (a `path` column; other columns ignored), or, for
folders, files and globs, `_inputs.csv` written once into the output folder by a streaming walk and reused by a
rerun (so a folder that changed meanwhile cannot move images from one shard into another). A shard is a range of
the listing's bytes holding `shard_images` lines: finding the ranges reads the file once, holding no path, and a
shard's reader (a Ray worker, say) reads only its own range. Millions of paths are never in memory at once.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from visiontune.data.index import MANIFEST_SUFFIXES, walk_files
from visiontune.errors import DatasetError
from visiontune.files import temporary_name
from visiontune.inference.sources import expand_one

LISTING = "_inputs.csv"  # in the output folder, for sources that are not one manifest
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # byte offsets into the listing: the lines that start in [start, end)
    end: int


@dataclass(frozen=True)
class Plan:
    listing: Path  # absolute
    root: Path  # relative paths in the listing start here
    column: int  # of `path`
    shards: tuple[Shard, ...]

    def paths(self, shard: Shard) -> list[str]:
        """The image paths of one shard, in listing order (blank lines skipped)."""
        with open(self.listing, "rb") as fh:
            fh.seek(shard.start)
            text = fh.read(shard.end - shard.start).decode("utf-8", "surrogateescape")
        rows = csv.reader(io.StringIO(text, newline=""))
        return [str(self.root / row[self.column]) for row in rows if len(row) > self.column and row[self.column]]


def is_manifest(sources: list[str]) -> bool:
    return len(sources) == 1 and sources[0].lower().endswith(MANIFEST_SUFFIXES) and Path(sources[0]).is_file()


def make_plan(sources: Iterable[str | Path], out: Path, shard_images: int, root: str | Path | None = None) -> Plan:
    """The listing (written into `out` first, unless the one source is a manifest) cut into shards."""
    sources = [str(s) for s in sources]
    if not sources:
        raise DatasetError("nothing to predict (no paths given)")
    if is_manifest(sources):
        listing = Path(sources[0]).resolve()
        base = Path(root).resolve() if root else listing.parent
    else:
        listing, base = out.resolve() / LISTING, Path("/")
        if not listing.is_file():  # a rerun keeps the first run's listing
            _write_listing(sources, listing)
    header, offsets = _scan(listing, shard_images)
    if "path" not in header:
        raise DatasetError(f"{listing}: a manifest for predict needs a header with a 'path' column (found "
                           f"{', '.join(header) or 'nothing'})")
    shards = tuple(Shard(i, a, b) for i, (a, b) in enumerate(zip(offsets, offsets[1:])))
    if not shards:
        raise DatasetError(f"{sources[0] if is_manifest(sources) else ' '.join(sources)}: no image paths to predict")
    return Plan(listing, base, header.index("path"), shards)


def _write_listing(sources: list[str], target: Path) -> None:
    """Every file the sources name, absolute, one per line; streamed, then renamed into place complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    try:
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["path"])
            for path in _walk(sources):
                writer.writerow([os.path.abspath(path)])
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _walk(sources: list[str]) -> Iterator[str]:
    for text in sources:
        path = Path(text)
        if path.is_dir():  # streamed: one directory's entries in memory at a time
            yield from (str(path / rel) for rel in walk_files(path, []))
        else:  # a name that is not there is listed too: it becomes a row with its error
            yield from expand_one(text)


def _scan(listing: Path, every: int) -> tuple[list[str], list[int]]:
    """(the header's column names, the byte offset of every `every`-th data line and of the end)."""
    try:
        fh = open(listing, "rb")
    except OSError as exc:
        raise DatasetError(f"{listing}: cannot read ({exc.strerror or exc})") from None
    with fh:
        first = fh.readline()
        header = next(csv.reader([first.decode("utf-8-sig", "replace").strip("\r\n")]), [])
        offsets, lines, position = [fh.tell()], 0, fh.tell()
        while chunk := fh.read(_CHUNK):
            start = 0
            while (newline := chunk.find(b"\n", start)) != -1:
                start = newline + 1
                lines += 1
                if lines % every == 0:
                    offsets.append(position + start)
            position += len(chunk)
        if offsets[-1] != position:
            offsets.append(position)
    return [h.strip() for h in header], offsets
