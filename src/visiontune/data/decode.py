"""The one way an image becomes an RGB uint8 array: training, evaluation, prediction and serving all call
`decode`, so preprocessing can never differ between them.

JPEGs are decoded with draft mode (DCT scaling) when a target size is known: libjpeg still reads every
coefficient, so truncation is still detected, but skips most of the inverse transform.
"""

from __future__ import annotations

import io
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from visiontune.config import ScanConfig
from visiontune.data.headers import check_before_open, check_shape, decode_pixels
from visiontune.errors import ImageDecodeError

# visiontune's own pixel limit (`max_pixels`, checked from the header before decoding) is the one that
# counts; Pillow's fixed one would refuse images a user allowed with --max-pixels.
Image.MAX_IMAGE_PIXELS = None

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray]



def describe_source(source: ImageSource, index: int) -> str:
    """How a message names an image: its path, or its type and position for an in-memory one."""
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__} #{index}>"


_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Bytes that identify common non-image files, so "not an image" can say what the file is instead.
_SIGNATURES = [
    (b"PK\x03\x04", "a zip archive"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"<!DOCTYPE html", "an HTML page"),
    (b"<html", "an HTML page"),
]


@dataclass
class Decoded:
    """A decoded image and what had to be done to make it RGB (each note is one short phrase)."""

    image: Image.Image  # RGB: resized and cropped as it is, it costs no array round trip (copies) first
    size: tuple[int, int]  # (width, height) at full resolution, after EXIF orientation
    format: str
    notes: list[str] = field(default_factory=list)

    @property
    def array(self) -> np.ndarray:  # H x W x 3, uint8
        return np.asarray(self.image, dtype=np.uint8)


