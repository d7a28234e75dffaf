"""INT8 activation ranges by ONNX Runtime's percentile method, computed without its copies, in the one pass over
the calibration images that also measures GPTQ's input moments.

ONNX Runtime's `HistogramCollector` stacks a window's outputs into one array, flattens it, takes |x| and histograms
that (2048 equal bins between the smallest and the largest |x|); the range is the edge where the 99.999th
percentile falls, clamped to the tensor's own min and max. On Lite0 that is about 10 million values an image, and
the copies took as long as the histograms. Here each image's |x| is histogrammed on its own over the same edges:
a value's bin depends only on the value and the edges, so the counts add up to ONNX Runtime's histogram bin for
bin, and so do the ranges (tested). Tensors are histogrammed two at a time. The ranges go into ONNX Runtime's
calibration cache, which `quantize_static` then reads as if it had calibrated itself.

When the images are more than one window (the memory bound: every output of a window is held at once), the
edges come from a first pass over all windows and a second pass counts; ONNX Runtime instead widens its
histogram window by window, so there the ranges are this module's, not ONNX Runtime's.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from visiontune.models.int8_rounding import MOMENT_BATCH, InputMoments

PERCENTILE, BINS = 99.999, 2048  # ONNX Runtime's defaults for CalibrationMethod.Percentile


def write_percentile_ranges(prepared: Path, images: list[np.ndarray], input_name: str, cache: Path, *,
                            window: int, moments: InputMoments | None = None) -> set[str]:
    """Calibrate `prepared` (a `quant_pre_process`ed graph file) on `images` (one image a call, (1, C, H, W), as
    ONNX Runtime's calibration runs them) and write the ranges to `cache`; `moments` is fed the inputs it needs
    from the same pass, MOMENT_BATCH images at a time. Returns the tensors calibrated (with the input, what `moments` got)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    with tempfile.TemporaryDirectory(prefix="visiontune-calibrate-") as tmp:
        # ONNX Runtime's own choice of tensors and its augmented graph, as `quantize_static` would make them.
        calibrator = create_calibrator(prepared, list(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Percentile)
        session, tensors = calibrator.infer_session, sorted(calibrator.tensors_to_calibrate)
        del calibrator
    names = [o.name for o in session.get_outputs()]
    wanted = [n for n in names if n in tensors]
    needs = moments.inputs if moments is not None else set()
    needed = [n for n in wanted if n in needs]
    step = max(1, window)
    windows = [images[i:i + step] for i in range(0, len(images), step)]

    def run(group: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
        outputs: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
        for image in group:
            values = dict(zip(names, session.run(names, {input_name: image})))
            for n in wanted:
                outputs[n].append(values[n])
        return outputs

    with ThreadPoolExecutor(2) as pool:
        stats: dict[str, _Stats] = {}
        held = None
        for group in windows:  # the edges: each tensor's extremes over every window
            held = run(group)
            for name, values in zip(wanted, pool.map(_Stats.of, (held[n] for n in wanted))):
                stats[name] = values if name not in stats else stats[name].merge(values)
            held = held if len(windows) == 1 else None
        for group in windows:  # the counts (one window: the outputs already held)
            outputs = held if held is not None else run(group)
            counts = pool.map(lambda n: stats[n].histogram(outputs[n]), wanted)  # submitted: they run meanwhile
            if moments is not None:
                fed = {input_name: group, **{n: outputs[n] for n in needed}}
                for j in range(0, len(group), MOMENT_BATCH):
                    moments.add({n: np.concatenate(v[j:j + MOMENT_BATCH]) for n, v in fed.items()})
            for name, hist in zip(wanted, counts):
                stats[name].hist = hist if stats[name].hist is None else stats[name].hist + hist
            outputs = held = None
    save_tensors_data(TensorsData(CalibrationMethod.Percentile, {n: stats[n].range() for n in wanted}), cache)
    return {input_name, *wanted}


class _Stats:
    """One tensor's min and max, the smallest and largest |x| (the histogram's outer edges) and the counts."""

    def __init__(self, low, high, abs_low, abs_high):
        self.low, self.high, self.abs_low, self.abs_high = low, high, abs_low, abs_high
        self.hist: np.ndarray | None = None

    @classmethod
    def of(cls, arrays: list[np.ndarray]) -> _Stats:
        low = min(_extreme(a, np.min, np.nanmin) for a in arrays)
        high = max(_extreme(a, np.max, np.nanmax) for a in arrays)
        # |x|'s extremes (numpy's histogram takes them as `a.min()`, `a.max()` of |x|: float32 scalars), without
        # a pass over |x| unless the values straddle zero
        abs_high = np.maximum(-low, high)
        if low >= 0:
            abs_low = low
        elif high <= 0:
            abs_low = -high
        else:
            abs_low = min(np.abs(a).min() for a in arrays)
        return cls(low, high, abs_low, abs_high)

    def merge(self, other: _Stats) -> _Stats:
        return _Stats(min(self.low, other.low), max(self.high, other.high), min(self.abs_low, other.abs_low),
                      max(self.abs_high, other.abs_high))

    def histogram(self, arrays: list[np.ndarray]) -> np.ndarray:
        edges = (self.abs_low, self.abs_high)
        return sum(np.histogram(np.abs(a), bins=BINS, range=edges)[0] for a in arrays)

    def range(self) -> tuple:
        """ONNX Runtime's `compute_percentile` (symmetric, as its percentile calibrator is by default)."""
        first, last = self.abs_low, self.abs_high
        if first == last:  # numpy widens an empty range so, before it makes the edges
            first, last = first - 0.5, last + 0.5
        edges = np.linspace(first, last, BINS + 1, endpoint=True, dtype=np.result_type(first, last, np.float32))
        cdf = np.cumsum(self.hist / self.hist.sum())
        threshold = edges[np.searchsorted(cdf, PERCENTILE / 100.0)]
        low = -np.array(threshold, dtype=edges.dtype)
        high = np.array(threshold, dtype=edges.dtype)
        if low < self.low:
            low = self.low
        if high > self.high:
            high = self.high
        return (low, high, *self.hist[:2])


def _extreme(a: np.ndarray, fast, nan_aware):
    """`nan_aware(a)` (what ONNX Runtime takes), by the faster `fast` unless `a` holds a NaN."""
    value = fast(a)
    return nan_aware(a) if np.isnan(value) else value
