"""Grad-CAM: target layers for several architectures, every method, faithfulness on a trained run, the CLI,
and hooks released after every call."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image

import visiontune
from visiontune import samples
from visiontune.data.loader import load_for_model
from visiontune.data.transforms import Preprocess
from visiontune.errors import ConfigError, ModelError
from visiontune.explain.gradcam import METHODS, Explainer, find_target_layer

SPEC = Preprocess(224, 0.875, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
CLASSES = ("daisy", "roses", "tulips")


@pytest.fixture(scope="module")
def crops(photos) -> np.ndarray:
    return np.stack([load_for_model(photos[name][-1], SPEC) for name in CLASSES])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "flowers"
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for photo in sorted((samples.path("flowers-mini") / name).glob("*.jpg"))[:8]:
            shutil.copy(photo, root / name / photo.name)
    out = tmp_path_factory.mktemp("runs") / "run"
    return visiontune.train(root, out=out, views=1, head_epochs=5, finetune_epochs=1, val=0.25, test=0.25,
                            evaluate=False).run_dir


@pytest.mark.parametrize("name, layer, reshaped", [
    ("tf_efficientnet_lite0", "bn2", False),
    ("resnet18", "layer4", False),
    ("mobilenetv3_small_050", "blocks", False),
    ("test_vit", "blocks.5.norm1", True),
])
def test_target_layer_is_the_last_feature_map(name, layer, reshaped, crops):
    model = timm.create_model(name, pretrained=False, num_classes=3)
    size = model.pretrained_cfg["input_size"][-1]
    target = find_target_layer(model, size)
    assert (target.name, target.reshape is not None) == (layer, reshaped)
    spec = Preprocess(size, 0.875, (0.5,) * 3, (0.5,) * 3, "bicubic")
    images = np.stack([np.asarray(Image.fromarray(c).resize((size, size))) for c in crops[:2]])
    explanations = Explainer(model, list(CLASSES), spec).explain(images)
    for e in explanations:
        assert e.heatmap.shape == (size, size) and e.overlay.shape == (size, size, 3)
        assert 0.0 <= e.heatmap.min() and e.heatmap.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_map(method, crops):
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    spec = Preprocess(64, 1.0, (0.5,) * 3, (0.5,) * 3, "bicubic")
    small = np.stack([np.asarray(Image.fromarray(c).resize((64, 64))) for c in crops[:1]])
    e = Explainer(model, list(CLASSES), spec, method=method).explain(small, [1])[0]
    assert e.target == "roses" and e.method == method and e.heatmap.shape == (64, 64)
    assert np.isfinite(e.heatmap).all()


def test_layer_and_class_overrides_and_their_errors(crops):
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    assert Explainer(model, list(CLASSES), SPEC, layer="layer3").layer.name == "layer3"
    with pytest.raises(ConfigError, match="no such module"):
        Explainer(model, list(CLASSES), SPEC, layer="layer9")
    with pytest.raises(ConfigError, match="not one of the model's classes"):
        Explainer(model, list(CLASSES), SPEC).target_index("cactus")
    with pytest.raises(ConfigError, match="unknown explanation method"):
        Explainer(model, list(CLASSES), SPEC, method="magic")


def test_hooks_are_released_and_memory_stays_flat(crops):
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    spec = Preprocess(64, 1.0, (0.5,) * 3, (0.5,) * 3, "bicubic")
    small = np.stack([np.asarray(Image.fromarray(c).resize((64, 64))) for c in crops])
    explainer = Explainer(model, list(CLASSES), spec)

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    for _ in range(20):
        explainer.explain(small)
    before = rss_mb()
    for _ in range(100):  # 300 images
        explainer.explain(small)
    grown = rss_mb() - before
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert grown < 25, f"memory grew by {grown:.1f} MB over 300 explanations"


def test_trained_model_maps_are_faithful(run, photos):
    images = [photos[name][-1] for name in CLASSES] + [photos[name][-2] for name in CLASSES]
    result = visiontune.api.explain(run, images, faithfulness=True)
    f = result.faithfulness
    assert f["images"] == 6
    # Removing the pixels the map marks hurts more than removing random ones; restoring them helps more.
    assert f["deletion"] < f["random_deletion"] and f["insertion"] > f["random_insertion"]
    assert all(e.layer == "bn2" and len(e.predictions) == 3 for e in result.explanations)


def test_cli_explain(run, photos, cli, tmp_path, untouched):
    images = tmp_path / "images"
    images.mkdir()
    for name in CLASSES:
        shutil.copy(photos[name][0], images / f"{name}.jpg")
    (images / "notes.txt").write_text("not a photo")
    with untouched(images):
        done = cli("explain", run, images, "--out", tmp_path / "out")
        assert done.returncode == 0, done.stderr
        assert "not explained:" in done.stderr and "notes.txt" in done.stderr
        written = sorted(p.name for p in (tmp_path / "out").iterdir())
        assert written == ["daisy.gradcam.png", "roses.gradcam.png", "tulips.gradcam.png"]
        grid = cli("explain", run, images / "daisy.jpg", images / "roses.jpg", "--grid", "--method", "eigencam",
                   "--out", tmp_path / "grid")
        assert grid.returncode == 0 and (tmp_path / "grid" / "grid.eigencam.png").stat().st_size > 10_000
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    refused = cli("explain", onnx, images / "daisy.jpg")
    assert refused.returncode == 2 and "Grad-CAM needs" in refused.stderr and refused.stderr.count("\n") == 1
    unknown = cli("explain", run, images / "daisy.jpg", "--class", "cactus", "--out", tmp_path / "x")
    assert unknown.returncode == 2 and "cactus" in unknown.stderr


def test_classifier_explain(run, photos, tmp_path):
    from visiontune.inference import Classifier

    clf = Classifier.load(run)
    e = clf.explain(photos["roses"][0])
    assert e.target == e.predictions[0][0] == clf.predict(photos["roses"][0])[0].label
    assert e.heatmap.shape == (224, 224) and e.overlay.dtype == np.uint8 and e.method == "gradcam"
    forced = clf.explain(photos["roses"][0], method="gradcam++", target="daisy")
    assert forced.target == "daisy" and forced.method == "gradcam++"
    # The exported model has no gradients: the error says what to load instead.
    onnx = Classifier.load(visiontune.api.export(run).path)
    with pytest.raises(ModelError, match="Grad-CAM needs"):
        onnx.explain(photos["roses"][0])