def read_bytes(path: Union[str, Path]) -> bytes:
    """Read a regular file, turning the OS's errors into one-line reasons.

    Opened non-blocking and checked to be a regular file first: a named pipe or device in a dataset
    must be reported, not waited on forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ImageDecodeError(str(path), "not a regular file (a pipe, socket or device)")
            return fh.read()
    except PermissionError:
        raise ImageDecodeError(str(path), "unreadable: permission denied") from None
    except FileNotFoundError:
        raise ImageDecodeError(str(path), "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(str(path), "is a folder, not an image") from None
    except OSError as exc:
        raise ImageDecodeError(str(path), f"unreadable: {exc.strerror or exc}") from None


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def describe_non_image(data: bytes) -> str:
    if data[4:8] == b"ftyp":  # ISO media: an iPhone's HEIC photo, an AVIF, or a video
        brand = data[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIC/HEIF photo: not supported by this install (convert it to JPEG or PNG)"
        if brand in (b"avif", b"avis"):
            return "AVIF image: not supported by this install (convert it to JPEG or PNG)"
        return "not an image (a video or other ISO media file)"
    head = data[:64].lstrip()
    for magic, what in _SIGNATURES:
        if head[: len(magic)].lower() == magic.lower():
            return f"not an image ({what})"
    try:
        data[:4096].decode("utf-8")
        return "not an image (text)"
    except UnicodeDecodeError:
        return "not an image (unrecognised content)"


def decode_full(
    source: ImageSource,
    *,
    draft: int | None = None,
    max_pixels: int = ScanConfig.max_pixels,
    max_aspect: float = ScanConfig.max_aspect,
    where: str | None = None,
    max_jpeg_scans: int = ScanConfig.max_jpeg_scans,
) -> Decoded:
    """Decode `source` to RGB, noting every conversion. Raises ImageDecodeError with a reason.

    `draft`: the shorter side the caller will resize to; JPEGs are then decoded at the smallest
    DCT scale that still covers it (never smaller), which is several times faster for large photos.
    """
    if isinstance(source, np.ndarray):
        rgb = _array_to_rgb(source, where or "array")
        check_shape(*_array_size(source), where or "array", max_pixels, max_aspect)
        return Decoded(Image.fromarray(rgb), _array_size(source), "array")
    if isinstance(source, Image.Image):
        where = where or "image"
        with unreadable_as_decode_error(where):
            return _decode_pil(source, draft=None, max_pixels=max_pixels, max_aspect=max_aspect, where=where)
    if isinstance(source, (str, Path)):
        where = where or str(source)
        data = read_bytes(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        where = where or "bytes"
        data = bytes(source)
    else:
        raise TypeError(f"cannot decode an image from {type(source).__name__}")
    if not data:
        raise ImageDecodeError(where, "zero-byte file")
    with unreadable_as_decode_error(where):
        check_before_open(data, where, max_pixels=max_pixels, max_aspect=max_aspect, max_jpeg_scans=max_jpeg_scans)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageDecodeError(where, describe_non_image(data)) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(where, f"corrupt image header ({exc})") from None
        return _decode_pil(image, draft=draft, max_pixels=max_pixels, max_aspect=max_aspect, where=where)


@contextmanager
def unreadable_as_decode_error(where: str) -> Iterator[None]:
    """Whatever a decoder raises on one file's bytes becomes that file's ImageDecodeError.

    Pillow's plugins raise nearly any type on hostile input (struct.error from an EXIF tag of the wrong type,
    SyntaxError from a TIFF page with no known mode, TypeError, IndexError, MemoryError...): listing the types
    has missed some before, and one of them escaping stops a whole scan, training run or server request.
    """
    try:
        yield
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - see above: the type says nothing about a bug here, the bytes do
        text = " ".join(str(exc).split())[:160]
        raise ImageDecodeError(where, f"unreadable image ({type(exc).__name__}{': ' + text if text else ''})") from None


def decode_cost(data: bytes, *, draft: int | None = None, max_pixels: int = ScanConfig.max_pixels,
                max_aspect: float = ScanConfig.max_aspect, where: str = "bytes") -> int:
    """Pixels decoding `data` will hold, from its header alone (no decoder runs); raises ImageDecodeError for what
    `decode_full` would refuse from the header. A server charges this against its pixel budget first."""
    if not data:
        raise ImageDecodeError(where, "zero-byte file")
    with unreadable_as_decode_error(where):
        check_before_open(data, where, max_pixels=max_pixels, max_aspect=max_aspect,
                          max_jpeg_scans=ScanConfig.max_jpeg_scans)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageDecodeError(where, describe_non_image(data)) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(where, f"corrupt image header ({exc})") from None
        width, height = image.size
        check_shape(width, height, where, max_pixels, max_aspect)
        return decode_pixels(width, height, image.format or "", draft)


def decode(source: ImageSource, *, draft: int | None = None, max_pixels: int = ScanConfig.max_pixels) -> np.ndarray:
    """Decode `source` (path, bytes, PIL image or array) to an H x W x 3 uint8 RGB array."""
    return decode_full(source, draft=draft, max_pixels=max_pixels).array


def _decode_pil(image: Image.Image, *, draft: int | None, max_pixels: int, max_aspect: float, where: str) -> Decoded:
    width, height = image.size
    check_shape(width, height, where, max_pixels, max_aspect)
    notes: list[str] = []
    # Read before anything else touches the image: n_frames and getexif() can reset a PNG's tile list.
    if image.mode in ("RGB", "RGBA") and image.tile and ";16" in str(image.tile[0].args):
        notes.append(f"converted from 16-bit {image.mode} to 8-bit RGB")
    fmt = image.format or "unknown"
    frames = _frame_count(image)
    if frames is None:
        notes.append("multi-frame with an unreadable later frame: first frame used")
    elif frames > 1:
        notes.append(f"multi-frame ({frames} frames): first frame used")
    orientation = _exif_orientation(image)
    if draft and fmt == "JPEG":
        image.draft("RGB", (draft, draft))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(where, f"truncated or corrupt ({exc})") from None
    if orientation in _ORIENTATION_TRANSPOSE:
        # Not ImageOps.exif_transpose: it writes the EXIF block back, and a tag of the wrong type in it
        # (a LONG where a SHORT belongs) then raises struct.error on a photo whose pixels are fine.
        image = image.transpose(_ORIENTATION_TRANSPOSE[orientation])
        notes.append(f"EXIF orientation {orientation} applied")
        if orientation in (5, 6, 7, 8):
            width, height = height, width
    mode = image.mode
    try:
        rgb = _to_rgb(image)
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(where, f"cannot convert {mode} to RGB ({exc})") from None
    if mode != "RGB":
        notes.append(f"converted from {_describe_mode(mode)} to RGB")
    return Decoded(rgb, (width, height), fmt, notes)


# EXIF orientation -> the transpose that shows the image upright (the table ImageOps.exif_transpose uses).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _frame_count(image: Image.Image) -> int | None:
    """How many frames (pages) the file holds; None when counting them failed on a later one (a TIFF whose
    second page has no known mode): the first is then still decoded, as for any multi-frame file."""
    try:
        return getattr(image, "n_frames", 1)
    except Exception:  # noqa: BLE001 - any plugin error on a later frame; the first is checked when loaded
        image.seek(0)
        return None


# A camera's EXIF fits in one 64 KiB JPEG segment; a PNG eXIf chunk has no bound, and parsing megabytes of
# tags costs seconds of CPU for the one number read from it.
_MAX_EXIF_BYTES = 1 << 20


def _exif_orientation(image: Image.Image) -> int | None:
    raw = image.info.get("exif")
    if isinstance(raw, (bytes, bytearray)) and len(raw) > _MAX_EXIF_BYTES:
        return None
    try:
        value = image.getexif().get(0x0112)
    except Exception:  # a malformed EXIF block must not make a good image unreadable
        return None
    return value if isinstance(value, int) else None  # a tag of the wrong type (text, several values): ignored


def _describe_mode(mode: str) -> str:
    names = {"L": "greyscale", "P": "palette", "CMYK": "CMYK", "RGBA": "RGBA", "LA": "greyscale+alpha",
             "PA": "palette+alpha", "1": "1-bit", "I": "32-bit integer", "F": "32-bit float", "YCbCr": "YCbCr"}
    if mode in _SIXTEEN_BIT_MODES:
        return "16-bit greyscale"
    return names.get(mode, mode)


_BAND_ROWS = 256


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # Pillow's own convert() clips 16-bit values at 255; scale the full range instead, a band of rows at a
        # time: float arrays of the whole image took 1.5 GB for one 81 MP PNG, and a server decodes several.
        values = np.asarray(image)
        peak = 65535.0 if (mode in _SIXTEEN_BIT_MODES or values.max() > 255) else 255.0
        grey = np.empty(values.shape[:2], dtype=np.uint8)
        for top in range(0, len(values), _BAND_ROWS):
            band = values[top:top + _BAND_ROWS].astype(np.float32)
            grey[top:top + _BAND_ROWS] = np.clip(band * (255.0 / peak) + 0.5, 0, 255)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        # Transparent pixels carry arbitrary colour; put them on white, as a viewer would show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_size(array: np.ndarray) -> tuple[int, int]:
    return (int(array.shape[1]), int(array.shape[0])) if array.ndim >= 2 else (0, 0)


def _array_to_rgb(array: np.ndarray, where: str) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageDecodeError(where, f"expected an H x W x 3 array, got shape {tuple(array.shape)}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        array = array[:, :, :3]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and float(np.nanmax(array)) <= 1.0:
            array = array * 255.0
        array = np.clip(array, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)
