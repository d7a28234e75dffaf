"""INT8 static post-training quantization with ONNX Runtime's own tools.

Static (activations calibrated ahead of time) rather than dynamic: dynamic quantization recomputes the
activation range at every call, which costs more than it saves on a convolutional network. The fp32 graph
is first optimised by `quant_pre_process` (BatchNorm folded into the convolutions, shapes inferred), so
the quantized weights are the folded ones and no BatchNorm is left to run in float.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from visiontune.config import ExportConfig
from visiontune.errors import ExportError
from visiontune.models.int8_rounding import MOMENT_BATCH, InputMoments, round_weights
from visiontune.models.percentile_ranges import write_percentile_ranges


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over normalised float32 batches, read one range at a time.

    ONNX Runtime keeps every intermediate output of the images it is given in one `collect_data` call (tens of
    MB an image for Lite0): 512 calibration images at once were killed for memory on a 24 GiB machine.
    `quantize_static` calls `collect_data` once per `set_range` window when given `CalibStridedMinMax`, and
    the histogram calibrators merge the windows, so memory is bounded by one window."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self.input_name = input_name
        # One image per call: the histogram calibrators (percentile, entropy) stack every call's outputs and
        # fail on a last batch smaller than the others.
        self._images = [image[None] for batch in batches for image in batch]
        self._next, self._end = 0, len(self._images)

    def __len__(self) -> int:
        return len(self._images)

    @property
    def images(self) -> list[np.ndarray]:
        return self._images

    @property
    def first_shape(self) -> tuple[int, ...]:
        return self._images[0].shape

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._images))

    def get_next(self):
        if self._next >= self._end:
            return None
        self._next += 1
        return {self.input_name: self._images[self._next - 1]}

    def rewind(self):  # required by the protocol; calibration reads each window once
        pass

    def window(self, most: int) -> int:
        """The largest number of images at most `most` that divides them all into equal windows (ONNX Runtime
        refuses a shorter last window)."""
        n = len(self._images)
        return max(k for k in range(1, max(1, min(most, n)) + 1) if n % k == 0)


def quantize_int8(fp32_model: bytes, calibration: list[np.ndarray], *, input_name: str,
                  per_channel: bool = ExportConfig.per_channel, quant_format: str = ExportConfig.quant_format,
                  method: str = ExportConfig.calibration_method, exclude: Iterable[str] = (),
                  window: int = ExportConfig.calibration_window,
                  weight_rounding: str = ExportConfig.weight_rounding) -> bytes:
    """The INT8 model (weights int8 per output channel, activations uint8) as serialised ONNX bytes.

    `calibration`: normalised N x 3 x S x S batches of representative images (training images, eval crop).
    `exclude`: node names left in float (e.g. the first convolution, or the classifier).
    `window`: at most this many images' activations are held in memory at once.
    """
    with Int8Calibration(fp32_model, calibration, input_name=input_name, per_channel=per_channel,
                         quant_format=quant_format, method=method, window=window,
                         weight_rounding=weight_rounding) as calibrated:
        return calibrated.build(exclude)


class Int8Calibration:
    """One calibration, any number of INT8 graphs: each `build(exclude)` keeps other nodes in float and reuses the
    activation ranges measured once (ONNX Runtime's calibration cache), so trying which layers to keep in float
    costs a graph rewrite, not a calibration (the calibration is most of an INT8 export's time)."""

    def __init__(self, fp32_model: bytes, calibration: list[np.ndarray], *, input_name: str,
                 per_channel: bool = ExportConfig.per_channel, quant_format: str = ExportConfig.quant_format,
                 method: str = ExportConfig.calibration_method, window: int = ExportConfig.calibration_window,
                 weight_rounding: str = ExportConfig.weight_rounding):
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if not calibration:
            raise ExportError("INT8 quantization needs calibration images, and the run's training split has none "
                              "that decode")
        self._tmp = tempfile.TemporaryDirectory(prefix="visiontune-int8-")
        tmp = Path(self._tmp.name)
        src, self._prepared, self._ranges = tmp / "fp32.onnx", tmp / "prepared.onnx", tmp / "ranges.json"
        src.write_bytes(fp32_model)
        quant_pre_process(str(src), str(self._prepared), skip_symbolic_shape=False)
        self._options = dict(per_channel=per_channel, quant_format=quant_format, method=method)
        self._reader = _Batches(input_name, calibration)
        self._window = window
        self._rounding, self._moments = weight_rounding, None
        self.input_name = input_name

    @property
    def prepared(self) -> bytes:
        """The fp32 graph the INT8 ones are made from (BatchNorm folded): its node names are the ones `exclude`
        and the sensitivities use."""
        return self._prepared.read_bytes()

    @property
    def image_size(self) -> int:
        return int(self._reader.first_shape[-1])

    def build(self, exclude: Iterable[str] = ()) -> bytes:
        import onnx

        exclude = list(exclude)
        out = Path(self._tmp.name) / "int8.onnx"
        # Histogram calibrators print their progress to stdout, which belongs to the CLI's own output.
        with contextlib.redirect_stdout(io.StringIO()):
            self._calibrate()
            _quantize_static(str(self._prepared), str(out), self._reader, exclude=exclude, window=self._window,
                             ranges=self._ranges, **self._options)
        # Load and re-serialise: the calibration scratch files must not be referenced afterwards.
        graph = onnx.load(str(out))
        float_outputs(graph)
        if exclude:
            float_again(graph, onnx.load(str(self._prepared)), set(exclude))
        if self._rounding == "gptq":
            round_weights(graph, self.input_moments(), skip=exclude)
        return graph.SerializeToString()

    def _calibrate(self) -> None:
        """The percentile ranges, and GPTQ's moments from the same pass, before the first graph is built (ONNX
        Runtime calibrates the other methods itself, in `quantize_static`)."""
        if self._ranges.is_file() or self._options["method"] != "percentile":
            return
        moments = InputMoments(self.prepared) if self._rounding == "gptq" else None
        seen = write_percentile_ranges(self._prepared, self._reader.images, self.input_name, self._ranges,
                                       window=self._reader.window(self._window), moments=moments)
        if moments is not None and moments.inputs <= seen:
            self._moments = moments.done()

    def input_moments(self) -> InputMoments:
        """What GPTQ rounds against, measured on the calibration images once for every graph built."""
        if self._moments is None:
            images = np.concatenate(self._reader.images)
            batches = [images[i:i + MOMENT_BATCH] for i in range(0, len(images), MOMENT_BATCH)]
            self._moments = InputMoments.measure(self.prepared, batches, self.input_name)
        return self._moments

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _quantize_static(prepared: str, out: str, reader: _Batches, *, per_channel, quant_format, method, exclude,
                     window, ranges: Path):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cached = ranges.is_file()
    quantize_static(
        prepared, out, None if cached else reader,
        quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
        per_channel=per_channel,
        # uint8 activations x int8 weights is the combination x86 VNNI/AMX integer kernels run natively.
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[method],
        nodes_to_exclude=list(exclude) or None,
        extra_options={} if cached else {"CalibStridedMinMax": reader.window(window)},
        calibration_cache_path=str(ranges),
    )


def float_again(int8, prepared, exclude: set[str]) -> None:
    """Make the nodes in `exclude` really float, in place: each reads the float tensors its fp32 (`prepared`) twin
    reads, not a DequantizeLinear's output.

    ONNX Runtime leaves an excluded node unquantized but not its inputs: `_add_qdq_pair_for_activation` renames a
    quantized activation for every reader (`replace_input_of_all_nodes`), the excluded ones included, so a layer
    "kept in float" computed on INT8-rounded activations and the gate barely moved however many went back. Where
    the quantizer removed a Clip/Relu after a convolution (its range folded into the QuantizeLinear), the float
    tensor no longer exists and a copy of that activation is put back for the excluded readers. Q/DQ pairs and
    initializers nobody reads afterwards are dropped."""
    import onnx

    graph, twin = int8.graph, {n.name: n for n in prepared.graph.node}
    made_by = {out: node for node in graph.node for out in node.output}
    twin_made_by = {out: node for node in prepared.graph.node for out in node.output}
    initializers = {i.name for i in graph.initializer}
    twin_initializers = {i.name: i for i in prepared.graph.initializer}
    removed: dict[str, onnx.NodeProto] = {}  # float tensor -> the folded-away activation that made it
    for node in graph.node:
        original = twin.get(node.name)
        if node.name not in exclude or original is None or len(original.input) != len(node.input):
            continue
        for i, (now, before) in enumerate(zip(node.input, original.input)):
            dq = made_by.get(now)
            if now == before or dq is None or dq.op_type != "DequantizeLinear":
                continue
            maker, twin_maker = made_by.get(before), twin_made_by.get(before)
            if before in twin_initializers:  # a weight the quantizer quantized: the float one again
                _need(graph, [before], initializers, twin_initializers)
            elif maker is not None and twin_maker is not None and maker.name != twin_maker.name:
                # The activation that made `before` was folded away; `before` now holds its input's value.
                removed[before] = twin_maker
                before = f"{before}/float"
            node.input[i] = before
    for tensor, activation in removed.items():
        _put_back(graph, activation, tensor, initializers, twin_initializers)
    _drop_unread(graph)
    onnx.checker.check_model(int8)


def float_outputs(int8) -> None:
    """Leave the graph's outputs in float, in place: a QuantizeLinear -> DequantizeLinear pair that ends at a graph
    output is removed and the node before it writes the output itself.

    ONNX Runtime quantizes the classifier's output too, so the logits come back on a uint8 grid (a step of 0.036 on
    the flower_photos run): two classes' logits can come out exactly equal (8 of oxford102's 1,024 test images), the
    answer then depends on the class order, and the probabilities are rounded for nothing, since the integer kernel
    can write float as cheaply (the same batch-1 latency, measured: BENCHMARKS.md)."""
    graph = int8.graph
    made_by = {out: node for node in graph.node for out in node.output}
    inputs = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    removed = False
    for output in graph.output:
        dq = made_by.get(output.name)
        q = made_by.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inputs:
            continue
        if [n.name for n in graph.node if q.output[0] in n.input] != [dq.name]:  # another reader keeps the pair
            continue
        source = q.input[0]
        graph.node.remove(dq)
        graph.node.remove(q)
        for node in graph.node:
            node.output[:] = [output.name if name == source else name for name in node.output]
            node.input[:] = [output.name if name == source else name for name in node.input]
        removed = True
    if removed:  # the pairs' scales and zero points
        _drop_unread(graph)


def _need(graph, names, initializers: set[str], twin_initializers: dict) -> None:
    """Copy the fp32 graph's initializers among `names` that the INT8 graph no longer has."""
    for name in names:
        if name in twin_initializers and name not in initializers:
            graph.initializer.append(twin_initializers[name])
            initializers.add(name)


def _put_back(graph, activation, tensor: str, initializers: set[str], twin_initializers: dict) -> None:
    """A copy of a removed activation (Clip, Relu) applied to `tensor` (now its input's value), written to
    `tensor/float`, placed right after the node that makes `tensor` so the graph stays in topological order."""
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(activation)
    copy.name = f"{activation.name}/float"
    copy.input[0] = tensor
    del copy.output[:]
    copy.output.append(f"{tensor}/float")
    _need(graph, copy.input[1:], initializers, twin_initializers)
    nodes = list(graph.node)
    at = next(k for k, n in enumerate(nodes) if tensor in n.output) + 1
    nodes.insert(at, copy)
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_unread(graph) -> None:
    """Remove Q/DQ nodes whose outputs nobody reads (repeatedly: a DQ gone leaves its Q unread), then unread
    initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        unread = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                  and not any(o in read for o in n.output)]
        if not unread:
            break
        for n in unread:
            graph.node.remove(n)
    read = {name for node in graph.node for name in node.input} | outputs
    kept = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def node_names(model: bytes, op_type: str) -> list[str]:
    """Names of the graph's nodes of one type, in graph order (to pick the first conv or the head)."""
    import onnx

    return [n.name for n in onnx.load_from_string(model).graph.node if n.op_type == op_type]


def scoped_nodes(model: bytes, scope: str) -> list[str]:
    """Names of the nodes a traced submodule made (`/scope/...`): e.g. the unknown score's, kept in float."""
    import onnx

    prefix = f"/{scope}/"
    return [n.name for n in onnx.load_from_string(model).graph.node if n.name.startswith(prefix)]
