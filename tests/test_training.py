"""Training end to end on a handful of real photos with the real Lite0 weights (and tiny timm models)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import visiontune
from conftest import kill_train_when
from deploy_run import photos_folder
from visiontune.errors import ConfigError, DatasetError, ModelError
from visiontune.models.bundle import load_bundle

FAST = dict(views=1, head_epochs=3, finetune_epochs=1, seed=0)


@pytest.fixture(scope="module")
def tiny_flowers(tmp_path_factory) -> Path:
    """3 classes x 8 real photos from the embedded sample."""
    return photos_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(tiny_flowers, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    # --no-refit: these tests check the plain phases and that the reported val score is the bundle's own
    return visiontune.train(tiny_flowers, out=out, val=0.25, test=0.25, refit=False, **FAST)


def test_run_directory_holds_everything_downstream_needs(trained):
    run = trained.run_dir
    for name in ("config.yaml", "split.csv", "model.safetensors", "model.json", "history.csv", "metrics.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    meta = json.loads((run / "model.json").read_text())
    assert meta["id2label"] == {"0": "daisy", "1": "roses", "2": "tulips"}
    assert meta["preprocess"]["mean"] == [0.5, 0.5, 0.5] and meta["preprocess"]["input_size"] == 224
    assert meta["architecture"]["timm_name"] == "tf_efficientnet_lite0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["views"] == 1 and config["model"] == "efficientnet_lite0"
    with open(run / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["phase"] for r in rows] == ["head"] * 3 + ["finetune"]
    with open(run / "split.csv") as fh:
        splits = [r["split"] for r in csv.DictReader(fh)]
    assert splits.count("train") == 12 and splits.count("val") == 6 and splits.count("test") == 6
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["images"] == {"train": 12, "val": 6, "test": 6}
    # Pretrained features separate daisies, roses and tulips even from 12 photos.
    assert metrics["val"]["top1"] >= 0.5


def test_bundle_reloads_and_agrees_with_reported_validation(trained, tiny_flowers):
    import numpy as np
    import torch

    from visiontune.data.loader import load_for_model
    from visiontune.data.transforms import normalize

    model, meta = load_bundle(trained.run_dir)
    with open(trained.run_dir / "split.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    x = np.concatenate([normalize(load_for_model(trained.run_dir / r["path"], meta.preprocess), meta.preprocess) for r in rows])
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(1).numpy()
    accuracy = float(np.mean([meta.labels[p] == r["label"] for p, r in zip(predicted, rows)]))
    # The frozen pass ran in ONNX Runtime; the reloaded model runs in PyTorch. They must agree.
    assert accuracy == pytest.approx(trained.metrics["val"]["top1"])


def test_same_seed_same_history_and_metrics(trained, tiny_flowers, tmp_path):
    again = visiontune.train(tiny_flowers, out=tmp_path / "again", val=0.25, test=0.25, refit=False, **FAST)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]  # noqa: E731
    assert strip(again.history) == strip(trained.history)
    assert again.metrics["val"] == trained.metrics["val"] and again.metrics["test"] == trained.metrics["test"]
    assert (tmp_path / "again" / "split.csv").read_bytes() == (trained.run_dir / "split.csv").read_bytes()


def test_full_finetune_and_balance_options_train(tiny_flowers, tmp_path):
    result = visiontune.train(tiny_flowers, out=tmp_path / "full", model="test_efficientnet", from_scratch=True,
                              full_finetune=True, finetune_epochs=2, balance="sampler",
                              val=0.25, test=0.25)
    assert [r["phase"] for r in result.history] == ["full", "full"]
    assert (tmp_path / "full" / "model.safetensors").is_file()
    weighted = visiontune.train(tiny_flowers, out=tmp_path / "weighted", model="test_efficientnet", from_scratch=True,
                                balance="weights", views=1, head_epochs=2, finetune_epochs=1, schedule="onecycle",
                                refit=False)
    assert len(weighted.history) == 3


def test_architecture_without_stage_split_trains_head_only(tiny_flowers, tmp_path):
    result = visiontune.train(tiny_flowers, out=tmp_path / "maxvit", model="test_maxvit", from_scratch=True, views=1,
                              head_epochs=2, finetune_epochs=1, refit=False)
    assert [r["phase"] for r in result.history] == ["head", "head"]
    assert any("no known stage split" in note for note in result.notes)


def test_user_errors_are_clear(tiny_flowers, tmp_path):
    with pytest.raises(ConfigError, match="contradict"):
        visiontune.train(tiny_flowers, out=tmp_path / "a", weights="w.safetensors", from_scratch=True)
    with pytest.raises(ModelError, match="unknown model"):
        visiontune.train(tiny_flowers, out=tmp_path / "b", model="no_such_net")
    with pytest.raises(ModelError, match="--weights FILE"):
        visiontune.train(tiny_flowers, out=tmp_path / "c", model="resnet18")
    one_class = tmp_path / "one"
    shutil.copytree(tiny_flowers / "daisy", one_class / "daisy")
    with pytest.raises(DatasetError, match="only one class"):
        visiontune.train(one_class, out=tmp_path / "d")


def test_existing_run_is_not_overwritten(trained, tiny_flowers):
    before = (trained.run_dir / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="--overwrite"):
        visiontune.train(tiny_flowers, out=trained.run_dir, **FAST)
    assert (trained.run_dir / "model.safetensors").read_bytes() == before


def test_the_api_shows_progress_like_the_cli_unless_quiet(tiny_flowers, tmp_path, capfd):
    # A newcomer's visiontune.train(...) ran for minutes without a word; the CLI's lines come by default now.
    visiontune.train(tiny_flowers, out=tmp_path / "loud", val=0.25, test=0.25, evaluate=False,
                     **{**FAST, "head_epochs": 1})
    err = capfd.readouterr().err
    assert "scan" in err and "decode" in err and "epoch" in err, err
    visiontune.train(tiny_flowers, out=tmp_path / "quiet", val=0.25, test=0.25, evaluate=False, quiet=True,
                     **{**FAST, "head_epochs": 1})
    assert capfd.readouterr().err == ""


def test_cli_train_prints_run_and_accuracy(tiny_flowers, tmp_path):
    exe = Path(sys.executable).with_name("visiontune")
    out = tmp_path / "cli-run"
    done = subprocess.run([str(exe), "train", str(tiny_flowers), "--out", str(out), "--views", "1", "--head-epochs", "2",
                           "--epochs", "1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"run: {out}" in done.stdout and "val top-1" in done.stdout
    bad = subprocess.run([str(exe), "train", str(tiny_flowers), "--model", "resnet18", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("extra", [[], ["--ema", "0.9"]], ids=["plain", "weight-average"])
def test_kill_during_phase_two_then_resume_gives_the_uninterrupted_result(tiny_flowers, tmp_path, extra):

    exe = Path(sys.executable).with_name("visiontune")
    args = ["--views", "3", "--head-epochs", "2", "--epochs", "8", "--quiet", *extra]
    reference = subprocess.run([str(exe), "train", str(tiny_flowers), "--out", str(tmp_path / "whole"), *args],
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "killed"
    kill_train_when(run, "finetune,2,", tiny_flowers, *args)
    assert not (run / "model.json").exists()
    # One file, renamed into place whole: no instant holds the tensors of one epoch with the state of another.
    assert [p.name for p in (run / "checkpoint").iterdir()] == ["state.safetensors"]
    if not extra:  # a damaged checkpoint is a one-line error, and the run is left as it was
        damaged = tmp_path / "damaged"
        shutil.copytree(run, damaged)
        state = damaged / "checkpoint" / "state.safetensors"
        state.write_bytes(state.read_bytes()[:5000])
        bad = subprocess.run([str(exe), "train", "--resume", str(damaged), "--quiet"], capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unreadable checkpoint" in bad.stderr, bad.stderr
        assert state.stat().st_size == 5000

    resumed = subprocess.run([str(exe), "train", "--resume", str(run), "--quiet"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    whole, cont = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole", run))
    assert cont["resumed"] is True
    assert cont["val"] == whole["val"] and cont["test"] == whole["test"]
    strip = lambda path: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}  # noqa: E731
                          for r in csv.DictReader(open(path))]
    assert strip(run / "history.csv") == strip(tmp_path / "whole" / "history.csv")
    assert (run / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert not (run / "checkpoint").exists()


def test_weight_average_follows_the_weights_and_swaps_back():
    import torch

    from visiontune.training.phases import WeightAverage

    layer = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(layer.weight)
    average = WeightAverage(layer, decay=0.5)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average.update()  # warm-up decay min(0.5, 2/11) = 0.1818...: mostly the new weights
    assert torch.allclose(average.state["weight"], torch.full((1, 2), 1 - 2 / 11))
    average.update()  # decay min(0.5, 3/12)
    expected = 0.25 * (1 - 2 / 11) + 0.75
    assert torch.allclose(average.state["weight"], torch.full((1, 2), expected))
    average.swap()
    assert torch.allclose(layer.weight, torch.full((1, 2), expected))
    average.swap()
    assert torch.allclose(layer.weight, torch.ones(1, 2))


def test_weight_average_is_what_phase_two_keeps(tiny_flowers, tmp_path):
    plain = visiontune.train(tiny_flowers, out=tmp_path / "plain", val=0.25, test=0.25, **{**FAST, "epochs": 2})
    averaged = visiontune.train(tiny_flowers, out=tmp_path / "avg", val=0.25, test=0.25, ema=0.9, **{**FAST, "epochs": 2})
    assert yaml.safe_load((averaged.run_dir / "config.yaml").read_text())["ema"] == 0.9
    kept = load_bundle(averaged.run_dir)[0].state_dict()
    raw = load_bundle(plain.run_dir)[0].state_dict()
    assert any(not torch_equal(kept[k], raw[k]) for k in kept)  # same seed, same batches: only the averaging differs


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
