"""`--budget`'s search: recipes tried on the run's own data and scored out of fold, the plan's recipe first, wider
backbones as candidates, every trial a row of search_trials.csv, the chosen one trained on every labelled image
without fitting its folds again, and a search stopped midway continued by `--resume` from its Optuna study."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
import torch
import yaml

import visiontune
from conftest import kill_train_when
from deploy_run import photos_folder
from visiontune.config import TrainConfig
from visiontune.models.run_dir import RunDir
from visiontune.training.history import History
from visiontune.training.phases import PhaseContext
from visiontune.training.search import candidate_models
from visiontune.training.trials import TrialContext

WIDER = "efficientnet_lite0+efficientnet_lite1"
FAST = dict(head_epochs=3, seed=0, val=0.25, test=0.25, evaluate=False, search_models=WIDER, search_trials=4)
EVALUATED = {**FAST, "evaluate": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return photos_folder(tmp_path_factory.mktemp("tiny"))


def trials(run) -> list[dict]:
    with open(RunDir(run).search_trials, newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_candidates_are_the_model_then_wider_backbones_sharing_its_preprocessing():
    lite = ["efficientnet_lite0", WIDER, "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2"]
    assert candidate_models(TrainConfig()) == lite
    assert candidate_models(TrainConfig(model="efficientnet_lite1"))[1] == "efficientnet_lite1+efficientnet_lite0"
    assert candidate_models(TrainConfig(model="resnet18")) == ["resnet18"]  # not a Lite: its own recipe only
    assert candidate_models(TrainConfig(search_models=f"{WIDER}, efficientnet_lite0")) == ["efficientnet_lite0", WIDER]


def test_a_trial_is_pruned_on_its_held_out_scores(tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.99))
    trial = study.ask()
    base = PhaseContext(TrainConfig(), torch.device("cpu"), History(RunDir(tmp_path), True, write=False), True, [])
    ctx = TrialContext(base, trial)
    logits = torch.eye(2).numpy()
    assert ctx.evaluate(lambda x: x, logits, torch.tensor([0, 1]).numpy()).accuracy == 1.0  # 100 %: goes on
    with pytest.raises(optuna.TrialPruned):
        ctx.evaluate(lambda x: x, logits, torch.tensor([1, 1]).numpy())  # 50 %: below the pruner's floor
    assert trial.number == 0 and ctx.step == 2


def test_a_budget_run_searches_records_every_trial_and_refits_the_chosen_one(tiny, tmp_path):
    result = visiontune.train(tiny, out=tmp_path / "searched", budget="1h", **EVALUATED)
    rows = trials(result.run_dir)
    assert len(rows) == 4 and {r["state"] for r in rows} <= {"complete", "pruned"}
    assert all(r["state"] == "complete" for r in rows[:2])  # the first trial of each backbone is never pruned
    assert rows[0]["model"] == "efficientnet_lite0" and float(rows[0]["head_lr"]) == TrainConfig.head_lr  # the plan
    assert rows[1]["model"] == WIDER and rows[1]["finetune_epochs"] == ""  # several branches: the head alone
    search = result.metrics["search"]
    assert search["trials"] == 4 and search["models"] == sorted(["efficientnet_lite0", WIDER])
    chosen = search["chosen"]
    assert chosen["oof_top1"] == max(float(r["oof_top1"]) for r in rows if r["state"] == "complete")
    assert search["oof_top1"] >= search["plan_oof_top1"]  # never worse out of fold than the plan's recipe
    text = (result.run_dir / "config.yaml").read_text()
    assert text.startswith(f"# chosen by --budget's search: {chosen['trial']} (4 trials)")
    saved = yaml.safe_load(text)
    assert saved["budget"] is None and saved["model"] == chosen["model"] and saved["views"] == chosen["views"]
    assert saved["head_lr"] == pytest.approx(float(chosen["head_lr"]))
    assert json.loads((result.run_dir / "model.json").read_text())["architecture"]["backbone"] == chosen["model"]
    # the chosen trial's folds are not fitted again: the run's own phases are the refit's
    assert {r["phase"] for r in result.history} <= {"head", "finetune"}
    assert result.metrics["refit"]["oof_top1"] == pytest.approx(chosen["oof_top1"], abs=1e-4)
    assert any(n.startswith("search: 4 trials") for n in result.metrics["notes"])
    report = (result.run_dir / "report.html").read_text()
    assert "Recipe search" in report and f'<tr class="chosen"><td class="">{chosen["trial"]}</td>' in report
    assert "chosen by `--budget`'s search among 4 trials" in (result.run_dir / "MODEL_CARD.md").read_text()


def test_a_search_killed_midway_is_continued_by_resume(tiny, tmp_path, cli):
    out = tmp_path / "stopped"
    args = [tiny, "--budget", "1h", "--head-epochs", "3", "--val", "0.25", "--test", "0.25", "--no-evaluate",
            "--search-models", WIDER, "--search-trials", "4"]
    kill_train_when(out, f"{WIDER}@", *args, watch=RunDir.SEARCH_TRIALS)
    before = trials(out)
    assert len(before) == 2 and RunDir(out).search_study.is_file()
    assert "budget" in (out / "config.yaml").read_text()  # config.yaml still asks for the search
    done = cli("train", "--resume", str(out))
    assert done.returncode == 0, done.stderr
    after = trials(out)
    assert len(after) == 4  # the two finished trials are not fitted again, and count towards the four
    assert [r["state"] for r in after[:2]] == ["complete (resumed)"] * 2
    assert [r["oof_top1"] for r in after[:2]] == [r["oof_top1"] for r in before]
    assert RunDir(out).meta.is_file()
