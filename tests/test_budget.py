"""`--budget`: the plan is chosen from measured rates, recorded in config.yaml (so the run can be repeated or resumed
as planned), stated in one line, and a bad budget is refused before any work. The run re-plans phase 2 from the speed
it measures, and the time it reports (and the budget judges) is the whole command's, evaluation included."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import yaml

import visiontune
from deploy_run import photos_folder
from visiontune.config import TrainConfig
from visiontune.errors import ConfigError
from visiontune.settings import parse_duration
from visiontune.training.budget import (
    LADDER,
    Counts,
    Rates,
    Replanner,
    choose,
    evaluation_seconds,
    predict_seconds,
)

FAST = dict(head_epochs=3, seed=0, val=0.25, test=0.25, evaluate=False)
RATES = Rates(frozen_views=100.0, train_views=200.0, score_views=600.0, head_views=50000.0, decode_images=300.0)
COUNTS = Counts(train=1000, val=200, test=200)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return photos_folder(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("5m", 300), ("1.5h", 5400), ("2min", 120), ("45", 45),
                                           (" 3M ", 180)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "0", "-5m", "5 parsecs", "nan", "fast"])
def test_bad_budgets_are_refused_naming_the_setting(text):
    with pytest.raises(ConfigError, match="budget"):
        TrainConfig(budget=text)


def test_budget_with_full_finetune_is_refused():
    with pytest.raises(ConfigError, match="budget.*full-finetune"):
        TrainConfig(budget="5m", full_finetune=True)


def test_predicted_time_grows_with_views_and_epochs():
    times = [predict_seconds(v, e, 20, COUNTS, RATES, phase2=True) for v, e in LADDER]
    assert times == sorted(times, reverse=True)  # the ladder goes from the richest plan to the cheapest
    assert predict_seconds(4, 4, 20, COUNTS, RATES, phase2=False) < times[0]


def test_the_richest_plan_that_fits_is_chosen():
    needed = {step: 10 + predict_seconds(*step, 20, COUNTS, RATES, phase2=True) for step in LADDER}
    assert choose(needed[(4, 4)] + 1, 10, COUNTS, RATES, 20, phase2=True).views == 4  # room for the default
    middle = choose(needed[(2, 2)] + 0.5, 10, COUNTS, RATES, 20, phase2=True)
    assert (middle.views, middle.finetune_epochs, middle.fits) == (2, 2, True)
    assert middle.seconds <= middle.budget
    tight = choose(1.0, 10, COUNTS, RATES, 20, phase2=True)
    assert (tight.views, tight.finetune_epochs, tight.fits) == (0, 0, False)
    assert "shorter than it needs" in tight.describe()


def test_a_run_with_a_budget_records_its_plan(tiny, tmp_path):
    result = visiontune.train(tiny, out=tmp_path / "planned", budget="1h", search=False, **FAST)
    plan = result.metrics["budget"]
    assert plan["budget_seconds"] == 3600 and plan["fits"] and (plan["views"], plan["finetune_epochs"]) == LADDER[0]
    text = (result.run_dir / "config.yaml").read_text()
    assert text.startswith("# planned by --budget: budget 60 min 00 s: 4 augmented views")
    saved = yaml.safe_load(text)
    assert saved["budget"] is None and saved["views"] == 4 and saved["finetune_epochs"] == 4  # repeatable as planned
    assert [r["phase"] for r in result.history].count("fold1.finetune") == 4  # the planned epochs, before the refit
    assert any(n.startswith("plan: budget 60 min") and "frozen-pass views/s" in n for n in result.metrics["notes"])
    # checked again before phase 2 with the speed the run measured, which leaves a 1 h budget's plan as it was
    # (and before the refit's phase 2 when the held-out images chose to keep phase 2)
    assert [r["phase"] for r in plan["replans"]] in (["fold1.finetune"], ["fold1.finetune", "finetune"])
    assert plan["replans"][0]["finetune_epochs"] == 4
    assert any(n.startswith("budget checked before fold1.finetune") and "4 phase-2 epochs kept" in n
               for n in result.metrics["notes"])
    assert plan["seconds"] == result.metrics["command_seconds"] and plan["within"]  # no evaluation: training alone


def test_a_budget_too_short_runs_the_smallest_plan_and_says_so(tiny, tmp_path, cli):
    out = tmp_path / "short"
    done = cli("train", str(tiny), "--out", str(out), "--budget", "1s", "--head-epochs", "2", "--val", "0.25",
               "--test", "0.25", "--no-evaluate")
    assert done.returncode == 0, done.stderr
    assert "plan: budget 1 s: 0 augmented views per image, 2 head epochs, no phase 2" in done.stderr
    assert "budget 1 s" in done.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["views"] == 0


def test_a_bad_budget_on_the_command_line_exits_2(tiny, tmp_path, cli):
    done = cli("train", str(tiny), "--out", str(tmp_path / "x"), "--budget", "soon")
    assert done.returncode == 2 and "budget" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()


def test_a_slow_warm_up_is_re_planned_from_the_real_pass():
    """The issue's case: the warm-up measured the frozen pass at a sixth of its real speed and chose the smallest plan;
    before phase 2, with the pass's own rate, the run takes the phase-2 epochs the budget has room for and writes
    them to config.yaml (through `record`)."""
    budget = predict_seconds(1, 2, 20, COUNTS, RATES, phase2=True, folds=1)
    slow = dataclasses.replace(RATES, frozen_views=RATES.frozen_views / 6)
    plan = choose(budget, 0, COUNTS, slow, 20, phase2=True, folds=1)
    assert (plan.views, plan.finetune_epochs, plan.fits) == (0, 0, False)
    notes, recorded = [], []
    replanner = Replanner(plan, time.perf_counter(), COUNTS, slow, 1, 4, True, notes, recorded.append)
    replanner.observe_frozen(1200, 12.0)  # the pass itself: 100 views/s
    epochs = replanner.finetune_epochs(plan.finetune_epochs, "fold1.finetune")
    assert epochs == 4 and recorded == [4]
    assert "re-planned to 4 phase-2 epochs instead of 0" in notes[-1] and "100 frozen-pass views/s" in notes[-1]
    assert replanner.finetune_epochs(3, "finetune") == 3  # the refit: what the fold chose, the time allows it
    summary = replanner.summary()
    assert summary["planned_finetune_epochs"] == 0 and summary["finetune_epochs"] == 4
    assert [r["phase"] for r in summary["replans"]] == ["fold1.finetune", "finetune"]


def test_a_phase_2_slower_than_measured_cuts_the_refit():
    budget = 10 + predict_seconds(4, 4, 20, COUNTS, RATES, phase2=True, folds=1)
    plan = choose(budget, 0, COUNTS, RATES, 20, phase2=True, folds=1)
    notes = []
    replanner = Replanner(plan, time.perf_counter(), COUNTS, RATES, 1, 4, True, notes)
    assert replanner.finetune_epochs(4, "fold1.finetune") == 4
    replanner.observe_phase2(4 * 5000, 4 * 5000 / (RATES.train_views / 4))  # four times slower than the warm-up
    cut = replanner.finetune_epochs(4, "finetune")
    assert cut < 4 and f"re-planned to {cut} phase-2 epoch" in notes[-1] and "instead of 4" in notes[-1]


def test_the_reported_time_is_the_whole_command_evaluation_included(tiny, tmp_path, cli):
    out = tmp_path / "whole"
    began = time.perf_counter()
    done = cli("train", str(tiny), "--out", str(out), "--budget", "1h", "--no-search", "--head-epochs", "2", "--val",
               "0.25", "--test", "0.25", "--quiet")
    wall = time.perf_counter() - began
    assert done.returncode == 0, done.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["evaluation_seconds"] > 0 and "evaluation" in m
    assert m["command_seconds"] == pytest.approx(m["train_seconds"] + m["evaluation_seconds"], abs=0.2)
    assert m["command_seconds"] <= wall  # what the user waited, less Python's start-up
    assert m["budget"]["seconds"] == m["command_seconds"] and m["budget"]["within"]
    line = next(x for x in done.stdout.splitlines() if x.startswith("run: "))
    assert (f"({m['command_seconds']:.0f} s: training {m['train_seconds']:.0f} s + evaluation "
            f"{m['evaluation_seconds']:.0f} s; budget 3600 s)") in line
    assert "train + evaluation" in (out / "report.html").read_text()
    assert f"this evaluation included, took {m['command_seconds']} s (budget 3600 s: kept)" in \
        (out / "MODEL_CARD.md").read_text()


def test_the_evaluation_is_predicted_at_the_whole_network_s_speed():
    """The evaluation runs whole images through the whole network: the test split, the unknown score's training
    sample and the validation images, the embedding map's sample (a refit calibrates on out-of-fold logits)."""
    half = evaluation_seconds(COUNTS, dataclasses.replace(RATES, whole_images=20.0), refit=True)
    slow = evaluation_seconds(COUNTS, dataclasses.replace(RATES, whole_images=10.0), refit=True)
    assert slow - half == pytest.approx((200 + 1000 + 200 + 200) * (1 / 10 - 1 / 20))
    sampled = Counts(COUNTS.train, COUNTS.val, COUNTS.test, classes=2)  # the unknown score: 200 images a class
    assert evaluation_seconds(sampled, RATES, refit=True) < evaluation_seconds(COUNTS, RATES, refit=True)
    with_it = predict_seconds(4, 4, 20, COUNTS, RATES, phase2=True, folds=1)
    without = predict_seconds(4, 4, 20, COUNTS, RATES, phase2=True, folds=1, evaluate=False)
    assert with_it - without == pytest.approx(evaluation_seconds(COUNTS, RATES, refit=True))
