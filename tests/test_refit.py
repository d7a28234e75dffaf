"""The refit: choices made on held-out predictions (the val split, or k folds over train + val), then the kept model
trained on every labelled image; the held-out logits calibrate it; a killed cross-fit resumes to the same result."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import visiontune
from conftest import kill_train_when
from deploy_run import photos_folder
from visiontune.models.run_dir import RunDir
from visiontune.training.budget import Counts, Rates, predict_seconds
from visiontune.training.crossfit import fold_positions

FAST = dict(views=1, head_epochs=3, finetune_epochs=1, seed=0, val=0.25, test=0.25, evaluate=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return photos_folder(tmp_path_factory.mktemp("tiny"))


def test_one_fold_holds_out_the_val_split_and_k_folds_hold_out_every_image_once():
    y = np.array([0] * 12 + [1] * 9 + [2] * 6)
    assert [f.tolist() for f in fold_positions(y, 20, 1, seed=0)] == [list(range(20, 27))]
    folds = fold_positions(y, 20, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))
    for held in folds:  # stratified: each fold holds a third of every class
        assert np.bincount(y[held], minlength=3).tolist() == [4, 3, 2]
    assert [f.tolist() for f in fold_positions(y, 20, 3, seed=0)] == [f.tolist() for f in folds]  # seeded


def test_default_run_is_refit_on_train_and_val(tiny, tmp_path):
    result = visiontune.train(tiny, out=tmp_path / "refit", **FAST)
    m = result.metrics
    split = list(csv.DictReader(open(result.run_dir / "split.csv")))
    n_val = sum(r["split"] == "val" for r in split)
    n_pool = sum(r["split"] in ("train", "val") for r in split)
    assert m["refit"]["folds"] == 1 and m["refit"]["held_out"] == "the val split"
    assert m["refit"]["images"] == n_pool and m["refit"]["oof_images"] == n_val
    assert m["val"]["top1"] == m["refit"]["oof_top1"]  # the validation number is the held-out one
    assert any("refit on train + val" in n and "out-of-fold" in n for n in m["notes"])
    logits, labels = RunDir(result.run_dir).read_out_of_fold()
    assert logits.shape == (n_val, 3) and len(labels) == n_val
    phases = [r["phase"] for r in result.history]
    assert phases[0] == "fold1.head" and phases[-1] == ("finetune" if m["refit"]["finetune_epochs"] else "head")
    refit_rows = [r for r in result.history if not r["phase"].startswith("fold")]
    assert all(r["val_acc"] == "" for r in refit_rows)  # nothing is held out from the refit
    assert sum(r["phase"] == "head" for r in refit_rows) == m["refit"]["head_epochs"]


def test_no_refit_trains_on_train_and_chooses_on_val(tiny, tmp_path):
    result = visiontune.train(tiny, out=tmp_path / "plain", refit=False, **FAST)
    assert "refit" not in result.metrics and not RunDir(result.run_dir).out_of_fold.exists()
    assert {r["phase"] for r in result.history} == {"head", "finetune"}
    assert any("--no-refit" in n for n in result.metrics["notes"])


def test_k_folds_hold_out_every_labelled_image_and_calibrate_the_refit(tiny, tmp_path):
    result = visiontune.train(tiny, out=tmp_path / "folds", folds=3, **{**FAST, "evaluate": True})
    refit = result.metrics["refit"]
    assert refit["folds"] == 3 and refit["oof_images"] == refit["images"] and len(refit["per_fold"]) == 3
    assert {r["phase"] for r in result.history} >= {"fold1.head", "fold2.head", "fold3.head", "head"}
    assert "is out-of-fold" in (result.run_dir / "MODEL_CARD.md").read_text()
    meta = json.loads((result.run_dir / "model.json").read_text())
    if refit["oof_images"] >= 30:  # EvalConfig.calibrate_min_images: the held-out logits calibrate the refit model
        assert meta["calibration"]["fitted_on"] == "out-of-fold" and meta["uncertainty"]["chosen_on"] == "out-of-fold"


def test_the_budget_counts_the_folds_and_the_refit():
    rates = Rates(frozen_views=100.0, train_views=200.0, score_views=600.0, head_views=50000.0, decode_images=300.0)
    counts = Counts(train=1000, val=200, test=200)
    # training alone: the evaluation differs the other way (without a refit it calibrates on a pass over val)
    plain = predict_seconds(4, 4, 20, counts, rates, phase2=True, folds=0, evaluate=False)
    refit = predict_seconds(4, 4, 20, counts, rates, phase2=True, folds=1, evaluate=False)
    five = predict_seconds(4, 4, 20, counts, rates, phase2=True, folds=5, evaluate=False)
    # the refit caches the val views and trains once more on train + val; five folds train five times more
    assert plain < refit < five
    assert refit - plain >= 200 * 4 / rates.frozen_views + 4 * 1200 * 5 / rates.train_views


@pytest.mark.parametrize("when", ["fold1.finetune,2,", "\nhead,"], ids=["in-a-fold", "before-the-refit"])
def test_kill_during_a_cross_fit_then_resume_gives_the_uninterrupted_result(tiny, tmp_path, when):
    exe = Path(sys.executable).with_name("visiontune")
    args = ["--views", "2", "--head-epochs", "2", "--epochs", "4", "--folds", "2", "--val", "0.25", "--test", "0.25",
            "--no-evaluate", "--quiet"]
    whole = tmp_path / "whole"
    reference = subprocess.run([str(exe), "train", str(tiny), "--out", str(whole), *args], capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    run = tmp_path / "killed"
    kill_train_when(run, when, tiny, *args)
    resumed = subprocess.run([str(exe), "train", "--resume", str(run), "--quiet"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    before, after = (json.loads((d / "metrics.json").read_text()) for d in (whole, run))
    assert after["refit"] == before["refit"] and after["test"] == before["test"]
    assert (run / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert (run / "out_of_fold.safetensors").read_bytes() == (whole / "out_of_fold.safetensors").read_bytes()
