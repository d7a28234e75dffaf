"""Multi-label classification end to end on 2 x 2 mosaics of real photos: label sets from a manifest, the
iterative split, training with a sigmoid per label, per-label thresholds in model.json and in every export,
evaluation, predict and serve; and the bad inputs a user can give."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import visiontune
from conftest import run_cli
from multilabel_data import CLASSES, mosaic_dataset
from test_serve import Server
from visiontune.config import ScanConfig, SplitConfig, TrainConfig
from visiontune.data.index import load_dataset
from visiontune.data.integrity import scan_dataset
from visiontune.data.multilabel import iterative_stratification
from visiontune.data.split import split_dataset
from visiontune.inference import Classifier
from visiontune.training.multilabel import choose_task
from visiontune.training.thresholds import choose_thresholds

FAST = dict(model="test_efficientnet", from_scratch=True, views=1, head_epochs=4, finetune_epochs=1, val=0.3,
            test=0.3, seed=0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return mosaic_dataset(tmp_path_factory.mktemp("mosaics"), images=30, side=96)


@pytest.fixture(scope="module")
def run(manifest, tmp_path_factory) -> Path:
    return visiontune.train(manifest, out=tmp_path_factory.mktemp("runs") / "multi", quiet=True, **FAST).run_dir


def test_manifest_gives_label_sets_and_the_split_keeps_every_label_everywhere(manifest, tmp_path):
    ds = load_dataset(manifest)
    assert ds.task == "multilabel" and ds.classes == list(CLASSES)
    assert ds.targets.shape == (30, 3) and (ds.targets.sum(axis=1) >= 1).all() and (ds.targets.sum(axis=1) > 1).any()
    split = split_dataset(ds, cfg=SplitConfig(val=0.3, test=0.3, seed=0))
    for k in range(3):
        assert ds.targets[split.assignment == k].any(axis=0).all()  # every label in train, val and test
    assert split_dataset(ds, cfg=SplitConfig(val=0.3, test=0.3, seed=0)).assignment.tolist() == split.assignment.tolist()
    split.write_csv(tmp_path / "split.csv")
    again = load_dataset(tmp_path / "split.csv")
    assert again.task == "multilabel" and (again.targets == ds.targets).all()
    report = scan_dataset(ds, ScanConfig(workers=1), quiet=True).to_dict()
    assert report["task"] == "multilabel" and report["label_sets"]["co_occurrence"]


def test_iterative_stratification_spreads_a_rare_label():
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 5)) < [0.5, 0.3, 0.2, 0.1, 0.03]).astype(np.uint8)
    parts = iterative_stratification(targets, [0.6, 0.2, 0.2], np.random.default_rng(1))
    for part, share in enumerate((0.6, 0.2, 0.2)):
        got = targets[parts == part].sum(axis=0)
        assert np.all(np.abs(got - share * targets.sum(axis=0)) <= 1.0 + 1e-9)


def test_thresholds_are_guarded_for_rare_labels():
    rng = np.random.default_rng(0)
    truth = np.zeros((100, 2), dtype=np.uint8)
    truth[:40, 0] = 1
    truth[:2, 1] = 1  # 2 positives: too few to choose on
    probs = np.clip(truth * 0.6 + rng.random((100, 2)) * 0.5, 0, 1)
    notes: list[str] = []
    chosen = choose_thresholds(probs, truth, ["common", "rare"], 3, notes)
    assert chosen["rare"] == 0.5 and "rare (2)" in notes[0]
    assert 0.3 < chosen["common"] < 0.9
    # a label whose probabilities carry no signal must not end below every image (predicted for all of them)
    noise = choose_thresholds(rng.random((100, 1)), truth[:, :1], ["noise"], 3, [])
    assert (rng.random(100) >= noise["noise"]).mean() < 0.9


def test_train_evaluate_export_predict_with_thresholds_carried(run, manifest, tmp_path):
    meta = json.loads((run / "model.json").read_text())
    assert meta["task"] == "multilabel" and set(meta["multilabel"]["thresholds"]) == set(CLASSES)
    assert meta["multilabel"]["chosen_on"] == "out-of-fold"
    evaluation = json.loads((run / "metrics.json").read_text())["evaluation"]
    for key in ("mAP", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss"):
        assert 0.0 <= evaluation[key] <= 1.0 and key in evaluation["intervals"]
    assert [r["label"] for r in evaluation["per_label"]] == list(CLASSES)
    html = (run / "report.html").read_text()
    assert "Per-label metrics" in html and "Most-missed labels" in html and "data:image/png" in html

    fp32 = visiontune.api.export(run).path
    int8 = visiontune.api.export(run, precision="int8", int8_agreement=0.5).path
    torch_clf = Classifier.load(run, backend="torch")
    images = sorted(manifest.parent.glob("*.jpg"))[:6]
    expected = torch_clf.predict(images)
    assert all(p.chosen is not None for p in expected)
    for path in (fp32, int8):
        clf = Classifier.load(path)
        assert clf.task == "multilabel" and clf.thresholds.tolist() == torch_clf.thresholds.tolist()
    for got, want in zip(Classifier.load(fp32).predict(images), expected):
        assert got.label == want.label
        assert [p for _, p in got.chosen] == pytest.approx([p for _, p in want.chosen], abs=1e-4)

    done = run_cli("evaluate", run, "--quiet")
    assert done.returncode == 0 and "mAP" in done.stdout and "subset accuracy" in done.stdout, done.stderr
    done = run_cli("predict", fp32, images[0], "--format", "json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)[0]
    assert answer["label"] == expected[0].label and "labels" in answer
    passed = {e["label"] for e in answer["labels"]}
    assert all(e["probability"] >= meta["multilabel"]["thresholds"][e["label"]] for e in answer["labels"])
    assert answer["label"] == ("|".join(e["label"] for e in answer["labels"]) if passed else "none")


def test_serve_returns_the_label_set(run, manifest, tmp_path):
    onnx_file = run / "export" / "model.onnx"
    if not onnx_file.is_file():
        visiontune.api.export(run)
    image = sorted(manifest.parent.glob("*.jpg"))[0]
    expected = Classifier.load(onnx_file).predict(image)[0]
    server = Server(onnx_file, tmp_path / "serve.log")
    try:
        server.wait_ready()
        info = server.get("/v1/model").json()
        assert info["task"] == "multilabel" and set(info["thresholds"]) == set(CLASSES)
        reply = server.post("/v1/predict", image.read_bytes())
        assert reply.status == 200, reply.body
        got = reply.json()
        assert got["label"] == expected.label
        assert [e["label"] for e in got["labels"]] == [name for name, _ in expected.chosen]
    finally:
        server.stop()


def test_class_folders_with_shared_copies_become_label_sets(manifest, tmp_path):
    images = sorted(manifest.parent.glob("*.jpg"))
    for k, name in enumerate(CLASSES):
        (tmp_path / name).mkdir()
        for image in images[k * 4:(k + 1) * 4]:
            shutil.copy(image, tmp_path / name / image.name)
    shutil.copy(images[0], tmp_path / "roses" / "copy.jpg")  # the same bytes as daisy/m000.jpg
    ds = load_dataset(tmp_path)
    report = scan_dataset(ds, ScanConfig(workers=1), quiet=True)
    merged, usable = choose_task(ds, report, TrainConfig(task="multilabel"), notes := [], quiet=True)
    first = ds.paths.index(f"daisy/{images[0].name}")
    assert merged.targets[first].tolist() == [1, 1, 0] and usable.sum() == len(ds) - 1
    assert "1 copies" in notes[0]


def test_bad_label_sets_are_one_line_and_exit_2(manifest, run, tmp_path):
    bad = tmp_path / "empty.csv"
    name = sorted(manifest.parent.glob("*.jpg"))[0]
    bad.write_text(f"path,labels\n{name},daisy\n{name.parent / 'm001.jpg'},\n")
    before = bad.read_bytes()
    done = run_cli("train", bad, "--out", tmp_path / "r")
    assert done.returncode == 2 and "empty label set" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and bad.read_bytes() == before
    unknown = tmp_path / "unknown.csv"
    unknown.write_text(f"path,labels\n{name},daisy|sunflowers\n")
    done = run_cli("evaluate", run, "--data", unknown, "--allow-subset")
    assert done.returncode == 2 and "unknown to the model: sunflowers" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_budget_search_keeps_one_output_per_label(manifest, tmp_path):
    wider = "efficientnet_lite0+efficientnet_lite1"
    result = visiontune.train(manifest, out=tmp_path / "searched", budget="1h", head_epochs=3, seed=0, val=0.3,
                              test=0.3, evaluate=False, search_models=wider, search_trials=3, quiet=True)
    search = result.metrics["search"]
    assert search["trials"] == 3 and wider in search["models"]
    meta = json.loads((result.run_dir / "model.json").read_text())
    assert meta["task"] == "multilabel" and meta["architecture"]["num_classes"] == len(CLASSES)
    assert any("out-of-fold mAP" in n for n in result.metrics["notes"])
