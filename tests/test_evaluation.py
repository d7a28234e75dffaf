"""Evaluation end to end: a real Lite0 run on a few real photos, scored, reported, compared, and refused
where the input is wrong."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import visiontune
from conftest import ARTIFACTS, browser_page, needs_chromium
from deploy_run import photos_folder
from visiontune import samples
from visiontune.errors import ConfigError, DatasetError, ModelError
from visiontune.evaluation import plots
from visiontune.evaluation.embedding import project, stratified_sample
from visiontune.evaluation.features import RunNetwork, iter_features
from visiontune.models.bundle import load_bundle

FAST = dict(views=1, head_epochs=3, finetune_epochs=1, seed=0, val=0.25, test=0.25)
CLASSES = ("daisy", "roses", "tulips")


@pytest.fixture(scope="module")
def flowers(tmp_path_factory) -> Path:
    """3 classes x 8 real photos from the embedded sample."""
    return photos_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(flowers, tmp_path_factory):
    """A run trained (and so evaluated) by the public API."""
    return visiontune.train(flowers, out=tmp_path_factory.mktemp("runs") / "run", **FAST)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_training_ends_with_an_evaluation(run):
    d = run.run_dir
    for name in ("report.html", "MODEL_CARD.md", "classification_report.csv", "predictions.csv"):
        assert (d / name).is_file(), name
    for name in ("training_curves", "confusion_matrix", "per_class_f1", "class_distribution", "reliability", "roc"):
        assert (d / "plots" / f"{name}.png").stat().st_size > 5000, name
    metrics = json.loads((d / "metrics.json").read_text())
    e = metrics["evaluation"]
    assert metrics["images"]["test"] == e["images"] == 6 and e["split"] == "test"
    # The saved model scored from scratch agrees with what training measured on its cached test features.
    assert e["top1"] == pytest.approx(metrics["test"]["top1"])
    assert set(e) >= {"top1", "balanced_accuracy", "log_loss", "macro", "weighted", "per_class", "confusion_matrix",
                      "most_confused", "roc_auc", "ece", "reliability", "temperature", "uncertainty_threshold"}
    assert "top3" not in e  # three classes: top-3 would always be 100 %
    assert np.array(e["confusion_matrix"]).sum() == 6
    # Six validation images are too few to fit a temperature: model.json is left alone, and the report says so.
    assert e["temperature"] == 1.0 and any("not calibrated" in n for n in e["notes"])
    assert "calibration" not in json.loads((d / "model.json").read_text())


def test_report_files_agree_with_metrics(run):
    e = run.metrics["evaluation"]
    rows = {r["class"]: r for r in _rows(run.run_dir / "classification_report.csv")}
    for per in e["per_class"]:
        assert int(rows[per["label"]]["support"]) == per["support"]
        assert float(rows[per["label"]]["f1"]) == pytest.approx(per["f1"], abs=1e-6)
    assert float(rows["accuracy"]["f1"]) == pytest.approx(e["top1"], abs=1e-6)
    predictions = _rows(run.run_dir / "predictions.csv")
    assert len(predictions) == 6
    assert np.mean([p["true"] == p["predicted"] for p in predictions]) == pytest.approx(e["top1"])
    card = (run.run_dir / "MODEL_CARD.md").read_text()
    assert "## Intended use" in card and f"{e['top1']:.1%}" in card and "Classifier.load" in card


def test_a_low_validation_loss_is_explained_and_every_pass_shows_itself(run, tmp_path, capfd):
    from visiontune.config import TrainConfig
    from visiontune.evaluation.evaluate import loss_gap_note
    from visiontune.models.run_dir import RunDir

    rows = [{"train_loss": 0.9, "val_loss": 0.6}, {"train_loss": 0.8, "val_loss": 0.5}, {"train_loss": 0.7, "val_loss": ""}]
    note = loss_gap_note(rows, TrainConfig(label_smoothing=0.1, views=4))
    assert note.startswith("validation loss is below training loss in 2 of 2 epochs: expected here")
    assert "label smoothing 0.1" in note and "4 cached view(s)" in note and "dropout 0.2" in note
    assert loss_gap_note([{"train_loss": 0.5, "val_loss": 0.7}] * 3, TrainConfig()) is None  # the usual way round
    # This run's own report says so exactly when its history shows it.
    history = RunDir(run.run_dir).read_history()
    expected = loss_gap_note(history, RunDir(run.run_dir).read_config()[2])
    html = (run.run_dir / "report.html").read_text()
    assert (expected is not None) == ("validation loss is below training loss" in html)
    assert expected is None or any(r["val_loss"] < r["train_loss"] for r in history)
    # The same run with the history such runs usually have (a sibling folder: split.csv's relative paths hold).
    copy = tmp_path / "run"
    shutil.copytree(run.run_dir, copy)
    with open(copy / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["val_loss"] = str(float(r["train_loss"]) * 0.8)
    with open(copy / "history.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    visiontune.evaluate(copy, gradcam_images=2, map_points=12)
    err = capfd.readouterr().err  # every pass shows itself, the unbarred ones by a line
    for step in ("unknown score: train", "score test", "map features", "map: placing 6 images", "evaluate: Grad-CAM"):
        assert step in err, (step, err)
    html = (copy / "report.html").read_text()
    assert f"validation loss is below training loss in {len(rows)} of {len(rows)} epochs" in html
    assert "label smoothing 0.1" in html


def test_torch_and_onnx_backends_score_alike(run, tmp_path):
    torch_eval = visiontune.evaluate(run.run_dir, out=tmp_path / "torch", backend="torch", calibrate=False, map_points=0)
    onnx_rows = _rows(run.run_dir / "predictions.csv")
    torch_rows = _rows(tmp_path / "torch" / "predictions.csv")
    assert [r["predicted"] for r in torch_rows] == [r["predicted"] for r in onnx_rows]
    assert [float(r["probability"]) for r in torch_rows] == pytest.approx([float(r["probability"]) for r in onnx_rows], abs=1e-4)
    assert torch_eval.metrics["backend"] == "torch"
    # map_points=0: no embedding map, and no extra pass for it
    assert "embedding_map" not in torch_eval.metrics and 'id="map-svg"' not in (tmp_path / "torch" / "report.html").read_text()


def test_features_come_with_the_logits_scoring_gave(run, tmp_path):
    rows = _rows(run.run_dir / "predictions.csv")
    gone = tmp_path / "gone.jpg"
    paths = [rows[0]["path"], str(gone)] + [r["path"] for r in rows[1:]]
    model, meta = load_bundle(run.run_dir)
    chunks = list(iter_features(model, meta.preprocess, paths, chunk_images=4))  # a few images: PyTorch
    assert [[i for i, _ in c.failed] for c in chunks] == [[1], []]  # listed by position, not fatal
    assert sum((c.indices for c in chunks), []) == [0, 2, 3, 4, 5, 6]
    logits = np.concatenate([c.logits for c in chunks])
    features = np.concatenate([c.features for c in chunks])
    assert features.shape == (6, model.num_features) and chunks[0].crops.shape == (3, 224, 224, 3)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # uncalibrated: predictions.csv's probabilities
    assert [meta.labels[i] for i in probs.argmax(1)] == [r["predicted"] for r in rows]
    assert probs.max(1) == pytest.approx([float(r["probability"]) for r in rows], abs=1e-4)
    # Many images go through ONNX Runtime (a graph traced for the purpose): the same numbers.
    notes = []
    traced = list(iter_features(model, meta.preprocess, paths, chunk_images=4, onnx=True, notes=notes))
    assert notes == [] and sum((c.indices for c in traced), []) == [0, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(np.concatenate([c.features for c in traced]), features, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([c.logits for c in traced]), logits, atol=1e-4)
    # One evaluation's passes share the run's network: loaded once, each engine made once, the same numbers.
    network = RunNetwork(run.run_dir)
    assert network.runner(True, []) is network.runner(True, []) and network.runner(False, []) is not None
    shared = list(network.iter(paths, onnx=True, chunk_images=4))
    np.testing.assert_allclose(np.concatenate([c.features for c in shared]), features, atol=1e-4)


def test_tta_evaluation_scores_what_predict_tta_returns(run, cli, tmp_path):
    done = cli("evaluate", run.run_dir, "--tta", "--no-calibrate", "--out", tmp_path / "tta", "--quiet")
    assert done.returncode == 0, done.stderr
    e = json.loads((tmp_path / "tta" / "metrics.json").read_text())["evaluation"]
    assert e["tta"] is True and run.metrics["evaluation"]["tta"] is False
    rows = _rows(tmp_path / "tta" / "predictions.csv")
    predicted = visiontune.Classifier.load(run.run_dir, backend="onnx").predict([r["path"] for r in rows], tta=True)
    assert [r["predicted"] for r in rows] == [p.label for p in predicted]
    assert [float(r["probability"]) for r in rows] == pytest.approx([p.probability for p in predicted], abs=1e-5)
    # Six views an image really differ from the single centre crop.
    plain = {r["path"]: float(r["probability"]) for r in _rows(run.run_dir / "predictions.csv")}
    assert any(abs(plain[r["path"]] - float(r["probability"])) > 1e-4 for r in rows)
    assert "test-time augmentation" in (tmp_path / "tta" / "report.html").read_text()


def test_calibration_is_stored_in_model_json(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run.run_dir, copy)
    result = visiontune.evaluate(copy, calibrate_min_images=5)
    stored = json.loads((copy / "model.json").read_text())
    t = stored["calibration"]["temperature"]
    assert t > 0 and t != 1.0 and result.metrics["temperature"] == t
    assert stored["uncertainty"]["threshold"] == result.metrics["uncertainty_threshold"]
    assert (copy / "plots" / "reliability_uncalibrated.png").is_file()
    # A later consumer applies it.
    assert visiontune.Classifier.load(copy).temperature == t


def test_other_data_with_a_missing_class_needs_allow_subset(run, flowers, tmp_path, untouched):
    subset = tmp_path / "subset"
    for name in CLASSES[:2]:
        shutil.copytree(flowers / name, subset / name)
    with untouched(subset):
        with pytest.raises(DatasetError, match=r"missing from the data: tulips.*--allow-subset"):
            visiontune.evaluate(run.run_dir, data=subset)
        result = visiontune.evaluate(run.run_dir, data=subset, allow_subset=True)
    assert result.out_dir == run.run_dir / "evaluations" / "subset-test"
    e = result.metrics
    assert e["images"] == 16 and e["absent_classes"] == ["tulips"]
    tulips = next(r for r in e["per_class"] if r["label"] == "tulips")
    assert tulips["support"] == 0 and tulips["recall"] is None
    assert (result.out_dir / "report.html").is_file()


def test_unknown_classes_are_listed(run, flowers, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(flowers / "daisy", other / "daisy")
    shutil.copytree(samples.path("flowers-mini") / "sunflowers", other / "sunflowers")
    with pytest.raises(DatasetError, match=r"unknown to the model: sunflowers; missing from the data: roses, tulips"):
        visiontune.evaluate(run.run_dir, data=other, allow_subset=True)


def test_broken_run_directories_say_which_file(run, tmp_path):
    for missing, error, message in (("model.json", ModelError, "model.json is missing"),
                                    ("model.safetensors", ModelError, "model.safetensors"),
                                    ("split.csv", DatasetError, "split.csv is missing")):
        broken = tmp_path / f"no-{missing}"
        shutil.copytree(run.run_dir, broken)
        (broken / missing).unlink()
        with pytest.raises(error, match=message):
            visiontune.evaluate(broken)


def test_compare_marks_the_best_and_refuses_other_splits(run, flowers, tmp_path):
    second = visiontune.train(flowers, out=tmp_path / "second", head_lr=3e-3, evaluate=True, **FAST)
    visiontune.bench(second.run_dir, runs=3, warmup=1, batch_sizes=(1,), throughput_seconds=0.05)
    result = visiontune.compare([run.run_dir, second.run_dir], out=tmp_path / "cmp")
    assert [f.name for f in result.files] == ["comparison.csv", "comparison.md", "comparison.html"]
    rows = _rows(tmp_path / "cmp" / "comparison.csv")
    assert [r["backbone"] for r in rows] == ["efficientnet_lite0"] * 2
    assert rows[1]["settings"] == "head_lr=0.003" and rows[0]["settings"] == "head_lr=0.001"
    top1 = [float(r["top1"]) for r in rows]
    assert result.best["top1"] == {i for i, v in enumerate(top1) if v == max(top1)}
    assert rows[0]["latency_ms"] == "" and float(rows[1]["latency_ms"]) > 0  # from the bench.json bench saved
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert markdown.count("**") >= 2 * len(result.best)
    leader = max(range(2), key=lambda i: top1[i])
    assert rows[leader]["vs_best"] == "best"  # the other is tested against it on the same 6 images
    assert rows[1 - leader]["vs_best"].startswith(("within noise (p = ", "real difference (p = "))
    lo, hi = (float(x.rstrip("%")) / 100 for x in rows[0]["top1_ci"].split("–"))
    assert lo <= float(rows[0]["top1"]) <= hi

    other = tmp_path / "other-split"
    shutil.copytree(run.run_dir, other)
    lines = (other / "split.csv").read_text().splitlines()
    test_row = next(i for i, line in enumerate(lines) if line.endswith(",test"))
    lines[test_row] = lines[test_row][: -len("test")] + "val"
    (other / "split.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="not scored on the same split"):
        visiontune.compare([run.run_dir, other], out=tmp_path / "cmp2")


def test_cli_evaluate_and_its_errors(run, cli, tmp_path):
    done = cli("evaluate", run.run_dir, "--out", tmp_path / "e", "--quiet", "--map-points", "4")
    assert done.returncode == 0, done.stderr
    assert "test: top-1 " in done.stdout and "6 images)" in done.stdout
    assert f"report: {tmp_path / 'e' / 'report.html'}" in done.stdout
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["evaluation"]["embedding_map"]["points"] == 4
    assert "one of 4 test images (a stratified sample of the 6 scored)" in (tmp_path / "e" / "report.html").read_text()
    negative = cli("evaluate", run.run_dir, "--map-points", "-1")
    assert negative.returncode == 2 and negative.stderr.count("\n") == 1 and "map" in negative.stderr
    bad = cli("evaluate", tmp_path / "nowhere")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nowhere" in bad.stderr
    one = cli("compare", run.run_dir)
    assert one.returncode == 2 and "two or more runs" in one.stderr


def test_many_classes_get_a_zoomed_confusion_view(tmp_path):
    rng = np.random.default_rng(0)
    labels = [f"class {i}" for i in range(60)]
    counts = np.diag(rng.integers(5, 20, 60))
    counts[3, 7] = counts[7, 3] = 4
    counts[10, 11] = 2
    assert plots.confusion_matrix(counts, labels, tmp_path / "cm.png").stat().st_size > 5000
    assert plots.confused_block(counts, labels, tmp_path / "block.png").is_file()
    assert plots.confused_block(np.diag([3, 4]), ["a", "b"], tmp_path / "none.png") is None
    assert list(plots.class_order(np.array([[5, 0], [3, 2]]))) == [1, 0]  # worst recall first


@needs_chromium
def test_report_in_a_real_browser(run):
    report = run.run_dir / "report.html"
    url = report.resolve().as_uri()
    with browser_page({"width": 1280, "height": 900}) as (page, errors, requests):
        page.goto(url)
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("img").count() >= 8
        e = run.metrics["evaluation"]
        lo, hi = e["intervals"]["top1"]
        shown = page.locator(".card .v").first.inner_text()  # the value, and its 95 % interval under it
        assert shown == f"{e['top1']:.2%}\n95 %: {lo * 100:.1f}–{hi:.1%}"
        # Sorting the per-class table by F1 puts the rows in F1 order.
        page.locator("#per-class th", has_text="F1").click()
        shown = page.eval_on_selector_all("#per-class tbody tr td:nth-child(4)", "cells => cells.map(c => c.dataset.v)")
        assert [float(v) for v in shown] == sorted(float(v) for v in shown)
        shot = ARTIFACTS / "report.png"
        page.screenshot(path=str(shot), full_page=True)
    assert not errors, errors
    assert [r for r in requests if r != url and not r.startswith("data:")] == []
    assert shot.stat().st_size > 50_000


@needs_chromium
def test_embedding_map_in_a_real_browser(run):
    """One dot per scored image, coloured by true class with a legend, mistakes ringed; hovering or tabbing to a dot
    shows its thumbnail, file name, labels and probability."""
    summary = run.metrics["evaluation"]["embedding_map"]
    assert summary["points"] == summary["scored"] == 6 and summary["method"].startswith("PCA to 2 dimensions")
    rows = {Path(r["path"]).name: r for r in _rows(run.run_dir / "predictions.csv")}
    url = (run.run_dir / "report.html").resolve().as_uri()
    with browser_page({"width": 1280, "height": 900}) as (page, errors, requests):
        page.goto(url)
        assert "PCA to 2 dimensions (t-SNE needs at least" in page.locator("#embedding").inner_text()
        dots = page.locator("#map-svg circle")
        assert dots.count() == 6
        legend = page.eval_on_selector_all(
            "#map-legend li[data-c]", "items => items.map(i => [i.firstChild.nextSibling.textContent.trim(), "
            "i.querySelector('.muted').textContent, getComputedStyle(i.querySelector('.swatch')).backgroundColor])")
        assert [(name, count) for name, count, _ in legend] == [(c, "2") for c in CLASSES]
        colour = {name: rgb for name, _, rgb in legend}
        assert len(set(colour.values())) == 3
        tip = page.locator("#map-tip")

        def shown(dot) -> str:
            """The file name the tip shows, once its labels, probability, thumbnail and the dot's look are checked."""
            assert tip.is_visible()
            name = tip.locator(".name").inner_text()
            row = rows[name]
            assert tip.locator(".true").inner_text() == f"true: {row['true']}"
            percent = round(float(row["probability"]) * 100)
            assert tip.locator(".pred").inner_text() == f"predicted: {row['predicted']} ({percent} %)"
            assert page.evaluate("document.querySelector('#map-tip img').naturalWidth") == 64
            assert dot.evaluate("d => getComputedStyle(d).fill") == colour[row["true"]]
            assert ("wrong" in dot.get_attribute("class")) == (row["true"] != row["predicted"])
            return name

        page.evaluate("document.getElementById('map').scrollIntoView({block: 'center'})")  # clear of the sticky header
        dots.last.hover()  # drawn last, so no other dot covers it
        shown(dots.last)
        dots.first.focus()
        seen = {shown(dots.first)}
        for _ in range(5):
            page.keyboard.press("Tab")  # every dot is reachable from the keyboard
            seen.add(shown(page.locator("#map-svg circle:focus")))
        assert set(seen) == set(rows)
        page.evaluate("document.activeElement.blur()")
        ring = dict(page.eval_on_selector_all("#map-svg circle", "ds => ds.map(d => [d.getAttribute('aria-label')"
                                                                  ".split(':')[0], getComputedStyle(d).stroke])"))
        wrong = [n for n, r in rows.items() if r["true"] != r["predicted"]]
        assert wrong, "the tiny run makes mistakes on its test images, so the ring is shown"
        assert {n for n, stroke in ring.items() if stroke == "rgb(17, 17, 17)"} == set(wrong)
        page.locator("#map-only-wrong").check()
        assert sum(dots.nth(i).is_visible() for i in range(6)) == len(wrong)
        page.locator("#map-only-wrong").uncheck()
        dots.last.hover()
        page.screenshot(path=str(ARTIFACTS / "embedding_map.png"))
    assert not errors, errors
    assert [r for r in requests if r != url and not r.startswith("data:")] == []


