"""`--budget`: the plan is chosen from measured rates, recorded in config.yaml (so the run can be repeated or resumed
as planned), stated in one line, and a bad budget is refused before any work."""

from __future__ import annotations

import pytest
import yaml

import visiontune
from deploy_run import photos_folder
from visiontune.config import TrainConfig
from visiontune.errors import ConfigError
from visiontune.settings import parse_duration
from visiontune.training.budget import LADDER, Counts, Rates, choose, predict_seconds

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
    result = visiontune.train(tiny, out=tmp_path / "planned", budget="1h", **FAST)
    plan = result.metrics["budget"]
    assert plan["budget_seconds"] == 3600 and plan["fits"] and (plan["views"], plan["finetune_epochs"]) == LADDER[0]
    text = (result.run_dir / "config.yaml").read_text()
    assert text.startswith("# planned by --budget: budget 60 min 00 s: 4 augmented views")
    saved = yaml.safe_load(text)
    assert saved["budget"] is None and saved["views"] == 4 and saved["finetune_epochs"] == 4  # repeatable as planned
    assert [r["phase"] for r in result.history].count("fold1.finetune") == 4  # the planned epochs, before the refit
    assert any(n.startswith("plan: budget 60 min") and "frozen-pass views/s" in n for n in result.metrics["notes"])


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
