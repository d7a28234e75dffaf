"""TFLite export of a real trained run (onnx2tf + TensorFlow's converter), run on LiteRT's real interpreter:
parity, the metadata inside the file, and the .tflite in Classifier, predict, bench and serve."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import visiontune
from deploy_run import copy_run
from test_serve import Server
from visiontune.data.loader import load_for_model
from visiontune.errors import ExportError, ModelError
from visiontune.inference import Classifier

needs_tflite = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("tensorflow", "onnx2tf", "ai_edge_litert")),
    reason="the tflite extra is not installed (make install includes it)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return copy_run(tmp_path_factory, "tflite")


@pytest.fixture(scope="module")
def exported(run):
    return {"fp32": visiontune.api.export(run, format="tflite"),
            "fp16": visiontune.api.export(run, format="tflite", precision="fp16")}


@pytest.fixture(scope="module")
def crops(run, photos):
    reference = Classifier.load(run)
    images = photos["daisy"][8:10] + photos["roses"][8:10] + photos["tulips"][8:10]
    return reference, np.stack([load_for_model(p, reference.preprocess) for p in images]), images


@needs_tflite
def test_fp32_and_fp16_match_pytorch_and_record_parity(run, exported):
    assert exported["fp32"].path == run / "export" / "model.tflite"
    assert exported["fp16"].path == run / "export" / "model.fp16.tflite"
    record = json.loads((run / "export" / "parity.json").read_text())
    fp32, fp16 = record["model.tflite"], record["model.fp16.tflite"]
    assert fp32["passed"] and fp32["reference"] == "pytorch" and fp32["split"] == "test" and fp32["images"] == 6
    assert fp32["max_abs_diff"] <= 1e-4 and fp32["min_cosine"] >= 0.9999 and fp32["top1_agreement"] == 1.0
    assert fp16["passed"] and fp16["min_cosine"] >= 0.999 and fp16["thresholds"] == {"min_cosine": 0.999}
    # float16 weights: half the size
    assert exported["fp16"].path.stat().st_size < 0.6 * exported["fp32"].path.stat().st_size
    assert "max |diff|" in exported["fp32"].summary()


@needs_tflite
def test_labels_and_preprocessing_travel_inside_the_file(run, exported, crops, tmp_path):
    from ai_edge_litert import schema_py_generated as schema

    data = exported["fp32"].path.read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    entries = {model.Metadata(i).Name().decode(): model.Metadata(i).Buffer() for i in range(model.MetadataLength())}
    assert {"visiontune.model", "visiontune.metrics", "visiontune.export", "TFLITE_METADATA"} <= set(entries)
    standard = model.Buffers(entries["TFLITE_METADATA"]).DataAsNumpy().tobytes()
    assert standard[4:8] == b"M001" and b"labels.txt" in standard  # TFLite Support's metadata schema
    # the label file other LiteRT tools read is zipped onto the end of the flatbuffer
    assert zipfile.ZipFile(io.BytesIO(data)).read("labels.txt").decode().split() == ["daisy", "roses", "tulips"]
    info = json.loads(model.Buffers(entries["visiontune.export"]).DataAsNumpy().tobytes())
    assert info["format"] == "tflite" and info["parity"]["passed"] and "onnx2tf" in info["versions"]
    assert "NHWC" in info["input"]

    reference, batch, _ = crops
    lone = tmp_path / "elsewhere.bin"  # away from its run, under a name that says nothing: the file alone
    shutil.copy(exported["fp32"].path, lone)
    clf = Classifier.load(lone)
    assert clf.engine_name == "tflite fp32" and clf.labels == reference.labels
    assert clf.preprocess == reference.preprocess
    assert np.allclose(clf.logits(batch), reference.logits(batch), atol=1e-4)
    half = Classifier.load(exported["fp16"].path)
    assert half.engine_name == "tflite fp16" and np.allclose(half.logits(batch), reference.logits(batch), atol=0.02)


@needs_tflite
def test_predict_cli_and_bench_on_the_tflite(run, exported, crops, cli):
    reference, _, images = crops
    expected = [p.label for p in reference.predict(images)]
    done = cli("predict", exported["fp32"].path, *images, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert [p["label"] for p in json.loads(done.stdout)] == expected
    assert done.stderr == ""  # TensorFlow's and LiteRT's native start-up notes are kept off the terminal
    report = visiontune.api.bench(exported["fp16"].path, runs=3, warmup=1, batch_sizes=(1, 32), throughput_seconds=0.05)
    (engine,) = report.engines
    assert engine.engine == "tflite fp16" and set(engine.throughput) == {1, 32}  # the input resized to batch 32
    from visiontune.inference.bench import engines_for

    assert [e.engine_name for e in engines_for(run, threads=1)] == [
        "pytorch fp32", "onnx fp32", "tflite fp32", "tflite fp16"]


@needs_tflite
def test_serve_answers_from_the_tflite_like_the_classifier(exported, crops, tmp_path):
    reference, _, images = crops
    clf = Classifier.load(exported["fp32"].path)
    server = Server(exported["fp32"].path, tmp_path / "serve.log")
    try:
        server.wait_ready()
        assert server.get("/v1/model").json()["engine"] == "tflite fp32"
        for path in images[::2]:
            expected = clf.predict(path, top_k=3)[0]
            reply = server.post("/v1/predict", path.read_bytes())
            assert reply.status == 200, reply.body
            got = reply.json()
            assert got["label"] == expected.label == reference.predict(path)[0].label
            assert got["probability"] == pytest.approx(expected.probability, abs=1e-5)
    finally:
        server.stop()


@needs_tflite
def test_a_failed_tflite_parity_check_writes_no_model(tmp_path_factory):
    run = copy_run(tmp_path_factory, "tflite-refused")
    # fp16 weights cannot keep every logit's direction exactly: an honest failure of TFLite's own check
    with pytest.raises(ExportError, match=r"model\.fp16\.tflite failed its parity check.*min_cosine"):
        visiontune.api.export(run, format="tflite", precision="fp16", fp16_cosine=1.0)
    assert not (run / "export" / "model.fp16.tflite").exists()
    record = json.loads((run / "export" / "parity.json").read_text())["model.fp16.tflite"]
    assert record["passed"] is False and record["min_cosine"] < 1.0 and "stage" not in record


@needs_tflite
def test_tflite_int8_is_full_integer_and_judged_by_the_int8_gate(tmp_path_factory, crops, cli):
    run = copy_run(tmp_path_factory, "tflite-int8")
    target = run / "export" / "model.int8.tflite"
    # The default gate, on the tiny run's 6 test images: written only when it passes, one line when it does not.
    done = cli("export", run, "--format", "tflite", "--precision", "int8", "--calibration-images", "8", "--quiet")
    record = json.loads((run / "export" / "parity.json").read_text())["model.int8.tflite"]
    assert record["reference"] == "onnx fp32" and record["thresholds"]["top1_agreement"] == 0.995
    assert (done.returncode == 0) == record["passed"] == target.exists()
    if not record["passed"]:
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "cannot keep single layers" in done.stderr

    # A bar every model meets, to check what is written: int8 tensors inside, float in and out, and it classifies.
    result = visiontune.api.export(run, format="tflite", precision="int8", calibration_images=8, int8_agreement=0.0,
                                   int8_unknown_agreement=0.0, int8_max_drop=100.0)
    assert result.path == target and result.parity["passed"] and "vs_pytorch" in result.parity
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_path=str(target)).get_tensor_details()
    assert sum(d["dtype"] == np.int8 for d in details) > 20
    reference, batch, _ = crops
    int8 = Classifier.load(target)
    assert int8.engine_name == "tflite int8"
    assert int8.logits(batch).shape == reference.logits(batch).shape


@needs_tflite
def test_foreign_and_damaged_tflite_files_are_one_line_errors(exported, tmp_path, photos, cli):
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(exported["fp32"].path.read_bytes()))
    model.metadata = [m for m in model.metadata if not m.name.decode().startswith("visiontune.")]
    foreign = tmp_path / "foreign.tflite"
    foreign.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    with pytest.raises(ModelError, match="a TFLite model, but not a visiontune one"):
        Classifier.load(foreign)
    damaged = tmp_path / "damaged.tflite"
    damaged.write_bytes(b"\x00" * 64)
    done = cli("predict", damaged, photos["daisy"][0])
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not a TFLite model" in done.stderr


def _without(module: str, code: str) -> subprocess.CompletedProcess:
    """Python with `module` absent, as on a machine without the extra (a None entry in sys.modules is how
    Python marks a module that must not be imported)."""
    script = f"import sys; sys.modules[{module!r}] = None\n{code}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_without_the_extra_export_and_load_say_what_to_install(tmp_path_factory, photos):
    run = copy_run(tmp_path_factory, "tflite-missing")
    done = _without("onnx2tf", f"from visiontune.cli import main; sys.argv = ['visiontune', 'export', {str(run)!r}, "
                               f"'--format', 'tflite']; sys.exit(main())")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert re.search(r"TFLite export needs (\w+, )*onnx2tf\b.*, not installed \(pip install 'visiontune\[tflite\]'\)$",
                     done.stderr.strip()), done.stderr
    assert not (run / "export").exists()
    model = tmp_path_factory.mktemp("tflite-file") / "model.tflite"
    model.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 56)  # anything with a .tflite name gets this far
    done = _without("ai_edge_litert", f"from visiontune.cli import main; sys.argv = ['visiontune', 'predict', "
                                      f"{str(model)!r}, {str(photos['daisy'][0])!r}]; sys.exit(main())")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "the LiteRT interpreter is not installed (pip install 'visiontune[tflite]')" in done.stderr


def test_training_logs_to_tensorboard_without_importing_tensorflow(tmp_path):
    """The tflite extra installs TensorFlow, which TensorBoard would otherwise import at the first epoch."""
    code = (f"from visiontune.models.run_dir import RunDir\nfrom visiontune.training.history import History\n"
            f"h = History(RunDir({str(tmp_path)!r}), quiet=True); h.add({{'phase': 'head', 'epoch': 1, "
            f"'train_loss': 0.5}}); h.close()\nprint('tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", f"import sys\n{code}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False" and any((tmp_path / "tensorboard").iterdir())