def test_map_sample_is_stratified_and_seeded():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 9 + [3] * 1)
    chosen = stratified_sample(labels, 20)
    assert len(chosen) == 20 and list(chosen) == sorted(set(chosen.tolist()))
    assert np.bincount(labels[chosen], minlength=4).tolist() == [11, 6, 2, 1]  # every class, then in proportion
    assert list(stratified_sample(labels, 20)) == list(chosen)  # the same seed, the same sample
    assert list(stratified_sample(labels, 500)) == list(range(100))


def test_tsne_keeps_clusters_apart():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (3, 64))
    features = np.concatenate([c + rng.normal(0, 1, (15, 64)) for c in centres])
    xy, method = project(features)
    assert method.startswith("t-SNE (perplexity 14.7)") and xy.shape == (45, 2)
    assert xy.min() >= 0 and xy.max() <= 1
    truth = np.repeat([0, 1, 2], 15)
    distance = ((xy[:, None] - xy[None]) ** 2).sum(-1) + np.eye(45) * 1e9
    assert (truth[distance.argmin(1)] == truth).all()  # every point's nearest neighbour is in its own cluster
    few, method = project(features[:4])
    assert method.startswith("PCA") and few.shape == (4, 2)
    one, _ = project(features[:1])
    assert one.tolist() == [[0.5, 0.5]]


def test_a_split_csv_row_whose_file_vanished_is_noted(run, flowers, tmp_path, cli):
    photos = tmp_path / "photos"
    shutil.copytree(flowers, photos)
    copy = tmp_path / "run"
    shutil.copytree(run.run_dir, copy)
    rows = _rows(copy / "split.csv")
    for r in rows:  # the copy points at its own copy of the photos
        r["path"] = str(photos / Path(r["path"]).parent.name / Path(r["path"]).name)
    with open(copy / "split.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    gone = Path(next(r["path"] for r in rows if r["split"] == "test"))
    gone.unlink()
    done = cli("evaluate", copy, "--out", tmp_path / "eval")
    assert done.returncode == 0, done.stderr
    assert f"note: {gone}: listed in split.csv" in done.stderr and "but missing" in done.stderr
    notes = json.loads((tmp_path / "eval" / "metrics.json").read_text())["evaluation"]["notes"]
    assert any(str(gone) in n and "missing" in n for n in notes)
