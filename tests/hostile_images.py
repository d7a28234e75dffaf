"""Hostile image files, built byte by byte in the tests (Pillow, struct, zlib): each once stopped a whole
command with a traceback (issue 25), and a seeded mutator of real image bytes for the fuzz tests.

Every builder returns bytes; the pixels underneath are valid 64 x 48 noise, so a decoder that skips the hostile
part (as `decode` does with a bad EXIF tag) gets a usable image.
"""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
from PIL import Image

ORIENTATION, RESOLUTION_UNIT, X_RESOLUTION, MAKER_NOTE = 0x0112, 0x0128, 0x011A, 0x927C
SHORT, LONG, ASCII, UNDEFINED, SLONG = 3, 4, 2, 7, 9


def _noise(seed: int = 0) -> Image.Image:
    """64 wide, 48 high: an orientation that turns it shows in its size."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def tiff_ifd(entries: list[tuple[int, int, int, bytes]], tail: bytes = b"") -> bytes:
    """A big-endian TIFF header and one IFD of (tag, type, count, 4-byte value or offset) entries, then `tail`."""
    ifd = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HHI", *e[:3]) + e[3] for e in entries)
    return b"MM\0\x2a" + struct.pack(">I", 8) + ifd + b"\0\0\0\0" + tail


def _rotated(entry: tuple[int, int, int, bytes]) -> list[tuple[int, int, int, bytes]]:
    # Orientation 6 makes Pillow's exif_transpose write the block back, where the bad tag fails to pack.
    return [(ORIENTATION, SHORT, 1, struct.pack(">HH", 6, 0)), entry]


WRONG_TYPE_TAGS = {
    "long-too-big-for-short": (RESOLUTION_UNIT, LONG, 1, struct.pack(">I", 70000)),  # struct.error
    "negative-slong": (RESOLUTION_UNIT, SLONG, 1, struct.pack(">i", -7)),  # struct.error
    "text-for-a-rational": (X_RESOLUTION, ASCII, 4, b"abc\0"),  # TypeError
}


def wrong_type_exif_jpeg(kind: str = "long-too-big-for-short") -> bytes:
    exif = b"Exif\0\0" + tiff_ifd(_rotated(WRONG_TYPE_TAGS[kind]))
    out = io.BytesIO()
    _noise().save(out, "JPEG", exif=exif)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def big_exif_png(megabytes: int = 9) -> bytes:
    """A PNG with an eXIf chunk of `megabytes` MB: orientation 6, a maker note filling it, a bad-type tag."""
    size = megabytes << 20
    offset = 8 + 2 + 12 * 3 + 4  # where the maker note's bytes start: after the header and the 3-entry IFD
    exif = tiff_ifd([(ORIENTATION, SHORT, 1, struct.pack(">HH", 6, 0)),
                     (MAKER_NOTE, UNDEFINED, size, struct.pack(">I", offset)),
                     WRONG_TYPE_TAGS["long-too-big-for-short"]], b"\0" * size)
    out = io.BytesIO()
    _noise(1).save(out, "PNG")
    png = out.getvalue()
    return png[:33] + png_chunk(b"eXIf", exif) + png[33:]  # right after IHDR (8-byte signature + 25-byte chunk)


def bad_second_page_tiff() -> bytes:
    """A two-page TIFF whose second page claims photometric interpretation 99 (no such mode)."""
    out = io.BytesIO()
    _noise(2).save(out, "TIFF", save_all=True, append_images=[_noise(3)])
    data = bytearray(out.getvalue())
    order = "<" if data[:2] == b"II" else ">"
    first = struct.unpack(order + "I", data[4:8])[0]
    n = struct.unpack(order + "H", data[first:first + 2])[0]
    second = struct.unpack(order + "I", data[first + 2 + 12 * n:first + 6 + 12 * n])[0]
    for i in range(struct.unpack(order + "H", data[second:second + 2])[0]):
        entry = second + 2 + 12 * i
        if struct.unpack(order + "H", data[entry:entry + 2])[0] == 262:  # PhotometricInterpretation
            data[entry + 8:entry + 10] = struct.pack(order + "H", 99)
            return bytes(data)
    raise AssertionError("no PhotometricInterpretation tag on the second page")


def hostile_files() -> dict[str, bytes]:
    """File name -> bytes for every hostile file above."""
    files = {f"exif-{kind}.jpg": wrong_type_exif_jpeg(kind) for kind in WRONG_TYPE_TAGS}
    files["big-exif.png"] = big_exif_png()
    files["bad-second-page.tif"] = bad_second_page_tiff()
    return files


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation of real image bytes: flipped bytes, a cut, a repeated or removed span, or
    header fields set to extremes (the mutations that reach past the signature into the decoders)."""
    data = bytearray(data)
    how = rng.randrange(5)
    if how == 0:
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == 1:
        data = data[: rng.randrange(8, len(data))]
    elif how == 2:
        start = rng.randrange(len(data))
        span = data[start:start + rng.randint(1, 512)]
        data[start:start] = span * rng.randint(1, 8)
    elif how == 3:
        start = rng.randrange(len(data))
        del data[start:start + rng.randint(1, 256)]
    else:
        # Near the start lie the size, depth, and chunk / segment lengths: set a few to 0x00 or 0xff.
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(len(data), 256))] = rng.choice((0, 0xFF))
    return bytes(data)


def fuzz_seeds(photo: bytes) -> dict[str, bytes]:
    """Small real-photo bytes in every format the fuzz tests mutate."""
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    image.thumbnail((64, 64))
    seeds = {"jpeg": photo}
    for fmt, options in (("PNG", {}), ("TIFF", {}), ("WEBP", {"quality": 60}), ("GIF", {})):
        out = io.BytesIO()
        image.save(out, fmt, **options)
        seeds[fmt.lower()] = out.getvalue()
    progressive = io.BytesIO()
    image.save(progressive, "JPEG", progressive=True)
    seeds["progressive-jpeg"] = progressive.getvalue()
    return seeds


def icon_with_huge_png(side: int = 20000) -> bytes:
    """An .ico whose directory says 256 x 256 and whose PNG inside says side x side (its pixels left out: only
    a decoder that starts on it would find out, after allocating them)."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    png = b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + png_chunk(b"IEND", b"")
    directory = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)
    return directory + png


def many_scan_jpeg(scans: int = 2000) -> bytes:
    """A progressive JPEG of 4096 x 1024 (a smooth gradient, so each scan is a few kB) whose smallest scan is
    repeated until it has `scans` scans: each one is still a pass over every block."""
    ramp = np.linspace(0, 255, 4096, dtype=np.float32)
    pixels = np.stack([np.tile(ramp, (1024, 1)), np.tile(ramp[::-1], (1024, 1)), np.full((1024, 4096), 90.0)], 2)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "JPEG", progressive=True, quality=90)
    data = out.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"]
    spans = [(end - start, start, end) for start, end in zip(starts, starts[1:] + [len(data) - 2])]
    _, start, end = min(spans)
    return data[:end] + data[start:end] * (scans - len(starts)) + data[end:]
