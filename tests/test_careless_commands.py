"""Careless commands never destroy a user's file (issue 25): an output over an input is refused in one line before
any work, and a run folder another process is writing is refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import VISIONTUNE
from visiontune.errors import ConfigError
from visiontune.files import exclusive_lock, refuse_output_over_inputs, remove_stale_temporaries
from visiontune.models.run_dir import RunDir


@pytest.mark.parametrize("where", ["the data", "inside the data", "above the data"])
def test_train_refuses_an_out_over_its_data_before_any_work(tmp_path, make_classes, cli, untouched, where):
    data = make_classes(tmp_path / "project" / "data", {"a": 3, "b": 3})
    (data / "split.csv").write_text("path,label,split\n")  # the user's own files, which a run would overwrite
    (data / "config.yaml").write_text("mine: true\n")
    out = {"the data": data, "inside the data": data / "a" / "run", "above the data": data.parent}[where]
    with untouched(tmp_path / "project"):
        result = cli("train", data, "--out", out)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"--out {out}:" in result.stderr and "no file was changed" in result.stderr


def test_train_refuses_an_out_that_holds_its_manifest(tmp_path, photos, cli, untouched):
    rows = [f"{p},{name},\n" for name in ("daisy", "roses") for p in photos[name][:3]]
    manifest = tmp_path / "work" / "split.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label,split\n" + "".join(rows))
    with untouched(manifest.parent):
        result = cli("train", manifest, "--out", manifest.parent)
    assert result.returncode == 2 and "holds the input" in result.stderr, result.stderr


def test_a_run_beside_the_data_is_not_refused(tmp_path, make_classes):
    data = make_classes(tmp_path / "data", {"a": 1, "b": 1})
    refuse_output_over_inputs(tmp_path / "runs" / "x", [data], folder=True, what="write the run")
    refuse_output_over_inputs(tmp_path / "data-run", [data], folder=True, what="write the run")  # a prefix only
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(ConfigError, match="inside the input folder"):  # the same place under another name
        refuse_output_over_inputs(tmp_path / "link" / "run", [data], folder=True, what="write the run")


def test_a_second_train_of_a_run_being_written_is_refused(tmp_path, photos, cli):
    """Two `train --resume` of one run once both ran to the end; now the second is refused in one line while the
    first writes, and a writer killed with -9 leaves no lock behind."""
    data = tmp_path / "data"
    for name in ("daisy", "roses"):
        (data / name).mkdir(parents=True)
        for p in photos[name][:6]:
            shutil.copy(p, data / name / p.name)
    run = tmp_path / "run"
    first = subprocess.Popen([str(VISIONTUNE), "train", str(data), "--out", str(run), "--views", "2", "--head-epochs",
                              "2", "--epochs", "30", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None and not (run / "checkpoint").is_dir():
            time.sleep(0.05)
        assert first.poll() is None, "the run finished before a second could be started"
        second = cli("train", "--resume", run, "--quiet")
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"being written by process {first.pid}" in second.stderr
        again = cli("train", data, "--out", run, "--overwrite", "--quiet")
        assert again.returncode == 2 and "being written" in again.stderr, again.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with exclusive_lock(RunDir(run).lock, "this run"):  # the kernel released the dead writer's lock
        pass
    assert not RunDir(run).lock.exists()


def _on_a_full_disk(size: str, mount, *command) -> subprocess.CompletedProcess:
    """Run `command` with a real `size` tmpfs mounted at `mount` (in a private user and mount namespace, so no
    privilege is needed and nothing outlives the call); its listing afterwards is printed to stdout."""

    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed")
    mount.mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                           capture_output=True)
    if probe.returncode:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.decode().strip()}")
    script = 'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && "$@"; rc=$?; find "$MNT" -mindepth 1; exit $rc'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", size, str(mount), *map(str, command)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "MNT": str(mount)})


def test_disk_full_is_one_line_and_leaves_no_temporary(tmp_path, make_classes):

    data = make_classes(tmp_path / "data", {"a": 400, "b": 400})  # a split.csv of some 20 kB
    full = tmp_path / "full"
    result = _on_a_full_disk("8k", full, VISIONTUNE, "split", data, "--out", full / "split.csv", "--quiet")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "no space left on the device" in result.stderr
    assert f"{full / 'split.csv'}: " in result.stderr and "nothing was written" in result.stderr
    assert result.stdout == ""  # nothing on the full disk: no half-written temporary


def test_train_on_a_full_disk_is_one_line(tmp_path, photos):


    data = tmp_path / "data"
    for name in ("daisy", "roses"):
        (data / name).mkdir(parents=True)
        for p in photos[name][:5]:
            shutil.copy(p, data / name / p.name)
    full = tmp_path / "full"
    result = _on_a_full_disk("2m", full, VISIONTUNE, "train", data, "--out", full / "run", "--views", "1",
                             "--head-epochs", "1", "--epochs", "1", "--quiet")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "no space left on the device" in result.stderr, result.stderr
    assert ".tmp" not in result.stdout, result.stdout


def test_temporaries_of_a_dead_writer_are_removed_and_a_live_ones_kept(tmp_path):


    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".model.int8.onnx.{dead.pid}.tmp").write_bytes(b"half")
    (tmp_path / f".model.openvino.xml.{dead.pid}.tmpdir").mkdir()
    (tmp_path / f".model.onnx.{os.getpid()}.tmp").write_bytes(b"being written")
    (tmp_path / "model.onnx").write_bytes(b"whole")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".model.int8.onnx.{dead.pid}.tmp",
                                                       f".model.openvino.xml.{dead.pid}.tmpdir"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".model.onnx.{os.getpid()}.tmp", "model.onnx"])


def test_an_export_that_was_not_written_is_not_recorded_as_passed(tmp_path_factory):
    """parity.json once said "passed" for a model a killed export never wrote; and a temporary of an export
    killed with -9 is removed by the next one."""
    import visiontune
    from deploy_run import copy_run
    from visiontune.files import read_json

    run = copy_run(tmp_path_factory, "careless-export")
    export = RunDir(run).export
    export.mkdir(exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = export / f".model.onnx.{dead.pid}.tmp"
    stale.write_bytes(b"half an export")
    (export / "model.onnx").mkdir()  # a folder in the way: the checked model cannot be renamed into place
    with pytest.raises(IsADirectoryError):
        visiontune.api.export(run)
    assert "model.onnx" not in read_json(RunDir(run).parity)
    assert sorted(p.name for p in export.iterdir()) == ["model.onnx"]  # no temporary, old or new


def test_sigterm_unwinds_train_leaving_its_checkpoint_and_no_temporary(tmp_path, photos):
    """SIGTERM (a scheduler's stop) runs the same clean-up as a failure: the lock file and every temporary
    go, the last checkpoint stays for --resume."""
    data = tmp_path / "data"
    for name in ("daisy", "roses"):
        (data / name).mkdir(parents=True)
        for p in photos[name][:6]:
            shutil.copy(p, data / name / p.name)
    run = tmp_path / "run"
    proc = subprocess.Popen([str(VISIONTUNE), "train", str(data), "--out", str(run), "--views", "2", "--head-epochs",
                             "2", "--epochs", "30", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not (run / "checkpoint" / "state.safetensors").exists():
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert b"Traceback" not in stderr
    left = [p.name for p in run.rglob(".*")]
    assert left == [], left  # no lock file, no temporary
    assert (run / "checkpoint" / "state.safetensors").is_file()
