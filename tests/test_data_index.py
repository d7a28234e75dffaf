"""Indexing: the three input layouts, hidden files, manifests, and the embedded sample.

Real files under tmp_path; every test that indexes or scans checks that no user file changed.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

import visiontune
from visiontune.data.index import NO_SPLIT, SPLITS, load_dataset
from visiontune.errors import DatasetError, VisiontuneError


def write_manifest(path: Path, rows: list[tuple], header: tuple = ("path", "label", "split")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def split_names(ds) -> list[str]:
    return [SPLITS[s] if s != NO_SPLIT else "-" for s in ds.splits]


# --- the embedded sample -----------------------------------------------------------------------------


def test_sample_has_five_classes_of_thirty_photos_and_its_attribution(sample_root, untouched):
    assert sample_root == visiontune.samples.path("flowers-mini")
    with untouched(sample_root):
        ds = load_dataset("flowers-mini")  # by name, as the CLI takes it
        report = visiontune.scan("flowers-mini")
    assert ds.root == sample_root and ds.layout == "class-folders"
    assert ds.classes == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert ds.class_counts() == {name: 30 for name in ds.classes}
    assert report.unusable_reason is None and report.usable.all()
    assert report.formats == {"JPEG": 150}
    assert not report.exact_duplicates and not report.near_duplicates
    attribution = (sample_root / "ATTRIBUTION.md").read_text()
    assert "CC BY 2.0" in attribution
    # Every photo is credited by its file name.
    for rel in ds.paths:
        assert Path(rel).name in attribution, rel


def test_unknown_sample_name_is_a_dataset_error():
    with pytest.raises(DatasetError) as exc:
        visiontune.samples.path("no-such-sample")
    assert "no-such-sample" in one_line(exc) and "flowers-mini" in str(exc.value)


# --- class folders -----------------------------------------------------------------------------------


def test_class_folders_with_nested_subfolders(tmp_path, untouched, write_noise):
    root = tmp_path / "pets"
    for rel in ["cats/a.png", "cats/2019/b.png", "cats/2019/june/c.jpg", "cats/2020/d.png",
                "dogs/x.png", "dogs/inside/y.png"]:
        write_noise(root / rel)
    with untouched(root):
        ds = load_dataset(root)
        report = visiontune.scan(root)
    assert ds.layout == "class-folders" and not ds.has_splits
    assert ds.classes == ["cats", "dogs"]
    assert sorted(ds.paths) == ["cats/2019/b.png", "cats/2019/june/c.jpg", "cats/2020/d.png", "cats/a.png",
                                "dogs/inside/y.png", "dogs/x.png"]
    assert {p: ds.classes[label] for p, label in zip(ds.paths, ds.labels)}["cats/2019/june/c.jpg"] == "cats"
    assert (ds.splits == NO_SPLIT).all()
    assert report.class_counts == {"cats": 4, "dogs": 2}
    assert report.unusable_reason is None and not report.findings


def test_index_order_is_stable_and_class_names_sort_naturally(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "numbered", {"10": 1, "2": 1, "1": 2, "Zebra": 1, "apple": 1})
    with untouched(root):
        first, second = load_dataset(root), load_dataset(root)
    assert first.classes == ["1", "2", "10", "apple", "Zebra"]
    assert first.paths == second.paths and (first.labels == second.labels).all()


def test_hidden_files_and_folders_are_ignored(tmp_path, untouched, write_noise, make_classes):
    root = make_classes(tmp_path / "data", {"cats": 2, "dogs": 2})
    write_noise(root / ".git" / "objects" / "x.png")  # a hidden top-level folder: not a class
    write_noise(root / ".cache" / "y.png")
    write_noise(root / "__MACOSX" / "cats" / "._000.png")  # macOS zip debris
    (root / "cats" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "cats" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_noise(root / "cats" / ".thumbnails" / "t.png")
    (root / ".hidden_file.jpg").write_text("not even an image")
    with untouched(root):
        ds = load_dataset(root)
        report = visiontune.scan(root)
    assert ds.classes == ["cats", "dogs"]
    assert sorted(ds.paths) == ["cats/000.png", "cats/001.png", "dogs/000.png", "dogs/001.png"]
    assert report.usable.all() and not report.findings


def test_loose_files_next_to_class_folders_are_reported_and_ignored(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"a": 1, "b": 1})
    (root / "README.txt").write_text("my dataset")
    (root / "labels.csv").write_text("path,label\na/000.png,a\n")
    with untouched(root):
        ds = load_dataset(root)
    assert len(ds) == 2
    [finding] = ds.findings
    assert finding.level == "info" and "2 file(s) at the top level" in finding.reason
    assert "labels.csv" in finding.reason  # hints that the manifest could be passed instead


def test_empty_class_folder_is_an_error_and_makes_the_dataset_unusable(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"cats": 2, "dogs": 2, "ferrets": 0})
    (root / "ferrets" / ".DS_Store").write_bytes(b"hidden files do not count")
    with untouched(root):
        report = visiontune.scan(root)
    assert report.dataset.classes == ["cats", "dogs", "ferrets"]
    assert any(f.level == "error" and "class 'ferrets' has no files" in f.reason for f in report.findings)
    assert "ferrets" in report.unusable_reason and "\n" not in report.unusable_reason


def test_one_class_is_unusable(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"cats": 3})
    with untouched(root):
        report = visiontune.scan(root)
    assert "only one class (cats)" in report.unusable_reason


def test_empty_folder_is_unusable(tmp_path, untouched):
    root = tmp_path / "nothing"
    (root / ".keep").parent.mkdir()
    (root / ".keep").write_text("")
    with untouched(root):
        report = visiontune.scan(root)
    assert "no files found" in report.unusable_reason


def test_nonexistent_path_is_a_one_line_dataset_error(tmp_path):
    missing = tmp_path / "not" / "here"
    with pytest.raises(DatasetError) as exc:
        load_dataset(missing)
    assert str(missing) in one_line(exc)
    with pytest.raises(VisiontuneError):
        visiontune.scan(missing)


def test_a_plain_file_is_not_a_dataset(tmp_path, photo):
    with pytest.raises(DatasetError) as exc:
        load_dataset(photo)
    assert ".jpg" in one_line(exc) and "CSV manifest" in str(exc.value)


# --- split folders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "Validation"])
def test_split_folders_with_val_aliases(tmp_path, untouched, make_classes, val_name):
    root = tmp_path / "data"
    make_classes(root / "train", {"a": 3, "b": 3})
    make_classes(root / val_name, {"a": 1, "b": 1})
    make_classes(root / "test", {"a": 1, "b": 2})
    with untouched(root):
        ds = load_dataset(root)
        report = visiontune.scan(root)
    assert ds.layout == "split-folders" and ds.has_splits
    assert ds.classes == ["a", "b"]
    by_split = {s: sorted(p for p, k in zip(ds.paths, split_names(ds)) if k == s) for s in SPLITS}
    assert by_split["val"] == [f"{val_name}/a/000.png", f"{val_name}/b/000.png"]
    assert len(by_split["train"]) == 6 and len(by_split["test"]) == 3
    assert report.to_dict()["class_counts_per_split"] == {
        "train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 2}}


def test_split_folders_with_nested_subfolders_and_train_test_only(tmp_path, untouched, write_noise):
    root = tmp_path / "data"
    for rel in ["train/a/x/1.png", "train/a/2.png", "train/b/y/z/3.png", "train/b/4.png", "test/a/5.png", "test/b/6.png"]:
        write_noise(root / rel)
    with untouched(root):
        ds = load_dataset(root)
    assert ds.layout == "split-folders"
    assert dict(zip(ds.paths, split_names(ds))) == {
        "train/a/2.png": "train", "train/a/x/1.png": "train", "train/b/4.png": "train",
        "train/b/y/z/3.png": "train", "test/a/5.png": "test", "test/b/6.png": "test"}


def test_a_class_folder_named_like_a_split_alone_is_just_a_class(tmp_path, untouched, make_classes):
    # Only "train" (no second split folder): these are two classes, "train" and "other".
    root = make_classes(tmp_path / "data", {"train": 2, "other": 2})
    with untouched(root):
        ds = load_dataset(root)
    assert ds.layout == "class-folders" and ds.classes == ["other", "train"]


def test_two_folders_for_the_same_split_are_not_silently_dropped(tmp_path, untouched, make_classes):
    root = tmp_path / "data"
    for split in ("train", "valid", "validation", "test"):
        make_classes(root / split, {"a": 1, "b": 1})
    with untouched(root):
        try:
            ds = load_dataset(root)
        except DatasetError as exc:  # refusing, naming both folders, is fine too
            assert "valid" in str(exc) and "validation" in str(exc)
            return
    assert len(ds) == 8, sorted(ds.paths)


# --- CSV manifests -----------------------------------------------------------------------------------


def test_manifest_paths_relative_to_the_csv(tmp_path, untouched, write_noise):
    root = tmp_path / "project"
    for rel in ["images/001.png", "images/002.png", "images/sub/003.png", "images/004.png"]:
        write_noise(root / rel)
    csv_path = write_manifest(root / "labels.csv", [("images/001.png", "cat"), ("images/002.png", "dog"),
                                                    ("images/sub/003.png", "cat"), ("images/004.png", "dog")],
                              header=("path", "label"))
    with untouched(root):
        ds = load_dataset(csv_path)
        report = visiontune.scan(csv_path)
    assert ds.layout == "manifest" and ds.root == root and ds.source == csv_path
    assert ds.paths == ["images/001.png", "images/002.png", "images/sub/003.png", "images/004.png"]
    assert [ds.classes[i] for i in ds.labels] == ["cat", "dog", "cat", "dog"]
    assert not ds.has_splits and (ds.splits == NO_SPLIT).all()
    assert report.class_counts == {"cat": 2, "dog": 2} and report.unusable_reason is None


def test_manifest_paths_relative_to_a_given_root(tmp_path, untouched, write_noise):
    images = tmp_path / "images"
    for rel in ["a/1.png", "a/2.png", "b/3.png", "b/4.png"]:
        write_noise(images / rel)
    csv_path = write_manifest(tmp_path / "lists" / "split.csv", [
        ("a/1.png", "ant", "train"), ("b/3.png", "bee", "train"), ("a/2.png", "ant", "test"), ("b/4.png", "bee", "test")])
    with untouched(tmp_path):
        ds = load_dataset(csv_path, root=images)
        report = visiontune.scan(csv_path, root=images)
    assert ds.root == images and ds.has_splits
    assert split_names(ds) == ["train", "train", "test", "test"]
    assert report.usable.all() and report.to_dict()["class_counts_per_split"] == {
        "train": {"ant": 1, "bee": 1}, "test": {"ant": 1, "bee": 1}}
    # Without --root the same relative paths point next to the CSV, where nothing is: all missing.
    with untouched(tmp_path):
        alone = load_dataset(csv_path)
    assert len(alone) == 0 and len(alone.findings) == 4


def test_manifest_labels_win_over_folder_names(tmp_path, untouched, write_noise):
    # Like oxford102: folders are numbers, the manifest says what the flowers are.
    root = tmp_path / "flowers"
    rows = []
    for folder, label in (("1", "pink primrose"), ("2", "hard-leaved pocket orchid"), ("3", "pink primrose")):
        for i in range(2):
            write_noise(root / "jpg" / folder / f"{i}.png")
            rows.append((f"jpg/{folder}/{i}.png", label, "train" if i == 0 else "valid"))
    csv_path = write_manifest(root / "split_train.csv", rows)
    with untouched(root):
        ds = load_dataset(csv_path)
        report = visiontune.scan(csv_path)
    assert ds.classes == ["hard-leaved pocket orchid", "pink primrose"]
    assert ds.class_counts() == {"hard-leaved pocket orchid": 2, "pink primrose": 4}
    assert set(split_names(ds)) == {"train", "val"}  # "valid" is read as val
    assert report.unusable_reason is None


def test_manifest_row_for_a_missing_file_is_a_warning(tmp_path, untouched, write_noise):
    root = tmp_path / "data"
    write_noise(root / "a.png")
    write_noise(root / "b.png")
    write_noise(root / "c.png")
    csv_path = write_manifest(root / "m.csv", [("a.png", "x"), ("gone.png", "x"), ("b.png", "y"), ("c.png", "x")],
                              header=("path", "label"))
    with untouched(root):
        report = visiontune.scan(csv_path)
    assert report.dataset.paths == ["a.png", "b.png", "c.png"]
    [missing] = [f for f in report.findings if "gone.png" in f.path]
    assert missing.level == "warning" and "missing" in missing.reason and "line 3" in missing.reason
    assert report.unusable_reason is None


def test_manifest_row_listed_twice_is_a_warning(tmp_path, untouched, write_noise):
    root = tmp_path / "data"
    for name in ("a.png", "b.png"):
        write_noise(root / name)
    csv_path = write_manifest(root / "m.csv", [("a.png", "x"), ("b.png", "y"), ("a.png", "y")], header=("path", "label"))
    with untouched(root):
        ds = load_dataset(csv_path)
    assert ds.paths == ["a.png", "b.png"] and ds.classes == ["x", "y"]
    assert any("listed twice" in f.reason and "line 4" in f.reason for f in ds.findings)


def test_manifest_with_a_bad_split_value_names_the_line(tmp_path, untouched, write_noise):
    root = tmp_path / "data"
    for name in ("a.png", "b.png", "c.png"):
        write_noise(root / name)
    csv_path = write_manifest(root / "m.csv", [("a.png", "x", "train"), ("b.png", "y", "trian"), ("c.png", "y", "test")])
    with untouched(root), pytest.raises(DatasetError) as exc:
        visiontune.scan(csv_path)
    message = one_line(exc)
    assert f"{csv_path}:3" in message and "'trian'" in message


@pytest.mark.parametrize("content, needle", [
    ("file,class\na.png,x\n", "'path' and 'label'"),
    ("", "'path' and 'label'"),
    ("path,label,split\na.png,x,train\nb.png,y\n", ":3: expected 3 columns"),
    ("path,label\na.png,\n", ":2: empty path or label"),
    ("path,label,split\na.png,x,train\nb.png,y,\n", ":3: unknown split ''"),  # a split on some rows only
])
def test_malformed_manifest_is_a_clear_error(tmp_path, untouched, write_noise, content, needle):
    root = tmp_path / "data"
    write_noise(root / "a.png")
    write_noise(root / "b.png")
    csv_path = root / "m.csv"
    csv_path.write_text(content)
    with untouched(root), pytest.raises(DatasetError) as exc:
        load_dataset(csv_path)
    assert needle in one_line(exc) and "m.csv" in str(exc.value)


def test_manifest_columns_in_any_order_with_bom_and_blank_lines(tmp_path, untouched, write_noise):
    root = tmp_path / "data"
    for name in ("a.png", "b.png"):
        write_noise(root / name)
    csv_path = root / "m.csv"
    csv_path.write_text("\ufeffSplit,Label,Path,notes\ntrain,x,a.png,first\n\ntest,y,b.png,\n", encoding="utf-8")
    with untouched(root):
        ds = load_dataset(csv_path)
    assert ds.paths == ["a.png", "b.png"] and ds.classes == ["x", "y"]
    assert split_names(ds) == ["train", "test"]
    assert np.array_equal(ds.labels, [0, 1])


def test_dataset_error_messages_say_where(tmp_path):
    for source in (tmp_path / "missing.csv", tmp_path / "nope"):
        with pytest.raises(DatasetError, match=re.escape(str(source))):
            load_dataset(source)


def test_the_untouched_guard_notices_any_change(tmp_path, untouched, make_classes):
    import os

    root = make_classes(tmp_path / "data", {"a": 2})
    image = root / "a" / "000.png"
    for change in (lambda: os.utime(image, ns=(0, 0)),  # same bytes, new mtime
                   lambda: image.write_bytes(image.read_bytes()[:-1]),
                   lambda: (root / "a" / "new.txt").write_text("x"),
                   lambda: (root / "a" / "001.png").unlink()):
        with pytest.raises(AssertionError, match="user files were"):
            with untouched(root):
                change()


def test_symlinks_out_of_a_class_folder_do_not_relabel_another_class(tmp_path, make_classes, cli):
    root = make_classes(tmp_path / "linked", {"daisy": 3, "roses": 3})
    (root / "daisy" / "loop").symlink_to("..")  # would make every rose a daisy too
    (root / "daisy" / "again.png").symlink_to(root / "roses" / "000.png")  # the same file under another label
    outside = make_classes(tmp_path / "library", {"extra": 2})
    (root / "roses" / "more").symlink_to(outside / "extra")  # a folder of the user's elsewhere: outside the class
    dataset = load_dataset(root)
    assert sorted(dataset.paths) == [f"{c}/{i:03d}.png" for c in ("daisy", "roses") for i in range(3)]
    reasons = {Path(f.path).name: f.reason for f in dataset.findings}
    assert "outside its class folder" in reasons["loop"] and "outside its class folder" in reasons["more"]
    assert "counted once" in reasons["again.png"]
    done = cli("scan", root)
    assert done.returncode == 0 and "usable 6" in done.stdout and "not followed" in done.stdout, done.stdout


def test_a_symlinked_file_from_outside_the_dataset_is_a_normal_member(tmp_path, make_classes):
    library = make_classes(tmp_path / "library", {"all": 2})
    root = tmp_path / "data"
    for k, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        (root / name / "photo.png").symlink_to(library / "all" / f"{k:03d}.png")
    assert sorted(load_dataset(root).paths) == ["a/photo.png", "b/photo.png"]


def test_a_latin1_manifest_from_excel_reads(tmp_path, make_classes):
    root = make_classes(tmp_path / "data", {"crème": 2, "rosé": 2})
    rows = ["path,label"] + [f"{p.relative_to(root).as_posix()},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    manifest = root / "labels.csv"
    manifest.write_bytes(("\r\n".join(rows) + "\r\n").encode("cp1252"))
    dataset = load_dataset(manifest)
    assert dataset.classes == ["crème", "rosé"] and len(dataset) == 4


def test_undecodable_and_oversized_manifests_are_one_line_errors(tmp_path, make_classes):
    root = make_classes(tmp_path / "data", {"a": 1})
    binary = root / "binary.csv"
    binary.write_bytes(b"path,label\n" + bytes(range(128, 256)) * 4 + b",a\n")
    with pytest.raises(DatasetError, match=r"binary.csv:2: not UTF-8 or Windows-1252 text"):
        load_dataset(binary)
    huge = root / "huge.csv"
    huge.write_text("path,label\n" + "a/000.png," + "x" * 200_000 + "\n")
    with pytest.raises(DatasetError, match=r"huge.csv:2: not a readable CSV \(field larger than field limit"):
        load_dataset(huge)
