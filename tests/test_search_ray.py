"""`train --budget B --ray`: the search's TPE trials on a real local Ray (2 CPUs, two workers of one thread each),
pruned through the driver's study, recorded and chosen as a search on this machine is."""

from __future__ import annotations

import threading
import time

import optuna
import pytest

import visiontune
from conftest import run_cli
from deploy_run import photos_folder
from visiontune.models.run_dir import RunDir

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'; make test does)")

FAST = dict(head_epochs=2, seed=0, val=0.25, test=0.25, evaluate=False, search_models="efficientnet_lite0",
            search_trials=5)


def kill_one_trial_worker(killed: list, seconds: float = 240) -> None:
    """SIGKILL the first Ray worker seen running a trial, as a lost node would end it."""
    import psutil

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for proc in psutil.Process().children(recursive=True):
            try:
                if "TrialWorker.run" in " ".join(proc.cmdline()):
                    proc.kill()
                    killed.append(proc.pid)
                    return
            except psutil.Error:
                pass
        time.sleep(0.02)


def test_the_trials_run_on_ray_workers_and_the_chosen_one_is_refit(local_ray, tmp_path):
    data = photos_folder(tmp_path)
    killed: list[int] = []
    killer = threading.Thread(target=kill_one_trial_worker, args=(killed,))
    killer.start()
    result = visiontune.train(data, out=tmp_path / "run", budget="1h", search_ray="local", search_ray_threads=1,
                              quiet=True, **FAST)
    killer.join()
    assert "search: TPE trials on Ray (2 worker(s) x 1 thread(s), 2 CPUs)" in result.metrics["notes"]
    search = result.metrics["search"]
    rows = search["rows"]
    numbers = sorted(int(r["trial"].split("#")[1]) for r in rows)  # in the order they finished
    assert search["trials"] == 5 and numbers == list(range(5)) and rows[0]["trial"] == "efficientnet_lite0@4#0"
    assert rows[0]["state"] == "complete" and {r["state"] for r in rows} <= {"complete", "pruned", "failed"}
    # the killed worker's trial is a row, not the end of the search; a new worker took its place
    assert killed and [r["state"] for r in rows].count("failed") == 1
    assert any(n.startswith("search: trial ") and "lost with its Ray worker" in n for n in result.metrics["notes"])
    # every trial is in the run's own study, the workers' per-epoch reports included (they reach it by gRPC)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(RunDir(result.run_dir).search_study)))
    trials = optuna.load_study(study_name="efficientnet_lite0@4", storage=storage).trials
    assert len(trials) == 5 and all(t.intermediate_values for t in trials[1:] if t.state.name != "FAIL")
    chosen = search["chosen"]
    assert chosen["oof_top1"] == max(r["oof_top1"] for r in rows if r["state"] == "complete")
    # the chosen trial's folds came back from its worker: the refit fits once, on train + val
    assert result.metrics["refit"]["oof_top1"] == pytest.approx(chosen["oof_top1"], abs=1e-4)
    assert {r["phase"] for r in result.history} <= {"head", "finetune"}


def test_ray_without_a_budget_is_one_line_and_exit_2(tmp_path):
    done = run_cli("train", photos_folder(tmp_path), "--ray", "local", "--out", tmp_path / "run")
    assert done.returncode == 2 and "--ray runs the trials of --budget's search: give --budget" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
