"""What a careless user meets: advice in error messages that works, clear words for unsupported files, no empty
folders left by a failed run, and a scan that says "not usable" exactly when training would refuse."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

import visiontune
from visiontune.cli import build_parser
from visiontune.errors import SplitError

SRC = Path(visiontune.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


def _commands() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def _flags_in_raises() -> dict[str, set[str]]:
    """{flag: files} for every --flag written in the message of a `raise` anywhere in the package."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for const in ast.walk(node.exc):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        for flag in FLAG.findall(const.value):
                            found.setdefault(flag, set()).add(path.name)
    return found


def test_every_flag_an_error_message_suggests_exists():
    known = set().union(*_commands().values())
    suggested = _flags_in_raises()
    assert "--min-per-split" in suggested and "--overwrite" in suggested  # the scan does find them
    missing = {flag: sorted(files) for flag, files in suggested.items() if flag not in known}
    assert not missing, f"error messages suggest flags no command has: {missing}"


def test_the_too_small_class_advice_works_on_train(tmp_path, make_classes, cli):
    root = make_classes(tmp_path / "small", {"a": 2, "b": 12})
    with pytest.raises(SplitError) as caught:
        visiontune.split(root, val=0.2, test=0.2, min_per_split=1, check=False)
    advice = FLAG.findall(str(caught.value))
    assert "--min-per-split" in advice and set(advice) <= _commands()["train"]
    done = cli("train", root, "--min-per-split", "0", "--views", "0", "--head-epochs", "1", "--epochs", "0",
               "--no-evaluate", "--out", tmp_path / "run", "--quiet")
    assert done.returncode == 0, done.stderr


def test_heic_photos_are_named(tmp_path):
    from visiontune.data.decode import decode
    from visiontune.errors import ImageDecodeError

    heic = tmp_path / "IMG_0001.HEIC"  # the start of an iPhone photo: an ISO media box of brand heic
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    with pytest.raises(ImageDecodeError, match="HEIC/HEIF photo: not supported by this install"):
        decode(heic)


def test_scan_calls_a_class_only_in_val_unusable_as_train_would(tmp_path, make_classes, cli):
    root = tmp_path / "given"
    make_classes(root / "train", {"a": 3, "b": 3})
    make_classes(root / "val", {"a": 2, "b": 2, "c": 2})
    scan = cli("scan", root)
    assert "NOT USABLE" in scan.stdout and "train lacks c" in scan.stdout, scan.stdout
    train = cli("train", root, "--out", tmp_path / "run", "--quiet")
    assert train.returncode == 2 and "train lacks c" in train.stderr


def test_a_failed_train_leaves_no_folder_behind(tmp_path, make_classes, cli, untouched):
    root = make_classes(tmp_path / "one", {"only": 4})
    out = tmp_path / "run"
    with untouched(root):
        done = cli("train", root, "--out", out, "--quiet")
    assert done.returncode == 2 and "only one class" in done.stderr
    assert not out.exists()
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("my file")
    done = cli("train", root, "--out", kept, "--quiet")
    assert done.returncode == 2 and (kept / "notes.txt").read_text() == "my file"  # a folder the user made stays
