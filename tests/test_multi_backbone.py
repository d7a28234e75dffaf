"""Several backbones as one model (`efficientnet_lite0+efficientnet_lite1`): their pooled features concatenated feed
one classifier, and the run trains, reloads, exports, predicts and is explained like a run of one backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import visiontune
from deploy_run import photos_folder
from visiontune import api
from visiontune.errors import ModelError
from visiontune.models import load_bundle
from visiontune.models.classifier import build_classifier
from visiontune.models.multi import MultiBackbone

PAIR = "efficientnet_lite0+efficientnet_lite1"
FAST = dict(views=1, head_epochs=3, seed=0, val=0.25, test=0.25, evaluate=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photos_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    return visiontune.train(data, out=tmp_path_factory.mktemp("multi") / "run", model=PAIR, **FAST)


def test_the_branches_keep_their_own_pretrained_weights_and_concatenate_their_features():
    model, spec = build_classifier(PAIR, 3, dropout=0.2)
    alone, _ = build_classifier("efficientnet_lite1", 3, dropout=0.2)
    assert isinstance(model, MultiBackbone) and spec.timm_name == "tf_efficientnet_lite0+tf_efficientnet_lite1"
    assert spec.preprocess.input_size == 224 and model.num_features == 1280 + 1280
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    model.eval(), alone.eval()
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        reference = alone.forward_head(alone.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, 2560)
    torch.testing.assert_close(pooled[:, 1280:], reference)  # the second branch is Lite1 with its ImageNet weights


def test_a_run_of_several_backbones_trains_the_head_and_reloads(run):
    meta = json.loads((run.run_dir / "model.json").read_text())
    assert meta["architecture"]["timm_name"] == "tf_efficientnet_lite0+tf_efficientnet_lite1"
    assert any("only the head is trained" in n for n in run.metrics["notes"])
    assert {r["phase"] for r in run.history} <= {"fold1.head", "head"}
    model, loaded = load_bundle(run.run_dir)
    assert isinstance(model, MultiBackbone) and loaded.labels == ["daisy", "roses", "tulips"]


def test_export_predict_and_explain_work_on_several_backbones(run, photos):
    from visiontune.explain.gradcam import find_target_layer

    onnx = api.export(run.run_dir).path
    images = [str(p) for p in photos["roses"][:3]]
    a = visiontune.predict(run.run_dir, images, backend="torch")
    b = visiontune.predict(onnx, images)
    assert [p.label for p in a] == [p.label for p in b]
    np.testing.assert_allclose([p.top_k[0][1] for p in a], [p.top_k[0][1] for p in b], atol=1e-4)
    model, _ = load_bundle(run.run_dir)
    layer = find_target_layer(model, 224)
    assert layer.name.startswith("branches.1.")  # the last backbone's final feature map
    (explained,) = api.explain(run.run_dir, images[:1]).explanations
    assert explained.heatmap.shape == (224, 224) and np.isfinite(explained.heatmap).all()


def test_several_backbones_distil_into_one(run, data, tmp_path):
    student = visiontune.distill(data, teacher=run.run_dir, out=tmp_path / "student", finetune_epochs=1, **FAST)
    assert student.metrics["model"] == "efficientnet_lite0"
    assert any("teacher logits" in n for n in student.metrics["notes"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(model=PAIR, weights="w.safetensors"), "--weights gives one backbone"),
    (dict(model=PAIR, head="attention"), "linear head"),
    (dict(model="efficientnet_lite0+efficientnet_lite0"), "named twice"),
    (dict(model="efficientnet_lite0+resnet18"), "normalise their input differently"),
])
def test_what_several_backbones_cannot_take_is_one_clear_error(kwargs, message, tmp_path):
    data = photos_folder(tmp_path)
    with pytest.raises(ModelError, match=message):  # before any image is decoded
        visiontune.train(data, out=tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
