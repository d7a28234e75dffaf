"""The preprocessing is versioned in model.json: models made before the version existed read as 1 and keep their
Pillow resize bit for bit; new models are version 2 (OpenCV), and every consumer (the training cache's centre view,
evaluation, predict, serve) gets the same pixels from one function."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
from PIL import Image

from visiontune import samples
from visiontune.data.loader import load_for_model, load_resized
from visiontune.data.transforms import PREPROCESS_VERSION, Preprocess, center_crop, eval_crop
from visiontune.errors import ModelError
from visiontune.models.bundle import ModelMeta, read_meta, write_meta
from visiontune.models.registry import get_spec

V1 = Preprocess(224, 0.875, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
V2 = replace(V1, version=2)


def jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(width * height)
    smooth = cv2.resize(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8), (width, height))
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_new_models_get_the_newest_version_and_a_model_json_without_one_is_version_1(tmp_path):
    assert get_spec("efficientnet_lite0").preprocess.version == PREPROCESS_VERSION == 2
    meta = ModelMeta("efficientnet_lite0", "tf_efficientnet_lite0", ["a", "b"], V2)
    write_meta(tmp_path, meta)
    data = json.loads((tmp_path / "model.json").read_text())
    assert data["preprocess"]["version"] == 2
    del data["preprocess"]["version"]  # what every model.json written before 2026-12-06 looks like
    (tmp_path / "model.json").write_text(json.dumps(data))
    assert read_meta(tmp_path).preprocess == V1


def test_an_unknown_version_is_one_line_naming_the_field(tmp_path):
    write_meta(tmp_path, ModelMeta("efficientnet_lite0", "tf_efficientnet_lite0", ["a", "b"], V2))
    data = json.loads((tmp_path / "model.json").read_text())
    data["preprocess"]["version"] = 3
    (tmp_path / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"preprocess\.version: 3 is outside 1\.\.2"):
        read_meta(tmp_path)


@pytest.mark.parametrize("width, height", [(320, 240), (500, 333), (213, 160)])
def test_version_1_is_pillow_on_the_whole_image_as_before(width, height):
    data = jpeg(width, height)
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    scale = 256 / min(width, height)
    whole = decoded.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(load_for_model(data, V1), center_crop(np.asarray(whole), 224))


@pytest.mark.parametrize("width, height, flag", [(500, 333, cv2.INTER_AREA), (320, 240, cv2.INTER_CUBIC)])
def test_version_2_is_opencv_area_when_shrinking_and_the_interpolation_when_enlarging(width, height, flag):
    data = jpeg(width, height)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    scale = 256 / min(width, height)
    whole = cv2.resize(decoded, (round(width * scale), round(height * scale)), interpolation=flag)
    new = load_for_model(data, V2)
    np.testing.assert_array_equal(new, center_crop(whole, 224))
    old = load_for_model(data, V1).astype(int)
    assert new.shape == old.shape == (224, 224, 3)
    assert np.abs(new.astype(int) - old).mean() < 3  # the same geometry: only the resampling differs


@pytest.mark.parametrize("spec", [V1, V2], ids=["v1", "v2"])
def test_every_consumer_sees_the_same_pixels(spec):
    """Serving and predict crop `load_for_model`; training caches `load_resized` and takes its centre; evaluation
    of an array goes through `eval_crop`: one crop whichever way the image comes."""
    path = sorted((samples.path("flowers-mini") / "roses").glob("*.jpg"))[0]
    served = load_for_model(path.read_bytes(), spec)
    cached = load_resized(str(path), spec)
    assert min(cached.shape[:2]) == spec.resize_size
    np.testing.assert_array_equal(served, center_crop(cached, spec.input_size))
    np.testing.assert_array_equal(served, load_for_model(str(path), spec))
    decoded = np.asarray(Image.open(path).convert("RGB"))
    if max(decoded.shape[:2]) < 2 * spec.resize_size:  # no JPEG draft between the two: the same decoded pixels
        np.testing.assert_array_equal(served, eval_crop(decoded, spec))
