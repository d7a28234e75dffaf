"""One row per epoch: history.csv (rewritten whole, atomically), TensorBoard, and a line on stderr."""

from __future__ import annotations

import csv
import io
import sys
import types

from visiontune.files import atomic_write_text
from visiontune.models.run_dir import HISTORY_COLUMNS, RunDir


class History:
    def __init__(self, run: RunDir, quiet: bool, rows: list[dict] | None = None, write: bool = True):
        self.run = run
        self.quiet = quiet
        self.write = write  # False on every process but rank 0 of a distributed run
        self.rows: list[dict] = list(rows or [])
        self._writer = None

    def _tensorboard(self):
        if self._writer is None:
            # TensorBoard imports TensorFlow when it is installed (the tflite extra brings it), which cost 6 s and
            # a screen of C++ notes at the first epoch; its event writer needs only TensorBoard's own stub, and
            # this module name is TensorBoard's switch for it.
            sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run.tensorboard))
        return self._writer

    def add(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in HISTORY_COLUMNS}
        self.rows.append(row)
        if not self.write:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.run.history, buffer.getvalue())
        step = len(self.rows)
        tb = self._tensorboard()
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            if isinstance(row[key], (int, float)):
                tb.add_scalar(f"{key.replace('_', '/', 1)}", row[key], step)
        tb.flush()
        if not self.quiet:
            print(f"{row['phase']:>8} epoch {row['epoch']:>3}  loss {_fmt(row['train_loss'])}  acc {_fmt(row['train_acc'])}"
                  f"  val_loss {_fmt(row['val_loss'])}  val_acc {_fmt(row['val_acc'])}  {_fmt(row['images_per_s'], 0)} img/s",
                  file=sys.stderr)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"
