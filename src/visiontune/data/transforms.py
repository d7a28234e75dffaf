"""Preprocessing: the spec that travels with a model, and the functions that apply it.

`Preprocess` is filled in by the model registry and stored in model.json; evaluation, export, prediction
and serving all rebuild it from there, so there is one definition of "what the model sees".
Everything here is numpy + Pillow (no torch), so a served ONNX model needs nothing heavier.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
INTERPOLATIONS = frozenset(_RESAMPLE)
_OPENCV_ENLARGE = {"bicubic": "INTER_CUBIC", "bilinear": "INTER_LINEAR", "nearest": "INTER_NEAREST",
                   "lanczos": "INTER_LANCZOS4", "box": "INTER_AREA"}  # OpenCV's names: it is imported on first use
# How the shorter side is brought to the resize size. 1: Pillow, on the whole decoded image (every model made before
# 2026-12-06; a model.json without a version is 1, and stays on that path bit for bit). 2: OpenCV, area-averaging
# when it shrinks and the spec's interpolation when it enlarges: a flower_photos JPEG decoded, resized and cropped in
# 0.49 instead of 1.64 ms, most of a served request's work besides the model (BENCHMARKS "Preprocessing version 2").
# New models get the newest.
PREPROCESS_VERSIONS = (1, 2)
PREPROCESS_VERSION = PREPROCESS_VERSIONS[-1]


@dataclass(frozen=True)
class Preprocess:
    input_size: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    version: int = 1

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop (input_size / crop_pct, as timm does)."""
        return int(math.floor(self.input_size / self.crop_pct))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        return cls(int(data["input_size"]), float(data["crop_pct"]), tuple(data["mean"]), tuple(data["std"]),
                   str(data["interpolation"]), int(data.get("version", 1)))


def resample(name: str) -> Image.Resampling:
    return _RESAMPLE.get(name, Image.Resampling.BICUBIC)


def resized_for_crop(rgb: np.ndarray | Image.Image, spec: Preprocess) -> np.ndarray | Image.Image:
    """The image with its shorter side at `spec.resize_size`, resized as the spec's version says. Version 1 gives
    a PIL image back when given one, so `center_crop` copies only the crop to an array."""
    w, h = rgb.size if isinstance(rgb, Image.Image) else (rgb.shape[1], rgb.shape[0])
    target = _shorter_at(w, h, spec.resize_size)
    return rgb if target == (w, h) else resize_to(rgb, target, spec)


def resize_to(rgb: np.ndarray | Image.Image, size: tuple[int, int], spec: Preprocess) -> np.ndarray | Image.Image:
    """`rgb` resized to `size` (width, height) the way the spec's preprocessing version resizes."""
    if spec.version == 1:
        image = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
        return image.resize(size, resample(spec.interpolation))
    cv2 = _opencv()
    rgb = np.ascontiguousarray(rgb)
    # Area averaging when shrinking: OpenCV's cubic does not widen its kernel with the scale as Pillow's does, so
    # it would alias; the JPEG draft already keeps a decoded photo within twice the target.
    flag = "INTER_AREA" if size[0] < rgb.shape[1] else _OPENCV_ENLARGE.get(spec.interpolation, "INTER_CUBIC")
    return cv2.resize(rgb, size, interpolation=getattr(cv2, flag))


def _shorter_at(w: int, h: int, size: int) -> tuple[int, int]:
    scale = size / min(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def center_crop(rgb: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """The centre size x size of a uint8 array or RGB PIL image; a PIL image is cropped before it becomes an array,
    so only the crop is copied (the same pixels as cropping its array)."""
    if isinstance(rgb, Image.Image):
        w, h = rgb.size
        if h >= size and w >= size:
            top, left = (h - size) // 2, (w - size) // 2
            return np.asarray(rgb.crop((left, top, left + size, top + size)))
        rgb = np.asarray(rgb)
    h, w = rgb.shape[:2]
    if h < size or w < size:  # an odd aspect ratio can leave one side short after the resize: pad by edge
        pad_h, pad_w = max(0, size - h), max(0, size - w)
        rgb = np.pad(rgb, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)), mode="edge")
        h, w = rgb.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return rgb[top:top + size, left:left + size]


def tta_views(resized: np.ndarray, size: int) -> np.ndarray:
    """Test-time augmentation views of an image already resized for the model: the centre crop, its mirror and
    the four corner crops (K x S x S x 3 uint8; only the first two when a side is shorter than `size`)."""
    centre = center_crop(resized, size)
    h, w = resized.shape[:2]
    views = [centre, centre[:, ::-1]]
    if h >= size and w >= size:
        views += [resized[:size, :size], resized[:size, w - size:], resized[h - size:, :size],
                  resized[h - size:, w - size:]]
    return np.ascontiguousarray(np.stack(views))


