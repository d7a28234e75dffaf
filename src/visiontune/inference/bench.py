"""How fast a model classifies on this machine: batch-1 latency and batch throughput per engine.

Engines are measured one after another in the same process, on the same input, so their ratios are
comparable even when the absolute numbers move with the machine's load. Latency is per call, after a
warm-up (ONNX Runtime plans memory and spins up its threads on the first calls): from a normalised tensor
(the model alone), and end-to-end from JPEG bytes (decode + resize + crop + model + softmax, through
`Classifier.predict`, as a service would call it).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from visiontune.config import BenchConfig, InferenceConfig
from visiontune.data.loader import load_for_model
from visiontune.data.transforms import normalize
from visiontune.errors import ModelError
from visiontune.inference.classifier import EXPORTED_ONNX, Classifier


@dataclass
class EngineResult:
    engine: str
    file: str
    threads: int
    tensor_ms: dict  # batch-1 latency from a tensor: p50, p95, mean, runs
    jpeg_ms: dict  # batch-1 latency end-to-end from JPEG bytes
    throughput: dict[int, float]  # batch size -> images/s from tensors
    best_batch: int = 0
    best_images_per_s: float = 0.0


@dataclass
class BenchReport:
    model: str
    image: str
    image_size: tuple[int, int]
    input_size: int
    machine: dict
    engines: list[EngineResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def ratios(self) -> dict[str, float]:
        """Speed-up of every engine over the first one (PyTorch where present), batch-1 from a tensor."""
        if not self.engines:
            return {}
        base = self.engines[0].tensor_ms["p50"]
        return {e.engine: base / e.tensor_ms["p50"] for e in self.engines}

    def table(self) -> str:
        head = ["engine", "threads", "tensor p50", "p95", "JPEG p50", "p95", "best batch", "images/s"]
        rows = [head]
        for e in self.engines:
            rows.append([e.engine, str(e.threads), f"{e.tensor_ms['p50']:.2f} ms", f"{e.tensor_ms['p95']:.2f} ms",
                         f"{e.jpeg_ms['p50']:.2f} ms", f"{e.jpeg_ms['p95']:.2f} ms", str(e.best_batch),
                         f"{e.best_images_per_s:.0f}"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        for e in self.engines:
            lines.append(f"{e.engine}: images/s by batch size: "
                         + ", ".join(f"{b}: {v:.0f}" for b, v in e.throughput.items()))
        ratios = self.ratios()
        if len(ratios) > 1:
            first = self.engines[0].engine
            lines.append("speed-up over " + first + " (batch 1, tensor): "
                         + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items() if k != first))
        return "\n".join(lines)


def engines_for(model: str | Path, *, threads: int) -> list[tuple[str, Classifier]]:
    """PyTorch, ONNX fp32 and ONNX INT8 for a run folder (whichever exist); the file's own engine otherwise."""
    path = Path(model)
    if not path.is_dir():
        clf = Classifier.load(path, threads=threads)
        return [(_engine_name(clf), clf)]
    found = [("pytorch fp32", Classifier.load(path, "torch", threads=threads))]
    found.append(("onnx fp32", Classifier.load(path, "onnx", threads=threads)))
    int8 = path / EXPORTED_ONNX.parent / "model.int8.onnx"
    if int8.is_file():
        found.append(("onnx int8", Classifier.load(int8, threads=threads)))
    return found


def _engine_name(clf: Classifier) -> str:
    if clf.backend == "onnx" and clf.path is not None:
        suffixes = Path(clf.path).suffixes
        return "onnx " + ("int8" if ".int8" in suffixes else "fp16" if ".fp16" in suffixes else "fp32")
    return "torchscript fp32" if Path(clf.path).is_file() else "pytorch fp32"


def _percentiles(times: list[float]) -> dict:
    ms = np.asarray(times) * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "mean": float(ms.mean()),
            "runs": len(times)}


def _time_calls(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _throughput(engine, x: np.ndarray, batch: int, seconds: float) -> float:
    data = np.ascontiguousarray(np.repeat(x, batch, axis=0))
    engine(data)
    engine(data)
    done, start = 0, time.perf_counter()
    while True:
        engine(data)
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def measure(name: str, clf: Classifier, jpeg: bytes, cfg: BenchConfig) -> EngineResult:
    x = normalize(load_for_model(jpeg, clf.preprocess), clf.preprocess)
    engine = clf.engine
    tensor = _time_calls(lambda: engine(x), cfg.runs, cfg.warmup)
    e2e = _time_calls(lambda: clf.predict(jpeg, top_k=1, workers=1), cfg.runs, cfg.warmup)
    throughput = {b: _throughput(engine, x, b, cfg.throughput_seconds) for b in cfg.batch_sizes}
    best = max(throughput, key=throughput.get)
    threads = getattr(engine, "threads", None)
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return EngineResult(name, str(clf.path), int(threads), _percentiles(tensor), _percentiles(e2e), throughput,
                        best, throughput[best])


def run_bench(model: str | Path, *, image: str | Path | None = None, config: BenchConfig | None = None,
              threads: int = InferenceConfig.threads, quiet: bool = True) -> BenchReport:
    """Benchmark every engine `model` offers (see `engines_for`) on one JPEG (default: a sample photo)."""
    from visiontune import samples
    from visiontune.data.decode import decode_full, read_bytes

    cfg = config or BenchConfig()
    source = Path(image) if image else sorted((samples.path("flowers-mini") / "daisy").glob("*.jpg"))[0]
    jpeg = read_bytes(source)
    size = decode_full(jpeg).size
    found = engines_for(model, threads=threads)
    if not found:
        raise ModelError(f"{model}: nothing to benchmark")
    report = BenchReport(str(model), str(source), size, found[0][1].preprocess.input_size, machine())
    if Path(model).is_dir() and not any(n == "onnx int8" for n, _ in found):
        report.notes.append("no export/model.int8.onnx: run `visiontune export RUN --precision int8` to bench INT8")
    for name, clf in found:
        if not quiet:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
        report.engines.append(measure(name, clf, jpeg, cfg))
    return report


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "load_average_1min": load,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
