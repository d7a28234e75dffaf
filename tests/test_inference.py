"""`visiontune.inference.Classifier` on a real trained run: backends agree, inputs of every kind, bad models."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import visiontune
from deploy_run import copy_run
from visiontune.data.decode import decode
from visiontune.data.loader import load_for_model
from visiontune.errors import ConfigError, ModelError
from visiontune.inference import Classifier, Prediction
from visiontune.models.bundle import update_meta


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return copy_run(tmp_path_factory, "inference")


@pytest.fixture(scope="module")
def clf(run):
    return Classifier.load(run)


@pytest.fixture(scope="module")
def fast(run):
    """The ONNX Runtime backend (in memory): several times faster than PyTorch eager on 2 busy cores."""
    return Classifier.load(run, backend="onnx")


@pytest.fixture(scope="module")
def unseen(photos):
    """Photos of the run's classes that were not among its 24 training/val/test images."""
    return photos["daisy"][8:10] + photos["roses"][8:10] + photos["tulips"][8:10]


@pytest.fixture(scope="module")
def crops(clf, unseen):
    return np.stack([load_for_model(p, clf.preprocess) for p in unseen])


def test_run_loads_with_labels_preprocessing_and_defaults(clf, run):
    assert clf.backend == "torch" and clf.path == run
    assert clf.labels == ["daisy", "roses", "tulips"] and clf.meta.labels == clf.labels
    assert clf.preprocess.input_size == 224 and clf.preprocess.mean == (0.5, 0.5, 0.5)
    assert clf.temperature == 1.0 and clf.threshold == 0.5


def test_logits_and_probabilities(clf, crops):
    logits = clf.logits(crops)
    assert logits.shape == (6, 3) and logits.dtype == np.float32
    probs = clf.probabilities(crops)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == logits.argmax(1)).all()
    assert np.allclose(clf.logits(crops[:1]), logits[:1], atol=1e-5)  # batching does not change an answer
    with pytest.raises(ConfigError, match="expected N x 224 x 224 x 3"):
        clf.logits(crops[:, :100])


def test_onnx_backend_in_memory_and_exported_agree_with_torch(run, clf, crops):
    reference = clf.logits(crops)
    in_memory = Classifier.load(run, backend="onnx")
    assert in_memory.backend == "onnx" and not (run / "export" / "model.onnx").exists()
    assert np.allclose(in_memory.logits(crops), reference, atol=1e-4)
    visiontune.api.export(run)
    from_file = Classifier.load(run, backend="onnx")
    assert from_file.engine.where.endswith("export/model.onnx")
    assert np.allclose(from_file.logits(crops), reference, atol=1e-4)
    assert np.allclose(Classifier.load(run / "export" / "model.onnx").logits(crops), reference, atol=1e-4)


def test_temperature_and_threshold_come_from_model_json(run, crops, tmp_path):
    import shutil

    calibrated = tmp_path / "calibrated"
    shutil.copytree(run, calibrated, ignore=shutil.ignore_patterns("export"))
    update_meta(calibrated, calibration={"temperature": 2.5}, uncertainty={"threshold": 0.99})
    c = Classifier.load(calibrated)
    assert c.temperature == 2.5 and c.threshold == 0.99
    z = c.logits(crops) / 2.5
    expected = np.exp(z - z.max(1, keepdims=True))
    assert np.allclose(c.probabilities(crops), expected / expected.sum(1, keepdims=True), atol=1e-6)
    assert all(p.uncertain for p in c.predict(list(crops[:2])))  # nothing is 99 % sure at T = 2.5


def test_predict_accepts_paths_bytes_pil_and_arrays_alike(clf, unseen):
    path = unseen[0]
    data = path.read_bytes()
    by_path, by_bytes, by_pil, by_array = clf.predict([path, data, Image.open(io.BytesIO(data)), decode(path)], top_k=2)
    assert by_path.source == str(path) and by_bytes.source == "<bytes #1>"
    assert len(by_path.top_k) == 2 and by_path.label == by_path.top_k[0][0]
    for other in (by_bytes, by_pil, by_array):
        assert other.label == by_path.label and other.probability == pytest.approx(by_path.probability, abs=1e-5)
    single = clf.predict(path)
    assert len(single) == 1 and single[0].label == by_path.label
    p = single[0]
    q = clf.probabilities(load_for_model(path, clf.preprocess)[None])[0]
    assert p.entropy == pytest.approx(-sum(x * np.log(x) for x in q), abs=1e-4)
    assert p.uncertain == (p.probability < 0.5)
    assert set(p.to_dict()) == {"source", "label", "probability", "top_k", "entropy", "uncertain", "unknown",
                                "unknown_score", "error"}


def test_predict_reports_bad_images_per_item(fast, unseen, tmp_path):
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(unseen[0].read_bytes()[:1500])
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    results = fast.predict([unseen[1], truncated, text, tmp_path / "absent.jpg", b"", unseen[2]])
    assert [r.ok for r in results] == [True, False, False, False, False, True]
    assert "truncated" in results[1].error and results[2].error == "not an image (text)"
    assert results[3].error == "file not found" and results[4].error == "zero-byte file"
    assert results[1].label is None and results[1].top_k == []
    assert results[0].label == fast.predict(unseen[1])[0].label


