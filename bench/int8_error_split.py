"""Where an INT8 graph's error comes from: its weights or its activations, measured on a run's test split.

    python bench/int8_error_split.py RUN [--json FILE]

One process loads the run, its test images and the fp32 ONNX graph (what `visiontune export` does), calibrates
INT8 once with the exporter's defaults, and judges with the exporter's own gate (`parity.check_agreement`
against fp32 ONNX) four graphs:

- all INT8: the graph `visiontune export --precision int8` tries first;
- weights only: the fp32 graph with every convolution weight replaced by its INT8 value (GPTQ-rounded, dequantized),
  activations in float;
- activations only: the INT8 graph with every convolution reading its fp32 weight again (the int32 bias, whose step
  is the input's scale times the weight's, stays), activations uint8;
- all INT8 with MSE ranges: each activation range shrunk by the factor (0.2-1.0) that minimises that tensor's own
  quantization error (clipping plus rounding) on 64 calibration images, instead of the percentile calibrator's range.

"rel" is ||INT8 logits - fp32 logits|| / ||fp32 logits|| over the test images. Nothing is tuned on the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402

_SHRINK = np.linspace(0.2, 1.0, 41)
_MSE_IMAGES, _VALUES_AN_IMAGE = 64, 5000


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from visiontune.config import ExportConfig
    from visiontune.export import parity
    from visiontune.export.exporter import _Shared
    from visiontune.export.onnx import INPUT
    from visiontune.export.run_images import onnx_logits
    from visiontune.models.int8_rounding import on_int8_grid
    from visiontune.models.open_set_head import SCOPE
    from visiontune.models.quantize import Int8Calibration, scoped_nodes

    cfg = ExportConfig(precision="int8")
    shared = _Shared(args.run, cfg, lambda m: print(m, flush=True))
    fp32, fp32_out, _ = shared.fp32
    rows = []

    def judge(name: str, data: bytes, **extra) -> None:
        out = onnx_logits(data, shared.images)
        result = parity.check_agreement("ONNX INT8", shared.compare(out, fp32_out), agreement=cfg.int8_agreement,
                                        max_drop=cfg.int8_max_drop, unknown_agreement=cfg.int8_unknown_agreement)
        rel = np.linalg.norm(out.logits - fp32_out.logits) / np.linalg.norm(fp32_out.logits)
        rows.append({"graph": name, "rel": round(float(rel), 4), "agreement": round(result["top1_agreement"], 4),
                     "accuracy_change": result.get("accuracy_change_points"),
                     "unknown_agreement": round(result.get("unknown_agreement", 1.0), 4), "passed": result["passed"],
                     **extra})
        print(json.dumps(rows[-1]), flush=True)

    calibration = shared.calibration
    with Int8Calibration(fp32, calibration, input_name=INPUT, per_channel=cfg.per_channel,
                         method=cfg.calibration_method, window=cfg.calibration_window,
                         weight_rounding=cfg.weight_rounding) as calibrated:
        always = scoped_nodes(fp32, SCOPE)  # the unknown score's nodes stay float, as in the exporter
        start = time.perf_counter()
        int8 = calibrated.build(always)
        judge("all INT8", int8, seconds=round(time.perf_counter() - start, 1))
        prepared = calibrated.prepared
        judge("weights only", on_int8_grid(prepared, int8))
        judge("activations only", _float_weights(int8, prepared))
        start = time.perf_counter()
        shrunk = _mse_ranges(calibrated, np.concatenate(calibration)[:_MSE_IMAGES])
        judge("all INT8, MSE ranges", calibrated.build(always), seconds=round(time.perf_counter() - start, 1),
              median_shrink=round(float(np.median(list(shrunk.values()))), 3))
    save_json(args.json, {"machine": describe(), "date": time.strftime("%Y-%m-%d %H:%M"), "run": str(args.run),
                          "rows": rows})
    return rows


def _float_weights(int8: bytes, prepared: bytes) -> bytes:
    """`int8` with each convolution reading its fp32 weight (from `prepared`, whose node names it shares)."""
    import onnx

    graph, twin = onnx.load_from_string(int8), {n.name: n for n in onnx.load_from_string(prepared).graph.node}
    floats = {i.name: i for i in onnx.load_from_string(prepared).graph.initializer}
    made_by = {out: node for node in graph.graph.node for out in node.output}
    for node in graph.graph.node:
        original = twin.get(node.name)
        dq = made_by.get(node.input[1]) if node.op_type == "Conv" else None
        if original is None or dq is None or dq.op_type != "DequantizeLinear" or original.input[1] not in floats:
            continue
        weight = onnx.TensorProto()
        weight.CopyFrom(floats[original.input[1]])
        weight.name = f"{original.input[1]}_fp32"
        graph.graph.initializer.append(weight)
        node.input[1] = weight.name
    return graph.SerializeToString()


def _mse_ranges(calibrated, images: np.ndarray) -> dict[str, float]:
    """Rewrites the calibration's cached ranges (ONNX Runtime's calibration cache) to the MSE-best shrink of each;
    the next `build` uses them. Returns the factor chosen per tensor."""
    from visiontune.models.int8_sensitivity import _with_outputs

    cache = json.loads(calibrated._ranges.read_text())
    ranges = cache["data"]
    names = [n for n in ranges if n != calibrated.input_name]
    session, wanted = _with_outputs(calibrated.prepared, names, 0)
    rng = np.random.default_rng(0)
    values: dict[str, list] = {n: [] for n in wanted}
    for i in range(0, len(images), 8):
        for name, out in zip(wanted, session.run(wanted, {calibrated.input_name: images[i:i + 8]})):
            flat = out.ravel()
            values[name].append(flat[rng.integers(0, flat.size, min(flat.size, 8 * _VALUES_AN_IMAGE))])
    chosen = {}
    for name in wanted:
        x = np.concatenate(values[name])
        low, high = _value(ranges[name]["lowest"]), _value(ranges[name]["highest"])
        if high <= low:
            continue
        errors = [np.mean((x - _fake_quant(x, low * s, high * s)) ** 2) for s in _SHRINK]
        chosen[name] = s = float(_SHRINK[int(np.argmin(errors))])
        _set(ranges[name], "lowest", low * s)
        _set(ranges[name], "highest", high * s)
    calibrated._ranges.write_text(json.dumps(cache))
    return chosen


def _fake_quant(x: np.ndarray, low: float, high: float) -> np.ndarray:
    scale = (high - low) / 255.0
    zero = np.round(-low / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _value(v) -> float:  # the cache writes a float or a numpy scalar as {"data": ..., "dtype": ...}
    return float(v["data"] if isinstance(v, dict) else v)


def _set(entry: dict, key: str, value: float) -> None:
    if isinstance(entry[key], dict):
        entry[key]["data"] = value
    else:
        entry[key] = value


if __name__ == "__main__":
    main()
