"""`predict --shards`, on this machine and on a real local Ray (started once per session, 2 CPUs): every image
written exactly once, bad files as rows, a rerun after a kill (of the driver, or of a Ray worker) completing the
job without writing anything twice, and the same predictions as plain `predict`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import visiontune
from deploy_run import exported_onnx
from visiontune.errors import ConfigError
from visiontune.inference.shard_writer import COLUMNS, read_shards

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install -e '.[ray]'; make test does)")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return exported_onnx(tmp_path_factory, "shards")


@pytest.fixture(scope="module")
def album(tmp_path_factory, photos):
    """40 real photos in nested folders, a truncated JPEG and a text file."""
    root = tmp_path_factory.mktemp("album")
    for name in ("daisy", "roses", "tulips", "dandelion"):
        for p in photos[name][:10]:
            (root / name).mkdir(exist_ok=True)
            shutil.copy(p, root / name / p.name)
    (root / "roses" / "broken.jpg").write_bytes(photos["roses"][12].read_bytes()[:2000])
    (root / "notes.txt").write_text("shopping list")
    return root


def by_path(rows: list[dict]) -> dict[str, dict]:
    found = {r["path"]: r for r in rows}
    assert len(found) == len(rows), "an image was written twice"
    return found


def test_shards_on_this_machine_match_predict_with_bad_files_as_rows(model, album, tmp_path, untouched):
    with untouched(album):  # CSV: this path needs no pyarrow
        result = visiontune.predict_shards(model, album, tmp_path / "out", shard_images=7, shard_format="csv",
                                           quiet=True)
    rows = by_path(read_shards(tmp_path / "out"))
    assert (result.shards, result.written, result.skipped, result.images, result.errors) == (6, 6, 0, 42, 2)
    assert len(rows) == 42 and list(read_shards(tmp_path / "out")[0]) == list(COLUMNS)
    assert "text" in rows[str(album / "notes.txt")]["error"] and rows[str(album / "notes.txt")]["label"] == ""
    assert "truncated or corrupt" in rows[str(album / "roses" / "broken.jpg")]["error"]
    for p in visiontune.predict(model, album):
        assert rows[p.source]["label"] == (p.label or "") and rows[p.source]["error"] == (p.error or "")
        if p.ok:
            assert float(rows[p.source]["probability"]) == pytest.approx(p.probability, abs=1e-5)
            assert json.loads(rows[p.source]["top_k"])[0][0] == p.label


def test_manifest_csv_shards_and_a_rerun_with_other_settings_is_refused(model, album, tmp_path, cli):
    manifest = tmp_path / "list.csv"
    names = sorted(os.path.relpath(p, tmp_path) for p in album.rglob("*.jpg"))[:9] + ["gone.jpg"]  # from its folder
    manifest.write_text("label,path\n" + "".join(f"x,{n}\n" for n in names))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "visiontune.cli", "predict", str(model), str(manifest), "--shards",
                           str(out), "--shard-format", "csv", "--shard-images", "4", "--quiet"],
                          capture_output=True, text=True, cwd=album)  # not where the paths start
    assert done.returncode == 0, done.stderr
    assert "3 shard(s) written" in done.stdout and "10 image(s) (1 with an error)" in done.stdout
    with open(out / "part-000002.csv", newline="") as fh:
        last = list(csv.DictReader(fh))
    assert [r["path"] for r in last] == [str(tmp_path / n) for n in names[8:]]
    assert last[1]["error"] == "file not found" and last[1]["label"] == "" and last[0]["uncertain"] in ("true", "false")
    with pytest.raises(ConfigError, match="another job .*shard_images"):
        visiontune.predict_shards(model, manifest, out, shard_format="csv", shard_images=5)
    again = visiontune.predict_shards(model, manifest, out, shard_format="csv", shard_images=4, quiet=True)
    assert (again.written, again.skipped) == (0, 3)


def test_a_killed_run_resumes_and_writes_each_image_once(model, album, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "visiontune.cli", "predict", str(model), str(album), "--shards", str(out),
               "--shard-images", "3", "--batch-size", "1", "--shard-format", "csv", "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not (out / "part-000001.csv").exists():
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert 2 <= len(before) < 14
    result = visiontune.predict_shards(model, album, out, shard_images=3, batch_size=1, shard_format="csv", quiet=True)
    assert result.skipped == len(before) and result.written == 14 - len(before)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*") if p.name in before} == before
    assert len(by_path(read_shards(out))) == 42 and not list(out.glob(".*tmp"))


@needs_ray
def test_ray_writes_what_this_machine_writes(local_ray, model, album, tmp_path):
    here = visiontune.predict_shards(model, album, tmp_path / "here", shard_images=5, quiet=True)
    there = visiontune.predict_shards(model, album, tmp_path / "ray", ray="", shard_images=5, quiet=True)
    assert there.engine.startswith("ray (1 model copy x 2 thread(s), 2 CPUs)") and there.errors == 2
    assert sorted(p.name for p in (tmp_path / "ray").glob("part-*")) == sorted(
        p.name for p in (tmp_path / "here").glob("part-*"))
    for name in ("part-000000.parquet", "part-000008.parquet"):  # rows in listing order within a shard
        import pyarrow.parquet as pq

        a, b = pq.read_table(tmp_path / "here" / name).to_pylist(), pq.read_table(tmp_path / "ray" / name).to_pylist()
        assert [r["path"] for r in a] == [r["path"] for r in b]
    mine, theirs = by_path(read_shards(tmp_path / "here")), by_path(read_shards(tmp_path / "ray"))
    assert mine.keys() == theirs.keys() and len(mine) == here.images == 42
    for path, row in mine.items():
        assert theirs[path]["label"] == row["label"] and theirs[path]["error"] == row["error"]
        assert theirs[path]["probability"] == pytest.approx(row["probability"], abs=1e-5) if row["label"] else True


@needs_ray
def test_ray_survives_a_killed_worker_and_a_rerun_skips_finished_shards(local_ray, model, album, tmp_path):
    import threading

    import psutil

    out = tmp_path / "out"
    killed = []

    def kill_a_worker_once_a_shard_is_written():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(out.glob("part-*")):
            time.sleep(0.01)
        for proc in psutil.Process().children(recursive=True):
            try:
                if "MapWorker" in " ".join(proc.cmdline()):
                    proc.kill()
                    killed.append(proc.pid)
            except psutil.Error:
                pass

    killer = threading.Thread(target=kill_a_worker_once_a_shard_is_written)
    killer.start()
    result = visiontune.predict_shards(model, album, out, ray="", shard_images=2, batch_size=1, quiet=True)
    killer.join()
    assert killed, "no Ray worker found to kill"
    assert result.written == 21 and len(by_path(read_shards(out))) == 42
    for name in ("part-000003.parquet", "part-000017.parquet"):  # as if the driver had died before them
        (out / name).unlink()
    (out / ".part-000004.parquet.999999999.tmp").write_bytes(b"half a shard")
    again = visiontune.predict_shards(model, album, out, ray="", shard_images=2, quiet=True)
    assert (again.written, again.skipped, again.images) == (2, 19, 4)
    assert len(by_path(read_shards(out))) == 42 and not list(out.glob(".*tmp"))
