"""Damaged or hand-edited model files: model.json checked field by field where it is read, and a model file whose
output does not match its labels refused, each as one line naming what and where (exit 2), nothing changed."""

from __future__ import annotations

import json
import shutil

import pytest

import visiontune
from deploy_run import copy_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = copy_run(tmp_path_factory, "model-files")
    visiontune.api.export(run)
    return run


def edited(run, tmp_path, change) -> object:
    copy = tmp_path / "edited"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export", "evaluations"))
    meta = json.loads((copy / "model.json").read_text())
    change(meta)
    (copy / "model.json").write_text(json.dumps(meta))
    return copy


def _set(path: str, value):
    def change(meta):
        *parents, key = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[key] = value
    return change


CASES = {
    "crop_pct 0": (_set("preprocess.crop_pct", 0), "preprocess.crop_pct: 0 is outside"),
    "input_size 0": (_set("preprocess.input_size", 0), "preprocess.input_size: 0 is outside"),
    "input_size 50000": (_set("preprocess.input_size", 50000), "preprocess.input_size: 50000 is outside"),
    "mean not numbers": (_set("preprocess.mean", ["a", 0.5, 0.5]), "preprocess.mean: ['a', 0.5, 0.5]: expected three"),
    "std 0": (_set("preprocess.std", [0, 0.5, 0.5]), "preprocess.std: [0, 0.5, 0.5]: every value must be above 0"),
    "label not a string": (_set("id2label.1", 7), "id2label.1: 7 is not a name"),
    "calibration a list": (_set("calibration", [1.0]), "calibration: expected an object, got list"),
    "temperature hot": (_set("calibration", {"temperature": "hot"}), "calibration.temperature: 'hot' is not a number"),
    "temperature 0": (_set("calibration", {"temperature": 0}), "calibration.temperature: 0 is outside"),
    "interpolation": (_set("preprocess.interpolation", "smooth"), "preprocess.interpolation: 'smooth': expected one of"),
    "two million labels": (_set("id2label", {str(i): f"c{i}" for i in range(2_000_000)}),
                           "id2label: 2,000,000 labels, more than the 100,000"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_model_json_field_is_one_line_naming_it(run, tmp_path, photos, cli, untouched, case):
    change, expected = CASES[case]
    bad = edited(run, tmp_path, change)
    with untouched(bad):
        done = cli("predict", bad, photos["daisy"][10], "--backend", "torch")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{bad / 'model.json'}: {expected}" in done.stderr


def test_an_onnx_file_whose_output_differs_from_its_labels_is_refused(run, tmp_path, photos, cli):
    import onnx

    from visiontune.export.metadata import MODEL_KEY

    model = onnx.load(str(run / "export" / "model.onnx"))
    for entry in model.metadata_props:
        if entry.key == MODEL_KEY:
            meta = json.loads(entry.value)
            meta["id2label"][str(len(meta["id2label"]))] = "extra class"  # four labels, three outputs
            meta["architecture"]["num_classes"] += 1
            entry.value = json.dumps(meta)
    path = tmp_path / "relabelled.onnx"
    onnx.save(model, str(path))
    done = cli("predict", path, photos["daisy"][10])
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "outputs shape (1, 3) for one image, but its description has 4 labels" in done.stderr


def test_a_torchscript_file_that_returns_a_scalar_is_refused(run, tmp_path, photos, cli):
    import torch

    class Scalar(torch.nn.Module):
        def forward(self, x):
            return x.sum()

    path = tmp_path / "scalar.pt"
    torch.jit.save(torch.jit.script(Scalar()), str(path), _extra_files={"model.json": (run / "model.json").read_text()})
    done = cli("predict", path, photos["daisy"][10])
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "outputs shape () for one image" in done.stderr
