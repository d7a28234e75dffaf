"""Inference speed and INT8 accuracy of a trained run, every engine measured side by side in one process.

    .venv/bin/python bench/inference_benchmark.py --run bench/out/train/flower_photos-efficientnet_lite0-0 \
        --json bench/out/inference.json

What it does, in order:
1. exports RUN/export/model.onnx and model.int8.onnx with `visiontune export` defaults (if missing);
2. builds INT8 variants (QOperator format, per-tensor weights, first conv or classifier left in float,
   entropy calibration) under bench/out/inference/ for comparison;
3. scores every engine on the run's whole test split (accuracy, agreement with fp32);
4. times batch-1 latency from a tensor and end-to-end from JPEG bytes, interleaving the engines in blocks
   so a change in the machine's load hits them all alike, then throughput per batch size;
5. prints a markdown table, the ratios, and the physical bound (multiply-adds per image against the
   cores' peak).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def count_macs(model, size: int) -> dict:
    """Multiply-accumulates of one forward pass at size x size, by layer kind (conv, depthwise, linear)."""
    import torch

    totals = {"conv": 0, "depthwise": 0, "linear": 0}

    def conv_hook(module, inputs, output):
        out = output.shape[1] * output.shape[2] * output.shape[3]
        per = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        kind = "depthwise" if module.groups > 1 and module.groups == module.in_channels else "conv"
        totals[kind] += out * per

    def linear_hook(module, inputs, output):
        totals["linear"] += module.in_features * module.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    totals["total"] = sum(totals.values())
    return totals


def cpu_ghz() -> float | None:
    try:
        with open("/proc/cpuinfo") as fh:
            mhz = [float(line.split(":")[1]) for line in fh if line.startswith("cpu MHz")]
        return max(mhz) / 1000 if mhz else None
    except OSError:
        return None


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return set(next(line for line in fh if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


def build_variants(run: Path, out: Path, quick: bool) -> tuple[dict[str, Path], dict[str, str]]:
    """INT8 variants of the run's fp32 ONNX, each written once (delete the folder to rebuild)."""
    from visiontune.config import ExportConfig
    from visiontune.data.index import SPLITS, load_dataset
    from visiontune.data.loader import load_for_model
    from visiontune.data.transforms import normalize
    from visiontune.export.onnx import INPUT
    from visiontune.models.bundle import read_meta
    from visiontune.models.quantize import node_names, quantize_int8

    fp32 = (run / "export" / "model.onnx").read_bytes()
    meta = read_meta(run)
    cfg = ExportConfig()
    dataset = load_dataset(run / "split.csv")
    train = np.flatnonzero(dataset.splits == SPLITS.index("train"))
    pick = np.sort(np.random.default_rng(cfg.seed).choice(train, min(cfg.calibration_images, len(train)), replace=False))
    crops = np.stack([load_for_model(dataset.abspath(int(i)), meta.preprocess) for i in pick])
    batches = [normalize(crops[i:i + 16], meta.preprocess) for i in range(0, len(crops), 16)]
    convs, gemms = node_names(fp32, "Conv"), node_names(fp32, "Gemm")
    variants = {
        "int8 qoperator": dict(quant_format="qoperator"),
        "int8 per-tensor": dict(per_channel=False),
        "int8 first conv fp32": dict(exclude=convs[:1]),
        "int8 head fp32": dict(exclude=gemms),
    }
    if not quick:
        variants["int8 entropy calib"] = dict(method="entropy")
    out.mkdir(parents=True, exist_ok=True)
    paths, failed = {}, {}
    for name, kwargs in variants.items():
        path = out / (name.replace(" ", "_") + ".onnx")
        if not path.is_file():
            print(f"quantizing: {name}", file=sys.stderr, flush=True)
            try:
                path.write_bytes(quantize_int8(fp32, batches, input_name=INPUT, **kwargs))
            except Exception as exc:  # a variant ORT's quantizer cannot build is a result too
                failed[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
                print(f"  failed: {failed[name]}", file=sys.stderr)
                continue
        paths[name] = path
    return paths, failed


def load_split(run: Path, spec, split: str, limit: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from concurrent.futures import ThreadPoolExecutor

    from visiontune.data.index import SPLITS, load_dataset
    from visiontune.data.loader import load_for_model

    dataset = load_dataset(run / "split.csv")
    idx = np.flatnonzero(dataset.splits == SPLITS.index(split))[: limit or None]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        crops = list(pool.map(lambda i: load_for_model(dataset.abspath(int(i)), spec), idx))
    return np.stack(crops), dataset.labels[idx], [dataset.classes[i] for i in range(len(dataset.classes))]


def interleaved_latency(fns: dict[str, callable], runs: int, warmup: int, block: int = 25) -> dict[str, dict]:
    """Batch-1 call times, the engines taking turns in blocks of `block` calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    while any(len(t) < runs for t in times.values()):
        for name, fn in fns.items():
            for _ in range(min(block, runs - len(times[name]))):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    out = {}
    for name, t in times.items():
        ms = np.asarray(t) * 1000
        out[name] = {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "mean": float(ms.mean()),
                     "runs": len(ms)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(ROOT / "bench" / "out" / "train" / "flower_photos-efficientnet_lite0-0"),
                        help="a trained run directory (default: the one bench/train_benchmark.py leaves)")
    parser.add_argument("--runs", type=int, default=300, help="timed batch-1 calls per engine (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput time per engine and batch size")
    parser.add_argument("--test-limit", type=int, default=0, help="score only this many test images (0: all)")
    parser.add_argument("--quick", action="store_true", help="fewer variants (no entropy calibration)")
    parser.add_argument("--json", help="write the full results here")
    args = parser.parse_args(argv)

    import onnxruntime
    import torch

    import visiontune
    from visiontune.data.decode import decode_full
    from visiontune.data.transforms import normalize
    from visiontune.inference import Classifier
    from visiontune.inference.pixel_input import load_proto, with_pixel_input
    from visiontune.models.bundle import load_bundle
    from visiontune.models.onnx_graph import session_options

    run = Path(args.run)
    for precision in ("fp32", "int8"):
        target = run / "export" / ("model.onnx" if precision == "fp32" else "model.int8.onnx")
        if not target.is_file():
            print(f"exporting {precision}", file=sys.stderr, flush=True)
            print(visiontune.api.export(run, precision=precision).summary(), file=sys.stderr)
    parity = json.loads((run / "export" / "parity.json").read_text())
    variants, variant_failures = build_variants(run, ROOT / "bench" / "out" / "inference" / run.name, args.quick)

    threads = os.cpu_count() or 1
    engines: dict[str, Classifier] = {
        "pytorch fp32": Classifier.load(run, "torch"),
        "onnx fp32": Classifier.load(run / "export" / "model.onnx"),
        "onnx int8 (export default: qdq, per-channel)": Classifier.load(run / "export" / "model.int8.onnx"),
    }
    for name, path in variants.items():
        engines[f"onnx {name}"] = Classifier.load(path)
    engines["onnx int8, 1 thread"] = Classifier.load(run / "export" / "model.int8.onnx", threads=1)
    basic = Classifier.load(run / "export" / "model.int8.onnx")
    import onnxruntime as ort

    options = session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # The same graph the loader made (with the normalisation in front when it put it there), on the basic level.
    int8_file = run / "export" / "model.int8.onnx"
    wrapped = with_pixel_input(load_proto(int8_file), basic.preprocess) if basic.engine.takes_pixels else None
    basic.engine.session = ort.InferenceSession(wrapped or str(int8_file), options, providers=["CPUExecutionProvider"])
    engines["onnx int8, basic graph optimisation"] = basic
    spec = engines["pytorch fp32"].preprocess

    # Accuracy on the whole test split, every engine on the same crops.
    crops, labels, classes = load_split(run, spec, "test", args.test_limit)
    model_labels = engines["pytorch fp32"].labels
    to_model = np.array([model_labels.index(c) for c in classes])
    y = to_model[labels]
    scores, fp32_pred = {}, None
    for name, clf in engines.items():
        if name.endswith("1 thread") or "basic graph" in name:
            continue  # same weights as the default INT8 file: same answers
        print(f"scoring: {name}", file=sys.stderr, flush=True)
        pred = clf.logits(crops).argmax(1)
        if name == "onnx fp32":
            fp32_pred = pred
        scores[name] = {"accuracy": float(np.mean(pred == y)), "pred": pred}
    for s in scores.values():
        s["agreement_with_onnx_fp32"] = float(np.mean(s.pop("pred") == fp32_pred))

    # One JPEG from the test split, as a service would receive it.
    from visiontune.data.index import SPLITS, load_dataset

    dataset = load_dataset(run / "split.csv")
    first_test = int(np.flatnonzero(dataset.splits == SPLITS.index("test"))[0])
    jpeg_path = dataset.abspath(first_test)
    jpeg = jpeg_path.read_bytes()
    size = decode_full(jpeg).size

    print("timing batch-1 latency", file=sys.stderr, flush=True)
    # Each engine timed from what it takes: an ONNX graph that normalises takes the crop itself.
    inputs = {n: c.model.engine_input(crops[:1]) for n, c in engines.items()}
    tensor = interleaved_latency({n: (lambda c=c, n=n: c.engine(inputs[n])) for n, c in engines.items()}, args.runs,
                                 args.warmup)
    jpeg_ms = interleaved_latency({n: (lambda c=c: c.predict(jpeg, top_k=1, workers=1)) for n, c in engines.items()},
                                  args.runs, args.warmup)
    from visiontune.data.loader import load_for_model

    decode_only = interleaved_latency({"decode+resize+crop+normalize": lambda: normalize(load_for_model(jpeg, spec), spec)},
                                      args.runs, args.warmup)

    print("timing throughput", file=sys.stderr, flush=True)
    from visiontune.inference.bench import _throughput

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    throughput = {}
    for name, clf in engines.items():
        if "basic graph" in name or "1 thread" in name or name.startswith("onnx int8 ") and "default" not in name:
            continue  # throughput of the main three engines only (time)
        throughput[name] = {b: _throughput(clf.engine, inputs[name], b, args.seconds) for b in sizes}

    model, meta = load_bundle(run)
    macs = count_macs(model, spec.input_size)
    ghz = cpu_ghz()
    flags = cpu_flags()
    report = {
        **describe(),
        "run": str(run), "classes": meta.labels, "input_size": spec.input_size, "threads": threads,
        "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
        "cpu_ghz": ghz, "amx": "amx_int8" in flags, "avx512_vnni": "avx512_vnni" in flags,
        "load_average": os.getloadavg(), "jpeg": str(jpeg_path), "jpeg_size": size,
        "macs": macs, "test_images": int(len(y)), "scores": scores, "parity": parity,
        "latency_tensor_ms": tensor, "latency_jpeg_ms": jpeg_ms, "decode_ms": decode_only,
        "throughput": throughput, "variant_failures": variant_failures,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    print(markdown(report))
    return report


def markdown(r: dict) -> str:
    base = r["latency_tensor_ms"]["pytorch fp32"]["p50"]
    lines = ["| engine | test top-1 | agrees with fp32 | batch-1 p50 / p95 (tensor) | vs PyTorch | "
             "batch-1 p50 / p95 (JPEG bytes) | best batch: images/s |", "|---|---|---|---|---|---|---|"]
    for name, t in r["latency_tensor_ms"].items():
        s = r["scores"].get(name, {})
        j = r["latency_jpeg_ms"][name]
        tp = r["throughput"].get(name)
        best = f"{max(tp, key=tp.get)}: {max(tp.values()):.0f}" if tp else "—"
        acc = f"{s['accuracy']:.2%}" if s else "(same file)"
        agree = f"{s['agreement_with_onnx_fp32']:.2%}" if s else ""
        lines.append(f"| {name} | {acc} | {agree} | {t['p50']:.2f} / {t['p95']:.2f} ms | {base / t['p50']:.1f}x | "
                     f"{j['p50']:.2f} / {j['p95']:.2f} ms | {best} |")
    lines.append("")
    lines.append("Throughput (images/s) by batch size: ")
    for name, tp in r["throughput"].items():
        lines.append(f"- {name}: " + ", ".join(f"{b}: {v:.0f}" for b, v in tp.items()))
    for name, why in r["variant_failures"].items():
        lines.append(f"- {name}: could not be built ({why})")
    d = r["decode_ms"]["decode+resize+crop+normalize"]
    lines.append(f"\nJPEG {r['jpeg']} ({r['jpeg_size'][0]}x{r['jpeg_size'][1]}): decode + resize + crop + normalise "
                 f"p50 {d['p50']:.2f} ms.")
    m = r["macs"]
    lines.append(f"Multiply-adds per image: {m['total'] / 1e6:.0f} M (conv {m['conv'] / 1e6:.0f} M, depthwise "
                 f"{m['depthwise'] / 1e6:.0f} M, linear {m['linear'] / 1e6:.2f} M); CPU {r['cpu_ghz']} GHz, "
                 f"AMX-INT8 {r['amx']}, AVX-512 VNNI {r['avx512_vnni']}; load average {r['load_average']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
