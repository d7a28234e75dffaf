"""Decode once: every image a model sees goes through `load_resized` (decode with JPEG draft + resize of
the shorter side to the model's resize size). Training caches its output; inference calls it per image."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from visiontune.config import ScanConfig
from visiontune.data.decode import ImageSource, decode_full, describe_source, read_bytes, unreadable_as_decode_error
from visiontune.data.parallel import parallel_map
from visiontune.data.transforms import Preprocess, center_crop, resized_for_crop
from visiontune.errors import ImageDecodeError


def load_resized(source: ImageSource, spec: Preprocess, max_pixels: int = ScanConfig.max_pixels) -> np.ndarray:
    """uint8 RGB with the shorter side at `spec.resize_size`: the common start of training and inference."""
    return np.asarray(_resized_image(source, spec, max_pixels))


def load_for_model(source: ImageSource, spec: Preprocess, max_pixels: int = ScanConfig.max_pixels) -> np.ndarray:
    """The uint8 input_size x input_size crop the model is evaluated on: `load_resized`'s centre, cropped before
    the resized image becomes an array (a third less CPU per image than copying it whole first: it is most of a
    served request's cost besides the model)."""
    return center_crop(_resized_image(source, spec, max_pixels), spec.input_size)


def _resized_image(source: ImageSource, spec: Preprocess, max_pixels: int):
    decoded = decode_full(source, draft=spec.resize_size, max_pixels=max_pixels)  # path, bytes, PIL or array
    with unreadable_as_decode_error(describe_source(source, 0)):  # a resize can still run out of memory
        return resized_for_crop(decoded.image, spec)


@dataclass
class DecodedSet:
    images: list[np.ndarray | None]
    digests: list[str] = field(default_factory=list)  # content digest per file ("" where it failed)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)


def _load_one(args: tuple[str, Preprocess]) -> tuple[np.ndarray, str] | str:
    path, spec = args
    try:
        data = read_bytes(path)
        return load_resized(data, spec), hashlib.blake2b(data, digest_size=16).hexdigest()
    except ImageDecodeError as exc:
        return exc.reason


def load_all(paths: list[str], spec: Preprocess, *, workers: int = 0, quiet: bool = False) -> DecodedSet:
    """Decode and resize every path once, on every core; failures are listed, not raised."""
    out = DecodedSet([])
    for i, result in enumerate(parallel_map(_load_one, [(p, spec) for p in paths], workers=workers, desc="decode", quiet=quiet)):
        if isinstance(result, str):
            out.images.append(None)
            out.digests.append("")
            out.failed.append((i, result))
        else:
            out.images.append(result[0])
            out.digests.append(result[1])
    return out
