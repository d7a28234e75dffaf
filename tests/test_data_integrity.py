"""`scan`: every problem kind, made as a real file, reported with the right reason; conversions noted and
decoded correctly; duplicates, near-duplicates and leakage across splits. No user file is ever changed.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import visiontune
from visiontune.config import ScanConfig
from visiontune.data import dedup
from visiontune.data.decode import decode, decode_full
from visiontune.data.integrity import check_file
from visiontune.errors import ImageDecodeError

# --- files made by hand ------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def pixel_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming a huge RGB image, with a tiny IDAT: a few hundred bytes on disk."""
    return png_bytes(width, height, 8, 2, zlib.compress(b"\x00" * 64))


def rgb48_png(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return png_bytes(pixels.shape[1], pixels.shape[0], 16, 2, zlib.compress(rows))


def grey16_gradient(width: int = 64, height: int = 48) -> np.ndarray:
    """0 .. 65535 left to right, so the whole 16-bit range is used."""
    row = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    return np.tile(row, (height, 1))


def save_with_orientation(pixels: np.ndarray, path: Path, orientation: int | None) -> Path:
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif.tobytes())
    return path


def animated_gif(path: Path) -> Path:
    frames = [Image.new("RGB", (48, 40), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


# --- one messy dataset, scanned once -----------------------------------------------------------------

# file name -> the exact start of the reason it is skipped with
SKIPPED = {
    "truncated.jpg": "truncated or corrupt (image file is truncated",
    "truncated.png": "truncated or corrupt (image file is truncated",
    "notes.jpg": "not an image (text)",
    "empty.jpg": "zero-byte file",
    "bomb.png": "decompression bomb",
    "big_header.png": "decompression bomb: 10000x10000 = 100,000,000 pixels, over the limit of 89,478,485",
    "tiny.png": "too small: 20x20 px (shorter side under 32)",
    "archive.jpg": "not an image (a zip archive)",
    "garbage.jpg": "not an image (unrecognised content)",
    "header_only.jpg": "corrupt image header",
}
# file name -> the note it is used with
CONVERTED = {
    "cmyk.jpg": "converted from CMYK to RGB",
    "grey16.png": "converted from 16-bit greyscale to RGB",
    "rotated.jpg": "EXIF orientation 6 applied",
    "palette.png": "converted from palette to RGB",
    "grey.jpg": "converted from greyscale to RGB",
    "rgba.png": "converted from RGBA to RGB",
    "grey_alpha.png": "converted from greyscale+alpha to RGB",
    "animated.gif": "multi-frame (3 frames): first frame used",
}


@pytest.fixture(scope="module")
def messy(tmp_path_factory, photos, make_classes, untouched):
    """class folders `good/` (3 fine images) and `messy/` (every problem kind, each from a different photo)."""
    root = tmp_path_factory.mktemp("messy") / "data"
    make_classes(root, {"good": 3})
    m = root / "messy"
    m.mkdir()
    roses = iter(photos["roses"])
    whole = next(roses).read_bytes()
    (m / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    buffer = io.BytesIO()
    Image.open(next(roses)).save(buffer, "PNG")
    (m / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (m / "header_only.jpg").write_bytes(next(roses).read_bytes()[:300])
    (m / "notes.jpg").write_text("this was supposed to be a photo of a rose\n")
    (m / "empty.jpg").write_bytes(b"")
    (m / "bomb.png").write_bytes(pixel_bomb())
    (m / "big_header.png").write_bytes(png_bytes(10_000, 10_000, 8, 0, zlib.compress(b"\x00" * 64)))
    Image.open(next(roses)).resize((20, 20)).save(m / "tiny.png")
    (m / "archive.jpg").write_bytes(b"PK\x03\x04" + bytes(60))
    (m / "garbage.jpg").write_bytes(bytes(range(256)) * 4)
    Image.open(next(roses)).convert("CMYK").save(m / "cmyk.jpg")
    Image.fromarray(grey16_gradient()).save(m / "grey16.png")
    save_with_orientation(np.asarray(Image.open(next(roses))), m / "rotated.jpg", 6)
    Image.open(next(roses)).convert("P").save(m / "palette.png")
    Image.open(next(roses)).convert("L").save(m / "grey.jpg")
    Image.open(next(roses)).convert("RGBA").save(m / "rgba.png")
    Image.open(next(roses)).convert("LA").save(m / "grey_alpha.png")
    animated_gif(m / "animated.gif")
    # Recognised by content, not by name: a JPEG with no suffix and a PNG called .txt are images.
    shutil.copy(next(roses), m / "no_suffix")
    Image.open(next(roses)).save(m / "really_a_png.txt", "PNG")
    with untouched(root):
        report = visiontune.scan(root)
    return root, report


def reasons_by_name(report) -> dict[str, str]:
    return {Path(path).name: reason for path, reason in report.skipped()}


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_bad_file_is_skipped_with_its_reason(messy, name):
    root, report = messy
    reasons = reasons_by_name(report)
    assert reasons[name].startswith(SKIPPED[name]), reasons[name]
    assert "\n" not in reasons[name]
    # ... and listed as a warning finding with its full path.
    assert any(f.level == "warning" and f.path == str(root / "messy" / name) and f.reason == reasons[name]
               for f in report.findings)


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_converted_file_is_used_and_noted(messy, name):
    root, report = messy
    ds = report.dataset
    i = ds.paths.index(f"messy/{name}")
    assert report.usable[i]
    notes = [f for f in report.findings if f.path == str(root / "messy" / name)]
    assert any(f.level == "info" and f.reason == CONVERTED[name] for f in notes), notes


def test_scan_totals_for_the_messy_dataset(messy):
    root, report = messy
    data = report.to_dict()
    assert data["files"] == 3 + len(SKIPPED) + len(CONVERTED) + 2
    assert data["skipped_files"] == len(SKIPPED)
    assert data["usable_images"] == 3 + len(CONVERTED) + 2
    assert data["class_counts"] == {"good": 3, "messy": len(CONVERTED) + 2}
    assert data["formats"] == {"GIF": 1, "JPEG": 4, "PNG": 8}
    assert data["usable"] and report.unusable_reason is None
    # The images recognised by content, whatever their names say.
    ds = report.dataset
    assert report.usable[ds.paths.index("messy/no_suffix")] and report.usable[ds.paths.index("messy/really_a_png.txt")]
    # The EXIF-rotated photo is counted at its displayed size: width and height of the stored pixels swap.
    i = ds.paths.index("messy/rotated.jpg")
    stored_width, stored_height = Image.open(root / "messy" / "rotated.jpg").size
    assert stored_width != stored_height
    assert (report.widths[i], report.heights[i]) == (stored_height, stored_width)


def test_pixel_bomb_is_refused_before_decoding(tmp_path, untouched, write_noise):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(pixel_bomb())
    assert bomb.stat().st_size < 200
    with untouched(tmp_path):
        check = check_file(str(bomb))
        with pytest.raises(ImageDecodeError) as exc:
            decode(bomb)
    assert check.problem.startswith("decompression bomb") and "10,000,000,000" in check.problem
    assert "decompression bomb" in exc.value.reason
    # A lower --max-pixels refuses smaller images too.
    image = write_noise(tmp_path / "noise.png", size=64)
    assert check_file(str(image), ScanConfig(max_pixels=64 * 64 - 1)).problem.startswith("decompression bomb: 64x64")
    assert check_file(str(image), ScanConfig(max_pixels=64 * 64)).problem is None


def test_a_raised_max_pixels_is_honoured(tmp_path):
    # 15000 x 13000 = 195 M pixels: over Pillow's hard limit, under a user's --max-pixels 300000000.
    header = tmp_path / "large.png"
    header.write_bytes(png_bytes(15_000, 13_000, 8, 0, zlib.compress(b"\x00" * 64)))
    problem = check_file(str(header), ScanConfig(max_pixels=300_000_000)).problem
    # Allowed by size, it is then found truncated (its pixel data is a few bytes), not a bomb.
    assert not problem.startswith("decompression bomb"), problem


def test_16_bit_png_uses_the_full_range(tmp_path, untouched):
    path = tmp_path / "grey16.png"
    values = grey16_gradient()
    Image.fromarray(values).save(path)
    with untouched(tmp_path):
        decoded = decode_full(path)
    assert Image.open(path).mode == "I;16"
    assert decoded.notes == ["converted from 16-bit greyscale to RGB"]
    assert decoded.array.dtype == np.uint8 and decoded.array.shape == (48, 64, 3)
    row = decoded.array[0, :, 0]
    # Scaled, not clipped: 0 -> 0, 65535 -> 255, the middle near 128, never decreasing.
    assert row[0] == 0 and row[-1] == 255 and abs(int(row[len(row) // 2]) - 128) <= 2
    assert (np.diff(row.astype(int)) >= 0).all() and len(np.unique(row)) == 64
    assert np.array_equal(row, np.round(values[0] / 257).astype(np.uint8))
    assert (decoded.array == decoded.array[:, :, :1]).all()  # grey: R = G = B


def test_16_bit_rgb_png_uses_the_full_range(tmp_path):
    pixels = np.zeros((40, 40, 3), dtype=np.uint16)
    pixels[:, :20] = (65535, 32768, 0)
    pixels[:, 20:] = (0, 4096, 65535)
    path = tmp_path / "rgb48.png"
    path.write_bytes(rgb48_png(pixels))
    decoded = decode_full(path)
    assert tuple(decoded.array[0, 0]) == (255, 128, 0) and tuple(decoded.array[0, 39]) == (0, 16, 255)


def test_16_bit_rgb_png_conversion_is_noted(tmp_path):
    path = tmp_path / "rgb48.png"
    path.write_bytes(rgb48_png(np.full((40, 40, 3), 40000, dtype=np.uint16)))
    assert any("16-bit" in note for note in decode_full(path).notes)


def test_exif_orientation_6_transposes_the_pixels(tmp_path, untouched, photo):
    pixels = np.asarray(Image.open(photo))  # 240 rows x 207 columns
    upright = save_with_orientation(pixels, tmp_path / "upright.jpg", None)
    rotated = save_with_orientation(pixels, tmp_path / "rotated.jpg", 6)
    with untouched(tmp_path):
        plain, turned = decode_full(upright), decode_full(rotated)
        check = check_file(str(rotated))
    assert plain.notes == [] and turned.notes == ["EXIF orientation 6 applied"]
    assert plain.array.shape == (240, 207, 3) and turned.array.shape == (207, 240, 3)
    # Orientation 6: the stored image is shown turned 90 degrees clockwise.
    assert np.array_equal(turned.array, np.rot90(plain.array, k=-1))
    assert turned.size == (240, 207) and (check.width, check.height) == (240, 207)
    assert check.notes == ("EXIF orientation 6 applied",)
    # The fast scan decode (JPEG draft mode) turns it too: its perceptual hash is that of the turned photo.
    assert check.dhash != check_file(str(upright)).dhash


def test_cmyk_jpeg_decodes_to_the_right_colours(tmp_path, photo):
    path = tmp_path / "cmyk.jpg"
    Image.open(photo).convert("CMYK").save(path, quality=95)
    decoded = decode_full(path)
    assert Image.open(path).mode == "CMYK" and decoded.notes == ["converted from CMYK to RGB"]
    difference = np.abs(decoded.array.astype(int) - decode(photo).astype(int)).mean()
    assert difference < 6, difference  # not inverted, not garbled


def test_transparent_pixels_are_put_on_white(tmp_path):
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (200, 10, 10, 255)  # opaque red
    rgba[:, 20:] = (0, 0, 0, 0)  # fully transparent "black"
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    palette = Image.fromarray(rgba, "RGBA").quantize(colors=4)
    palette.save(tmp_path / "palette.png", transparency=palette.getpixel((30, 0)))
    for name in ("rgba.png", "palette.png"):
        decoded = decode_full(tmp_path / name)
        assert tuple(decoded.array[5, 5]) == (200, 10, 10), name
        assert tuple(decoded.array[5, 30]) == (255, 255, 255), name
    assert decode_full(tmp_path / "palette.png").notes == ["converted from palette to RGB"]


def test_greyscale_and_palette_decode_to_three_equal_or_mapped_channels(tmp_path, photo):
    Image.open(photo).convert("L").save(tmp_path / "grey.png")
    Image.open(photo).convert("P").save(tmp_path / "palette.png")
    grey = decode(tmp_path / "grey.png")
    assert grey.shape == (240, 207, 3) and (grey == grey[:, :, :1]).all()
    palette = decode(tmp_path / "palette.png")
    assert palette.shape == (240, 207, 3) and np.abs(palette.astype(int) - decode(photo).astype(int)).mean() < 12


def test_animated_gif_uses_its_first_frame(tmp_path):
    decoded = decode_full(animated_gif(tmp_path / "anim.gif"))
    assert decoded.notes[0] == "multi-frame (3 frames): first frame used"
    assert (decoded.array == (255, 0, 0)).all()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: root can read a chmod 000 file, so it cannot be made unreadable")
def test_unreadable_file_is_skipped_with_its_reason(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"a": 2, "b": 2})
    locked = root / "a" / "000.png"
    locked.chmod(0)
    try:
        with untouched(root):
            report = visiontune.scan(root)
        assert reasons_by_name(report) == {"000.png": "unreadable: permission denied"}
        assert report.class_counts == {"a": 1, "b": 2}
    finally:
        locked.chmod(0o644)


def test_a_class_whose_files_are_all_bad_makes_the_dataset_unusable(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"good": 2})
    (root / "bad").mkdir()
    (root / "bad" / "a.jpg").write_text("nope")
    (root / "bad" / "b.jpg").write_bytes(b"")
    with untouched(root):
        report = visiontune.scan(root)
    assert any(f.level == "error" and "class 'bad' has no usable image (2 file(s), all skipped)" in f.reason
               for f in report.findings)
    assert "bad" in report.unusable_reason


def test_class_balance_and_image_sizes(tmp_path, untouched, write_noise):
    root = tmp_path / "data"
    for i in range(4):
        write_noise(root / "big" / f"{i}.png", size=40 + 10 * i)  # 40, 50, 60, 70
    for i in range(2):
        write_noise(root / "small" / f"{i}.jpg", size=64)
    with untouched(root):
        data = visiontune.scan(root).to_dict()
    assert data["class_counts"] == {"big": 4, "small": 2}
    assert data["imbalance_ratio"] == 2.0
    assert data["image_size"] == {"width": {"min": 40, "median": 62.0, "max": 70},
                                  "height": {"min": 40, "median": 62.0, "max": 70}}
    assert data["formats"] == {"JPEG": 2, "PNG": 4}


# --- duplicates and leakage --------------------------------------------------------------------------


def test_exact_duplicates_within_a_class_are_a_warning(tmp_path, untouched, photos, make_classes):
    root = make_classes(tmp_path / "data", {"a": 2, "b": 2})
    shutil.copy(photos["tulips"][0], root / "a" / "one.jpg")
    shutil.copy(photos["tulips"][0], root / "a" / "copy.jpg")
    with untouched(root):
        report = visiontune.scan(root)
    assert report.to_dict()["exact_duplicate_groups"] == [["a/one.jpg", "a/copy.jpg"]] or \
        report.to_dict()["exact_duplicate_groups"] == [["a/copy.jpg", "a/one.jpg"]]
    [finding] = [f for f in report.findings if "duplicate" in f.reason]
    assert finding.level == "warning" and finding.reason.startswith("exact duplicate of")
    assert not report.leaks and report.unusable_reason is None


def test_exact_duplicate_with_two_labels_says_so(tmp_path, untouched, photos, make_classes):
    root = make_classes(tmp_path / "data", {"a": 1, "b": 1})
    shutil.copy(photos["tulips"][0], root / "a" / "x.jpg")
    shutil.copy(photos["tulips"][0], root / "b" / "x.jpg")
    with untouched(root):
        report = visiontune.scan(root)
    [finding] = [f for f in report.findings if "duplicate" in f.reason]
    assert "labelled differently: a, b" in finding.reason


def test_exact_duplicate_across_split_folders_is_leakage(tmp_path, untouched, photos, make_classes):
    root = tmp_path / "data"
    make_classes(root / "train", {"a": 2, "b": 2})
    make_classes(root / "test", {"a": 1, "b": 1})
    shutil.copy(photos["daisy"][3], root / "train" / "a" / "photo.jpg")
    shutil.copy(photos["daisy"][3], root / "test" / "a" / "same_photo.jpg")
    with untouched(root):
        report = visiontune.scan(root)
    data = report.to_dict()
    assert data["leaking_groups"] == [["train/a/photo.jpg", "test/a/same_photo.jpg"]]
    [leak] = [f for f in report.findings if "leakage" in f.reason]
    assert leak.level == "error"
    assert leak.reason == "leakage: exact duplicate across splits: train/a/photo.jpg [train] = test/a/same_photo.jpg [test]"
    assert data["counts_by_level"]["error"] == 1
    assert report.findings[0] == leak  # errors come first


def test_exact_duplicate_across_manifest_splits_is_leakage(tmp_path, untouched, photos, make_classes):
    root = tmp_path / "data"
    make_classes(root / "img", {"a": 2, "b": 2})
    shutil.copy(photos["roses"][5], root / "img" / "a" / "p.jpg")
    shutil.copy(photos["roses"][5], root / "img" / "a" / "p_copy.jpg")
    rows = ["path,label,split", "img/a/000.png,a,train", "img/a/001.png,a,val", "img/b/000.png,b,train",
            "img/b/001.png,b,val", "img/a/p.jpg,a,train", "img/a/p_copy.jpg,a,val"]
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    with untouched(root):
        report = visiontune.scan(root / "m.csv")
    assert report.to_dict()["leaking_groups"] == [["img/a/p.jpg", "img/a/p_copy.jpg"]]
    [leak] = [f for f in report.findings if f.level == "error"]
    assert leak.reason.startswith("leakage: exact duplicate across splits") and "[val]" in leak.reason


def reencode(photo: Path, path: Path, how: str) -> Path:
    image = Image.open(photo)
    if how == "quality":
        image.save(path, quality=35)
    else:  # slightly smaller, as a web thumbnail would be
        image.resize((image.width * 9 // 10, image.height * 9 // 10), Image.Resampling.LANCZOS).save(path, quality=90)
    return path


@pytest.mark.parametrize("how", ["quality", "resized"])
def test_near_duplicate_in_one_class_is_noted(tmp_path, untouched, photos, make_classes, how):
    root = make_classes(tmp_path / "data", {"a": 1, "b": 2})
    original = photos["sunflowers"][2]
    shutil.copy(original, root / "a" / "original.jpg")
    reencode(original, root / "a" / "again.jpg", how)
    with untouched(root):
        report = visiontune.scan(root)
    data = report.to_dict()
    assert data["exact_duplicate_groups"] == []
    assert [sorted(g) for g in data["near_duplicate_groups"]] == [["a/again.jpg", "a/original.jpg"]]
    [finding] = [f for f in report.findings if "duplicate" in f.reason]
    assert finding.level == "info" and finding.reason.startswith("near-duplicate of")


@pytest.mark.parametrize("how", ["quality", "resized"])
def test_near_duplicate_across_splits_is_leakage(tmp_path, untouched, photos, make_classes, how):
    root = tmp_path / "data"
    make_classes(root / "train", {"a": 2, "b": 2})
    make_classes(root / "validation", {"a": 1, "b": 1})
    original = photos["dandelion"][7]
    shutil.copy(original, root / "train" / "b" / "original.jpg")
    reencode(original, root / "validation" / "b" / "again.jpg", how)
    with untouched(root):
        report = visiontune.scan(root)
    [leak] = [f for f in report.findings if f.level == "error"]
    assert leak.reason.startswith("leakage: near-duplicate across splits")
    assert "[train]" in leak.reason and "[val]" in leak.reason
    assert report.unusable_reason is None  # usable, but an evaluation on it would be wrong


def test_different_photos_are_not_near_duplicates(photos, tmp_path, untouched, make_classes):
    # 30 real photos of one kind of flower: alike, but none is a near-duplicate of another.
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for p in photos["daisy"]:
        shutil.copy(p, root / "a" / p.name)
    make_classes(root, {"b": 2})
    with untouched(root):
        report = visiontune.scan(root)
    assert report.exact_duplicates == [] and report.near_duplicates == []


def on_backdrop(photo: Path, path: Path) -> Path:
    """A photo cut out as an ellipse and put on a flat magenta backdrop, the way a shop photographs its goods."""
    item = Image.open(photo).convert("RGB")
    item.thumbnail((60, 60))
    mask = Image.new("L", item.size, 0)
    ImageDraw.Draw(mask).ellipse((0, 0, item.width - 1, item.height - 1), fill=255)
    canvas = Image.new("RGB", (240, 300), (230, 40, 200))
    canvas.paste(item, ((240 - item.width) // 2, (300 - item.height) // 2), mask)
    canvas.save(path, quality=85)
    return path


def test_different_things_on_one_backdrop_are_not_near_duplicates(tmp_path, untouched, photos):
    # 10 different photos on one magenta backdrop: their 64-bit hashes are within 4 bits of each other (the hash
    # alone made them one group, an error across splits), their 32 x 32 thumbnails tell them apart. A re-encoded
    # copy of one of them in test is still a near-duplicate, and the leakage error names that real crossing.
    root = tmp_path / "shop"
    for k, cls in enumerate(["daisy", "dandelion", "roses", "sunflowers", "tulips"]):
        for j in range(2):
            (root / "train" / cls).mkdir(parents=True, exist_ok=True)
            on_backdrop(photos[cls][j], root / "train" / cls / f"{j}.jpg")
        (root / "test" / cls).mkdir(parents=True)
        on_backdrop(photos[cls][5], root / "test" / cls / "other.jpg")
    reencode(root / "train" / "roses" / "1.jpg", root / "test" / "roses" / "again.jpg", "resized")
    with untouched(root):
        report = visiontune.scan(root)
    dataset = report.dataset
    hashes = np.array([dedup.difference_hash(np.asarray(Image.open(dataset.abspath(i)).convert("RGB").reduce(2)))
                       for i in range(len(dataset))], dtype=np.uint64)
    assert len(dedup.near_groups(hashes, report.usable, 4, [])[0]) >= 8  # what the hash alone grouped
    assert report.to_dict()["near_duplicate_groups"] == [["train/roses/1.jpg", "test/roses/again.jpg"]]
    [leak] = [f for f in report.findings if f.level == "error"]
    assert leak.reason == ("leakage: near-duplicate across splits: train/roses/1.jpg [train] = "
                           "test/roses/again.jpg [test]")


def test_a_leakage_example_is_a_real_crossing_and_a_big_group_is_one_short_line(tmp_path, untouched, photos,
                                                                               make_classes):
    root = tmp_path / "data"
    make_classes(root / "train", {"a": 2, "b": 2})
    make_classes(root / "test", {"a": 1, "b": 1})
    for name in ("p1", "p2", "p3", "p4", "p5"):
        shutil.copy(photos["tulips"][4], root / "train" / "a" / f"{name}.jpg")
    shutil.copy(photos["tulips"][4], root / "test" / "a" / "q.jpg")
    with untouched(root):
        report = visiontune.scan(root)
    [group] = report.to_dict()["leaking_groups"]
    assert len(group) == 6  # --json keeps every member
    [leak] = [f for f in report.findings if f.level == "error"]
    pair, rest = leak.reason.split("; ")
    assert pair.startswith("leakage: exact duplicate across splits: ")
    assert pair.count("[train]") == 1 and pair.count("[test]") == 1  # a train copy = the test copy, not two in train
    assert rest.startswith("4 more in the group: ") and rest.endswith(" and 1 more (see --json)")
    split = visiontune.split(root)[0]
    [warning] = [n for n in split.notes if n.startswith("warning:")]
    named = re.search(r"\(e\.g\. (\S+) in (\w+) and (\S+) in (\w+)\)", warning)
    assert named and named[2] != named[4], warning  # two files in different splits, not two in train
    where = {split.dataset.paths[i]: int(split.assignment[i]) for i in range(len(split.dataset))}
    assert where[named[1]] != where[named[3]]


# --- things on disk that are not regular files -------------------------------------------------------


def test_dangling_symlink_is_skipped_with_its_reason(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"a": 2, "b": 2})
    (root / "a" / "moved.jpg").symlink_to(tmp_path / "elsewhere" / "moved.jpg")
    with untouched(root):
        report = visiontune.scan(root)
    assert reasons_by_name(report) == {"moved.jpg": "file not found"}
    assert report.class_counts == {"a": 2, "b": 2}


def test_symlinked_folder_loop_is_reported_not_followed_forever(tmp_path, untouched, make_classes):
    root = make_classes(tmp_path / "data", {"a": 2, "b": 2})
    (root / "a" / "again").symlink_to(root / "a")
    with untouched(root):
        report = visiontune.scan(root)
    assert report.class_counts == {"a": 2, "b": 2}
    assert any("symlink loop" in f.reason for f in report.findings)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_in_a_class_folder_does_not_hang_the_scan(tmp_path, untouched, make_classes):
    import threading

    root = make_classes(tmp_path / "data", {"a": 2, "b": 2})
    fifo = root / "a" / "pipe.jpg"
    os.mkfifo(fifo)
    result: dict = {}
    with untouched(root):
        worker = threading.Thread(target=lambda: result.update(report=visiontune.scan(root, config=ScanConfig(workers=1))))
        worker.start()
        worker.join(timeout=5)  # four tiny images take milliseconds
        hung = worker.is_alive()
        if hung:  # unblock the reader (it then sees an empty file) so the test can end
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(timeout=10)
    assert not hung, "scan blocked reading a named pipe"
    report = result["report"]
    assert report.class_counts == {"a": 2, "b": 2}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16", "CMYK"])
@pytest.mark.parametrize("size", [(300, 200), (180, 640), (224, 224), (60, 900)])
def test_the_model_crop_is_the_centre_of_the_resized_image_whatever_the_mode(mode, size):
    # `load_for_model` crops before the resized image becomes an array; it must be exactly the centre of
    # `load_resized`'s array, which training caches (and the edge padding of a side left short).
    from visiontune.data.loader import load_for_model, load_resized
    from visiontune.data.transforms import Preprocess, center_crop

    rgb = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    image = image.convert("I;16") if mode == "I;16" else image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
    spec = Preprocess(224, 0.875, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    for source in (buffer.getvalue(), rgb):
        np.testing.assert_array_equal(load_for_model(source, spec), center_crop(load_resized(source, spec), 224))
