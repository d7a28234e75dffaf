"""Ensembles and knowledge distillation: the arithmetic on hand-made numbers, then real tiny runs.

Members: the shared tiny Lite0 run (224 px) and a tiny timm network (160 px, ImageNet mean/std) trained from
scratch on the first run's own split.csv with another seed, so the ensemble engine must fit every crop to a
member with another input size and normalisation.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import visiontune
from deploy_run import FAST, copy_run
from visiontune.config import DistillConfig, EnsembleConfig, TrainConfig
from visiontune.data.index import load_dataset
from visiontune.data.loader import load_all, load_for_model
from visiontune.data.split import Split
from visiontune.errors import ConfigError, ModelError
from visiontune.inference import Classifier
from visiontune.inference.ensemble import fit_crops
from visiontune.inference.voting import ensemble_logits, fit_weights, log_loss, normalise, parse_weights, soft_vote
from visiontune.jobs.teacher import RunTeacher
from visiontune.models.registry import get_spec
from visiontune.models.run_dir import RunDir
from visiontune.training.distill import kl_to_teacher
from visiontune.training.feature_cache import view_crop
from visiontune.training.phases import augment_from

TINY_AGREEMENT = 0.5  # as in test_export: six test images of a barely-trained model can flip under INT8
LOOSE_DROP = 100.0  # and one flipped image of six is 16.7 points of accuracy


# ------------------------------------------------------------------ arithmetic on hand-made logits


def test_soft_voting_is_the_weighted_mean_of_calibrated_probabilities():
    a = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b = np.array([[0.0, 0.0, 3.0], [0.0, 2.0, 0.0]])
    t_a, t_b = 1.0, 2.0  # member temperatures
    pa = np.exp(a / t_a) / np.exp(a / t_a).sum(1, keepdims=True)
    pb = np.exp(b / t_b) / np.exp(b / t_b).sum(1, keepdims=True)
    vote = soft_vote(np.stack([pa, pb]), [3, 1])  # weights are normalised: 0.75 / 0.25
    np.testing.assert_allclose(vote, 0.75 * pa + 0.25 * pb, rtol=1e-12)
    e2 = np.exp(2.0)
    assert vote[0, 0] == pytest.approx(0.75 * e2 / (e2 + 2) + 0.25 / (2 + np.exp(1.5)), abs=1e-12)
    np.testing.assert_allclose(vote.sum(1), 1.0)
    # The ensemble's logits are log-probabilities: softmax gives the vote back, argmax follows the vote.
    z = ensemble_logits(np.stack([pa, pb]), [3, 1])
    np.testing.assert_allclose(np.exp(z) / np.exp(z).sum(1, keepdims=True), vote, rtol=1e-5)
    assert list(z.argmax(1)) == [0, 1]
    # Equal weights on two members that disagree: the vote is exactly the mean.
    np.testing.assert_allclose(soft_vote(np.stack([pa, pb]), [1, 1]), (pa + pb) / 2, rtol=1e-12)


def test_weights_fitted_on_validation_favour_the_better_member():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    good = np.full((200, 4), 0.1)
    good[np.arange(200), labels] = 0.7  # right with 0.7 every time
    noise = rng.dirichlet(np.ones(4), 200)  # knows nothing
    probs = np.stack([noise, good])
    w = fit_weights(probs, labels)
    assert w.sum() == pytest.approx(1.0) and w[1] > 0.9 > 0.1 > w[0]
    best = log_loss(soft_vote(probs, w), labels)
    for other in ([0.5, 0.5], [0.2, 0.8], [0.0, 1.0]):  # the fit is the minimum of the validation log loss
        assert best <= log_loss(soft_vote(probs, other), labels) + 1e-9
    # Two members each right on half the images complement each other: both keep weight.
    half = np.stack([np.where(np.arange(200)[:, None] % 2 == 0, good, 0.25), np.where(np.arange(200)[:, None] % 2, good, 0.25)])
    assert np.all(fit_weights(half, labels) > 0.3)


def test_weight_settings_are_checked():
    assert parse_weights("fit") == "fit" and parse_weights("0.5,0.25, 0.25") == [0.5, 0.25, 0.25]
    with pytest.raises(ConfigError, match="one number per run"):
        parse_weights("0.5,heavy")
    with pytest.raises(ConfigError, match="2 weight.*3 member"):
        normalise([1, 2], 3)
    with pytest.raises(ConfigError, match="0 or more"):
        normalise([1, -1], 2)


def test_each_member_sees_its_own_crop(photos):
    """A Lite0 member of a Lite2-sized ensemble gets the region Lite0's own preprocessing would crop."""
    lite0, lite2 = get_spec("efficientnet_lite0").preprocess, get_spec("efficientnet_lite2").preprocess
    images = photos["daisy"][:4] + photos["roses"][:4]
    own = np.stack([load_for_model(p, lite0) for p in images])
    fitted = fit_crops(np.stack([load_for_model(p, lite2) for p in images]), lite2, lite0)
    assert fitted.shape == own.shape and fitted.dtype == np.uint8
    assert np.abs(fitted.astype(float) - own).mean() < 5  # resampling differences only, same field of view
    assert fit_crops(own, lite0, lite0) is own


