"""The unknown score on a real tiny run: fitted at evaluation, carried by every engine and export, shown by
predict (and serve: see test_serve.py), and null for models made without it."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import visiontune
from conftest import noise_image
from deploy_run import copy_run
from visiontune.inference import Classifier
from visiontune.models import open_set

QUICK = dict(gradcam_images=0, top_losses=0)
CLASSES = ("daisy", "roses", "tulips")  # the report's pictures are not what these tests are about


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """A run trained without an evaluation: no unknown score, like every run made before it existed."""
    return copy_run(tmp_path_factory, "open-set-plain")


@pytest.fixture(scope="module")
def run(tmp_path_factory, sample_root) -> Path:
    """A run on 3 classes x 30 sample photos, evaluated: 54 training images to compare with and 18 validation
    images to set the threshold on (the shared run's 12 and 6 are too few for its threshold to mean much)."""
    base = tmp_path_factory.mktemp("open-set")  # photos beside the run: a copy of the folder keeps split.csv right
    for name in CLASSES:
        shutil.copytree(sample_root / name, base / "flowers" / name)
    data, run = base / "flowers", base / "run"
    visiontune.train(data, out=run, views=1, head_epochs=3, finetune_epochs=1, seed=0, val=0.2, test=0.2,
                     evaluate=False)
    visiontune.evaluate(run, calibrate_min_images=10, **QUICK)  # calibrated too: both are fitted in one evaluation
    return run


def checkerboard(path: Path, square: int = 8) -> Path:
    """A black-and-white checkerboard: far from any flower in every model measured (the sample run here, and the
    flower_photos benchmark model, where it scored 1.2x and 1.6x their thresholds); uniform noise was nearer the
    thresholds of both (1.1x and 1.0x)."""
    yy, xx = np.mgrid[:224, :224]
    Image.fromarray((((yy // square + xx // square) % 2) * 255).astype(np.uint8)).convert("RGB").save(path)
    return path


@pytest.fixture(scope="module")
def strange(tmp_path_factory) -> Path:
    return checkerboard(tmp_path_factory.mktemp("strange") / "checkerboard.png")


@pytest.fixture(scope="module")
def known(run) -> Path:
    """A photo of one of the run's classes from its own train split."""
    with open(run / "split.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["split"] == "train")
    return (run / row["path"]).resolve()


def test_evaluation_fits_the_score_and_stores_it_with_the_model(run):
    entry = json.loads((run / "model.json").read_text())["open_set"]
    assert (run / "open_set.safetensors").is_file()
    assert entry["method"] == "knn-cosine-pca" and entry["chosen_on"] == "val" and entry["threshold"] > 0
    assert entry["train_images"] == 54 and entry["val_images"] == 18 and entry["val_accepted"] >= 0.95
    fit = open_set.read_fit(run)
    assert entry["fingerprint"] == fit.fingerprint and entry["dims"] == fit.dims
    scored = json.loads((run / "metrics.json").read_text())["evaluation"]["open_set"]
    assert 0.0 <= scored["unknown_share"] <= 1.0 and scored["threshold_applied"] == entry["threshold"]
    assert "calibration" in json.loads((run / "model.json").read_text())


def test_an_out_of_domain_image_is_unknown_and_a_class_photo_is_not(run, strange, known):
    clf = Classifier.load(run)
    odd, photo = clf.predict([strange, known])
    assert odd.unknown is True and photo.unknown is False
    assert odd.unknown_score > clf.unknown_threshold >= photo.unknown_score
    assert odd.to_dict()["unknown"] is True and photo.to_dict()["unknown"] is False


def test_every_engine_and_export_makes_the_same_decision(run, strange, known, photos):
    images = [strange, known, *photos["roses"][8:10], *photos["tulips"][8:10]]
    reference = Classifier.load(run).predict(images)
    exports = [visiontune.api.export(run).path, visiontune.api.export(run, format="torchscript").path,
               visiontune.api.export(run, format="openvino").path]
    parity = json.loads((run / "export" / "parity.json").read_text())
    for name in ("model.onnx", "model.torchscript.pt", "model.openvino.xml"):
        assert parity[name]["passed"] and parity[name]["unknown_max_abs_diff"] <= 1e-4, name
    for model, backend in [(run, "onnx"), *[(path, None) for path in exports]]:
        got = Classifier.load(model, backend).predict(images)
        assert [p.unknown for p in got] == [p.unknown for p in reference], model
        np.testing.assert_allclose([p.unknown_score for p in got], [p.unknown_score for p in reference], atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_tflite_export_carries_the_score_as_its_second_output(run, strange, known, photos, precision):
    pytest.importorskip("onnx2tf")
    images = [strange, known, *photos["roses"][8:10]]
    reference = Classifier.load(run).predict(images)
    result = visiontune.api.export(run, format="tflite", precision=precision)
    assert result.parity["passed"] and "unknown_max_abs_diff" in result.parity
    got = Classifier.load(result.path).predict(images)
    assert [p.unknown for p in got] == [p.unknown for p in reference]
    np.testing.assert_allclose([p.unknown_score for p in got], [p.unknown_score for p in reference],
                               atol=1e-4 if precision == "fp32" else 0.01)


def test_int8_keeps_the_score_in_float_and_records_its_agreement(run, strange, known):
    result = visiontune.api.export(run, precision="int8", int8_agreement=0.5, int8_unknown_agreement=0.5, int8_max_drop=100.0)
    record = json.loads((run / "export" / "parity.json").read_text())["model.int8.onnx"]
    assert "unknown_agreement" in record and record["thresholds"]["unknown_agreement"] == 0.5
    nodes = onnx.load(str(result.path)).graph.node
    head = [n for n in nodes if n.name.startswith("/open_set/")]
    assert head and not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in head)
    odd, photo = Classifier.load(result.path).predict([strange, known])
    assert odd.unknown is True and photo.unknown is False


def test_cli_predict_shows_unknown_in_json_csv_and_table(run, strange, known, cli):
    done = cli("predict", run, strange, known, "--format", "json")
    assert done.returncode == 0, done.stderr
    records = {Path(r["source"]).name: r for r in json.loads(done.stdout)}
    assert records[strange.name]["unknown"] is True and records[known.name]["unknown"] is False
    assert records[strange.name]["unknown_score"] > records[known.name]["unknown_score"]
    rows = {Path(r["source"]).name: r for r in csv.DictReader(io.StringIO(cli("predict", run, strange, known,
                                                                               "--format", "csv").stdout))}
    assert rows[strange.name]["unknown"] == "true" and rows[known.name]["unknown"] == "false"
    table = cli("predict", run, strange, known).stdout
    assert "unknown" in next(line for line in table.splitlines() if line.startswith(str(strange)))
    assert "unknown: unlike every class the model was trained on" in table


def test_a_model_without_the_score_predicts_unknown_null(plain, strange, photos, cli):
    for clf in (Classifier.load(plain), Classifier.load(plain, "onnx")):
        assert clf.unknown_threshold is None
        p = clf.predict(strange)[0]
        assert p.unknown is None and p.unknown_score is None and p.to_dict()["unknown"] is None
    old_export = visiontune.api.export(plain).path  # made without the score: a graph with logits only
    assert [o.name for o in Classifier.load(old_export).engine.session.get_outputs()] == ["logits"]
    done = cli("predict", old_export, strange, "--format", "csv")
    assert done.returncode == 0, done.stderr
    row = next(csv.DictReader(io.StringIO(done.stdout)))
    assert row["unknown"] == "" and row["unknown_score"] == ""


def test_a_threshold_is_never_applied_to_another_fit(run, strange, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run.parent, copy)
    model_json = copy / run.name / "model.json"
    data = json.loads(model_json.read_text())
    data["open_set"]["fingerprint"] = "0" * 16  # as if open_set.safetensors had been refitted after it
    model_json.write_text(json.dumps(data))
    p = Classifier.load(copy / run.name).predict(strange)[0]
    assert p.unknown is None and p.unknown_score is None


def test_negatives_choose_the_threshold_that_separates_them(run, strange, tmp_path, photos):
    copy = tmp_path / "copy"
    shutil.copytree(run.parent, copy)
    run_copy = copy / run.name
    negatives = tmp_path / "negatives"
    negatives.mkdir()
    for square in (8, 16):
        checkerboard(negatives / f"checkerboard-{square}.png", square)
    noise_image(100, size=224).save(negatives / "noise.png")
    before = json.loads((run_copy / "model.json").read_text())["open_set"]
    result = visiontune.evaluate(run_copy, negatives=negatives, **QUICK)
    entry = json.loads((run_copy / "model.json").read_text())["open_set"]
    assert entry["chosen_on"] == "val and negatives" and entry["negative_images"] == 3
    assert entry["val_accepted"] - (1 - entry["negatives_rejected"]) > 0  # Youden's J: better than chance
    assert entry["fingerprint"] == before["fingerprint"]  # the same train images give the same fit
    assert result.metrics["open_set"]["negatives"] == str(negatives)
    # the run's newer threshold reaches an engine of the same fit (here PyTorch; exports are checked above)
    assert Classifier.load(run_copy).unknown_threshold == entry["threshold"]


def test_threshold_rules():
    val = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert open_set.accept_threshold(val, 0.95) == 1.0  # 95 % of 10 images: all of them
    assert open_set.accept_threshold(val, 0.8) == 0.8
    assert open_set.separating_threshold(val, np.array([0.85, 0.95, 1.5])) == 0.8  # J = 0.8 - 0
    assert open_set.separating_threshold(val, np.array([2.0, 3.0])) == 1.0  # everything in, every negative out


def test_no_open_set_removes_a_score_an_earlier_evaluation_fitted(run, strange, tmp_path):
    shutil.copytree(run.parent, tmp_path / "copy", ignore=shutil.ignore_patterns("export"))  # photos beside the run
    copy = tmp_path / "copy" / run.name
    visiontune.evaluate(copy, open_set=False, map_points=0, **QUICK)
    assert "open_set" not in json.loads((copy / "model.json").read_text())
    assert not (copy / "open_set.safetensors").exists() and (run / "open_set.safetensors").is_file()
    assert Classifier.load(copy).predict([strange])[0].unknown is None


def test_the_default_dimensions_are_one_a_class_and_at_least_16(run):
    assert json.loads((run / "model.json").read_text())["open_set"]["dims"] == 16  # 3 classes
    features = np.random.default_rng(0).normal(size=(200, 64)).astype(np.float32)
    assert open_set.fit_knn(features, open_set.auto_dims(40)).dims == 40
    assert open_set.fit_knn(features[:10], open_set.auto_dims(40)).dims == 9  # 10 points span 9 directions


def test_a_bad_negatives_folder_is_one_line_and_changes_nothing(run, cli, untouched, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.jpg").write_text("not an image")
    with untouched(run.parent):
        for folder, message in ((tmp_path / "nope", "no such folder"), (empty, "empty folder"),
                                (texts, "could be read as an image")):
            done = cli("evaluate", run, "--negatives", folder, "--quiet")
            assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
            assert done.stderr.startswith("visiontune: error: ") and message in done.stderr, done.stderr
        done = cli("evaluate", run, "--negatives", empty, "--no-open-set")
        assert done.returncode == 2 and "--negatives" in done.stderr and done.stderr.count("\n") == 1
