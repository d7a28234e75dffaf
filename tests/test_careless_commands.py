"""Careless commands never destroy a user's file (issue 25): an output over an input is refused in one line before
any work, and a run folder another process is writing is refused."""

from __future__ import annotations

import pytest


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
    from visiontune.errors import ConfigError
    from visiontune.files import refuse_output_over_inputs

    data = make_classes(tmp_path / "data", {"a": 1, "b": 1})
    refuse_output_over_inputs(tmp_path / "runs" / "x", [data], folder=True, what="write the run")
    refuse_output_over_inputs(tmp_path / "data-run", [data], folder=True, what="write the run")  # a prefix only
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(ConfigError, match="inside the input folder"):  # the same place under another name
        refuse_output_over_inputs(tmp_path / "link" / "run", [data], folder=True, what="write the run")


def test_a_second_train_of_a_run_being_written_is_refused(tmp_path, photos, cli):
    """Two `train --resume` of one run once both ran to the end; now the second is refused in one line while the
    first writes, and a writer killed with -9 leaves no lock behind."""
    import shutil
    import signal
    import subprocess
    import time

    from conftest import VISIONTUNE
    from visiontune.files import exclusive_lock
    from visiontune.models.run_dir import RunDir

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