# ------------------------------------------------------------------ real tiny runs


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    a = copy_run(tmp_path_factory, "ensemble")
    b = a.parent / "run_b"
    visiontune.train(a / "split.csv", out=b, model="test_efficientnet", from_scratch=True, **{**FAST, "seed": 1})
    return [a, b]


@pytest.fixture(scope="module")
def ens(members) -> Path:
    out = members[0].parent / "ens"
    # backend and evaluate come from the config: no default of the verb's may override them
    visiontune.api.ensemble(members, out=out, weights="0.6,0.4", config=EnsembleConfig(backend="torch", evaluate=False))
    return out


def test_ensemble_directory_is_a_model_like_a_run(ens, members, photos):
    manifest = json.loads((ens / "ensemble.json").read_text())
    assert [m["path"] for m in manifest["members"]] == ["../run", "../run_b"]  # relative: they move together
    assert [m["weight"] for m in manifest["members"]] == [0.6, 0.4] and manifest["weights_from"] == "given"
    assert manifest["backend"] == "torch" and "evaluation" not in json.loads((ens / "metrics.json").read_text())
    assert manifest["val"]["top1"] is not None and manifest["preprocess_from"] == "../run"
    meta = json.loads((ens / "model.json").read_text())
    assert meta["id2label"] == {"0": "daisy", "1": "roses", "2": "tulips"} and meta["preprocess"]["input_size"] == 224
    own = load_dataset(members[0] / "split.csv")
    copied = load_dataset(ens / "split.csv")  # rewritten relative to the ensemble: the same files
    assert sorted(map(str, (copied.abspath(i).resolve() for i in range(len(copied))))) == \
        sorted(map(str, (own.abspath(i).resolve() for i in range(len(own)))))
    metrics = json.loads((ens / "metrics.json").read_text())
    assert metrics["images"] == {"train": 12, "val": 6, "test": 6} and len(metrics["members"]) == 2

    clf = Classifier.load(ens)
    a, b = Classifier.load(members[0]), Classifier.load(members[1])
    crops = np.stack([load_for_model(p, clf.preprocess) for p in photos["tulips"][:3]])
    expected = 0.6 * a.probabilities(crops) + 0.4 * b.probabilities(fit_crops(crops, clf.preprocess, b.preprocess))
    np.testing.assert_allclose(clf.probabilities(crops), expected, atol=1e-5)
    predictions = visiontune.predict(ens, [str(p) for p in photos["daisy"][:2]], top_k=2)
    assert all(p.ok and p.label in clf.labels and len(p.top_k) == 2 for p in predictions)
    with pytest.raises(ModelError, match="ensemble"):
        clf.explain(photos["daisy"][0])
    with pytest.raises(ConfigError, match="distil it into one model"):
        visiontune.api.export(ens)


