"""`visiontune predict` and `visiontune bench` as a user runs them: real model files, real photos."""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path

import pytest

from deploy_run import exported_onnx


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A lone fp32 .onnx file (the fastest engine to start in a fresh process) plus its run."""
    return exported_onnx(tmp_path_factory, "predict")


@pytest.fixture(scope="module")
def album(tmp_path_factory, photos):
    """A user's folder: good photos in nested folders, one truncated JPEG and one text file."""
    root = tmp_path_factory.mktemp("album")
    for i, p in enumerate(photos["daisy"][10:12] + photos["tulips"][10:12]):
        target = root / ("garden" if i % 2 else "park") / p.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(p, target)
    (root / "park" / "broken.jpg").write_bytes(photos["roses"][10].read_bytes()[:2000])
    (root / "notes.txt").write_text("shopping list")
    return root


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "jsonl"])
def test_predict_formats_on_a_folder_with_bad_files(cli, model, album, untouched, fmt):
    with untouched(album):
        done = cli("predict", model, album, "--format", fmt, "--top-k", "2")
    assert done.returncode == 0, done.stderr
    skipped = sorted(line for line in done.stderr.splitlines() if line.startswith("skipped: "))
    assert len(skipped) == 2
    assert skipped[0].startswith(f"skipped: {album / 'notes.txt'}: not an image (text)")
    assert skipped[1].startswith(f"skipped: {album / 'park' / 'broken.jpg'}: truncated or corrupt")
    good = sorted(str(p) for p in album.rglob("*.jpg") if p.name != "broken.jpg")
    if fmt == "table":
        lines = done.stdout.splitlines()
        assert lines[0].split() == ["file", "label", "prob", "next"]
        rows = [line for line in lines[1:] if line.startswith(str(album))]
        assert sorted(r.split()[0] for r in rows) == good
        assert all(r.split()[1] in ("daisy", "roses", "tulips") and r.split()[2].endswith("%") for r in rows)
        return
    if fmt == "csv":
        records = list(csv.DictReader(io.StringIO(done.stdout)))
        assert list(records[0]) == ["source", "label", "probability", "label_2", "probability_2", "entropy",
                                    "uncertain", "unknown", "unknown_score", "error"]
    elif fmt == "json":
        records = json.loads(done.stdout)
    else:
        records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == 6  # every file, the unreadable ones with their reason
    ok = [r for r in records if not r["error"]]
    assert sorted(r["source"] for r in ok) == good
    for r in ok:
        assert r["label"] in ("daisy", "roses", "tulips") and 0 < float(r["probability"]) <= 1
    if fmt != "csv":
        assert all(len(r["top_k"]) == 2 and r["top_k"][0]["label"] == r["label"] for r in ok)


def test_predict_globs_single_files_out_file_and_backends(cli, model, album, photos, tmp_path):
    out = tmp_path / "predictions.jsonl"
    run = model.parent.parent
    done = cli("predict", run, album / "garden" / "*.jpg", photos["roses"][11], tmp_path / "nope.jpg",
               "--format", "jsonl", "--out", out, "--backend", "onnx", "--tta")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and f"to {out}" in done.stderr
    assert "skipped: " + str(tmp_path / "nope.jpg") + ": file not found" in done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in records[:3]] == [*sorted(str(p) for p in (album / "garden").glob("*.jpg")),
                                                  str(photos["roses"][11])]
    refused = cli("predict", model, album, "--out", album / "park" / "out.csv")
    assert refused.returncode == 2 and "inside the input folder" in refused.stderr
    before = (run / "model.json").read_bytes()
    refused = cli("predict", run, photos["roses"][11], "--format", "json", "--out", run / "model.json")
    assert refused.returncode == 2 and "inside the input folder" in refused.stderr and "Traceback" not in refused.stderr
    assert (run / "model.json").read_bytes() == before  # the run it reads is whole


