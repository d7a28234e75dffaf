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

from visiontune.config import SPLITS, BenchConfig
from visiontune.data.loader import load_for_model
from visiontune.inference.classifier import Classifier
from visiontune.models.locate import locate_model
from visiontune.models.run_dir import RunDir


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

    def summary(self) -> str:
        """What `visiontune bench` prints: the model, image and machine, the table, the notes."""
        m = self.machine
        head = (f"{self.model}: {self.input_size} px input; JPEG {self.image} ({self.image_size[0]}x{self.image_size[1]}); "
                f"{m['cores']} cores, {m['cpu']}, onnxruntime {m['onnxruntime']}, torch {m['torch']}")
        return "\n".join([head, self.table()] + [f"note: {n}" for n in self.notes])

    def table(self) -> str:
        head = ["engine", "threads", "tensor p50", "p95", "JPEG p50", "p95", "best batch", "images/s"]
        rows = [head]
        for e in self.engines:
            rows.append([e.engine, str(e.threads), f"{e.tensor_ms['p50']:.2f} ms", f"{e.tensor_ms['p95']:.2f} ms",
                         f"{e.jpeg_ms['p50']:.2f} ms", f"{e.jpeg_ms['p95']:.2f} ms", str(e.best_batch),
                         _rate(e.best_images_per_s)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        for e in self.engines:
            lines.append(f"{e.engine}: images/s by batch size: "
                         + ", ".join(f"{b}: {_rate(v)}" for b, v in e.throughput.items()))
        ratios = self.ratios()
        if len(ratios) > 1:
            first = self.engines[0].engine
            lines.append("speed-up over " + first + " (batch 1, tensor): "
                         + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items() if k != first))
        return "\n".join(lines)


def _rate(images_per_s: float) -> str:
    """Images/s with a decimal below 10, so a slow engine does not read as 0."""
    return f"{images_per_s:.0f}" if images_per_s >= 10 else f"{images_per_s:.1f}"


def engines_for(model: str | Path, *, threads: int) -> list[Classifier]:
    """PyTorch and ONNX fp32 for a run or ensemble folder, then every other export a run has (ONNX INT8, OpenVINO
    fp32 and INT8, TFLite fp32, fp16 and INT8), side by side in one run; a file's own engine."""
    found = locate_model(model)
    if not found.is_folder:
        return [Classifier.load(found.path, threads=threads)]
    engines = [Classifier.load(found.path, "torch", threads=threads), Classifier.load(found.path, "onnx", threads=threads)]
    if found.kind == "run" and RunDir(found.path).export_file("onnx", "int8").is_file():
        engines.append(Classifier.load(found.path, "onnx", precision="int8", threads=threads))
    for format, precision in (("openvino", "fp32"), ("openvino", "int8"), ("tflite", "fp32"), ("tflite", "fp16"),
                              ("tflite", "int8")):
        exported = RunDir(found.path).export_file(format, precision)
        if found.kind == "run" and exported.is_file():
            engines.append(Classifier.load(exported, threads=threads))
    return engines


def _percentiles(times: list[float]) -> dict:
    ms = np.asarray(times) * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "mean": float(ms.mean()),
            "runs": len(times)}


# Batch-1 timing runs in windows of _WINDOW calls and stops once the median settles: when a window's median is within
# _SETTLED of the one before (PyTorch's first calls after the warm-up can still be several times slower), or once
# _SECONDS have passed (after at least _FEWEST calls; the warm-up is held to that time too). The numbers come from
# the last two windows. 200 fixed calls of each kind on up to seven engines kept a user waiting over 5 minutes.
_WINDOW = 10
_SETTLED = 0.05
_SECONDS = 3.0
_FEWEST = 5


def _time_calls(fn, runs: int, warmup: int) -> list[float]:
    started = time.perf_counter()
    for k in range(warmup):
        fn()
        if k and time.perf_counter() - started >= _SECONDS:
            break
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < runs:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= _FEWEST and time.perf_counter() - started >= _SECONDS:
            break
        if len(times) >= 2 * _WINDOW and len(times) % _WINDOW == 0:
            last, before = np.median(times[-_WINDOW:]), np.median(times[-2 * _WINDOW:-_WINDOW])
            if abs(last - before) <= _SETTLED * last:
                break
    return times[-2 * _WINDOW:]


