"""`--head attention`: a learned spatial attention pool that starts as the average pool, trains with the top stages
(cached recipe) or everything (full fine-tune), survives the bundle, every export format, and shows in `explain`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import visiontune
from deploy_run import FAST, photos_folder
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.inference.classifier import Classifier
from visiontune.models import load_bundle
from visiontune.models.attention import SpatialAttentionPool, attach_attention, attention_pool, head_modules
from visiontune.models.classifier import build_classifier


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return photos_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def attention_run(tiny, tmp_path_factory):
    run = tmp_path_factory.mktemp("attention") / "run"
    visiontune.train(tiny, out=run, head="attention", **{**FAST, "finetune_epochs": 2, "evaluate": True})
    return run


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "test_convnext"])
def test_the_attention_pool_starts_as_the_average_pool_it_replaces(name):
    torch.manual_seed(0)
    plain, _ = build_classifier(name, 3, dropout=0.0, from_scratch=True)
    torch.nn.init.normal_(plain.get_classifier().weight)
    attended, _ = build_classifier(name, 3, dropout=0.0, from_scratch=True, head="attention")
    missing, unexpected = attended.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("global_pool" in k for k in missing)
    assert isinstance(attention_pool(attended), SpatialAttentionPool) and attention_pool(plain) is None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(attended.eval()(x), plain.eval()(x), atol=1e-5, rtol=1e-4)
    assert head_modules(attended)[0] is attention_pool(attended)


def test_the_attention_map_is_a_distribution_over_positions():
    pool = SpatialAttentionPool(8)
    torch.nn.init.normal_(pool.score.weight)
    x = torch.randn(2, 8, 5, 6)
    w = pool.weights(x)
    assert w.shape == (2, 5, 6) and torch.allclose(w.sum(dim=(1, 2)), torch.ones(2))
    torch.testing.assert_close(pool(x), (x * w[:, None]).sum(dim=(2, 3)))


def test_a_backbone_without_a_spatial_pool_is_refused_naming_the_flag():
    model, _ = build_classifier("test_vit", 3, dropout=0.0, from_scratch=True)
    with pytest.raises(ConfigError, match="--head attention"):
        attach_attention(model)


def test_a_run_with_the_attention_head_trains_reloads_and_agrees(attention_run, tiny):
    meta = json.loads((attention_run / "model.json").read_text())
    assert meta["architecture"]["head"] == "attention"
    model, loaded = load_bundle(attention_run)
    assert loaded.head == "attention" and attention_pool(model) is not None
    metrics = json.loads((attention_run / "metrics.json").read_text())
    assert metrics["evaluation"]["images"] > 0 and metrics["test"]["top1"] is not None
    on_onnx = Classifier.load(attention_run, backend="onnx")
    on_torch = Classifier.load(attention_run)
    images = sorted(tiny.rglob("*.jpg"))[::4]
    for a, b in zip(on_onnx.predict(images), on_torch.predict(images)):
        assert a.label == b.label and a.probability == pytest.approx(b.probability, abs=1e-4)


def test_phase_two_and_the_full_finetune_train_the_attention(tiny, tmp_path):
    for name, extra in (("phase2", {}), ("full", {"full_finetune": True})):
        run = tmp_path / name
        # no validation split: phase 2's result is kept, not judged against the head alone
        visiontune.train(tiny, out=run, head="attention", **{**FAST, "val": 0.0, "epochs": 3, **extra})
        pool = attention_pool(load_bundle(run)[0])
        assert pool.score.weight.abs().sum() > 0, name


def test_every_export_format_carries_the_attention_head(attention_run, tiny):
    for fmt, precision in (("onnx", "fp32"), ("onnx", "int8"), ("torchscript", "fp32"), ("openvino", "fp32")):
        result = visiontune.api.export(attention_run, format=fmt, precision=precision)
        reference = Classifier.load(attention_run)
        exported = Classifier.load(result.path)
        images = sorted(tiny.rglob("*.jpg"))[::4]
        agree = np.mean([a.label == b.label for a, b in zip(reference.predict(images), exported.predict(images))])
        assert agree >= (0.8 if precision == "int8" else 1.0), (fmt, precision)


def test_explain_shows_the_attention_map_beside_grad_cam(attention_run, tiny, tmp_path, cli):
    image = sorted(tiny.rglob("*.jpg"))[0]
    e = Classifier.load(attention_run).explain(image)
    assert e.attention is not None and e.attention.shape == e.heatmap.shape
    assert e.attention.max() == pytest.approx(1.0) and e.attention.min() >= 0
    out = tmp_path / "explained"
    done = cli("explain", str(attention_run), str(image), "--out", str(out))
    assert done.returncode == 0, done.stderr
    from PIL import Image

    (png,) = out.glob("*.png")
    assert Image.open(png).width > 1000  # four panels: input, Grad-CAM, attention, predictions


def test_the_head_setting_is_checked_on_the_cli(tiny, cli):
    done = cli("train", str(tiny), "--head", "transformer", "--out", "nowhere")
    assert done.returncode == 2 and "head" in done.stderr
    with pytest.raises(VisiontuneError, match="head"):
        visiontune.train(tiny, out="nowhere", head="bogus")
