"""Which INT8 calibration and which layers kept in float pass the export gate, measured on a run's test split.

    python bench/int8_choices.py RUN [--methods minmax,entropy,percentile] [--counts 128,256,512]
        [--roundings gptq,nearest] [--search] [--out FILE]

One process loads the run, its test images, PyTorch's reference and the fp32 ONNX graph once (what `visiontune
export` does), then for every calibration (method x image count, per channel) builds the INT8 graphs the exporter
would consider and judges each with the exporter's own gate (`parity.check_agreement` on the test split against
fp32 ONNX). It also counts the test images whose fp32 top-2 softmax margin is a near-tie, and prints the margin of
every image INT8 flips. Only what the gate reads is measured; nothing is tuned on anything else.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--methods", default="minmax,entropy,percentile")
    parser.add_argument("--counts", default="128,256,512")
    parser.add_argument("--per-channel", default="1", help="1, 0 or 1,0")
    parser.add_argument("--roundings", default="gptq", help="INT8 weight rounding(s): gptq, nearest or both")
    parser.add_argument("--search", action="store_true", help="also run the exporter's layer search on each")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from visiontune.config import ExportConfig
    from visiontune.export import parity
    from visiontune.export.exporter import _Shared
    from visiontune.export.int8_control import controlled
    from visiontune.export.onnx import INPUT
    from visiontune.export.run_images import onnx_logits
    from visiontune.models.open_set_head import SCOPE
    from visiontune.models.quantize import Int8Calibration, scoped_nodes

    cfg = ExportConfig(precision="int8")
    start = time.perf_counter()
    shared = _Shared(args.run, cfg, lambda m: print(m, flush=True))
    fp32, fp32_out, _ = shared.fp32
    print(f"setup {time.perf_counter() - start:.1f} s", flush=True)
    logits = fp32_out.logits.astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top2 = np.sort(p, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    ties = {f"<{m}": int(np.sum(margin < m)) for m in (0.01, 0.02, 0.05, 0.1)}
    print(f"fp32 top-2 margins on {len(margin)} test images: {ties}", flush=True)
    records = [{"run": str(args.run), "near_ties": ties, "images": len(margin)}]

    def gate(data: bytes, cfg=cfg) -> dict:
        out = onnx_logits(data, shared.images)
        result = parity.check_agreement("ONNX INT8", shared.compare(out, fp32_out), agreement=cfg.int8_agreement,
                                        max_drop=cfg.int8_max_drop, unknown_agreement=cfg.int8_unknown_agreement)
        flipped = np.flatnonzero(out.logits.argmax(1) != fp32_out.logits.argmax(1))
        result["flip_margins"] = [round(float(margin[i]), 4) for i in flipped]
        return result

    always = scoped_nodes(fp32, SCOPE)
    choices = [(per_channel, method, int(count), rounding) for per_channel in args.per_channel.split(",")
               for method in args.methods.split(",") for count in args.counts.split(",")
               for rounding in args.roundings.split(",")]
    for per_channel, method, count, rounding in choices:
        per_channel = bool(int(per_channel))
        shared.images.cfg = cfg_n = ExportConfig(precision="int8", calibration_images=count,
                                                 calibration_method=method, per_channel=per_channel,
                                                 weight_rounding=rounding)
        shared.images._rng = np.random.default_rng(cfg.seed)  # the sample the exporter would draw
        calibration = shared.images.calibration_batches()
        t0 = time.perf_counter()
        with Int8Calibration(fp32, calibration, input_name=INPUT, per_channel=per_channel,
                             method=method, weight_rounding=rounding) as calibrated:
            built = calibrated.build(always)  # the unknown score's own nodes stay float, as in the exporter
            seconds = time.perf_counter() - t0
            for name, exclude in (("all int8", []), ("stem+classifier float", _ends(calibrated))):
                result = gate(built if not exclude else calibrated.build([*always, *exclude]))
                _record(records, cfg_n, name, result, seconds)
            if args.search:
                t1 = time.perf_counter()
                _, result, info = controlled(calibrated, always, gate, cfg_n, lambda: _sens(calibration, cfg),
                                             lambda m: print("   ", m, flush=True))
                _record(records, cfg_n, "search", result,
                        seconds + time.perf_counter() - t1, float_layers=info["float_layers"])
    if args.out:
        args.out.write_text(json.dumps(records, indent=1))


def _ends(calibrated) -> list[str]:
    """The stem (the convolution reading the image) and the classifier (the node writing the logits)."""
    import onnx

    graph = onnx.load_from_string(calibrated.prepared).graph
    stem = [n.name for n in graph.node if n.op_type == "Conv" and graph.input[0].name in n.input][:1]
    return stem + [n.name for n in graph.node if graph.output[0].name in n.output]


def _sens(calibration, cfg):
    images = np.concatenate(calibration)[:cfg.sensitivity_images]
    return [images[i:i + 16] for i in range(0, len(images), 16)]


def _record(records, cfg, name, result, seconds, **extra):
    row = dict(method=cfg.calibration_method, calibration_images=cfg.calibration_images, per_channel=cfg.per_channel,
               weight_rounding=cfg.weight_rounding, float=name,
               agreement=round(result["top1_agreement"], 4), accuracy_change=result.get("accuracy_change_points"),
               unknown_agreement=round(result.get("unknown_agreement", 1.0), 4), passed=result["passed"],
               flip_margins=result.get("flip_margins"), seconds=round(seconds, 1), **extra)
    records.append(row)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
