"""Accuracy-controlled INT8: the fewest layers kept in float that bring the INT8 graph within its gate.

The way OpenVINO NNCF's `quantize_with_accuracy_control` works: quantize everything, and only when the gate
refuses, rank the quantized layers by the error each adds against fp32 on calibration images
(`models.int8_sensitivity`) and return the most sensitive ones to float, as few as pass. Counts are tried
1, 2, 3, 4, 6, 8, ... and the last step bisected, so a search that needs k layers costs about log2(k) + 4 graph
rewrites and parity passes, never a second calibration. The ranking is made once, on the fully quantized graph.

The gate is judged on the parity images (the run's test split); the layers are chosen by their error on
calibration (training) images, so the test split only says when to stop.

Float layers cost speed out of proportion (each breaks the fused integer kernels around it), so every graph the
search makes is timed at batch 1 first: one that is not `int8_min_speedup` times faster than fp32 is not judged,
and the search stops there, since more layers in float are slower still. An INT8 file no faster than fp32 is
refused, with what speed it would have had.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from visiontune.config import ExportConfig
from visiontune.errors import ExportError
from visiontune.models.int8_sensitivity import quantized_nodes, sensitivities
from visiontune.models.quantize import Int8Calibration

_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_LISTED = 12  # most sensitive layers named in parity.json, so a user can pick one for --int8-float


def controlled(calibrated: Int8Calibration, always_float: list[str], check: Callable[[bytes], dict],
               cfg: ExportConfig, sensitivity_batches: Callable[[], list[np.ndarray]],
               say=lambda msg: None) -> tuple[bytes, dict, dict]:
    """(the INT8 graph, its gate result, what was kept in float and why). `always_float`: nodes never quantized
    (the unknown score's); `check(graph)` runs the gate; the graph returned is the last one tried when none passed
    (its result then says so)."""
    forced = _forced(calibrated, cfg)
    tried: dict[int, tuple[bytes, dict]] = {}
    fp32_ms: list[float] = []  # timed once, when the search first keeps a layer in float

    def attempt(k: int, ranking: list[str]) -> dict:
        if k not in tried:
            data = calibrated.build([*always_float, *forced, *ranking[:k]])
            speedup = _speedup(data, calibrated, fp32_ms) if k and cfg.int8_min_speedup > 0 else None
            if speedup is not None and speedup < cfg.int8_min_speedup:
                tried[k] = data, {"passed": False, "too_slow": True, "speedup_batch1": speedup}
                say(f"INT8 with {len(forced) + k} layer(s) in float: {speedup:.2f}x fp32's speed at batch 1, "
                    f"under --int8-min-speedup {cfg.int8_min_speedup:g}: not judged")
                return tried[k][1]
            tried[k] = data, check(data)
            if speedup is not None:
                tried[k][1]["speedup_batch1"] = speedup
            say(f"INT8 with {len(forced) + k} layer(s) in float: top-1 agreement "
                f"{tried[k][1]['top1_agreement']:.2%}, {'passed' if tried[k][1]['passed'] else 'refused'}")
        return tried[k][1]

    def verdict(k: int) -> bool | None:  # None: too slow, and more layers in float are slower still
        result = attempt(k, ranking)
        return None if result.get("too_slow") else result["passed"]

    info = {"float_layers": list(forced), "forced": list(forced), "by_sensitivity": [], "tries": []}
    ranking: list[str] = []
    if not attempt(0, ranking)["passed"] and cfg.int8_max_float > 0:
        start = time.perf_counter()
        ranked = sensitivities(calibrated.prepared, tried[0][0], sensitivity_batches(), calibrated.input_name)
        ranking = [n for n in ranked if n not in forced and n not in always_float]
        info["sensitivity"] = {n: round(ranked[n], 5) for n in ranking[:_LISTED]}
        info["sensitivity_seconds"] = round(time.perf_counter() - start, 2)
        say(f"ranked {len(ranking)} quantized layers by the error each adds; keeping the most sensitive in float")
        _search(verdict, min(cfg.int8_max_float, len(ranking)))
    judged = [k for k, (_, r) in tried.items() if not r.get("too_slow")]
    chosen = min((k for k in judged if tried[k][1]["passed"]), default=max(judged))
    data, result = tried[chosen]
    info["by_sensitivity"] = ranking[:chosen]
    info["float_layers"] = [*forced, *ranking[:chosen]]
    info["tries"] = [{"float_layers": len(forced) + k, "top1_agreement": r.get("top1_agreement"),
                      "accuracy_change_points": r.get("accuracy_change_points"), "passed": r["passed"],
                      **{key: r[key] for key in ("speedup_batch1", "too_slow") if key in r}}
                     for k, (_, r) in sorted(tried.items())]
    if not result["passed"]:
        result["hint"] = _hint(cfg, len(info["float_layers"]), tried, forced)
    info["latency_ms_batch1"] = _latencies(calibrated, data, tried[0][0] if info["float_layers"] else None)
    return data, result, info


def _hint(cfg: ExportConfig, kept: int, tried: dict[int, tuple[bytes, dict]], forced: list[str]) -> str:
    slow = min((k for k, (_, r) in tried.items() if r.get("too_slow")), default=None)
    if slow is None:
        return (f"; with the {kept} most sensitive layer(s) in float it still fails (--int8-max-float "
                f"{cfg.int8_max_float} allows more; --calibration-images, --calibration-method change the rest)")
    speedup = tried[slow][1]["speedup_batch1"]
    return (f"; keeping {len(forced) + slow} layer(s) in float would leave INT8 only {speedup:.2f}x as fast as fp32 "
            f"at batch 1 (--int8-min-speedup {cfg.int8_min_speedup:g} sets that floor; fp32 may serve better here)")


def _speedup(graph: bytes, calibrated: Int8Calibration, fp32_ms: list[float]) -> float:
    """fp32's batch-1 latency over `graph`'s, fp32 timed on the first call only."""
    size, name = calibrated.image_size, calibrated.input_name
    if not fp32_ms:
        fp32_ms.append(batch1_latency_ms(calibrated.prepared, size, name))
    return round(fp32_ms[0] / batch1_latency_ms(graph, size, name), 3)


def _latencies(calibrated: Int8Calibration, chosen: bytes, all_int8: bytes | None) -> dict:
    """What the layers kept in float cost: batch-1 latency of fp32, of the INT8 graph chosen and (when some
    layers stayed float) of the fully quantized one, timed one after the other on the same machine."""
    size, name = calibrated.image_size, calibrated.input_name
    timed = {"fp32": batch1_latency_ms(calibrated.prepared, size, name), "int8": batch1_latency_ms(chosen, size, name)}
    if all_int8 is not None:
        timed["int8_all_layers"] = batch1_latency_ms(all_int8, size, name)
    return timed


def _forced(calibrated: Int8Calibration, cfg: ExportConfig) -> list[str]:
    """The node names --int8-float asks to keep in float, each checked against the graph."""
    asked = [n.strip() for n in cfg.int8_float.split(",") if n.strip()]
    if not asked:
        return []
    known = set(quantized_nodes(calibrated.build([])))
    unknown = [n for n in asked if n not in known]
    if unknown:
        sample = ", ".join(sorted(known)[:5])
        raise ExportError(f"int8_float: {', '.join(unknown)} is not a quantized node of this model's graph "
                          f"(e.g. {sample}; parity.json lists the most sensitive ones once a search has run)")
    return asked


def _search(passes: Callable[[int], bool | None], most: int) -> int | None:
    """The fewest k in 1..most for which `passes(k)` (assumed to turn true and stay true as k grows), or None.
    `passes(k)` None: no k from here on can do (too slow), the search stops."""
    failed = 0
    for k in [s for s in _STEPS if s < most] + [most]:
        outcome = passes(k)
        if outcome is None:
            return None
        if outcome:
            low, high = failed, k
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (low, mid) if passes(mid) else (mid, high)
            return high
        failed = k
    return None


def batch1_latency_ms(model: bytes, size: int, input_name: str, runs: int = 30) -> float:
    """Median milliseconds of one image through `model` (ONNX Runtime, every core), after a few untimed calls."""
    from visiontune.models.onnx_graph import open_session

    session = open_session(model, "the INT8 graph")
    x = np.zeros((1, 3, size, size), np.float32)
    for _ in range(3):
        session.run(None, {input_name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {input_name: x})
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 3)
