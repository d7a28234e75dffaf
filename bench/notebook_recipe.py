"""The usual notebook recipe, as a baseline for visiontune's default: plain PyTorch, same backbone and weights.

Modelled on the Keras "Transfer learning and fine-tuning" tutorial (MobileNetV2 on cats vs dogs):

  phase 1  the whole backbone frozen (BatchNorm in inference mode), train the head
           (global pool -> dropout 0.2 -> linear) with Adam at 1e-3 for --epochs1 epochs;
  phase 2  unfreeze the top of the backbone (the last --unfreeze-blocks of EfficientNet's blocks,
           plus conv_head/bn2) and fine-tune it with the head at a 10x lower rate (1e-4) for --epochs2 epochs.

Every epoch runs the full network forward on every training image, with on-the-fly augmentation
(RandomResizedCrop, horizontal flip, small rotation) from a torch DataLoader: no caching of any kind.
BatchNorm layers of the frozen part stay in eval mode; so do those of the unfrozen top, as in the
tutorial (`base_model(x, training=False)`), unless --bn-train is given.

After every epoch the script evaluates validation and test accuracy and records the elapsed time, so
"time to reach the best accuracy" can be read off and set against `visiontune train`:

  bench/notebook_recipe.py --split ../shared/datasets/flower_photos/split.csv --out bench/results/notebook.json

`elapsed_s` is the recipe's own time since the script started (setup + training + the per-epoch
validation a notebook runs anyway); the test-set evaluation is measurement only and is excluded from it
(`wall_s` includes it). The only visiontune call is build_classifier, for the identical backbone, weights
and head; the preprocessing constants (input size, resize, mean/std) come from the same registry entry.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before the heavy imports: the baseline is charged for its whole start-up too

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.datasets.folder import default_loader  # noqa: E402

from visiontune.models import build_classifier  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

DEFAULT_SPLIT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos" / "split.csv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--split", type=Path, default=DEFAULT_SPLIT,
                   help="CSV with path,label,split (train/val/test); paths relative to the CSV's folder")
    p.add_argument("--model", default="efficientnet_lite0", help="visiontune backbone name (EfficientNet family)")
    p.add_argument("--epochs1", type=int, default=10, help="phase 1 epochs: frozen backbone, head only")
    p.add_argument("--epochs2", type=int, default=10, help="phase 2 epochs: top of the backbone unfrozen")
    p.add_argument("--lr1", type=float, default=1e-3, help="Adam learning rate, phase 1")
    p.add_argument("--lr2", type=float, default=1e-4, help="Adam learning rate, phase 2 (the tutorial's 10x lower)")
    p.add_argument("--unfreeze-blocks", type=int, default=3,
                   help="phase 2 trains the last N of model.blocks plus conv_head/bn2 (Lite0 has 7 blocks)")
    p.add_argument("--bn-train", action="store_true",
                   help="let BatchNorm in the unfrozen top update its statistics (default: eval, as the tutorial)")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--rotation", type=float, default=10.0, help="max rotation in degrees")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("notebook_recipe.json"), help="results JSON")
    return p.parse_args(argv)


LOADAVG = os.getloadavg() if hasattr(os, "getloadavg") else None  # other work on the machine skews timings


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class CsvImages(Dataset):
    def __init__(self, items: list[tuple[Path, int]], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.transform(default_loader(str(path))), label


def read_split(csv_path: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = sorted({r["label"] for r in rows})
    index = {name: i for i, name in enumerate(labels)}
    root = csv_path.resolve().parent
    parts: dict[str, list[tuple[Path, int]]] = {"train": [], "val": [], "test": []}
    for r in rows:
        parts[r["split"]].append((root / r["path"], index[r["label"]]))
    for name, items in parts.items():
        if not items:
            sys.exit(f"{csv_path}: no rows with split={name}")
    return labels, parts


def set_phase(model: nn.Module, trainable: list[nn.Module], bn_train: bool) -> tuple[list, list]:
    """Freeze everything but `trainable` (the classifier always among them).

    Returns (trainable parameters, BatchNorm layers allowed to update their statistics).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for module in trainable for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    bn = [m for module in trainable for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return params, (bn if bn_train else [])


def train_mode(model: nn.Module, bn_train: list[nn.Module]) -> None:
    """Training mode (the head's dropout reads model.training) with BatchNorm in eval except `bn_train`."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    for m in bn_train:
        m.train()


@torch.inference_mode()
def accuracy(model: nn.Module, loader: DataLoader) -> tuple[float, int]:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total, total


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cores = nproc()
    torch.set_num_threads(cores)
    torch.manual_seed(args.seed)

    labels, parts = read_split(args.split)
    model, spec = build_classifier(args.model, len(labels), dropout=args.dropout)
    pre = spec.preprocess
    interp = transforms.InterpolationMode(pre.interpolation)
    normalise = transforms.Normalize(pre.mean, pre.std)
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(pre.input_size, interpolation=interp),
        transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(args.rotation, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.ToTensor(),
        normalise,
    ])
    eval_tf = transforms.Compose([
        transforms.Resize(pre.resize_size, interpolation=interp),
        transforms.CenterCrop(pre.input_size),
        transforms.ToTensor(),
        normalise,
    ])
    common = dict(batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0)
    train_loader = DataLoader(CsvImages(parts["train"], train_tf), shuffle=True, drop_last=False,
                              generator=torch.Generator().manual_seed(args.seed), **common)
    val_loader = DataLoader(CsvImages(parts["val"], eval_tf), **common)
    test_loader = DataLoader(CsvImages(parts["test"], eval_tf), **common)

    head = model.get_classifier()
    top = [*model.blocks[len(model.blocks) - args.unfreeze_blocks:], model.conv_head, model.bn2, head]
    phases = [("head", args.epochs1, args.lr1, [head]), ("finetune", args.epochs2, args.lr2, top)]
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict] = []
    test_eval_s = 0.0  # measurement overhead, kept out of elapsed_s
    epoch = 0
    setup_s = time.perf_counter() - T0
    print(f"{len(labels)} classes; train {len(parts['train'])}, val {len(parts['val'])}, test {len(parts['test'])}; "
          f"{cores} threads; setup {setup_s:.1f}s", flush=True)

    for phase, epochs, lr, trainable in phases:
        params, bn_train = set_phase(model, trainable, args.bn_train)
        optimizer = torch.optim.Adam(params, lr=lr)  # a fresh optimizer per phase, as Keras' re-compile
        n_trainable = sum(p.numel() for p in params)
        for _ in range(epochs):
            epoch += 1
            train_mode(model, bn_train)
            t = time.perf_counter()
            seen = correct = 0
            loss_sum = 0.0
            for x, y in train_loader:
                logits = model(x)
                loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += len(y)
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
            train_s = time.perf_counter() - t
            t = time.perf_counter()
            val_acc, n_val = accuracy(model, val_loader)
            val_s = time.perf_counter() - t
            elapsed = time.perf_counter() - T0 - test_eval_s  # the recipe's own time, up to this epoch's val
            t = time.perf_counter()
            test_acc, n_test = accuracy(model, test_loader)
            test_s = time.perf_counter() - t
            test_eval_s += test_s
            row = {
                "epoch": epoch, "phase": phase, "lr": lr, "trainable_params": n_trainable,
                "elapsed_s": round(elapsed, 2), "wall_s": round(time.perf_counter() - T0, 2),
                "train_loss": round(loss_sum / seen, 5), "train_acc": round(correct / seen, 5),
                "val_acc": round(val_acc, 5), "test_acc": round(test_acc, 5),
                "train_s": round(train_s, 2), "val_s": round(val_s, 2), "test_s": round(test_s, 2),
                "train_images_per_s": round(seen / train_s, 2),
                "eval_images_per_s": round((n_val + n_test) / (val_s + test_s), 2),
            }
            history.append(row)
            print(f"epoch {epoch:2d} {phase:8s} loss {row['train_loss']:.4f} train {row['train_acc']:.4f} "
                  f"val {val_acc:.4f} test {test_acc:.4f} | {row['train_images_per_s']:.1f} img/s train, "
                  f"{row['eval_images_per_s']:.1f} img/s eval | elapsed {elapsed:.0f}s", flush=True)

    best = max(history, key=lambda r: (r["val_acc"], -r["epoch"]))  # first epoch reaching the best val acc
    best_test = max(history, key=lambda r: (r["test_acc"], -r["epoch"]))
    result = {
        "recipe": "notebook (Keras transfer-learning tutorial style), plain PyTorch",
        "command": [sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"nproc": cores, "cpu_model": cpu_model(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_at_start": LOADAVG},
        "model": {"name": args.model, "timm_name": spec.timm_name, "preprocess": pre.to_dict(),
                  "unfreeze_blocks": args.unfreeze_blocks, "bn_train": args.bn_train},
        "data": {"split": str(args.split), "classes": labels, **{k: len(v) for k, v in parts.items()}},
        "setup_s": round(setup_s, 2),
        "total_s": round(time.perf_counter() - T0 - test_eval_s, 2),
        "total_wall_s": round(time.perf_counter() - T0, 2),
        "best_val": {"epoch": best["epoch"], "val_acc": best["val_acc"], "test_acc": best["test_acc"],
                     "elapsed_s": best["elapsed_s"]},
        "best_test": {"epoch": best_test["epoch"], "test_acc": best_test["test_acc"],
                      "elapsed_s": best_test["elapsed_s"]},
        "history": history,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"best val {best['val_acc']:.4f} (test {best['test_acc']:.4f}) at epoch {best['epoch']}, "
          f"{best['elapsed_s']:.0f}s; total {result['total_s']:.0f}s -> {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
