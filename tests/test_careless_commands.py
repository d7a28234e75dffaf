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
