"""Writing files so a killed process leaves the old file or the new one, never half of one; reading JSON leniently.

Every file visiontune writes (run directory, exports, manifests, predictions) goes through here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from visiontune.errors import ConfigError, DiskFullError


def temporary_name(path: str | Path, suffix: str = ".tmp") -> Path:
    """Where `path` is written before its rename. The pid keeps two processes writing the same file (a distributed
    run, two exports) off each other's temporary, and lets `remove_stale_temporaries` tell a dead writer's."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException as exc:  # a full disk, a Ctrl-C: no half-written temporary left behind
        full = is_disk_full(exc, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full(path, f"{path.name} is as it was before" if path.exists() else "nothing was written") \
                from None
        raise


def is_disk_full(exc: BaseException, where: str | Path | None = None) -> bool:
    """No space left (or over quota). safetensors reports it as its own error type with the OS's words, and numpy
    as a short write with no errno at all: then the free space left where it wrote (`where`) decides."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
        return True
    if where is not None and isinstance(exc, OSError):
        try:
            return shutil.disk_usage(where).free < (1 << 20)
        except OSError:
            return False
    return False


def disk_full(path: str | Path, intact: str) -> DiskFullError:
    return DiskFullError(f"{path}: no space left on the device while writing it; {intact}. Free some space "
                         f"(`df -h {Path(path).parent}`) and run the command again")


@contextmanager
def staging_folder(target: str | Path) -> Iterator[Path]:
    """A folder beside `target` for files that are renamed into place (an IR's .xml and .bin), removed whatever
    happens; named like `temporary_name`, so a killed writer's is removed by `remove_stale_temporaries`."""
    folder = temporary_name(target, ".tmpdir")
    folder.mkdir(parents=True)
    try:
        yield folder
    except BaseException as exc:
        if is_disk_full(exc, folder):
            raise disk_full(target, f"{Path(target).name} is as it was before") from None
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp(dir)?$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries in `folder` whose writer is no longer running (killed with -9, or by a power cut):
    left there, they would hold disk space forever. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or _running(int(match.group(1))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(Path(entry.path))
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


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


def refuse_output_over_inputs(out: str | Path, inputs: Iterable[str | Path], *, folder: bool, what: str) -> None:
    """Raise ConfigError, before any work, when writing `out` could overwrite or change a user's input: `out` is
    an input, lies inside an input folder, or (a `folder` of outputs) holds an input. `train DATA --out DATA` once
    overwrote the user's own split.csv and config.yaml and left plots/ reading as a class; `predict RUN ... --out
    RUN/model.json` destroyed the run. Links are resolved, so another name for the same place is caught too."""
    target = Path(os.path.realpath(out))
    for given in inputs:
        source = Path(os.path.realpath(given))
        if target == source:
            reason = "that is one of the inputs"
        elif source in target.parents and source.is_dir():
            reason = f"that lies inside the input folder {given}"
        elif folder and target in source.parents:
            reason = f"that folder holds the input {given}"
        else:
            continue
        raise ConfigError(f"--out {out}: {reason}; {what} somewhere else (no file was changed)")


@contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a hidden file in the folder being written) for the block, or raise
    ConfigError at once when another process holds it: two `train --resume` of one run would each overwrite the
    other's checkpoints. The kernel drops the lock when its holder dies (even by kill -9), so no stale lock
    outlives a process; the file is removed on release."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{path.parent}: {what} is being written by process {holder}; wait for it to "
                              f"finish (or stop it), or give another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its last holder removed the file between our open and our lock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)  # while still held, so no one can lock this file after it is gone
        except FileNotFoundError:
            pass
        os.close(fd)
