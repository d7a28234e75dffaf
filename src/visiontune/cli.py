"""`visiontune <verb>`: parses arguments, calls the Python API, prints. No logic of its own. Settings flags come from
the `config` package (`cli_settings.add_settings`); the arguments declared here say what to work on and where output goes.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from visiontune import config as c
from visiontune.cli_settings import EXPORT_ONLY, Parser, add_settings, flag_of, overrides, tracked
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.settings import SettingError
from visiontune.version import __version__

DATA_HELP = "class folders, split folders, a CSV manifest (path,label[,split]), or an embedded sample name (flowers-mini)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="visiontune", description="Transfer-learning image classification, fast on a CPU.")
    parser.add_argument("--version", action="version", version=f"visiontune {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str, run, settings: type | None = None, **kwargs) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        p.set_defaults(run=run, settings=settings)
        if settings is not None:
            add_settings(p, settings, **kwargs)
        return p

    scan = verb("scan", "check a dataset's files, classes and duplicates; never changes a file", cmd_scan, c.ScanConfig)
    _data(scan)
    _quiet(scan)
    scan.add_argument("--json", action="store_true", help="print the full report as JSON")
    scan.add_argument("--strict", action="store_true", help="exit 1 when there are error-level findings (e.g. leakage)")

    split = verb("split", "stratified train/val/test split, written as path,label,split", cmd_split, c.DataConfig)
    _data(split)
    _quiet(split)
    split.add_argument("--out", help="CSV to write (paths relative to its folder); default: standard output")
    split.add_argument("--no-check", action="store_true", help="skip decoding every image (bad files then stay in)")

    doctor = verb("doctor", "likely mislabelled images, outliers and duplicates labelled differently, from out-of-fold "
                            "predictions on pretrained features; never changes a file", cmd_doctor, c.DoctorConfig)
    _data(doctor)
    doctor.add_argument("--out", help="folder for issues.csv/.json/.html and fixed_manifest.csv (default: "
                                      "doctor/<data>-<model>, numbered if taken)")
    doctor.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    doctor.add_argument("--json", action="store_true", help="print issues.json instead of the table")
    _quiet(doctor)

    train = verb("train", "train a classifier and write a run directory", cmd_train, c.TrainConfig,
                 skip=("split.seed", "distill"), tracked=EXPORT_ONLY)
    _data(train, optional=True)
    train.add_argument("--resume", metavar="RUN", help="continue an interrupted run (its data and settings)")
    _run_output(train)

    distill = verb("distill", "train a student against a teacher run or ensemble (knowledge distillation), with "
                              "the same fast recipe as train", cmd_distill, c.TrainConfig,
                   skip=("split.seed", "distill.teacher"), extra_flags={"model": ["--student"]}, tracked=EXPORT_ONLY)
    _data(distill)
    distill.add_argument("--teacher", required=True, help="a run or ensemble directory")
    _run_output(distill)

    evaluate = verb("evaluate", "score a run: metrics.json, plots/, report.html, MODEL_CARD.md", cmd_evaluate,
                    c.EvalConfig, tracked=EXPORT_ONLY)
    evaluate.add_argument("run_dir", metavar="RUN", help="a run directory")
    evaluate.add_argument("--data", help="score on this dataset instead of the run's own split.csv (any layout)")
    evaluate.add_argument("--root", help="folder a manifest's relative paths start from")
    evaluate.add_argument("--out", help="where to write (default: the run, or RUN/evaluations/<data>-<split> for --data)")
    evaluate.add_argument("--allow-subset", action="store_true", help="data may lack some of the model's classes")
    _quiet(evaluate)

    compare = verb("compare", "evaluated runs side by side (csv, markdown, html)", cmd_compare)
    compare.add_argument("runs", nargs="+", metavar="RUN", help="two or more evaluated run directories on the same split")
    compare.add_argument("--out", help="folder for comparison.csv/.md/.html (default ./comparison)")

    explain = verb("explain", "Grad-CAM heat maps: what the model looks at", cmd_explain, c.ExplainConfig)
    explain.add_argument("model", help="a run directory (Grad-CAM needs the PyTorch weights, not an export)")
    explain.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    explain.add_argument("--class", dest="target", metavar="LABEL", help="explain this class (default: the top prediction)")
    explain.add_argument("--out", default="explanations", help="folder for the PNGs (default %(default)s)")
    explain.add_argument("--grid", action="store_true", help="one gallery image (grid.<method>.png) instead of one PNG per image")

    export = verb("export", "write RUN/export/: ONNX, OpenVINO, TFLite or TorchScript, checked against PyTorch",
                  cmd_export, c.ExportConfig, tracked=())
    export.add_argument("run_dir", metavar="RUN", help="a run directory")
    _quiet(export)

    from visiontune.inference.output import FORMATS

    predict = verb("predict", "classify image files, folders (recursively) or globs", cmd_predict, c.InferenceConfig)
    predict.add_argument("model", help="a run or ensemble directory, a model file, models:/NAME/VERSION or models:/NAME@alias")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    predict.add_argument("--format", choices=FORMATS, default=FORMATS[0], help="default %(default)s")
    predict.add_argument("--out", help="write the predictions to this file instead of the terminal")
    predict.add_argument("--shards", metavar="DIR", help="write resumable Parquet/CSV shards into DIR (see README)")
    predict.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="with --shards: on a Ray cluster")
    _quiet(predict)

    bench = verb("bench", "latency and throughput of a model's engines (PyTorch, ONNX, OpenVINO) here", cmd_bench,
                 c.BenchConfig)
    bench.add_argument("model", help="a run directory (every engine it has), one model file or models:/NAME/VERSION")
    bench.add_argument("--image", help="JPEG for the end-to-end timing (default: a sample photo)")
    bench.add_argument("--json", action="store_true", help="print the full report as JSON")
    _quiet(bench)

    serve = verb("serve", "HTTP API and web page for a run directory or an exported model", cmd_serve, c.ServeConfig)
    serve.add_argument("model", help="a run or ensemble directory, a model file, models:/NAME/VERSION or models:/NAME@alias")

    ens = verb("ensemble", "soft voting over runs trained on the same labels and split: an ensemble directory usable "
                           "wherever a run is", cmd_ensemble, c.EnsembleConfig, tracked=EXPORT_ONLY)
    ens.add_argument("runs", nargs="+", metavar="RUN", help="two or more run (or ensemble) directories")
    ens.add_argument("--out", required=True, help="the ensemble directory to write")
    ens.add_argument("--overwrite", action="store_true", help="replace an ensemble already in --out")
    _quiet(ens)

    track = verb("track", "send a finished run, ensemble or evaluation folder to MLflow now (e.g. after its server "
                          "was down)", cmd_track, c.TrackConfig, skip=("track", *EXPORT_ONLY))
    track.add_argument("folder", metavar="RUN", help="a run, ensemble or evaluation folder")
    return parser


def _data(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("data", nargs="?" if optional else None, help=DATA_HELP)
    p.add_argument("--root", help="folder a manifest's relative paths start from (default: the manifest's folder)")


def _quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or lines")


def _run_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run directory (default: runs/<data>-<model>, numbered if taken)")
    p.add_argument("--config", help="a config.yaml (e.g. from an earlier run); flags given here override it")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    _quiet(p)


# --- data ---------------------------------------------------------------------------------------------------


def cmd_scan(args: argparse.Namespace) -> int:
    from visiontune.api import scan
    from visiontune.data.scan_text import render_scan

    report = scan(args.data, root=args.root, quiet=args.quiet or args.json, **overrides(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else render_scan(report))
    if report.unusable_reason:
        print(f"visiontune: error: {report.unusable_reason}", file=sys.stderr)
        return 2
    if args.strict and any(f.level == "error" for f in report.findings):
        return 1
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from visiontune.api import split

    cfg = c.override(c.DataConfig(), **overrides(args))
    result, report = split(args.data, out=args.out, root=args.root, check=not args.no_check, config=cfg,
                           quiet=args.quiet)
    log = sys.stderr
    if report is not None:
        for path, reason in report.skipped():
            print(f"left out: {path}: {reason}", file=log)
    if args.out is None:
        result.write_csv(sys.stdout, relative_to=None)
    if not args.quiet:
        counts = result.counts()
        totals = {s: sum(row[s] for row in counts.values()) for s in c.SPLITS}
        print(f"split: train {totals['train']}, val {totals['val']}, test {totals['test']} "
              f"over {len(counts)} classes (seed {cfg.split.seed})", file=log)
        for note in result.notes:
            print(f"note: {note}", file=log)
        if args.out:
            print(f"wrote {args.out}", file=log)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from visiontune.api import doctor

    result = doctor(args.data, out=args.out, root=args.root, overwrite=args.overwrite, quiet=args.quiet or args.json,
                    **overrides(args))
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


# --- train, distill, ensemble -------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from visiontune.api import train

    result = train(args.data, out=args.out, root=args.root, resume=args.resume, overwrite=args.overwrite,
                   config=args.config, quiet=args.quiet, track=tracked(args), **overrides(args))
    return _report_training(result)


def cmd_distill(args: argparse.Namespace) -> int:
    from visiontune.api import distill

    result = distill(args.data, teacher=args.teacher, out=args.out, root=args.root, overwrite=args.overwrite,
                     config=args.config, quiet=args.quiet, track=tracked(args), **overrides(args))
    return _report_training(result, f", teacher {args.teacher}")


def _report_training(result, extra: str = "") -> int:
    from visiontune.evaluation.intervals import describe
    from visiontune.training.budget import describe_time

    m = result.metrics
    if not m:  # a process other than rank 0 of a distributed run: rank 0 reports
        return 0
    val = m.get("val", {}).get("top1")
    scored = m.get("evaluation") or {}
    test = (scored or m.get("test") or {}).get("top1")
    line = f"run: {result.run_dir}  ({describe_time(m)}{extra})"
    if val is not None:
        line += f"  val top-1 {val:.2%}"
    if test is not None:
        line += f"  test top-1 {describe(test, scored.get('intervals', {}).get('top1'), scored.get('images', 0))}"
    if scored.get("task") == "multilabel":
        line += f"  test mAP {scored['mAP']:.3f}  micro F1 {scored['micro_f1']:.3f}"
    print(line)
    if result.evaluation is not None:
        print(f"report: {result.evaluation.report}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from visiontune.api import ensemble
    from visiontune.evaluation.intervals import describe

    result = ensemble(args.runs, out=args.out, overwrite=args.overwrite, quiet=args.quiet, track=tracked(args), **overrides(args))
    m = result.metrics
    weights = ", ".join(f"{member['path']} {member['weight']:.3f}" for member in m["members"])
    print(f"ensemble: {result.out_dir}  weights ({result.weights_from}): {weights}")
    for member in m["members"]:  # with its run's own figure: inside the ensemble it is fed another crop
        if "val" in member:
            own = member["val"].get("run_top1")
            print(f"  val top-1 {member['val']['top1']:.2%}{'' if own is None else f' (its run: {own:.2%})'}  "
                  f"log loss {member['val']['loss']:.4f}  {member['path']}")
    if "val" in m:
        print(f"  val top-1 {m['val']['top1']:.2%}  log loss {m['val']['loss']:.4f}  ensemble")
    if result.evaluation is not None:  # the test score with its interval, as train's line has it
        e = result.evaluation.metrics
        print(f"test top-1 {describe(e['top1'], e.get('intervals', {}).get('top1'), e['images'])}  macro F1 "
              f"{e['macro']['f1']:.2%}  ECE {e['ece']:.3f}\nreport: {result.evaluation.report}")
    return 0


# --- evaluate, compare, explain -----------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    from visiontune.api import evaluate
    from visiontune.evaluation.intervals import describe, span
    from visiontune.evaluation.multilabel import summary_line
    from visiontune.evaluation.open_set import summary as open_set_summary

    result = evaluate(args.run_dir, data=args.data, root=args.root, out=args.out, allow_subset=args.allow_subset,
                      quiet=args.quiet, track=tracked(args), **overrides(args))
    m = result.metrics
    ci = m.get("intervals", {})
    if m.get("task") == "multilabel":
        print(summary_line(m))
    else:
        line = f"{m['split']}: top-1 {describe(m['top1'], ci.get('top1'), m['images'])}"
        line += "".join(f"  top-{k} {m[f'top{k}']:.2%}" for k in (3, 5) if f"top{k}" in m)
        f1 = ci.get("macro_f1")
        line += f"  macro F1 {m['macro']['f1']:.2%}" + (f" ({span(f1)})" if f1 else "")
        print(line + f"  ECE {m['ece']:.3f}")
    for pair in m.get("most_confused", [])[:3]:
        print(f"  confused: {pair['true']} -> {pair['predicted']} ({pair['count']})")
    if unknown := open_set_summary(m):
        print(f"  {unknown}")
    for item in m["skipped"]:
        print(f"not scored: {item['path']}: {item['reason']}", file=sys.stderr)
    for note in m.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(f"report: {result.report}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from visiontune.api import compare

    result = compare(args.runs, out=args.out)
    print(result.files[1].read_text(), end="")
    print(f"wrote {', '.join(str(f) for f in result.files)}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from visiontune.api import explain

    result = explain(args.model, args.images, target=args.target, out=args.out, grid=args.grid, **overrides(args))
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


# --- export, predict, bench, serve --------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from visiontune.api import export

    print(export(args.run_dir, quiet=args.quiet, track=tracked(args), **overrides(args)).summary())
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from visiontune.api import track

    print(track(args.folder, **overrides(args)).summary())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from visiontune.api import predict, predict_shards
    from visiontune.files import refuse_output_over_inputs
    from visiontune.inference import output

    cfg = c.override(c.InferenceConfig(), **overrides(args))  # checked before any output file is considered
    if args.shards or args.ray is not None:  # a folder of shards, where --out is one file of predictions
        if not args.shards or args.out:
            raise ConfigError("--out and --shards: give one" if args.out else "--ray writes shards: give --shards DIR")
        print(predict_shards(args.model, args.paths, args.shards, ray=args.ray, config=cfg, quiet=args.quiet).summary())
        return 0
    if args.out:  # the model too: `--out RUN/model.json` once destroyed the run it read
        refuse_output_over_inputs(args.out, [args.model, *args.paths], folder=False, what="write the predictions")
    return output.emit(predict(args.model, args.paths, config=cfg), args.out, args.format, cfg.top_k)


def cmd_bench(args: argparse.Namespace) -> int:
    from visiontune.api import bench

    report = bench(args.model, image=args.image, quiet=args.quiet, **overrides(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from visiontune.serve import serve

    serve(args.model, **overrides(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C, so temporaries are removed on the way out; Python
    # would otherwise die at once and leave them. `serve` puts its own graceful handler in place of this one.
    if threading.current_thread() is threading.main_thread():  # the only thread a handler can be set from
        signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    try:
        return args.run(args)
    except SettingError as exc:  # named by its flag: that is what the user typed
        print(f"visiontune: error: {flag_of(args.settings, exc.name) or exc.name}: {exc.problem}", file=sys.stderr)
        return exc.exit_code
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
