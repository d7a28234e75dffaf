"""The cached recipe's pieces: the frozen pass (pixels in, normalised in the graph), the augmented crops, training
views at a smaller size, and the guard that keeps the head alone when fine-tuning made things worse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import visiontune
from deploy_run import photos_folder
from visiontune import samples
from visiontune.config import TrainConfig
from visiontune.data.decode import decode
from visiontune.data.transforms import augment_crop, normalize, resample
from visiontune.models import load_bundle
from visiontune.models.classifier import build_classifier
from visiontune.models.stages import frozen_trainable
from visiontune.training.feature_cache import FrozenFeatures, FrozenRunner
from visiontune.training.phases import augment_from

FAST = dict(views=1, head_epochs=3, finetune_epochs=1, seed=0, val=0.25, test=0.25, evaluate=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return photos_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [decode(p) for p in sorted((samples.path("flowers-mini") / "roses").glob("*.jpg"))[:4]]


def test_frozen_pass_in_onnx_runtime_matches_pytorch(photos):
    model, spec = build_classifier("efficientnet_lite0", 3, dropout=0.0)
    bottom, top = frozen_trainable(model, 2)
    net = FrozenFeatures(model.eval(), bottom, top)
    crops = np.stack([augment_crop(p, spec.preprocess, augment_from(TrainConfig()), np.random.default_rng(k))
                      for k, p in enumerate(photos)])
    notes: list[str] = []
    runner = FrozenRunner(net, spec.preprocess, torch.device("cpu"), notes)
    assert runner.session is not None and not notes  # uint8 crops in: normalised inside the graph
    boundary, pooled = runner(crops)
    with torch.no_grad():
        ref_boundary, ref_pooled = net(torch.from_numpy(normalize(crops, spec.preprocess)))
    np.testing.assert_allclose(pooled, ref_pooled.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(boundary.astype(np.float32), ref_boundary.numpy(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("angle", [0.0, 8.0, -8.0])
def test_one_pass_crop_turns_the_way_pillow_does(photos, angle):
    # The augmented crop is one affine resampling; Pillow's rotate-then-resize (the way it was made before) is the
    # reference for which way the picture turns and what the box holds.
    from visiontune.data.transforms import _crop_rotate_resize

    image = photos[0]
    h, w = image.shape[:2]
    box = (10, 5, int(w * 0.8), int(h * 0.9))
    pil = Image.fromarray(image).rotate(angle, resample=Image.Resampling.BILINEAR,
                                        center=((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
    expected = np.asarray(pil.resize((224, 224), resample("bicubic"), box=box), dtype=np.float32)
    got = _crop_rotate_resize(image, box, angle, 224, "bicubic").astype(np.float32)
    assert got.shape == (224, 224, 3) and np.abs(got - expected).mean() < 4.0
    turned = _crop_rotate_resize(image, box, -angle, 224, "bicubic").astype(np.float32)
    if angle:  # the other way round is far off: the direction is right, not just the box
        assert np.abs(turned - expected).mean() > 2 * np.abs(got - expected).mean()


def test_views_follow_images_a_class_unless_given():
    default = TrainConfig()
    assert default.views is None and default.views_for(660.0) == 4  # flower_photos' train + val
    assert default.views_for(20.0) == 8 and default.views_for(32.0) == 5 and default.views_for(1.0) == 8  # the most: 8
    assert TrainConfig(views=1).views_for(1.0) == 1 and TrainConfig(class_views=0).views_for(1.0) == 4


def test_training_views_at_a_smaller_size_and_more_of_them_for_few_images(tiny, tmp_path):
    # 3 classes x 8 photos, a quarter each to val and test: the refit trains on 6 a class, so --class-views 30
    # asks for 5 views an image where --views is not given.
    fast = {k: v for k, v in FAST.items() if k != "views"}
    result = visiontune.train(tiny, out=tmp_path / "small", train_size=160, class_views=30, **fast)
    meta = json.loads((result.run_dir / "model.json").read_text())
    assert meta["preprocess"]["input_size"] == 224  # what the saved model is evaluated and served at
    notes = result.metrics["notes"]
    assert any("training views at 160 px, validation and test at 224 px" in n for n in notes)
    assert "5 augmented views an image, not 4: 6.0 labelled images a class (--class-views 30; --views sets them)" in notes
    saved = (result.run_dir / "config.yaml").read_text()
    assert "views: 5, chosen for --class-views 30" in saved and yaml.safe_load(saved)["views"] == 5
    assert result.metrics["val"]["top1"] >= 0.5


def test_fine_tuning_that_hurts_validation_keeps_the_head_alone(tiny, tmp_path):
    # A learning rate far too high wrecks the top stages in phase 2: the run must end with phase 1's model.
    result = visiontune.train(tiny, out=tmp_path / "wrecked", **{**FAST, "lr": 50.0, "epochs": 2})
    assert any("did not beat the head alone" in n for n in result.metrics["notes"]), result.metrics["notes"]
    saved = load_bundle(result.run_dir)[0]
    fresh = build_classifier("efficientnet_lite0", 3, dropout=0.0)[0]
    top = frozen_trainable(fresh, 2)[1]
    top_saved = frozen_trainable(saved, 2)[1]
    for a, b in zip(top.state_dict().values(), top_saved.state_dict().values()):
        torch.testing.assert_close(a, b)  # the pretrained top stages, untouched


def test_a_vit_from_a_weights_file_at_a_chosen_size_trains_both_phases(tiny, tmp_path):
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "vit.safetensors"  # a 160-px ViT's file, as timm saves it
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()}, str(weights))
    result = visiontune.train(tiny, out=tmp_path / "vit", model="test_vit", weights=str(weights), input_size=64,
                              trainable_stages=2, refit=False, **FAST)
    assert [r["phase"] for r in result.history] == ["head"] * 3 + ["finetune"]
    meta = json.loads((result.run_dir / "model.json").read_text())
    assert meta["architecture"]["img_size"] == 64 and meta["preprocess"]["input_size"] == 64
    assert any(n.startswith("preprocessing of test_vit: 64 px") for n in result.metrics["notes"])
    clf = visiontune.Classifier.load(result.run_dir)  # rebuilt at 64 px from model.json
    assert clf.predict(sorted((samples.path("flowers-mini") / "roses").glob("*.jpg"))[0])[0].ok
