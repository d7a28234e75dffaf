"""`visiontune <verb>`: parses arguments, calls the Python API, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from visiontune.config import ScanConfig, SplitConfig, TrainConfig
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


_TRAIN_FLAGS = ("model", "weights", "from_scratch", "download", "full_finetune", "views", "trainable_stages",
                "head_epochs", "finetune_epochs", "feature_mixup", "head_lr", "finetune_lr", "batch_size", "schedule", "weight_decay",
                "label_smoothing", "dropout", "balance", "early_stopping", "amp", "seed", "deterministic", "val", "test",
                "workers", "cache_dir")


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from visiontune.api import train
    from visiontune.config import load_yaml

    base = None
    if args.config:
        from visiontune.training.run_dir import read_config

        config_path = Path(args.config)
        _, _, base = read_config(config_path.parent) if config_path.name == "config.yaml" else (None, None, load_yaml(TrainConfig, config_path))
    settings = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    augment = {k: getattr(args, k) for k in ("randaugment", "mixup", "cutmix") if getattr(args, k) is not None}
    if augment:
        current = (base or TrainConfig()).augment
        settings["augment"] = dataclasses.replace(current, **augment)
    if "workers" in settings:
        settings["scan"] = dataclasses.replace((base or TrainConfig()).scan, workers=settings.pop("workers"))
    if args.resume and (args.data or settings):
        raise ConfigError("--resume continues a run with its own data and settings; give no others")
    if not args.resume and not args.data:
        raise ConfigError("train needs a dataset (or --resume RUN)")
    model = settings.pop("model", (base or TrainConfig()).model)
    result = train(args.data, out=args.out, model=model, root=args.root, config=base, quiet=args.quiet,
                   overwrite=args.overwrite, resume=args.resume, **settings)
    m = result.metrics
    if not m:  # a process other than rank 0 of a distributed run: rank 0 reports
        return 0
    val = m.get("val", {}).get("top1")
    test = m.get("test", {}).get("top1")
    line = f"run: {result.run_dir}  ({m['train_seconds']:.0f} s)"
    if val is not None:
        line += f"  val top-1 {val:.2%}"
    if test is not None:
        line += f"  test top-1 {test:.2%}"
    print(line)
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
