"""The percentile calibration computed by visiontune gives ONNX Runtime's ranges exactly, whatever the window, and
the same pass measures GPTQ's moments (a small real ONNX graph, real ONNX Runtime)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from test_int8_rounding import correlated_images, two_convolutions
from visiontune.models.int8_rounding import InputMoments
from visiontune.models.percentile_ranges import write_percentile_ranges


def with_residual(model: bytes) -> bytes:
    """`model` with a skip connection after it, so that the ranges cover an Add of two signed tensors."""
    graph = onnx.load_from_string(model)
    pool = helper.make_node("AveragePool", ["a"], ["pooled"], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    add = helper.make_node("Add", ["output", "pooled"], ["sum"], name="add")
    graph.graph.node.extend([pool, add])
    graph.graph.output.pop()
    graph.graph.output.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, [None, 16, 8, 8]))
    return graph.SerializeToString()


def prepared(tmp_path) -> tuple:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, out = tmp_path / "fp32.onnx", tmp_path / "prepared.onnx"
    src.write_bytes(with_residual(two_convolutions()))
    quant_pre_process(str(src), str(out), skip_symbolic_shape=False)
    return out, [image[None] for image in correlated_images(12, seed=3)]


def ranges(path) -> dict:
    return json.loads(path.read_text())["data"]


def test_the_ranges_are_onnx_runtimes_own_bit_for_bit(tmp_path):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    graph, images = prepared(tmp_path)

    class Reader:
        def __init__(self):
            self.left = list(images)

        def get_next(self):
            return {"input": self.left.pop(0)} if self.left else None

    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(graph), str(tmp_path / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        calibrate_method=CalibrationMethod.Percentile,
                        calibration_cache_path=str(tmp_path / "onnxruntime.json"))
    seen = write_percentile_ranges(graph, images, "input", tmp_path / "ours.json", window=len(images))
    theirs, ours = ranges(tmp_path / "onnxruntime.json"), ranges(tmp_path / "ours.json")
    assert {"a", "b", "output", "pooled", "sum"} <= set(theirs) and seen >= set(theirs)
    assert ours == theirs
    method = json.loads((tmp_path / "ours.json").read_text())["calibration_method"]
    assert method == json.loads((tmp_path / "onnxruntime.json").read_text())["calibration_method"]


def test_windows_bound_memory_and_change_no_range(tmp_path):
    graph, images = prepared(tmp_path)
    write_percentile_ranges(graph, images, "input", tmp_path / "one.json", window=len(images))
    write_percentile_ranges(graph, images, "input", tmp_path / "four.json", window=3)
    assert ranges(tmp_path / "four.json") == ranges(tmp_path / "one.json")


def test_the_calibration_pass_measures_gptqs_moments(tmp_path):
    graph, images = prepared(tmp_path)
    data = graph.read_bytes()
    fed = InputMoments(data)
    seen = write_percentile_ranges(graph, images, "input", tmp_path / "r.json", window=5, moments=fed)
    assert fed.inputs <= seen
    fed.done()
    stacked = np.concatenate(images)
    measured = InputMoments.measure(data, [stacked[i:i + 16] for i in range(0, len(stacked), 16)], "input")
    assert fed.layers.keys() == measured.layers.keys() == {"dense", "depthwise"}
    for name, layer in measured.layers.items():
        assert fed.layers[name].count == layer.count
        np.testing.assert_allclose(fed.layers[name].moments, layer.moments, rtol=1e-5,
                                   atol=1e-6 * np.abs(layer.moments).max())


def test_a_graph_without_ranges_to_find_writes_an_empty_cache(tmp_path):
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"], name="same")], "nothing",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 2])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    images = [np.ones((1, 2), np.float32)]
    assert write_percentile_ranges(path, images, "input", tmp_path / "r.json", window=1) == {"input"}
    assert ranges(tmp_path / "r.json") == {}


