"""What a file will cost to decode, read from its bytes before any decoder runs: its pixel count and shape (the
images inside an icon included) and a progressive JPEG's number of scans.

Pillow's ICO reader decodes the largest image inside `Image.open` itself, before any size can be checked: an
.ico whose directory says 256 px but holds a 20000 x 20000 PNG took 1.6 GB there. And libjpeg decodes a
progressive JPEG once per scan: a 787 KB file with ~9,400 scans cost 88 s of one core.
"""

from __future__ import annotations

import struct

from visiontune.errors import ImageDecodeError

_PNG = b"\x89PNG\r\n\x1a\n"
_SOS = b"\xff\xda"  # start of scan: in entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker


def check_shape(width: int, height: int, where: str, max_pixels: int, max_aspect: float) -> None:
    """Refuse, from the header alone, what would take far more memory than its file size suggests."""
    if width * height > max_pixels:
        raise ImageDecodeError(
            where, f"decompression bomb: {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
        )
    if min(width, height) < 1:
        raise ImageDecodeError(where, f"empty image ({width}x{height})")
    if max(width, height) > max_aspect * min(width, height):
        raise ImageDecodeError(where, f"extreme aspect ratio: {width}x{height} is over {max_aspect:g}:1 (scaled to "
                                      f"the model's size its long side would need gigabytes)")


def check_before_open(data: bytes, where: str, *, max_pixels: int, max_aspect: float, max_jpeg_scans: int) -> None:
    """Raise ImageDecodeError for what no decoder should start on: an icon holding an image over the limits, or a
    JPEG with more than `max_jpeg_scans` scans (a baseline JPEG has one, a progressive one about ten)."""
    if data[:4] in (b"\0\0\1\0", b"\0\0\2\0"):  # ICO, CUR
        for width, height in icon_sizes(data):
            check_shape(width, height, where, max_pixels, max_aspect)
    elif data[:2] == b"\xff\xd8":
        scans = jpeg_scans(data)
        if scans > max_jpeg_scans:
            raise ImageDecodeError(where, f"JPEG with {scans:,} scans, over the limit of {max_jpeg_scans:,} (each scan "
                                          f"is a pass over the whole image: decoding it would take minutes)")


def jpeg_scans(data: bytes) -> int:
    """How many scans a JPEG holds. The segments before the first scan (EXIF, ICC profile, XMP: megabytes of
    anything) are stepped over by their lengths; after it, only entropy-coded data and small tables follow, where
    the bytes FF DA mean a scan."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return 0  # not a marker where one belongs: the decoder will say what is wrong
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return 1 + data.count(_SOS, pos + 2)
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return 0


def icon_sizes(data: bytes) -> list[tuple[int, int]]:
    """The real size of every image in an ICO/CUR file, from the PNG or BMP header each entry points at (its
    directory's own width and height are one byte each, and need not match)."""
    count = struct.unpack_from("<H", data, 4)[0]
    sizes = []
    for i in range(count):
        entry = 6 + 16 * i
        if entry + 16 > len(data):
            break
        offset = struct.unpack_from("<I", data, entry + 12)[0]
        if data[offset:offset + 8] == _PNG and offset + 24 <= len(data):
            sizes.append(struct.unpack_from(">II", data, offset + 16))
        elif offset + 12 <= len(data):  # a BMP's DIB header: its height counts the image and its mask
            width, height = struct.unpack_from("<ii", data, offset + 4)
            sizes.append((abs(width), abs(height) // 2))
    return sizes


def decode_pixels(width: int, height: int, fmt: str, draft: int | None) -> int:
    """Pixels a decoder will hold for an image of this header size: a JPEG with a `draft` target is decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) whose shorter side still covers it."""
    if fmt == "JPEG" and draft:
        scale = 1
        while scale < 8 and min(width, height) // (scale * 2) >= draft:
            scale *= 2
        return -(-width // scale) * -(-height // scale)
    return width * height
