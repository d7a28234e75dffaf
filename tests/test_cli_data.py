"""The installed `visiontune` console script, run as a user runs it: exit codes (0 usable, 2 unusable or a
user error), one-line errors with no traceback, `--json` with stable keys. No user file is ever changed.
"""

from __future__ import annotations

import csv
import io
import json
import shutil

import visiontune

SCAN_KEYS = ["source", "root", "layout", "files", "usable_images", "skipped_files", "classes", "task", "class_counts",
             "class_counts_per_split", "imbalance_ratio", "image_size", "formats", "exact_duplicate_groups",
             "near_duplicate_groups", "leaking_groups", "findings", "counts_by_level", "usable", "unusable_reason"]


def assert_one_line_error(proc, *needles: str) -> str:
    """Exit 2, one line on stderr starting with 'visiontune: error:', naming what is wrong; no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("visiontune: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_version(cli):
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"visiontune {visiontune.__version__}"


def test_scan_the_embedded_sample_by_name(cli, sample_root, untouched):
    with untouched(sample_root):
        proc = cli("scan", "flowers-mini", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "(class-folders)" in out and "files    150  usable 150  skipped 0" in out
    for name in ("daisy", "dandelion", "roses", "sunflowers", "tulips"):
        assert any(line.split() == [name, "30"] for line in out.splitlines()), name
    assert out.rstrip().endswith("usable: yes")


def test_scan_json_parses_and_has_stable_keys(cli, tmp_path, untouched, make_classes, photo):
    root = make_classes(tmp_path / "data", {"a": 3, "b": 3})
    (root / "a" / "notes.jpg").write_text("hello")
    shutil.copy(photo, root / "b" / "photo.jpg")
    with untouched(root):
        proc = cli("scan", root, "--json")
        again = cli("scan", root, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # nothing but the JSON on stdout (no progress bar)
    assert list(data) == SCAN_KEYS
    assert proc.stdout == again.stdout  # same input, same report
    assert data["layout"] == "class-folders" and data["classes"] == ["a", "b"]
    assert data["files"] == 8 and data["usable_images"] == 7 and data["skipped_files"] == 1
    assert data["class_counts"] == {"a": 3, "b": 4} and data["usable"] is True and data["unusable_reason"] is None
    assert data["formats"] == {"JPEG": 1, "PNG": 6}
    assert set(data["image_size"]) == {"width", "height"} and set(data["image_size"]["width"]) == {"min", "median", "max"}
    assert data["counts_by_level"] == {"error": 0, "warning": 1, "info": 0}
    [finding] = data["findings"]
    assert finding == {"level": "warning", "path": str(root / "a" / "notes.jpg"), "reason": "not an image (text)"}


def test_scan_lists_each_bad_file_with_its_reason_and_still_exits_0(cli, tmp_path, untouched, make_classes, photo):
    root = make_classes(tmp_path / "data", {"a": 3, "b": 3})
    (root / "a" / "empty.jpg").write_bytes(b"")
    data = photo.read_bytes()
    (root / "b" / "cut.jpg").write_bytes(data[: len(data) // 2])
    with untouched(root):
        proc = cli("scan", root, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"{root / 'a' / 'empty.jpg'}: zero-byte file" in proc.stdout
    assert f"{root / 'b' / 'cut.jpg'}: truncated or corrupt" in proc.stdout
    assert "WARNING (2)" in proc.stdout and "usable: yes" in proc.stdout


def test_scan_of_a_nonexistent_path_is_one_line_exit_2(cli, tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    proc = cli("scan", missing)
    assert_one_line_error(proc, str(missing))
    assert proc.stdout == ""


def test_scan_of_an_empty_class_folder_exits_2_with_the_reason(cli, tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"cats": 3, "dogs": 0})
    with untouched(root):
        text = cli("scan", root, "--quiet")
        as_json = cli("scan", root, "--json")
    assert text.returncode == 2 and "Traceback" not in text.stderr
    last = text.stdout.rstrip().splitlines()[-1]
    assert last.startswith("NOT USABLE: ") and "dogs" in last
    assert as_json.returncode == 2
    assert json.loads(as_json.stdout)["unusable_reason"] == last[len("NOT USABLE: "):]
    assert_one_line_error(as_json, "dogs")


def test_scan_of_one_class_exits_2(cli, tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"cats": 3})
    with untouched(root):
        proc = cli("scan", root, "--json")
    assert_one_line_error(proc, "only one class (cats)")
    assert json.loads(proc.stdout)["usable"] is False


def test_scan_strict_exits_1_on_leakage(cli, tmp_path, untouched, make_classes, photo):
    root = tmp_path / "data"
    make_classes(root / "train", {"a": 2, "b": 2})
    make_classes(root / "test", {"a": 1, "b": 1})
    shutil.copy(photo, root / "train" / "a" / "p.jpg")
    shutil.copy(photo, root / "test" / "a" / "p.jpg")
    with untouched(root):
        plain = cli("scan", root, "--quiet")
        strict = cli("scan", root, "--quiet", "--strict")
    assert plain.returncode == 0 and strict.returncode == 1
    assert "ERROR (1)" in plain.stdout and "leakage: exact duplicate across splits" in plain.stdout
    assert "1 crossing splits" in plain.stdout


def test_scan_manifest_with_a_bad_split_value_names_the_line(cli, tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"a": 2, "b": 2})
    manifest = root / "m.csv"
    manifest.write_text("path,label,split\na/000.png,a,train\na/001.png,a,tset\nb/000.png,b,test\n")
    with untouched(root):
        proc = cli("scan", manifest)
    assert_one_line_error(proc, f"{manifest}:3", "'tset'")


def test_scan_and_split_a_manifest_with_root(cli, tmp_path, untouched, make_classes):
    images = make_classes(tmp_path / "images", {"a": 5, "b": 5})
    manifest = tmp_path / "lists" / "labels.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label\n" + "".join(f"{c}/{i:03d}.png,{c}\n" for c in "ab" for i in range(5)))
    out = tmp_path / "out" / "split.csv"
    with untouched(images, manifest):
        scan = cli("scan", manifest, "--root", images, "--json")
        split = cli("split", manifest, "--root", images, "--val", "0.2", "--test", "0.2", "--out", out, "--quiet")
    assert scan.returncode == 0 and json.loads(scan.stdout)["usable_images"] == 10
    assert split.returncode == 0, split.stderr
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 10 and all((out.parent / r["path"]).resolve().is_file() for r in rows)


def test_split_output_is_byte_identical_across_runs_and_matches_the_api(cli, tmp_path, untouched, sample_root):
    outs = [tmp_path / f"run{i}.csv" for i in range(2)]
    with untouched(sample_root):
        for out in outs:
            proc = cli("split", "flowers-mini", "--val", "0.1", "--test", "0.1", "--seed", "4", "--out", out, "--quiet")
            assert proc.returncode == 0, proc.stderr
        stdout = cli("split", "flowers-mini", "--seed", "4", "--quiet")
        api_out = tmp_path / "api.csv"
        visiontune.split("flowers-mini", val=0.1, test=0.1, seed=4, out=api_out)
    assert outs[0].read_bytes() == outs[1].read_bytes() == api_out.read_bytes()
    rows = list(csv.DictReader(io.StringIO(stdout.stdout)))
    assert len(rows) == 150 and sorted({r["split"] for r in rows}) == ["test", "train", "val"]
    # On stdout, paths are relative to the dataset's root.
    assert all((sample_root / r["path"]).is_file() for r in rows)


def test_split_leaves_out_bad_images_and_lists_them_on_stderr(cli, tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"a": 10, "b": 10})
    (root / "a" / "notes.jpg").write_text("not a photo")
    (root / "b" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "split.csv"
    with untouched(root):
        proc = cli("split", root, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    left_out = sorted(line for line in proc.stderr.splitlines() if line.startswith("left out: "))
    assert left_out == [f"left out: {root / 'a' / 'notes.jpg'}: not an image (text)",
                        f"left out: {root / 'b' / 'empty.jpg'}: zero-byte file"]
    written = out.read_text()
    assert "notes.jpg" not in written and "empty.jpg" not in written
    assert len(written.splitlines()) == 21


def test_split_with_a_class_too_small_is_one_line_exit_2(cli, tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"plenty": 20, "rare": 2})
    out = tmp_path / "split.csv"
    with untouched(root):
        proc = cli("split", root, "--out", out, "--quiet")
        allowed = cli("split", root, "--out", out, "--min-per-split", "0")
    assert_one_line_error(proc, "'rare'", "2 usable image(s)")
    assert allowed.returncode == 0, allowed.stderr
    assert "note: class 'rare' (2 images) has none in val, test" in allowed.stderr
    assert f"wrote {out}" in allowed.stderr


def test_split_refuses_to_overwrite_the_dataset_manifest(cli, tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"a": 5, "b": 5})
    manifest = root / "labels.csv"
    manifest.write_text("path,label\n" + "".join(f"{c}/{i:03d}.png,{c}\n" for c in "ab" for i in range(5)))
    with untouched(root):
        proc = cli("split", manifest, "--out", manifest)
    assert_one_line_error(proc, "own manifest")


def test_split_with_differing_class_sets_is_one_line_exit_2(cli, tmp_path, untouched, make_classes):
    root = tmp_path / "data"
    make_classes(root / "train", {"a": 3, "b": 3})
    make_classes(root / "validation", {"a": 1, "c": 1})
    with untouched(root):
        proc = cli("split", root, "--quiet")
    assert_one_line_error(proc, "class sets differ", "train lacks c", "val lacks b")