def _throughput(engine, x: np.ndarray, batch: int, seconds: float) -> float:
    data = np.ascontiguousarray(np.repeat(x, batch, axis=0))
    engine(data)  # untimed: the first call at a new shape plans its memory
    done, start = 0, time.perf_counter()
    while True:
        engine(data)
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def measure(clf: Classifier, jpeg: bytes, cfg: BenchConfig, say=lambda line: None) -> EngineResult:
    """One engine's numbers; `say` gets a line after each step (the CLI's progress)."""
    crop = load_for_model(jpeg, clf.preprocess)[None]
    # An ensemble votes on crops (each member prepares its own input); a single network is timed from its tensor.
    engine, x = (clf.logits, crop) if clf.is_ensemble else (clf.engine, clf.model.engine_input(crop))
    tensor = _time_calls(lambda: engine(x), cfg.runs, cfg.warmup)
    say(f"batch 1 from a tensor: {_percentiles(tensor)['p50']:.2f} ms ({len(tensor)} calls)")
    e2e = _time_calls(lambda: clf.predict(jpeg, top_k=1, workers=1), cfg.runs, cfg.warmup)
    say(f"batch 1 from JPEG bytes: {_percentiles(e2e)['p50']:.2f} ms ({len(e2e)} calls)")
    throughput = {}
    for b in cfg.batch_sizes:
        throughput[b] = _throughput(engine, x, b, cfg.throughput_seconds)
        say(f"batch {b}: {_rate(throughput[b])} images/s")
    best = max(throughput, key=throughput.get)
    threads = getattr(engine, "threads", None)
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return EngineResult(clf.engine_name, str(clf.path), int(threads), _percentiles(tensor), _percentiles(e2e), throughput,
                        best, throughput[best])


def default_image(model: str | Path) -> Path:
    """The image a bench times when none is given: the first test image of the run (or ensemble) that still exists,
    then a validation or training one, so the JPEG path is timed on the user's own photos (a file in a run's export
    folder counts as the run's); a sample photo for a lone model file or a run whose images are gone."""
    from visiontune import samples
    from visiontune.data.index import load_dataset

    found = locate_model(model)
    folder = found.path if found.is_folder else found.path.resolve().parent.parent
    split = RunDir(folder).split
    if (found.is_folder or found.path.resolve().parent.name == RunDir.EXPORT) and split.is_file():
        dataset = load_dataset(split)
        for wanted in ("test", "val", "train"):
            for i in np.flatnonzero(dataset.splits == SPLITS.index(wanted)):
                if dataset.abspath(i).is_file():
                    return dataset.abspath(i)
    return sorted((samples.path("flowers-mini") / "daisy").glob("*.jpg"))[0]


def run_bench(model: str | Path, *, image: str | Path | None = None, config: BenchConfig | None = None,
              quiet: bool = True) -> BenchReport:
    """Benchmark every engine `model` offers (see `engines_for`) on one JPEG (default: `default_image`)."""
    from visiontune.data.decode import decode_full, read_bytes

    cfg = config or BenchConfig()
    source = Path(image) if image else default_image(model)
    jpeg = read_bytes(source)
    size = decode_full(jpeg).size
    found = engines_for(model, threads=cfg.threads)
    report = BenchReport(str(model), str(source), size, found[0].preprocess.input_size, machine())
    if locate_model(model).kind == "run" and not any(clf.engine_name == "onnx int8" for clf in found):
        int8 = RunDir(model).export_file("onnx", "int8").relative_to(model)
        report.notes.append(f"no {int8}: run `visiontune export RUN --precision int8` to bench INT8")
    started = time.perf_counter()
    for k, clf in enumerate(found, 1):
        def say(line: str, name: str = f"{clf.engine_name} ({k}/{len(found)})") -> None:
            if not quiet:
                print(f"bench: {name}: {line}  [{time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)

        say("...")
        report.engines.append(measure(clf, jpeg, cfg, say))
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