def test_cli_evaluates_an_ensemble_and_compare_takes_it(ens, members, cli, tmp_path):
    done = cli("evaluate", ens, "--backend", "torch", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "test: top-1 " in done.stdout and "6 images)" in done.stdout and (ens / "report.html").is_file()
    evaluation = json.loads((ens / "metrics.json").read_text())["evaluation"]
    assert evaluation["images"] == 6 and evaluation["backend"] == "torch"
    assert "no single feature space" in evaluation["embedding_map"]["note"]  # members' features do not share axes
    visiontune.evaluate(members[0], backend="torch", gradcam_images=0)
    comparison = visiontune.compare([members[0], ens], out=tmp_path / "cmp")
    assert [r["backbone"] for r in comparison.rows][1].startswith("ensemble of 2")


def test_cli_ensemble_prints_its_test_score_with_an_interval(members, cli, tmp_path):
    done = cli("ensemble", *members, "--out", tmp_path / "ens", "--backend", "torch", "--quiet")
    assert done.returncode == 0, done.stderr
    [test] = [line for line in done.stdout.splitlines() if line.startswith("test top-1 ")]
    assert re.match(r"test top-1 \d+\.\d\d% \(\d+\.\d–\d+\.\d%, 6 images\)  macro F1 ", test), test
    # Each member's validation score beside its run's own, which it can differ from (another crop, another engine).
    for run in members:
        own = json.loads((run / "metrics.json").read_text())["val"]["top1"]
        [line] = [x for x in done.stdout.splitlines() if x.startswith("  val top-1 ") and x.endswith("/" + run.name)]
        assert f"(its run: {own:.2%})" in line, line


def test_mismatched_labels_are_refused_in_one_line(members, cli, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(members[0], other)
    meta = json.loads((other / "model.json").read_text())
    meta["id2label"]["2"] = "sunflowers"  # a run on daisy, roses, sunflowers
    (other / "model.json").write_text(json.dumps(meta))
    done = cli("ensemble", members[0], other, "--out", tmp_path / "ens")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("visiontune: error:"), done.stderr
    assert "only in" in lines[0] and "tulips" in lines[0] and "sunflowers" in lines[0]
    assert not (tmp_path / "ens").exists()


def test_members_trained_on_different_splits_are_refused(members, tmp_path):
    moved = members[0].parent / "run_moved"  # next to the photos, so its split.csv still resolves
    shutil.copytree(members[0], moved, dirs_exist_ok=True)
    rows = (moved / "split.csv").read_text().splitlines()
    first_test = next(i for i, r in enumerate(rows) if r.endswith(",test"))
    rows[first_test] = rows[first_test][: -len("test")] + "train"  # one test image became a training image
    (moved / "split.csv").write_text("\n".join(rows) + "\n")
    try:
        with pytest.raises(ConfigError, match=r"different splits \(1 image"):
            visiontune.api.ensemble([members[0], moved], out=tmp_path / "ens", evaluate=False)
    finally:
        shutil.rmtree(moved)


def _train_view_kl(run: Path, teacher_dir: Path) -> float:
    """KL(teacher || student) at T = 1 on exactly the cached views the student trained on."""
    _, _, cfg = RunDir(run).read_config()
    dataset = load_dataset(teacher_dir / "split.csv")
    train = np.flatnonzero(dataset.splits == 0)  # decoded first, in this order, so image k is index k
    student = Classifier.load(run)
    images = load_all([str(dataset.abspath(i)) for i in train], student.preprocess, quiet=True).images
    crops = np.stack([view_crop(images[k], v, k, cfg.seed, student.preprocess, augment_from(cfg))
                      for v in range(1 + cfg.views) for k in range(len(train))])
    teacher = RunTeacher(teacher_dir, "torch")
    teacher.prepare(list(dataset.classes), Split(dataset, dataset.splits.copy()))
    return kl_to_teacher(student.logits(crops), teacher.logits(crops, student.preprocess))


@pytest.fixture(scope="module")
def distilled(ens, members) -> dict[str, Path]:
    cache = members[0].parent / "cache"  # both students share the frozen pass and the teacher's logits
    runs = {"distilled": visiontune.api.distill(ens / "split.csv", teacher=ens, alpha=DistillConfig.alpha,
                                                config=TrainConfig(distill=DistillConfig(teacher_backend="torch")),
                                                out=members[0].parent / "distilled", cache_dir=str(cache), **FAST).run_dir}
    # The plain student's alpha and temperature come from its config alone: no default of `distill`'s may replace them.
    plain = TrainConfig(distill=DistillConfig(teacher_backend="torch", alpha=0.0, temperature=3.0))
    runs["plain"] = visiontune.api.distill(ens / "split.csv", teacher=ens, config=plain, out=members[0].parent / "plain",
                                           cache_dir=str(cache), **FAST).run_dir
    return runs


def test_distillation_brings_the_student_closer_to_the_teacher(distilled, ens):
    kl = {name: _train_view_kl(run, ens) for name, run in distilled.items()}
    assert kl["distilled"] <= kl["plain"], kl
    config = yaml.safe_load((distilled["distilled"] / "config.yaml").read_text())
    assert config["distill"]["teacher"] == str(ens) and config["distill"]["alpha"] == DistillConfig.alpha
    notes = json.loads((distilled["distilled"] / "metrics.json").read_text())["notes"]
    assert any("distilled from the ensemble" in n for n in notes)
    assert any("teacher logits for 2 view(s) of 12 training images" in n for n in notes)
    plain = yaml.safe_load((distilled["plain"] / "config.yaml").read_text())["distill"]
    assert (plain["alpha"], plain["temperature"], plain["teacher"]) == (0.0, 3.0, str(ens))
    plain_notes = json.loads((distilled["plain"] / "metrics.json").read_text())["notes"]
    assert any("reused from the cache" in n for n in plain_notes)  # computed once, by the first student


def test_distilled_run_exports_to_int8(distilled):
    result = visiontune.api.export(distilled["distilled"], precision="int8", int8_agreement=TINY_AGREEMENT,
                                   int8_max_drop=LOOSE_DROP)
    assert result.path.name == "model.int8.onnx" and result.path.is_file()
    assert Classifier.load(result.path).labels == ["daisy", "roses", "tulips"]


def test_distill_refuses_a_teacher_that_saw_the_test_images_and_bad_settings(ens, members, cli, tmp_path):
    photos_root = members[0].parent / "flowers"
    with pytest.raises(ConfigError, match="test images .* would leak"):  # another seed: another split
        visiontune.api.distill(photos_root, teacher=ens, out=tmp_path / "s", seed=7, val=0.25, test=0.25, **{
            k: v for k, v in FAST.items() if k not in ("seed", "val", "test")})
    with pytest.raises(ConfigError, match="alpha"):
        visiontune.api.distill(ens / "split.csv", teacher=ens, alpha=1.5, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="full-finetune"):
        visiontune.api.distill(ens / "split.csv", teacher=ens, full_finetune=True, out=tmp_path / "f")
    done = cli("distill", "--teacher", tmp_path / "nothing", ens / "split.csv", "--out", tmp_path / "x")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "--teacher" in done.stderr
