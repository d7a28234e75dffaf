"""`split`: stratified, reproducible byte for byte, clear about classes too small or inconsistent, never
including a bad image, and written as a manifest that loads back. No user file is ever changed.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import visiontune
from visiontune.data.index import SPLITS, load_dataset
from visiontune.errors import ConfigError, DatasetError, SplitError


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def absolute_rows(ds) -> list[tuple[str, str, str]]:
    return sorted((str(ds.abspath(i).resolve()), ds.classes[ds.labels[i]], SPLITS[ds.splits[i]]) for i in range(len(ds)))


def test_stratified_counts_on_the_sample(sample_root, untouched, tmp_path):
    out = tmp_path / "split.csv"
    with untouched(sample_root):
        result, report = visiontune.split("flowers-mini", val=0.1, test=0.1, seed=0, out=out)
    assert report.usable.all()
    assert result.counts() == {name: {"train": 24, "val": 3, "test": 3}
                               for name in ("daisy", "dandelion", "roses", "sunflowers", "tulips")}
    rows = read_rows(out)
    assert len(rows) == 150 and list(rows[0]) == ["path", "label", "split"]
    for name in ("daisy", "tulips"):
        of_class = [r["split"] for r in rows if r["label"] == name]
        assert (of_class.count("train"), of_class.count("val"), of_class.count("test")) == (24, 3, 3)
    # Each file once; the folder name is the label.
    assert len({r["path"] for r in rows}) == 150
    assert all(Path(r["path"]).parent.name == r["label"] for r in rows)


def test_uneven_classes_are_split_per_class(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"many": 40, "some": 20, "few": 10})
    with untouched(root):
        result, _ = visiontune.split(root, val=0.2, test=0.1, seed=3)
    assert result.counts() == {"few": {"train": 7, "val": 2, "test": 1},
                               "many": {"train": 28, "val": 8, "test": 4},
                               "some": {"train": 14, "val": 4, "test": 2}}


def test_same_seed_gives_byte_identical_output(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"a": 12, "b": 9, "c": 15})
    first, second, other = tmp_path / "out" / "first.csv", tmp_path / "out" / "second.csv", tmp_path / "out" / "other.csv"
    with untouched(root):
        visiontune.split(root, seed=7, out=first)
        visiontune.split(root, seed=7, out=second)
        visiontune.split(root, seed=8, out=other)
    assert first.read_bytes() == second.read_bytes()
    # A different seed picks different files for val and test (with the same counts).
    assert first.read_bytes() != other.read_bytes()
    a, b = read_rows(first), read_rows(other)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert sorted(r["split"] for r in a) == sorted(r["split"] for r in b)


def test_class_too_small_is_an_error_naming_it_and_its_count(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"plenty": 20, "rare": 2})
    with untouched(root), pytest.raises(SplitError) as exc:
        visiontune.split(root, val=0.1, test=0.1)
    message = one_line(exc)
    assert "'rare'" in message and "2 usable image(s)" in message and "--min-per-split 0" in message
    assert "plenty" not in message


def test_min_per_split_zero_allows_a_small_class_and_reports_it(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"plenty": 20, "rare": 2})
    out = tmp_path / "split.csv"
    with untouched(root):
        result, _ = visiontune.split(root, val=0.1, test=0.1, min_per_split=0, out=out)
    assert result.counts()["rare"] == {"train": 2, "val": 0, "test": 0}
    assert result.counts()["plenty"] == {"train": 16, "val": 2, "test": 2}
    assert any("'rare'" in note and "none in val, test" in note for note in result.notes)
    assert sum(r["label"] == "rare" for r in read_rows(out)) == 2


def test_a_single_image_class_with_min_per_split_zero_stays_in_train(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"plenty": 10, "one": 1})
    with untouched(root):
        result, _ = visiontune.split(root, val=0.5, test=0.3, min_per_split=0)
    assert result.counts()["one"] == {"train": 1, "val": 0, "test": 0}


@pytest.mark.parametrize("val, test, needle", [(1.0, 0.1, "split.val: val 1.0 + test 0.1 leave nothing to train on"),
                                               (-0.1, 0.1, "split.val: -0.1 is below 0"),
                                               (0.1, 1.5, "split.test: 1.5 is above 1"),
                                               (0.6, 0.4, "leave nothing to train on")])
def test_impossible_fractions_are_clear_errors(tmp_path, make_classes, val, test, needle):
    root = make_classes(tmp_path / "data", {"a": 5, "b": 5})
    with pytest.raises(ConfigError) as exc:
        visiontune.split(root, val=val, test=test, check=False)
    assert needle in one_line(exc)


def test_unusable_dataset_cannot_be_split(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"only": 5})
    out = tmp_path / "split.csv"
    with untouched(root), pytest.raises(DatasetError) as exc:
        visiontune.split(root, out=out)
    assert "only one class" in one_line(exc)
    assert not out.exists()


def test_given_splits_are_kept(tmp_path, untouched, make_classes):
    root = tmp_path / "data"
    make_classes(root / "train", {"a": 4, "b": 4})
    make_classes(root / "valid", {"a": 1, "b": 1})
    make_classes(root / "test", {"a": 1, "b": 2})
    with untouched(root):
        result, _ = visiontune.split(root, seed=1)
    ds = result.dataset
    assert (result.assignment == ds.splits).all()
    assert result.notes == ["kept the splits the dataset came with"]


def test_class_sets_differing_between_given_splits_is_an_error_naming_them(tmp_path, untouched, make_classes):
    root = tmp_path / "data"
    make_classes(root / "train", {"cat": 3, "dog": 3})
    make_classes(root / "val", {"cat": 1, "dog": 1, "fox": 1})  # fox is in val but not in train
    make_classes(root / "test", {"cat": 1})  # dog and fox are missing from test
    with untouched(root), pytest.raises(DatasetError) as exc:  # the scan says so first, as `scan` itself does
        visiontune.split(root)
    message = one_line(exc)
    assert "class sets differ" in message
    assert "train lacks fox" in message and "test lacks dog, fox" in message
    with pytest.raises(SplitError, match="train lacks fox"):  # unscanned, the split itself refuses alike
        visiontune.split(root, check=False)


def test_train_and_test_folders_get_val_carved_out_of_train(tmp_path, untouched, make_classes):
    root = tmp_path / "data"
    make_classes(root / "train", {"a": 20, "b": 10})
    make_classes(root / "test", {"a": 3, "b": 3})
    with untouched(root):
        result, _ = visiontune.split(root, val=0.1, test=0.1, seed=0)
    ds = result.dataset
    assert result.counts() == {"a": {"train": 18, "val": 2, "test": 3}, "b": {"train": 9, "val": 1, "test": 3}}
    # The test split is exactly the given test folder; val comes only from the given train folder.
    assigned = {ds.paths[i]: SPLITS[result.assignment[i]] for i in range(len(ds))}
    assert {p for p, s in assigned.items() if s == "test"} == {p for p in ds.paths if p.startswith("test/")}
    assert all(p.startswith("train/") for p, s in assigned.items() if s == "val")
    assert any("carved val" in note for note in result.notes)


def test_bad_images_are_left_out_and_listed(tmp_path, untouched, make_classes, photo):
    root = make_classes(tmp_path / "data", {"a": 10, "b": 10})
    (root / "a" / "notes.jpg").write_text("not a photo")
    (root / "b" / "empty.png").write_bytes(b"")
    data = photo.read_bytes()
    (root / "b" / "cut.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "split.csv"
    with untouched(root):
        result, report = visiontune.split(root, out=out)
    written = {r["path"] for r in read_rows(tmp_path / "split.csv")}
    assert len(written) == 20
    bad = {"data/a/notes.jpg", "data/b/empty.png", "data/b/cut.jpg"}
    assert not bad & written
    assert {Path(p).name: reason.split(" (")[0] for p, reason in report.skipped()} == {
        "notes.jpg": "not an image", "empty.png": "zero-byte file", "cut.jpg": "truncated or corrupt"}
    # Left out, never deleted.
    assert all((tmp_path / p).exists() for p in bad)


def test_written_split_loads_back_as_a_manifest(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"a": 10, "b": 10, "c": 10})
    out = tmp_path / "elsewhere" / "deeper" / "split.csv"  # paths must be relative to the CSV's folder
    with untouched(root):
        result, _ = visiontune.split(root, seed=5, out=out)
        back = load_dataset(out)
    assert back.layout == "manifest" and back.has_splits and len(back) == 30
    assert read_rows(out)[0]["path"].startswith("../../data/")
    original = result.dataset
    expected = sorted((str(original.abspath(i).resolve()), original.classes[original.labels[i]],
                       SPLITS[result.assignment[i]]) for i in range(len(original)))
    assert absolute_rows(back) == expected
    # Splitting the loaded manifest again keeps its splits and writes the same rows.
    with untouched(root, out):
        again, _ = visiontune.split(out, seed=99, out=tmp_path / "again.csv")
    assert again.notes == ["kept the splits the dataset came with"]
    assert absolute_rows(load_dataset(tmp_path / "again.csv")) == expected


def test_split_of_a_manifest_with_root_loads_back(tmp_path, untouched, make_classes):
    images = make_classes(tmp_path / "images", {"a": 6, "b": 6})
    rows = ["path,label"] + [f"{c}/{i:03d}.png,{c}" for c in "ab" for i in range(6)]
    manifest = tmp_path / "lists" / "labels.csv"
    manifest.parent.mkdir()
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out" / "split.csv"
    with untouched(images, manifest):
        result, _ = visiontune.split(manifest, root=images, val=0.2, test=0.2, out=out)
        back = load_dataset(out)
    assert {str(back.abspath(i).resolve()) for i in range(len(back))} == \
        {str((images / f"{c}/{i:03d}.png").resolve()) for c in "ab" for i in range(6)}
    assert result.counts() == {"a": {"train": 4, "val": 1, "test": 1}, "b": {"train": 4, "val": 1, "test": 1}}


def test_out_pointing_at_the_dataset_manifest_is_refused(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"a": 6, "b": 6})
    manifest = root / "labels.csv"
    manifest.write_text("path,label\n" + "".join(f"{c}/{i:03d}.png,{c}\n" for c in "ab" for i in range(6)))
    with untouched(root):
        for out in (manifest, root / "a" / ".." / "labels.csv"):
            with pytest.raises(SplitError) as exc:
                visiontune.split(manifest, out=out)
            assert "own manifest" in one_line(exc)


def test_out_pointing_at_one_of_the_images_is_refused(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"a": 6, "b": 6})
    with untouched(root), pytest.raises(SplitError) as exc:
        visiontune.split(root, out=root / "a" / "000.png")
    assert "own files" in one_line(exc)


def test_no_check_keeps_every_file(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"a": 10, "b": 10})
    (root / "a" / "notes.jpg").write_text("not a photo")
    with untouched(root):
        result, report = visiontune.split(root, check=False)
    assert report is None
    assert (result.assignment >= 0).sum() == 21


def test_split_indices_partition_the_usable_files(sample_root, untouched):
    with untouched(sample_root):
        result, _ = visiontune.split("flowers-mini", seed=11, check=False)
    parts = [result.indices(s) for s in SPLITS]
    joined = np.sort(np.concatenate(parts))
    assert np.array_equal(joined, np.arange(150))
    assert [len(p) for p in parts] == [120, 15, 15]


def test_duplicate_photos_stay_in_one_split_and_the_split_says_so(tmp_path, make_classes, cli):
    # Two identical copies of each of 10 photos per class: without grouping, pairs land on different sides.
    root = make_classes(tmp_path / "dups", {"a": 10, "b": 10})
    for png in sorted(root.rglob("*.png")):
        (png.parent / f"copy-{png.name}").write_bytes(png.read_bytes())
    out = tmp_path / "split.csv"
    done = cli("split", root, "--val", "0.2", "--test", "0.2", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "20 duplicate image(s) put in the split of their first copy" in done.stderr
    rows = {r["path"]: r["split"] for r in csv.DictReader(open(out))}
    pairs = [(p, "/copy-".join(p.rsplit("/", 1))) for p in rows if "copy-" not in p]
    assert len(pairs) == 20 and all(rows[a] == rows[b] for a, b in pairs)
    assert {"train", "val", "test"} <= set(rows.values())
    strict = cli("scan", out, "--strict")
    assert strict.returncode == 0 and "20 exact group(s), 0 near group(s), 0 crossing splits" in strict.stdout


def test_given_splits_that_cross_duplicates_are_warned_about(tmp_path, make_classes):
    from visiontune.data.index import load_dataset
    from visiontune.data.integrity import scan_dataset
    from visiontune.data.split import split_dataset

    root = tmp_path / "given"
    for split in ("train", "val", "test"):
        make_classes(root / split, {"a": 3, "b": 3})
    (root / "test" / "a" / "twin.png").write_bytes((root / "train" / "a" / "000.png").read_bytes())
    dataset = load_dataset(root)
    report = scan_dataset(dataset, quiet=True)
    notes = split_dataset(dataset, report.usable, duplicates=report.exact_duplicates).notes
    assert any(n.startswith("warning: 1 group(s) of duplicate images cross the given splits") for n in notes), notes
