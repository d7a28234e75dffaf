"""MLflow tracking and the model registry against a real `mlflow server` (SQLite store, local artifact root) on a
loopback port, started once for the module; checked through MLflow's own client, as a user would look: the run's
parameters and metric history, its artifacts, a registered version with an alias, and `serve` answering from it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import visiontune
from deploy_run import copy_run
from test_serve import Server
from visiontune.config import TrackConfig
from visiontune.errors import ModelError
from visiontune.models.locate import locate_model
from visiontune.tracking import search_run
from visiontune.tracking.flatten import flat_metrics, flat_params
from visiontune.tracking.verbs import after

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed (the `tracking` extra: make test installs it)")

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URI of a real MLflow tracking server with a model registry, for this module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts"),
                             "--host", HOST, "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{(root / 'server.log').read_text()}")
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server not up after 90 s:\n{(root / 'server.log').read_text()}")
                time.sleep(0.3)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return mlflow.MlflowClient(tracking_uri=server, registry_uri=server)


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_a_run_evaluated_while_the_server_is_down_is_kept_and_sent_later(server, client, tmp_path_factory, capfd):
    run_dir = copy_run(tmp_path_factory, "tracking-later")
    down = f"http://{HOST}:{free_port()}"  # nothing listens there
    result = visiontune.evaluate(run_dir, gradcam_images=0, top_losses=4, map_points=0, open_set=False, quiet=True,
                                 track={"tracking_uri": down})
    err = capfd.readouterr().err
    assert len([line for line in err.splitlines() if "not tracked" in line]) == 1
    assert "does not answer" in err and f"visiontune track {run_dir}" in err
    assert (run_dir / "report.html").is_file() and (run_dir / "metrics.json").is_file()  # the work itself is whole

    tracked = visiontune.track(run_dir, tracking_uri=server, experiment="flowers", run_name="lite0-small",
                               tags="team=vision,ticket=28", param_chars=20)
    run = client.get_run(tracked.run_id)
    assert run.info.run_name == "lite0-small" and run.info.status == "FINISHED"
    assert run.data.tags["team"] == "vision" and run.data.tags["visiontune.verb"] == "train"
    params = run.data.params
    assert params["model"] == "efficientnet_lite0" and params["augment.mixup"] == "0.0"
    assert params["split.val"] == "0.25" and params["finetune_epochs"] == "1"
    assert all(len(v) <= 20 for v in params.values())
    assert "data" in run.data.tags["visiontune.truncated_params"].split(",")  # the data's path is longer than 20
    history = client.get_metric_history(tracked.run_id, "head/train_loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    m = run.data.metrics
    assert m["evaluation.top1"] == pytest.approx(result.metrics["top1"])
    low, high = result.metrics["intervals"]["top1"]
    assert m["evaluation.intervals.top1.low"] == pytest.approx(low) and m["evaluation.intervals.top1.high"] == pytest.approx(high)
    assert {"report.html", "MODEL_CARD.md", "model.json", "config.yaml", "history.csv", "metrics.json",
            "plots"} <= artifacts(client, tracked.run_id)
    assert "plots/confusion_matrix.png" in artifacts(client, tracked.run_id, "plots")


def test_export_registers_a_version_with_an_alias_that_serve_answers_from(server, client, tmp_path_factory, tmp_path,
                                                                          photos, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)  # MLflow's own `models:/` download reads its registry from here
    run_dir = copy_run(tmp_path_factory, "tracking-export")
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "visiontune.cli", "export", str(run_dir), "--register", "flowers-lite0",
                           "--alias", "champion", "--tags", "stage=test"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "registered: models:/flowers-lite0/1, models:/flowers-lite0@champion" in done.stderr
    version = client.get_model_version_by_alias("flowers-lite0", "champion")
    assert version.version == "1"
    info = mlflow.models.Model.load(mlflow.artifacts.download_artifacts("models:/flowers-lite0/1", tracking_uri=server,
                                                                         dst_path=str(tmp_path / "m")))
    assert "onnx" in info.flavors and info.signature is not None and info.saved_input_example_info is not None
    assert info.metadata["visiontune"]["preprocess"]["input_size"] == 224

    photo = photos["daisy"][0]
    expected = visiontune.predict(run_dir / "export" / "model.onnx", [photo])[0]
    served = Server.__new__(Server)  # the serve tests' helper, on `python -m visiontune.cli` with the registry's env
    served.port, served.log = free_port(), tmp_path / "serve.log"
    served.url = f"http://{HOST}:{served.port}"
    with open(served.log, "wb") as out:
        served.proc = subprocess.Popen([sys.executable, "-m", "visiontune.cli", "serve", "models:/flowers-lite0@champion",
                                        "--host", HOST, "--port", str(served.port)], env=env, stdout=out,
                                       stderr=subprocess.STDOUT)
    try:
        served.wait_ready()
        reply = served.post("/v1/predict", photo.read_bytes())
        assert reply.status == 200, reply.body
        assert reply.json()["label"] == expected.label
        assert reply.json()["probability"] == pytest.approx(expected.probability, abs=1e-5)
    finally:
        served.stop()


def test_a_registry_uri_that_names_nothing_is_one_clear_error(server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="not found"):
        locate_model("models:/no-such-model/3")
    with pytest.raises(ModelError, match="expected models:/NAME/VERSION"):
        locate_model("models:/no-version")


def test_a_search_logs_one_nested_run_per_trial(server, client):
    cfg = TrackConfig(track="mlflow", tracking_uri=server, experiment="search")
    with search_run(cfg, "budget 2m", {"budget": "2m"}) as search:
        for lr in (0.01, 0.001):
            with search.nested_trial({"lr": lr, "views": 2}) as log:
                for epoch in (1, 2):
                    log({"val.top1": 0.5 + lr * epoch}, step=epoch)
        with pytest.raises(RuntimeError):
            with search.nested_trial({"lr": 1.0}):
                raise RuntimeError("diverged")
    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].data.params["budget"] == "2m"
    parent_id = parent[0].info.run_id
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.info.status for r in trials) == ["FAILED", "FINISHED", "FINISHED"]
    done = next(r for r in trials if r.data.params.get("lr") == "0.01")
    assert [m.step for m in client.get_metric_history(done.info.run_id, "val.top1")] == [1, 2]


def test_tracking_off_and_a_server_that_is_down_never_stop_a_search(capfd):
    with search_run(None) as search, search.nested_trial({"lr": 0.1}) as log:
        log({"top1": 1.0})
    down = TrackConfig(track="mlflow", tracking_uri=f"http://{HOST}:{free_port()}")
    with search_run(down) as search:
        for _ in range(2):
            with search.nested_trial({"lr": 0.1}) as log:
                log({"top1": 1.0})
    assert capfd.readouterr().err.count("tracking off") == 1


def test_only_rank_0_of_a_torchrun_job_logs(server, client, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    cfg = TrackConfig(track="mlflow", tracking_uri=server, experiment="ranks")
    assert after("train", tmp_path, cfg) is None
    with search_run(cfg) as search, search.nested_trial({"lr": 0.1}) as log:
        log({"top1": 1.0})
    assert client.get_experiment_by_name("ranks") is None  # nothing reached the server


def test_settings_are_flattened_and_cut_and_intervals_become_low_high():
    params, cut = flat_params({"a": {"b": 1, "c": [1, 2]}, "long": "x" * 50, "none": None}, 20)
    assert params == {"a.b": "1", "a.c": "1,2", "long": "x" * 17 + "...", "none": ""} and cut == ["long"]
    assert flat_metrics({"top1": 0.9, "intervals": {"top1": [0.8, 0.95]}, "notes": ["x"], "ok": True}) == {
        "top1": 0.9, "intervals.top1.low": 0.8, "intervals.top1.high": 0.95}


def test_bad_tracking_flags_are_one_line_and_exit_2(tmp_path):
    for flags, says in ((["--tags", "oops"], "expected KEY=VALUE"), (["--alias", "champion"], "--register")):
        done = subprocess.run([sys.executable, "-m", "visiontune.cli", "export", str(tmp_path), *flags],
                              capture_output=True, text=True)
        assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_register_without_an_onnx_export_is_refused_before_any_work(tmp_path_factory):
    run_dir = copy_run(tmp_path_factory, "tracking-refused")
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(visiontune.errors.ConfigError, match="register"):
        visiontune.api.export(run_dir, format="torchscript", track={"register": "x"})
    assert sorted(p.name for p in run_dir.iterdir()) == before
    shutil.rmtree(run_dir.parent)


def test_a_budget_run_sends_its_search_as_nested_trial_runs(server, client, tmp_path):
    from deploy_run import photos_folder

    data = photos_folder(tmp_path)
    result = visiontune.train(data, out=tmp_path / "searched", budget="1h", head_epochs=2, val=0.25, test=0.25,
                              evaluate=False, search_models="efficientnet_lite0", search_trials=2, quiet=True,
                              track={"tracking_uri": server, "experiment": "budget-search"})
    runs = client.search_runs([client.get_experiment_by_name("budget-search").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "searched-search")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    rows = result.metrics["search"]["rows"]
    assert sorted(r.info.run_name for r in trials) == sorted(r["trial"] for r in rows)
    first = next(r for r in trials if r.info.run_name == rows[0]["trial"])
    assert first.data.metrics["oof_top1"] == pytest.approx(rows[0]["oof_top1"])
    assert parent.data.params["chosen"] == result.metrics["search"]["chosen"]["trial"]
