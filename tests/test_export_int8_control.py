"""Accuracy-controlled INT8 on the tiny real run (flowers-mini): a layer kept in float on request, the per-layer
error ranking, and a gate that still fails (or a float layer that costs INT8 its speed): one line, nothing written.
The mechanism only, never accuracy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import visiontune
from deploy_run import copy_run
from visiontune.config import ExportConfig
from visiontune.errors import ExportError
from visiontune.export import parity
from visiontune.export.int8_control import controlled
from visiontune.models.int8_sensitivity import quantized_nodes, sensitivities
from visiontune.models.onnx_graph import open_session
from visiontune.models.quantize import Int8Calibration

# Six test images of a barely-trained model: loose bars, so that what is tested is which layers stay float.
LOOSE = dict(int8_agreement=0.5, int8_max_drop=100.0, int8_unknown_agreement=0.0, calibration_images=8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return copy_run(tmp_path_factory, "int8_control")


def test_a_layer_asked_for_stays_float_and_its_cost_is_timed(run):
    fp32 = visiontune.api.export(run).path.read_bytes()
    images = np.random.default_rng(0).normal(size=(4, 3, 224, 224)).astype(np.float32)
    with Int8Calibration(fp32, [images], input_name="input") as calibrated:
        int8 = calibrated.build()
        ranked = sensitivities(calibrated.prepared, int8, [images], "input")
    assert set(ranked) <= set(quantized_nodes(int8)) and len(ranked) > 10
    assert list(ranked.values()) == sorted(ranked.values(), reverse=True)
    conv = next(n for n in ranked if n.endswith("/Conv"))

    result = visiontune.api.export(run, precision="int8", int8_float=conv, **LOOSE)
    graph = onnx.load(str(result.path)).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    node = next(n for n in graph.node if n.name == conv)
    weights = {i.name: i for i in graph.initializer}
    assert node.input[1] in weights and weights[node.input[1]].data_type == onnx.TensorProto.FLOAT
    assert made_by.get(node.input[1]) is None  # no DequantizeLinear in front of its weights
    control = json.loads((run / "export" / "parity.json").read_text())["model.int8.onnx"]["int8_control"]
    assert control["forced"] == [conv] and control["float_layers"] == [conv] and control["by_sensitivity"] == []
    assert set(control["latency_ms_batch1"]) == {"fp32", "int8", "int8_all_layers"}
    assert "1 layer(s) kept in float" in result.summary()


def test_a_layer_kept_in_float_reads_float_tensors(run):
    """ONNX Runtime's quantizer leaves an excluded node reading the Q/DQ'd activation of its input; the graph built
    here must not: no input of a float node comes out of a DequantizeLinear, a Clip the quantizer folded away is put
    back in front of it, and with every node kept in float the INT8 graph computes exactly what fp32 does."""
    fp32 = visiontune.api.export(run).path.read_bytes()
    images = np.random.default_rng(2).normal(size=(4, 3, 224, 224)).astype(np.float32)
    with Int8Calibration(fp32, [images], input_name="input") as calibrated:
        prepared = onnx.load_from_string(calibrated.prepared).graph
        pwl = next(n.name for n in prepared.node if n.name.endswith("conv_pwl/Conv"))
        stem = next(n.name for n in prepared.node if n.op_type == "Conv")
        graph = onnx.load_from_string(calibrated.build([pwl, stem])).graph
        everything = calibrated.build([n.name for n in prepared.node])
        fp32_out = ort_logits(calibrated.prepared, images)
    made_by = {out: node for node in graph.node for out in node.output}
    for name in (pwl, stem):
        node = next(n for n in graph.node if n.name == name)
        assert all(made_by[i].op_type != "DequantizeLinear" for i in node.input if i in made_by), name
    clip = made_by[next(n for n in graph.node if n.name == pwl).input[0]]
    assert clip.op_type == "Clip" and made_by[clip.input[0]].op_type == "Conv"  # ReLU6 again, on float values
    assert {n.op_type for n in onnx.load_from_string(everything).graph.node}.isdisjoint(
        {"QuantizeLinear", "DequantizeLinear"})
    np.testing.assert_array_equal(ort_logits(everything, images), fp32_out)


def test_a_gate_that_still_fails_or_a_float_layer_too_slow_is_one_line_and_writes_nothing(run, cli):
    fp32 = visiontune.api.export(run).path.read_bytes()  # not left to an earlier test: each runs alone too
    images = np.random.default_rng(1).normal(size=(4, 3, 224, 224)).astype(np.float32)
    reference = ort_logits(fp32, images)

    judged = []

    def gate(graph: bytes) -> dict:  # no INT8 graph gives fp32's logits to 1e-9: fails however many layers are float
        judged.append(graph)
        result = parity.compare(reference, ort_logits(graph, images))
        return parity.check_close("ONNX INT8", result, atol=1e-9, cosine=1.0, score_atol=1.0)

    with Int8Calibration(fp32, [images], input_name="input") as calibrated:
        _, result, control = controlled(calibrated, [], gate, ExportConfig(int8_max_float=2, int8_min_speedup=0),
                                        lambda: [images])
        # No graph is 1000x faster than fp32: the first one with a layer in float is timed, not judged, and the
        # search stops there, saying what speed it would have had.
        judged.clear()
        _, slow, slow_control = controlled(calibrated, [], gate, ExportConfig(int8_max_float=4, int8_min_speedup=1000.0),
                                           lambda: [images])
    assert len(judged) == 1 and slow["passed"] is False  # the all-INT8 graph only
    assert [(t["float_layers"], t.get("too_slow", False)) for t in slow_control["tries"]] == [(0, False), (1, True)]
    assert 0 < slow_control["tries"][1]["speedup_batch1"] < 1000 and slow_control["float_layers"] == []
    with pytest.raises(ExportError) as caught:
        parity.raise_if_failed("model.int8.onnx", slow, "model.int8.onnx")
    assert "\n" not in str(caught.value) and "keeping 1 layer(s) in float" in str(caught.value)
    assert "--int8-min-speedup 1000" in str(caught.value)
    assert result["passed"] is False and [t["float_layers"] for t in control["tries"]] == [0, 1, 2]
    assert control["float_layers"] == control["by_sensitivity"] and len(control["float_layers"]) == 2
    assert control["sensitivity"]  # the ranking is reported, for --int8-float
    with pytest.raises(ExportError) as caught:
        parity.raise_if_failed("model.int8.onnx", result, "model.int8.onnx")
    message = str(caught.value)
    assert "\n" not in message and "nothing was written" in message and "most sensitive layer(s) in float" in message

    target = run / "export" / "model.int8.onnx"
    target.unlink(missing_ok=True)
    done = cli("export", run, "--precision", "int8", "--int8-float", "no-such-node", "--calibration-images", "4",
               "--quiet")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no-such-node" in done.stderr
    assert not target.exists()


def ort_logits(graph: bytes, images: np.ndarray) -> np.ndarray:
    return open_session(graph, "test").run(None, {"input": images})[0]
