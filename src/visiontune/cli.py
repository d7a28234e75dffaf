"""`visiontune <verb>`: parses arguments, calls the Python API, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from visiontune.config import EvalConfig, ExplainConfig, ScanConfig, SplitConfig, TrainConfig
from visiontune.errors import ConfigError, VisiontuneError


def _data_argument(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    parser.add_argument("data", nargs="?" if optional else None, help="class folders, split folders, a CSV manifest (path,label[,split]), "
                                     "or an embedded sample name (flowers-mini)")
    parser.add_argument("--root", help="folder a manifest's relative paths start from (default: the manifest's folder)")


def _scan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-side", type=int, default=ScanConfig.min_side,
                        help="images whose shorter side is smaller are skipped (default %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=ScanConfig.max_pixels,
                        help="images with more pixels are refused as decompression bombs (default %(default)s)")
    parser.add_argument("--workers", type=int, default=ScanConfig.workers, help="processes (default: one per core)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _scan_config(args: argparse.Namespace) -> ScanConfig:
    return ScanConfig(min_side=args.min_side, max_pixels=args.max_pixels, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    from visiontune import __version__

    parser = argparse.ArgumentParser(prog="visiontune", description="Transfer-learning image classification, fast on a CPU.")
    parser.add_argument("--version", action="version", version=f"visiontune {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    scan = verbs.add_parser("scan", help="check a dataset's files, classes and duplicates; never changes a file")
    _data_argument(scan)
    _scan_arguments(scan)
    scan.add_argument("--json", action="store_true", help="print the full report as JSON")
    scan.add_argument("--strict", action="store_true", help="exit 1 when there are error-level findings (e.g. leakage)")
    scan.set_defaults(run=cmd_scan)

    split = verbs.add_parser("split", help="stratified train/val/test split, written as path,label,split")
    _data_argument(split)
    split.add_argument("--val", type=float, default=SplitConfig.val, help="fraction of each class (default %(default)s)")
    split.add_argument("--test", type=float, default=SplitConfig.test, help="fraction of each class (default %(default)s)")
    split.add_argument("--seed", type=int, default=SplitConfig.seed, help="same seed, byte-identical output")
    split.add_argument("--min-per-split", type=int, default=SplitConfig.min_per_split,
                       help="fewest images of each class in each split; 0 allows a class to be absent (default %(default)s)")
    split.add_argument("--out", help="CSV to write (paths relative to its folder); default: standard output")
    split.add_argument("--no-check", action="store_true", help="skip decoding every image (bad files then stay in)")
    _scan_arguments(split)
    split.set_defaults(run=cmd_split)

    train = verbs.add_parser("train", help="train a classifier and write a run directory")
    _data_argument(train, optional=True)
    train.add_argument("--resume", metavar="RUN", help="continue an interrupted run (its data and settings)")
    _train_arguments(train)
    train.set_defaults(run=cmd_train)

    evaluate = verbs.add_parser("evaluate", help="score a run: metrics.json, plots/, report.html, MODEL_CARD.md")
    evaluate.add_argument("run_dir", metavar="RUN", help="a run directory")
    evaluate.add_argument("--data", help="score on this dataset instead of the run's own split.csv (any layout)")
    evaluate.add_argument("--root", help="folder a manifest's relative paths start from")
    evaluate.add_argument("--split", choices=["train", "val", "test"], help=f"which split (default {EvalConfig.split}); "
                          "data without splits is scored whole")
    evaluate.add_argument("--out", help="where to write (default: the run, or RUN/evaluations/<data>-<split> for --data)")
    evaluate.add_argument("--allow-subset", action="store_true", help="data may lack some of the model's classes")
    evaluate.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                          help="do not fit a temperature on validation (model.json keeps what it has)")
    evaluate.add_argument("--backend", choices=["onnx", "torch"], default=EvalConfig.backend,
                          help="engine that scores the images (default %(default)s; same logits)")
    evaluate.add_argument("--tta", action="store_true", help="score as `predict --tta` does: average the centre crop, "
                          "its mirror and four corner crops (6x the work)")
    evaluate.add_argument("--top-losses", type=int, default=EvalConfig.top_losses, help="mistakes in the gallery")
    evaluate.add_argument("--workers", type=int, default=EvalConfig.workers, help="decoding processes (default: one per core)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=cmd_evaluate)

    compare = verbs.add_parser("compare", help="evaluated runs side by side (csv, markdown, html)")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="two or more evaluated run directories on the same split")
    compare.add_argument("--out", default="comparison", help="folder for comparison.csv/.md/.html (default %(default)s)")
    compare.set_defaults(run=cmd_compare)

    explain = verbs.add_parser("explain", help="Grad-CAM heat maps: what the model looks at")
    explain.add_argument("model", help="a run directory (Grad-CAM needs the PyTorch weights, not an export)")
    explain.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    explain.add_argument("--method", choices=["gradcam", "gradcam++", "hirescam", "eigencam", "scorecam"],
                         default=ExplainConfig.method, help="default %(default)s")
    explain.add_argument("--class", dest="target", metavar="LABEL", help="explain this class (default: the top prediction)")
    explain.add_argument("--layer", help="target layer by module name (default: the last feature map before pooling)")
    explain.add_argument("--out", default="explanations", help="folder for the PNGs (default %(default)s)")
    explain.add_argument("--grid", action="store_true", help="one gallery image (grid.<method>.png) instead of one PNG per image")
    explain.add_argument("--top-k", type=int, default=ExplainConfig.top_k, help="predictions shown (default %(default)s)")
    explain.add_argument("--faithfulness", action="store_true",
                         help="also measure deletion/insertion scores (about 40 extra forward passes per image)")
    explain.set_defaults(run=cmd_explain)
    _deploy_verbs(verbs)
    _serve_verb(verbs)
    _ensemble_verbs(verbs)
    return parser


def _train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--out", help="run directory (default: runs/<data>-<model>, numbered if taken)")
    p.add_argument("--config", help="a config.yaml (e.g. from an earlier run); flags given here override it")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    m = p.add_argument_group("model")
    m.add_argument("--model", help=f"registry or timm name (default {d.model})")
    m.add_argument("--weights", help="backbone weights file (safetensors or a PyTorch state dict)")
    m.add_argument("--from-scratch", action="store_true", default=None, help="random initialisation, no pretrained weights")
    m.add_argument("--download", action="store_true", default=None, help="let timm download weights from its hub")
    r = p.add_argument_group("recipe")
    r.add_argument("--full-finetune", action="store_true", default=None, help="train every layer on fresh augmentations (GPU)")
    r.add_argument("--views", type=int, help=f"augmented views cached per image (default {d.views})")
    r.add_argument("--trainable-stages", type=int, help=f"top backbone stages fine-tuned in phase 2 (default {d.trainable_stages})")
    r.add_argument("--head-epochs", type=int, help=f"phase 1 epochs (default {d.head_epochs})")
    r.add_argument("--epochs", type=int, dest="finetune_epochs", help=f"phase 2 / full fine-tune epochs (default {d.finetune_epochs})")
    r.add_argument("--head-lr", type=float, help=f"default {d.head_lr}")
    r.add_argument("--lr", type=float, dest="finetune_lr", help=f"phase 2 / full fine-tune learning rate (default {d.finetune_lr})")
    r.add_argument("--feature-mixup", type=float, help="phase 2: mixup of cached activations, Beta alpha (default off)")
    r.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    r.add_argument("--schedule", choices=["cosine", "onecycle", "plateau"], help=f"default {d.schedule}")
    r.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    r.add_argument("--label-smoothing", type=float, help=f"default {d.label_smoothing}")
    r.add_argument("--dropout", type=float, help=f"default {d.dropout}")
    r.add_argument("--balance", choices=["none", "weights", "sampler"], help="for imbalanced data: class-weighted loss or balanced batches")
    r.add_argument("--early-stopping", type=int, help="stop after this many epochs without a better validation score")
    r.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], help="mixed precision on CUDA (default auto)")
    r.add_argument("--seed", type=int, help=f"drives the split, augmentations and initialisation (default {d.seed})")
    r.add_argument("--deterministic", action="store_true", default=None, help="deterministic kernels where torch has them")
    a = p.add_argument_group("augmentation (full fine-tune)")
    a.add_argument("--randaugment", action="store_true", default=None)
    a.add_argument("--mixup", type=float, help="Beta alpha, e.g. 0.2")
    a.add_argument("--cutmix", type=float, help="Beta alpha, e.g. 1.0")
    s = p.add_argument_group("split (when the data has none)")
    s.add_argument("--val", type=float)
    s.add_argument("--test", type=float)
    s.add_argument("--workers", type=int, help="processes for decoding (default: one per core)")
    p.add_argument("--cache-dir", help="keep cached views here to reuse across runs (default: inside the run, deleted at the end)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false", default=None,
                   help="skip the final evaluation (report.html, plots, MODEL_CARD.md)")


_TRAIN_FLAGS = ("model", "weights", "from_scratch", "download", "full_finetune", "views", "trainable_stages",
                "head_epochs", "finetune_epochs", "feature_mixup", "head_lr", "finetune_lr", "batch_size", "schedule", "weight_decay",
                "label_smoothing", "dropout", "balance", "early_stopping", "amp", "seed", "deterministic", "val", "test",
                "workers", "cache_dir", "evaluate")


def _train_settings(args: argparse.Namespace) -> tuple[TrainConfig | None, dict]:
    """(the --config base, the TrainConfig fields the flags set) for `train` and `distill`."""
    import dataclasses

    from visiontune.config import load_yaml

    base = None
    if args.config:
        from visiontune.training.run_dir import read_config

        config_path = Path(args.config)
        _, _, base = read_config(config_path.parent) if config_path.name == "config.yaml" else (None, None, load_yaml(TrainConfig, config_path))
    settings = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    augment = {k: getattr(args, k) for k in ("randaugment", "mixup", "cutmix") if getattr(args, k) is not None}
    if augment:
        settings["augment"] = dataclasses.replace((base or TrainConfig()).augment, **augment)
    if "workers" in settings:
        settings["scan"] = dataclasses.replace((base or TrainConfig()).scan, workers=settings.pop("workers"))
    return base, settings


def _report_training(result, extra: str = "") -> int:
    m = result.metrics
    if not m:  # a process other than rank 0 of a distributed run: rank 0 reports
        return 0
    val = m.get("val", {}).get("top1")
    test = (m.get("evaluation") or m.get("test") or {}).get("top1")
    line = f"run: {result.run_dir}  ({m['train_seconds']:.0f} s{extra})"
    if val is not None:
        line += f"  val top-1 {val:.2%}"
    if test is not None:
        line += f"  test top-1 {test:.2%}"
    print(line)
    if result.evaluation is not None:
        print(f"report: {result.evaluation.report}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from visiontune.api import train

    base, settings = _train_settings(args)
    if args.resume and (args.data or settings):
        raise ConfigError("--resume continues a run with its own data and settings; give no others")
    if not args.resume and not args.data:
        raise ConfigError("train needs a dataset (or --resume RUN)")
    model = settings.pop("model", (base or TrainConfig()).model)
    result = train(args.data, out=args.out, model=model, root=args.root, config=base, quiet=args.quiet,
                   overwrite=args.overwrite, resume=args.resume, **settings)
    return _report_training(result)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from visiontune.api import evaluate

    result = evaluate(args.run_dir, data=args.data, root=args.root, split=args.split, out=args.out,
                      allow_subset=args.allow_subset, quiet=args.quiet, calibrate=args.calibrate,
                      backend=args.backend, top_losses=args.top_losses, workers=args.workers, tta=args.tta)
    m = result.metrics
    line = f"{m['split']}: {m['images']} images  top-1 {m['top1']:.2%}"
    for k in (3, 5):
        if f"top{k}" in m:
            line += f"  top-{k} {m[f'top{k}']:.2%}"
    line += f"  macro F1 {m['macro']['f1']:.2%}  ECE {m['ece']:.3f}"
    print(line)
    for pair in m["most_confused"][:3]:
        print(f"  confused: {pair['true']} -> {pair['predicted']} ({pair['count']})")
    for item in m["skipped"]:
        print(f"not scored: {item['path']}: {item['reason']}", file=sys.stderr)
    print(f"report: {result.report}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from visiontune.api import explain

    result = explain(args.model, args.images, method=args.method, target=args.target, layer=args.layer, out=args.out,
                     grid=args.grid, top_k=args.top_k, faithfulness=args.faithfulness)
    for source, reason in result.failed:
        print(f"not explained: {source}: {reason}", file=sys.stderr)
    for e, row in zip(result.explanations, result.per_image or [None] * len(result.explanations)):
        label, p = e.predictions[0]
        line = f"{e.source}: {label} {p:.1%}  ({e.method} for '{e.target}' at {e.layer})"
        if row:
            line += f"  deletion {row['deletion']:.3f}  insertion {row['insertion']:.3f}"
        print(line)
    if result.faithfulness:
        f = result.faithfulness
        print(f"faithfulness over {f['images']} images: deletion {f['deletion']:.3f} (random {f['random_deletion']:.3f}), "
              f"insertion {f['insertion']:.3f} (random {f['random_insertion']:.3f})")
    for path in result.files:
        print(f"wrote {path}")
    if not result.explanations:
        print("visiontune: error: no image could be explained", file=sys.stderr)
        return 2
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from visiontune.api import compare

    result = compare(args.runs, out=args.out)
    print(result.files[1].read_text(), end="")
    print(f"wrote {', '.join(str(f) for f in result.files)}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from visiontune.api import scan
    from visiontune.data.scan_text import render_scan

    report = scan(args.data, root=args.root, config=_scan_config(args), quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render_scan(report))
    if report.unusable_reason:
        print(f"visiontune: error: {report.unusable_reason}", file=sys.stderr)
        return 2
    if args.strict and any(f.level == "error" for f in report.findings):
        return 1
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from visiontune.api import split

    result, report = split(args.data, val=args.val, test=args.test, seed=args.seed, min_per_split=args.min_per_split,
                           out=args.out, root=args.root, check=not args.no_check, scan_config=_scan_config(args),
                           quiet=args.quiet)
    log = sys.stderr
    if report is not None:
        for path, reason in report.skipped():
            print(f"left out: {path}: {reason}", file=log)
    if args.out is None:
        result.write_csv(sys.stdout, relative_to=None)
    if not args.quiet:
        counts = result.counts()
        totals = {s: sum(row[s] for row in counts.values()) for s in ("train", "val", "test")}
        print(f"split: train {totals['train']}, val {totals['val']}, test {totals['test']} "
              f"over {len(counts)} classes (seed {args.seed})", file=log)
        for note in result.notes:
            print(f"note: {note}", file=log)
        if args.out:
            print(f"wrote {args.out}", file=log)
    return 0



# --- export, predict, bench ---------------------------------------------------------------------------------


def _deploy_verbs(verbs) -> None:
    from visiontune.config import BenchConfig, ExportConfig, InferenceConfig

    export = verbs.add_parser("export", help="write RUN/export/model.onnx (fp32, fp16, int8) or TorchScript, checked against PyTorch")
    export.add_argument("run_dir", metavar="RUN", help="a run directory")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="default %(default)s")
    export.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                        help="int8: static quantization calibrated on the run's training images (default %(default)s)")
    export.add_argument("--int8-agreement", type=float, default=ExportConfig.int8_agreement,
                        help="INT8 must pick fp32's top-1 class on at least this fraction of test images (default %(default)s)")
    export.add_argument("--calibration-images", type=int, default=ExportConfig.calibration_images,
                        help="training images INT8 calibration sees (default %(default)s)")
    export.add_argument("--quiet", action="store_true", help="no progress lines")
    export.set_defaults(run=cmd_export)

    predict = verbs.add_parser("predict", help="classify image files, folders (recursively) or globs")
    predict.add_argument("model", help="a run directory, a .onnx file or a TorchScript file")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    predict.add_argument("--format", choices=["table", "csv", "json", "jsonl"], default="table", help="default %(default)s")
    predict.add_argument("--out", help="write the predictions to this file instead of the terminal")
    predict.add_argument("--top-k", type=int, default=InferenceConfig.top_k, help="labels per image (default %(default)s)")
    predict.add_argument("--tta", action="store_true", help="average the centre crop, its mirror and four corner crops")
    predict.add_argument("--backend", choices=["torch", "onnx"],
                         help="engine (default: onnx for a .onnx file, torch for a run directory)")
    predict.add_argument("--batch-size", type=int, default=InferenceConfig.batch_size, help="default %(default)s")
    predict.add_argument("--threads", type=int, default=InferenceConfig.threads, help="default: one per core")
    predict.set_defaults(run=cmd_predict)

    bench = verbs.add_parser("bench", help="latency and throughput of PyTorch, ONNX fp32 and ONNX INT8 on this machine")
    bench.add_argument("model", help="a run directory (every engine it has) or one model file")
    bench.add_argument("--image", help="JPEG for the end-to-end timing (default: a sample photo)")
    bench.add_argument("--runs", type=int, default=BenchConfig.runs, help="timed batch-1 calls per engine (default %(default)s)")
    bench.add_argument("--warmup", type=int, default=BenchConfig.warmup, help="default %(default)s")
    bench.add_argument("--batch-sizes", default=",".join(map(str, BenchConfig.batch_sizes)),
                       help="throughput batch sizes (default %(default)s)")
    bench.add_argument("--seconds", type=float, default=BenchConfig.throughput_seconds,
                       help="per engine and batch size (default %(default)s)")
    bench.add_argument("--threads", type=int, default=InferenceConfig.threads, help="default: one per core")
    bench.add_argument("--json", action="store_true", help="print the full report as JSON")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")
    bench.set_defaults(run=cmd_bench)


def cmd_export(args: argparse.Namespace) -> int:
    import dataclasses

    from visiontune.api import export
    from visiontune.config import ExportConfig

    config = dataclasses.replace(ExportConfig(), calibration_images=args.calibration_images)
    result = export(args.run_dir, format=args.format, precision=args.precision, int8_agreement=args.int8_agreement,
                    config=config, quiet=args.quiet)
    print(result.summary())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import io

    from visiontune.api import predict
    from visiontune.inference import output

    if args.out:
        _refuse_input_as_output(Path(args.out), args.paths)
    results = predict(args.model, args.paths, top_k=args.top_k, tta=args.tta, backend=args.backend,
                      batch_size=args.batch_size, threads=args.threads)
    buffer = io.StringIO()
    output.write(results, buffer, args.format, args.top_k)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(buffer.getvalue())
        tmp.replace(out)
    else:
        sys.stdout.write(buffer.getvalue())
    failed = [p for p in results if p.error]
    for p in failed:
        print(f"skipped: {p.source}: {p.error}", file=sys.stderr)
    if failed and len(failed) == len(results):
        print(f"visiontune: error: none of the {len(results)} file(s) could be read as an image", file=sys.stderr)
        return 2
    if args.out:
        print(f"wrote {len(results) - len(failed)} prediction(s) to {args.out}", file=sys.stderr)
    return 0


def _refuse_input_as_output(out: Path, paths: list[str]) -> None:
    target = out.resolve()
    for p in paths:
        given = Path(p).resolve()
        if target == given or given in target.parents:
            raise ConfigError(f"--out {out}: that is one of the inputs (or inside an input folder); "
                              f"write the predictions somewhere else")


def cmd_bench(args: argparse.Namespace) -> int:
    from visiontune.api import bench

    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers, e.g. 1,4,16") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: every batch size must be at least 1")
    if args.runs < 1:
        raise ConfigError(f"--runs {args.runs}: must be at least 1")
    report = bench(args.model, image=args.image, threads=args.threads, quiet=args.quiet, runs=args.runs,
                   warmup=args.warmup, batch_sizes=sizes, throughput_seconds=args.seconds)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    m = report.machine
    print(f"{report.model}: {report.input_size} px input; JPEG {report.image} ({report.image_size[0]}x{report.image_size[1]}); "
          f"{m['cores']} cores, {m['cpu']}, onnxruntime {m['onnxruntime']}, torch {m['torch']}")
    print(report.table())
    for note in report.notes:
        print(f"note: {note}")
    return 0

# --- serve ---------------------------------------------------------------------------------------------------


def _serve_verb(verbs) -> None:
    import os

    from visiontune.config import ServeConfig

    d = ServeConfig()
    serve = verbs.add_parser("serve", help="HTTP API and web page for a run directory or an exported model")
    serve.add_argument("model", help="a run directory, a .onnx file or a TorchScript file")
    serve.add_argument("--host", default=d.host, help="address to listen on (default %(default)s: this machine only)")
    serve.add_argument("--port", type=int, default=d.port, help="default %(default)s")
    serve.add_argument("--workers", type=int, default=d.workers, help="server processes (default %(default)s)")
    serve.add_argument("--api-key", default=os.environ.get("VISIONTUNE_API_KEY", d.api_key),
                       help="require this key on /v1/* (X-API-Key or Authorization: Bearer); "
                            "default: $VISIONTUNE_API_KEY, else none")
    serve.add_argument("--backend", choices=["onnx", "torch"], default=d.backend,
                       help="engine for a run directory (default %(default)s; a model file runs on its own)")
    serve.add_argument("--precision", choices=["auto", "int8", "fp32"], default=d.precision,
                       help="ONNX file of a run directory: auto = export/model.int8.onnx if there, else "
                            "export/model.onnx, else fp32 exported in memory (default %(default)s)")
    serve.add_argument("--threads", type=int, default=d.threads, help="model threads per worker (default: cores / workers)")
    serve.add_argument("--decode-threads", type=int, default=d.decode_threads,
                       help="image decoding threads per worker (default: one per core)")
    serve.add_argument("--max-batch", type=int, default=d.max_batch, help="images per model call (default %(default)s)")
    serve.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                       help="longest a request waits for a batch to fill (default %(default)s)")
    serve.add_argument("--queue-size", type=int, default=d.queue_size,
                       help="images in flight at once; more get 503 (default %(default)s)")
    serve.add_argument("--max-body-mb", type=float, default=d.max_body_mb, help="request body limit, MiB (default %(default)s)")
    serve.add_argument("--body-timeout", type=float, default=d.body_timeout_s, dest="body_timeout_s",
                       metavar="SECONDS",
                       help="seconds a request body may take to arrive (default %(default)s)")
    serve.add_argument("--graceful-timeout", type=int, default=d.graceful_timeout_s, dest="graceful_timeout_s",
                       metavar="SECONDS",
                       help="seconds in-flight requests get to finish on SIGTERM (default %(default)s)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=d.log_level)
    serve.set_defaults(run=cmd_serve)


_SERVE_FLAGS = ("host", "port", "workers", "api_key", "backend", "precision", "threads", "decode_threads", "max_batch",
                "max_wait_ms", "queue_size", "max_body_mb", "body_timeout_s", "graceful_timeout_s", "log_level")


def cmd_serve(args: argparse.Namespace) -> int:
    from visiontune.api import serve

    serve(args.model, **{k: getattr(args, k) for k in _SERVE_FLAGS})
    return 0


# --- ensemble, distill -------------------------------------------------------------------------------------


def _ensemble_verbs(verbs) -> None:
    from visiontune.config import DistillConfig, EnsembleConfig

    ens = verbs.add_parser("ensemble", help="soft voting over runs trained on the same labels and split: an ensemble "
                                            "directory usable wherever a run is")
    ens.add_argument("runs", nargs="+", metavar="RUN", help="two or more run (or ensemble) directories")
    ens.add_argument("--out", required=True, help="the ensemble directory to write")
    ens.add_argument("--weights", default=EnsembleConfig.weights,
                     help="equal, fit (minimum validation log loss), or one number per run: w1,w2,… (default %(default)s)")
    ens.add_argument("--backend", choices=["onnx", "torch"], default=EnsembleConfig.backend,
                     help="engine scoring the members while building and evaluating (default %(default)s)")
    ens.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                     help="skip scoring the test split (report.html, metrics.json)")
    ens.add_argument("--overwrite", action="store_true", help="replace an ensemble already in --out")
    ens.add_argument("--quiet", action="store_true", help="no progress bars")
    ens.set_defaults(run=cmd_ensemble)

    dis = verbs.add_parser("distill", help="train a student against a teacher run or ensemble (knowledge distillation), "
                                           "with the same fast recipe as train")
    _data_argument(dis)
    dis.add_argument("--teacher", required=True, help="a run or ensemble directory")
    dis.add_argument("--student", help=f"the student's model, same names as train --model (default {TrainConfig.model})")
    dis.add_argument("--alpha", type=float, default=DistillConfig.alpha,
                     help="weight of the KL-to-teacher term; 1 - alpha weighs the label loss (default %(default)s)")
    dis.add_argument("--temperature", type=float, default=DistillConfig.temperature,
                     help="softens teacher and student distributions in the KL term (default %(default)s)")
    _train_arguments(dis)
    dis.set_defaults(run=cmd_distill)


def cmd_ensemble(args: argparse.Namespace) -> int:
    from visiontune.api import ensemble

    result = ensemble(args.runs, out=args.out, weights=args.weights, backend=args.backend, evaluate=args.evaluate,
                      overwrite=args.overwrite, quiet=args.quiet)
    m = result.metrics
    weights = ", ".join(f"{member['path']} {member['weight']:.3f}" for member in m["members"])
    print(f"ensemble: {result.out_dir}  weights ({result.weights_from}): {weights}")
    for member in m["members"]:
        if "val" in member:
            print(f"  val top-1 {member['val']['top1']:.2%}  log loss {member['val']['loss']:.4f}  {member['path']}")
    if "val" in m:
        print(f"  val top-1 {m['val']['top1']:.2%}  log loss {m['val']['loss']:.4f}  ensemble")
    if result.evaluation is not None:
        e = result.evaluation.metrics
        print(f"test top-1 {e['top1']:.2%}  macro F1 {e['macro']['f1']:.2%}  ECE {e['ece']:.3f}")
        print(f"report: {result.evaluation.report}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from visiontune.api import distill

    if args.student and args.model and args.student != args.model:
        raise ConfigError(f"--student {args.student} and --model {args.model}: give one of them")
    base, settings = _train_settings(args)
    student = args.student or settings.pop("model", None) or (base or TrainConfig()).model
    settings.pop("model", None)
    result = distill(args.data, teacher=args.teacher, student=student, alpha=args.alpha, temperature=args.temperature,
                     out=args.out, root=args.root, config=base, quiet=args.quiet, overwrite=args.overwrite, **settings)
    return _report_training(result, f", teacher {args.teacher}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VisiontuneError as exc:
        print(f"visiontune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("visiontune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
