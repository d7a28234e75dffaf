"""No file can stop a command: hostile files built in the test (issue 25) and seeded mutations of real image
bytes go through `decode`, `scan`, `split`, `train` and `predict`; each is that file's reason, never a traceback."""

from __future__ import annotations

import json
import os
import random
import shutil
import time

import pytest

from hostile_images import bad_second_page_tiff, big_exif_png, fuzz_seeds, hostile_files, mutate, wrong_type_exif_jpeg
from visiontune.data.decode import decode_full
from visiontune.errors import ImageDecodeError


@pytest.mark.parametrize("kind", ["long-too-big-for-short", "negative-slong", "text-for-a-rational"])
def test_an_exif_tag_of_the_wrong_type_does_not_stop_the_orientation(kind):
    decoded = decode_full(wrong_type_exif_jpeg(kind))
    assert decoded.size == (48, 64) and decoded.image.size == (48, 64)  # 64 x 48 turned by orientation 6
    assert "EXIF orientation 6 applied" in decoded.notes


def test_a_png_with_a_9_mb_exif_chunk_decodes_fast():
    start = time.perf_counter()
    decoded = decode_full(big_exif_png(9))
    assert decoded.image.size in ((64, 48), (48, 64))
    assert time.perf_counter() - start < 2.0  # the maker note is not parsed tag by tag


def test_a_tiff_whose_second_page_is_broken_gives_its_first_page():
    decoded = decode_full(bad_second_page_tiff())
    assert decoded.image.size == (64, 48)
    assert any("unreadable later frame" in note for note in decoded.notes)


def test_seeded_fuzz_of_real_image_bytes_through_decode(photo):
    """300 seeded mutations of one real photo in six formats: every one decodes or raises ImageDecodeError,
    and none takes long (the whole test is a few seconds)."""
    start = time.perf_counter()
    outcomes = {"decoded": 0, "refused": 0}
    for fmt, data in fuzz_seeds(photo.read_bytes()).items():
        rng = random.Random(f"visiontune-{fmt}")
        for case in range(50):
            mutated = mutate(data, rng)
            t0 = time.perf_counter()
            try:
                decode_full(mutated, draft=64, where=f"{fmt}-{case}")
                outcomes["decoded"] += 1
            except ImageDecodeError:
                outcomes["refused"] += 1
            assert time.perf_counter() - t0 < 5.0, f"{fmt} case {case} took {time.perf_counter() - t0:.1f} s"
    assert outcomes["decoded"] and outcomes["refused"], outcomes
    assert time.perf_counter() - start < 60


@pytest.fixture(scope="module")
def hostile_dataset(tmp_path_factory, photos):
    """Two classes of real photos; one holds every hostile file and a photo whose name is not UTF-8."""
    root = tmp_path_factory.mktemp("hostile") / "data"
    for name in ("daisy", "roses"):
        (root / name).mkdir(parents=True)
        for p in photos[name][:8]:
            shutil.copy(p, root / name / p.name)
    for name, data in hostile_files().items():
        (root / "daisy" / name).write_bytes(data)
    shutil.copy(photos["daisy"][9], os.fsencode(root / "daisy") + b"/caf\xe9.jpg")
    return root


def test_scan_lists_every_hostile_file_and_goes_on(cli, hostile_dataset, untouched):
    with untouched(hostile_dataset):
        result = cli("scan", hostile_dataset, "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    by_path = {f["path"].rsplit("/", 1)[-1]: f["reason"] for f in report["findings"]}
    assert "not valid UTF-8" in by_path["caf\\xe9.jpg"]
    assert report["usable_images"] == 16 + 5  # the photos, and every hostile file's first image


def test_split_and_train_and_predict_a_folder_holding_hostile_files(cli, hostile_dataset, tmp_path):
    split = tmp_path / "split.csv"
    result = cli("split", hostile_dataset, "--out", split)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "caf" not in split.read_text(encoding="utf-8")  # left out, listed instead of half-written
    run = tmp_path / "run"
    result = cli("train", hostile_dataset, "--out", run, "--views", "1", "--head-epochs", "2",
                 "--epochs", "0", "--no-evaluate", "--quiet", timeout=600)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    out = tmp_path / "predictions.json"
    result = cli("predict", run, hostile_dataset / "daisy", "--format", "json", "--out", out)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    text = out.read_text(encoding="utf-8")
    for name in hostile_files():
        assert name in text


def test_an_icon_holding_a_huge_png_is_refused_before_any_decoder_runs():
    from hostile_images import icon_with_huge_png

    data = icon_with_huge_png(20000)
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="decompression bomb: 20000x20000"):
        decode_full(data)
    assert time.perf_counter() - start < 0.5


def test_a_jpeg_with_thousands_of_scans_is_refused_from_its_markers(photo):
    from hostile_images import many_scan_jpeg
    from visiontune.data.headers import jpeg_scans

    data = many_scan_jpeg(2000)
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="JPEG with 2,000 scans, over the limit of 100"):
        decode_full(data)
    assert time.perf_counter() - start < 0.5
    seeds = fuzz_seeds(photo.read_bytes())
    assert jpeg_scans(seeds["jpeg"]) == 1 and 5 <= jpeg_scans(seeds["progressive-jpeg"]) <= 12
    decode_full(seeds["progressive-jpeg"])  # a real progressive JPEG is well under the limit
    with pytest.raises(ImageDecodeError, match="scans"):  # the limit is a setting
        decode_full(seeds["progressive-jpeg"], max_jpeg_scans=3)