def eval_crop(rgb: np.ndarray, spec: Preprocess) -> np.ndarray:
    """Resize the shorter side to `resize_size`, then centre-crop `input_size`: uint8 H x W x 3."""
    return center_crop(resized_for_crop(rgb, spec), spec.input_size)


def normalize(batch_uint8: np.ndarray, spec: Preprocess) -> np.ndarray:
    """N x H x W x 3 uint8 (or one H x W x 3) -> N x 3 x H x W float32, normalised with the model's mean/std."""
    batch = batch_uint8 if batch_uint8.ndim == 4 else batch_uint8[None]
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1) * 255.0
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1) * 255.0
    # In place on the one float copy: fresh arrays for the difference and the quotient cost twice the time (page
    # faults of two more batch-sized arrays), measured 0.85 -> 0.44 ms an image at batch 8, with the same bits.
    chw = batch.transpose(0, 3, 1, 2).astype(np.float32)
    chw -= mean
    chw /= std
    return chw


def preprocess(rgb: np.ndarray, spec: Preprocess) -> np.ndarray:
    """One decoded image -> the 1 x 3 x S x S float32 tensor the model takes."""
    return normalize(eval_crop(rgb, spec), spec)


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation (applied to a decoded uint8 image, before normalisation)."""

    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    rotate_degrees: float
    brightness: float
    contrast: float


@functools.lru_cache(maxsize=1)
def _opencv():
    """OpenCV, imported on first use and set to one thread: crops are made beside ONNX Runtime, which already has a
    thread on every core."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def _crop_rotate_resize(rgb: np.ndarray, box: tuple, angle: float, size: int, interpolation: str) -> np.ndarray:
    """The box of `rgb` turned by `angle` degrees (counter-clockwise, as Pillow's rotate) about its centre, resized
    to size x size: one affine resampling of the output pixels only (OpenCV), where rotating the whole image and
    then resizing the box in Pillow cost eight times as much and made augmented crops the slowest part of the
    frozen pass. Outside the image is black, as Pillow's rotate leaves it."""
    cv2 = _opencv()
    left, top, right, bottom = box
    sx, sy = (right - left) / size, (bottom - top) / size
    cx, cy = (left + right) / 2, (top + bottom) / 2
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    # Continuous coordinates (pixel centres at +0.5): output q -> box point p = (left + sx qx, top + sy qy) ->
    # source = centre + R (p - centre), R = [[cos, -sin], [sin, cos]]; OpenCV indexes pixel centres at integers.
    linear = np.array([[cos * sx, -sin * sy], [sin * sx, cos * sy]])
    shift = np.array([cx + cos * (left - cx) - sin * (top - cy), cy + sin * (left - cx) + cos * (top - cy)])
    matrix = np.hstack([linear, (linear @ [0.5, 0.5] + shift - 0.5)[:, None]])
    flag = cv2.INTER_CUBIC if interpolation == "bicubic" else cv2.INTER_LINEAR
    return cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (size, size), flags=flag | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def random_box(shape: tuple, aug: Augment, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random resized crop of an image of `shape`: area and aspect ratio drawn from
    `aug.scale` and `aug.ratio`, as torchvision's RandomResizedCrop draws them."""
    h, w = shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*aug.scale)
        log_ratio = rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1]))
        aspect = math.exp(log_ratio)
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    side = min(h, w)  # fall back to the largest centred square
    return (w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side


def color_jitter(crop: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Random brightness and contrast of a uint8 crop."""
    out = crop.astype(np.float32)
    if aug.brightness > 0 or aug.contrast > 0:
        b = 1.0 + rng.uniform(-aug.brightness, aug.brightness)
        c = 1.0 + rng.uniform(-aug.contrast, aug.contrast)
        mean = out.mean()
        out = (out - mean) * c + mean * b
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def augment_crop(rgb: np.ndarray, spec: Preprocess, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Random resized crop, small rotation, flip and brightness/contrast jitter: uint8 S x S x 3."""
    box = random_box(rgb.shape, aug, rng)
    angle = float(rng.uniform(-aug.rotate_degrees, aug.rotate_degrees)) if aug.rotate_degrees > 0 else 0.0
    crop = _crop_rotate_resize(rgb, box, angle, spec.input_size, spec.interpolation)
    if rng.random() < aug.hflip:
        crop = crop[:, ::-1]
    return color_jitter(crop, aug, rng)