@pytest.mark.parametrize("case", ["not a model", "truncated onnx", "empty folder", "only bad images"])
def test_predict_bad_input_is_one_line_and_exit_2(cli, model, album, tmp_path, case):
    target, data = model, album
    if case == "not a model":
        target = tmp_path / "weights.onnx"
        target.write_text("definitely not protobuf")
    elif case == "truncated onnx":
        target = tmp_path / "cut.onnx"
        target.write_bytes(model.read_bytes()[:50_000])
    elif case == "empty folder":
        data = tmp_path / "empty"
        data.mkdir()
    else:
        data = album / "notes.txt"
    done = cli("predict", target, data)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if not line.startswith("skipped: ")]
    assert len(errors) == 1 and errors[0].startswith("visiontune: error: ") and "Traceback" not in done.stderr
    assert str(target if case in ("not a model", "truncated onnx") else data) in done.stderr or case == "only bad images"


def test_bench_cli_reports_every_engine(cli, model):
    run = model.parent.parent
    done = cli("bench", run, "--runs", "3", "--warmup", "1", "--batch-sizes", "1,2", "--seconds", "0.05", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [e["engine"] for e in report["engines"]] == ["pytorch fp32", "onnx fp32"]  # no INT8 exported here
    assert any("--precision int8" in n for n in report["notes"])
    for engine in report["engines"]:
        assert engine["tensor_ms"]["runs"] == 3 and engine["jpeg_ms"]["p50"] > 0 and engine["threads"] >= 1
        assert set(engine["throughput"]) == {"1", "2"} and engine["best_images_per_s"] > 0
    assert report["machine"]["cores"] >= 1
    # The JPEG timed is one of the run's own test images, not a flowers sample.
    first_test = next(r["path"] for r in csv.DictReader(open(run / "split.csv")) if r["split"] == "test")
    assert Path(report["image"]).resolve() == (run / first_test).resolve()
    alone = cli("bench", model, "--runs", "3", "--warmup", "1", "--batch-sizes", "1", "--seconds", "0.05", "--json")
    assert Path(json.loads(alone.stdout)["image"]).resolve() == (run / first_test).resolve()  # RUN/export/model.onnx
    bad = cli("bench", run, "--batch-sizes", "x")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_bench_by_default_shows_each_step_and_stops_early(cli, model):
    # It was silent for minutes (200 calls of each kind, 6 batch sizes of 2 s, on every engine).
    run = model.parent.parent
    started = time.perf_counter()
    done = cli("bench", run)
    took = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    steps = [line for line in done.stderr.splitlines() if line.startswith("bench: ")]
    for engine in ("pytorch fp32 (1/2)", "onnx fp32 (2/2)"):
        mine = [line[len(f"bench: {engine}: "):] for line in steps if line.startswith(f"bench: {engine}: ")]
        assert [line.split(":")[0].split("  [")[0] for line in mine] == [
            "...", "batch 1 from a tensor", "batch 1 from JPEG bytes", "batch 1", "batch 4", "batch 16"], steps
    assert took < 60, took
    assert "images/s by batch size: 1: " in done.stdout


def test_an_image_of_extreme_aspect_ratio_is_a_listed_skip(cli, model, photos, tmp_path):
    from visiontune.serve.loadtest import thin_png

    thin = tmp_path / "thin.png"
    thin.write_bytes(thin_png(1_000_000, 64))  # 62 KB; scaled to 224 px high it would be 3.5 million pixels long
    alone = cli("predict", model, thin)
    assert alone.returncode == 2 and "Traceback" not in alone.stderr, alone.stderr
    assert alone.stderr.splitlines() == [f"skipped: {thin}: extreme aspect ratio: 1000000x64 is over 20:1 (scaled to the "
                                         f"model's size its long side would need gigabytes)",
                                         "visiontune: error: none of the 1 file(s) could be read as an image"]
    both = cli("predict", model, thin, photos["daisy"][10], "--format", "jsonl")
    assert both.returncode == 0, both.stderr
    assert f"skipped: {thin}: extreme aspect ratio" in both.stderr
    assert [not json.loads(line)["error"] for line in both.stdout.splitlines()] == [False, True]