def test_tta_averages_views_into_a_distribution(fast, unseen):
    plain = fast.predict(unseen[:3], top_k=3)
    tta = fast.predict(unseen[:3], top_k=3, tta=True)
    for a, b in zip(plain, tta):
        assert sum(p for _, p in b.top_k) == pytest.approx(1.0, abs=1e-5)
        assert a.top_k != b.top_k  # six views are not the centre crop alone


def test_streaming_many_images_matches_one_batch(fast, unseen):
    many = unseen * 7  # 42 images: several internal chunks of batch_size * 4
    streamed = list(fast.iter_predict(iter(many), top_k=1))
    assert len(streamed) == 42
    assert [p.label for p in streamed] == [p.label for p in fast.predict(unseen, top_k=1)] * 7


def test_torchscript_file_classifies_alone(run, clf, crops):
    result = visiontune.api.export(run, format="torchscript")
    ts = Classifier.load(result.path)
    assert ts.backend == "torch" and ts.labels == clf.labels
    assert np.allclose(ts.logits(crops), clf.logits(crops), atol=1e-4)
    with pytest.raises(ConfigError, match="backend 'torch' only"):
        Classifier.load(result.path, backend="onnx")


def test_files_that_are_not_visiontune_models_are_refused(run, tmp_path):
    not_model = tmp_path / "model.onnx"
    not_model.write_text("hello")
    with pytest.raises(ModelError, match=r"model\.onnx: not a readable ONNX model"):
        Classifier.load(not_model)
    if not (run / "export" / "model.onnx").exists():
        visiontune.api.export(run)
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes((run / "export" / "model.onnx").read_bytes()[:100_000])
    with pytest.raises(ModelError, match=r"cut\.onnx: not a readable ONNX model"):
        Classifier.load(truncated)
    foreign = tmp_path / "foreign.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice
        torch.onnx.export(torch.nn.Conv2d(3, 2, 1).eval(), torch.zeros(1, 3, 8, 8), str(foreign), dynamo=False)
    with pytest.raises(ModelError, match="not a visiontune one"):
        Classifier.load(foreign)
    with pytest.raises(ModelError, match="not a readable TorchScript model"):
        Classifier.load(_zip(tmp_path))
    with pytest.raises(ModelError, match="no such model file or run folder"):
        Classifier.load(tmp_path / "absent")
    with pytest.raises(ModelError, match="model.json is missing"):
        Classifier.load(tmp_path)
    with pytest.raises(ConfigError, match="backend 'tensorflow'"):
        Classifier.load(run, backend="tensorflow")


def _zip(folder):
    import zipfile

    path = folder / "archive.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "not a model")
    return path


def test_prediction_of_a_failure_has_no_label():
    p = Prediction("x.jpg", error="file not found")
    assert p.label is None and p.probability is None and not p.ok
    assert p.to_dict()["error"] == "file not found"


def test_onnx_engines_normalise_inside_their_graph_bit_for_bit(run, fast, crops):
    """An ONNX engine takes the uint8 crops and normalises them in its graph (mean and std 0.5: division by 127.5
    rounds): the same logits, bit for bit, as the exported file run on numpy's normalisation; the exported file
    itself keeps its float input."""
    import dataclasses

    import onnx

    from visiontune.data.transforms import normalize
    from visiontune.inference.pixel_input import PIXELS, load_proto, with_pixel_input
    from visiontune.models.onnx_graph import open_session

    assert fast.engine.takes_pixels and fast.model.engine_input(crops) is crops
    if not (run / "export" / "model.onnx").exists():
        visiontune.api.export(run)
    path = run / "export" / "model.onnx"
    from_file = Classifier.load(path)
    assert from_file.engine.takes_pixels and from_file.engine.input_name == PIXELS
    plain = open_session(path, str(path))
    assert [i.name for i in plain.get_inputs()] == ["input"]  # the file on disk is not changed
    assert np.array_equal(from_file.logits(crops), plain.run(["logits"], {"input": normalize(crops, fast.preprocess)})[0])
    # Per-channel constants (ImageNet's) stay with numpy: ONNX Runtime's channels-last broadcast is slower.
    imagenet = dataclasses.replace(fast.preprocess, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert with_pixel_input(load_proto(path), imagenet) is None
    assert with_pixel_input(load_proto(path), dataclasses.replace(imagenet, mean=(0.4,) * 3, std=(0.3,) * 3))
    with pytest.raises(TypeError, match="takes uint8 crops"):
        from_file.engine(normalize(crops, fast.preprocess))
    # A graph whose input is not one float N x 3 x S x S image is run as it is.
    small = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])]))
    assert with_pixel_input(small, fast.preprocess) is None
    assert load_proto(b"not an onnx graph") is None
